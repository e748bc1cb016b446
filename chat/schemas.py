"""What the composer and the stop button send, over the socket or as a form post.

One schema for both paths, so a bad value gets the same clear error either way.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from inference.schemas import StopString


def _blank_to_none(value: Any) -> Any:
    return None if value == "" else value


class _Incoming(BaseModel):
    # htmx's ws extension adds the request headers of the sending element under HEADERS.
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)
    HEADERS: dict[str, Any] | None = None
    # The no-JS fallback form carries Django's CSRF field; over the socket it means nothing.
    csrfmiddlewaretoken: str | None = None


class SendMessage(_Incoming):
    """The composer: a new user turn, optionally with a model and sampling options."""

    type: Literal["send"]
    text: Annotated[str, StringConstraints(max_length=100_000)]
    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    max_tokens: int | None = None
    seed: int | None = None
    stop: str | list[StopString] | None = Field(None, description="one per line")

    def sampling(self) -> dict[str, Any]:
        fields = (
            "temperature",
            "top_p",
            "top_k",
            "min_p",
            "repetition_penalty",
            "max_tokens",
            "seed",
        )
        values = {f: getattr(self, f) for f in fields if getattr(self, f) is not None}
        if isinstance(self.stop, str):
            values["stop"] = [line for line in self.stop.splitlines() if line]
        elif self.stop:
            values["stop"] = self.stop
        return values


class StopReply(_Incoming):
    """The stop button of a streaming reply."""

    type: Literal["stop"]
    reply: Annotated[str, StringConstraints(pattern=r"^[0-9a-fA-F-]{32,36}$")]


def parse_message(content: dict[str, Any]) -> SendMessage | StopReply:
    """Validate one message; raises ValidationError, or ValueError for an unknown type."""
    # Empty option fields of the composer mean "use the default".
    cleaned = {k: v if k == "text" else _blank_to_none(v) for k, v in content.items()}
    kind = cleaned.get("type")
    if kind == "send":
        return SendMessage.model_validate(cleaned)
    if kind == "stop":
        return StopReply.model_validate(cleaned)
    raise ValueError("unknown message type; expected 'send' or 'stop'")


def describe_error(error: ValidationError) -> str:
    """One line naming each bad field and what is wrong with it."""
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"])
        parts.append(f"{where}: {item['msg']}" if where else item["msg"])
    return "; ".join(parts)
