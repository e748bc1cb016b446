"""Plain values that cross from the web side to the engine: one bounded schema for generation
options, shared by the websocket, the HTTP APIs, the CLI and the worker."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

StopString = Annotated[str, StringConstraints(min_length=1, max_length=64)]


class GenerationParams(BaseModel):
    """Sampling and length options of one generation. Bounds reject nonsense early."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float = Field(0.7, ge=0.0, le=2.0, description="0 is greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=1000, description="0 turns top-k off")
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, ge=0.5, le=2.0, description="1 turns it off")
    max_tokens: int = Field(512, ge=1, le=131_072)
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    stop: list[StopString] = Field(default_factory=list, max_length=8)


class ChatMessage(BaseModel):
    """One turn of a conversation as the model's chat template sees it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Literal["system", "user", "assistant"]
    content: Annotated[str, StringConstraints(max_length=1_000_000)]
