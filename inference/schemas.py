"""Plain values that cross from the web side to the engine: one bounded schema for generation
options, shared by the websocket, the HTTP APIs, the CLI and the worker."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

StopString = Annotated[str, StringConstraints(min_length=1, max_length=64)]
ToolName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
TOOL_CHOICE_MODES = ("auto", "none", "required")
MAX_LOGIT_BIAS = 300
MAX_TOOLS = 128


class ToolCall(BaseModel):
    """A call of one tool as the model wrote it; `arguments` is JSON text, as OpenAI sends it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    name: ToolName
    arguments: Annotated[str, StringConstraints(max_length=1_000_000)] = "{}"

    def arguments_value(self) -> Any:
        """The arguments as a value (templates render them); the raw text if it is not JSON."""
        try:
            return json.loads(self.arguments)
        except ValueError:
            return self.arguments


class ToolSpec(BaseModel):
    """A function the model may call (an OpenAI function definition)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: ToolName
    description: Annotated[str, StringConstraints(max_length=4096)] = ""
    parameters: dict[str, Any] = Field(default_factory=dict, description="a JSON Schema object")

    def as_template_tool(self) -> dict[str, Any]:
        """The OpenAI shape that chat templates take in `tools=`."""
        parameters = self.parameters or {"type": "object", "properties": {}}
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": parameters,
            },
        }


class ResponseFormat(BaseModel):
    """What shape the reply must have; `json_schema` is the schema itself."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: dict[str, Any] | None = None
    strict: bool = False

    @model_validator(mode="after")
    def _schema_when_needed(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format.json_schema is required when type is json_schema")
        return self


class GenerationParams(BaseModel):
    """Sampling and length options of one generation. Bounds reject nonsense early."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float = Field(0.7, ge=0.0, le=2.0, description="0 is greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=1000, description="0 turns top-k off")
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, ge=0.5, le=2.0, description="1 turns it off")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[Annotated[int, Field(ge=0)], Annotated[float, Field(ge=-100, le=100)]] = Field(
        default_factory=dict, max_length=MAX_LOGIT_BIAS
    )
    logprobs: bool = False
    top_logprobs: int = Field(0, ge=0, le=20)
    max_tokens: int = Field(512, ge=1, le=131_072)
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    stop: list[StopString] = Field(default_factory=list, max_length=8)
    response_format: ResponseFormat | None = None
    tools: list[ToolSpec] = Field(default_factory=list, max_length=MAX_TOOLS)
    tool_choice: Annotated[str, StringConstraints(min_length=1, max_length=64)] = Field(
        "auto", description='"auto", "none", "required" or the name of one of `tools`'
    )

    @model_validator(mode="after")
    def _consistent(self) -> GenerationParams:
        names = [tool.name for tool in self.tools]
        if len(set(names)) != len(names):
            raise ValueError("tools: two tools have the same name")
        if self.tool_choice not in TOOL_CHOICE_MODES and self.tool_choice not in names:
            raise ValueError(
                f"tool_choice: {self.tool_choice!r} is neither auto, none, required nor the "
                "name of a tool in tools"
            )
        if self.tool_choice == "required" and not self.tools:
            raise ValueError("tool_choice: required needs at least one tool in tools")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs")
        return self

    @property
    def uses_tools(self) -> bool:
        """Whether the model is told about tools and its calls are parsed."""
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def forced_tool(self) -> str | None:
        """The tool every reply must call ("" for any of them), or None when not forced."""
        if not self.tools or self.tool_choice in ("auto", "none"):
            return None
        return "" if self.tool_choice == "required" else self.tool_choice


class ChatMessage(BaseModel):
    """One turn of a conversation as the model's chat template sees it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Annotated[str, StringConstraints(max_length=1_000_000)]
    tool_calls: list[ToolCall] = Field(default_factory=list, max_length=MAX_TOOLS)
    tool_call_id: Annotated[str, StringConstraints(max_length=128)] | None = None
    name: Annotated[str, StringConstraints(max_length=64)] | None = None

    @model_validator(mode="after")
    def _fields_fit_the_role(self) -> ChatMessage:
        if self.tool_calls and self.role != "assistant":
            raise ValueError("tool_calls: only an assistant message may have tool calls")
        if self.tool_call_id is not None and self.role != "tool":
            raise ValueError("tool_call_id: only a tool message may answer a tool call")
        return self

    def extra(self) -> dict[str, Any]:
        """What the message carries besides its role and content (stored with it)."""
        extra: dict[str, Any] = {}
        if self.tool_calls:
            extra["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        if self.tool_call_id is not None:
            extra["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            extra["name"] = self.name
        return extra
