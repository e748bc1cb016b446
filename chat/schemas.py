"""What the composer and the stop button send, over the socket or as a form post.

One schema for both paths, so a bad value gets the same clear error either way.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
)

from inference.schemas import StopString

# Deeper than any message here needs (the deepest is an object in an object), far below
# Python's recursion limit, which json.loads would otherwise hit on `[[[[...`.
MAX_JSON_DEPTH = 16

# A JSON string (skipped whole: brackets inside it are text) or a bracket.
_STRING_OR_BRACKET = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.DOTALL)
_OPENERS = frozenset("[{")


class FrameError(ValueError):
    """A socket frame that is not a message; the text says what is wrong with it."""


def _storable(value: str) -> str:
    # PostgreSQL text cannot hold NUL, which arrives only as a JSON escape, never from a
    # composer. (Lone surrogates pydantic refuses by itself.)
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


StorableText = Annotated[str, AfterValidator(_storable)]


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
    text: Annotated[StorableText, StringConstraints(max_length=100_000)]
    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    max_tokens: int | None = None
    seed: int | None = None
    stop: StorableText | list[Annotated[StopString, AfterValidator(_storable)]] | None = Field(
        None, description="one per line"
    )
    # The options panel's Tools switch: the conversation's setting from this turn on.
    tools: Literal["on", "off"] | None = None

    @property
    def tools_enabled(self) -> bool | None:
        return None if self.tools is None else self.tools == "on"

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


class ToolDecision(_Incoming):
    """Approve / Deny / Always allow on a tool call that waits for the user."""

    type: Literal["tool"]
    step: Annotated[str, StringConstraints(pattern=r"^[0-9a-fA-F-]{32,36}$")]
    decision: Literal["approve", "deny", "always"]


MessageCode = Annotated[str, StringConstraints(pattern=r"^[0-9a-fA-F-]{32,36}$")]


class _OnMessage(_Incoming):
    """An action on one message of the conversation, named by its code."""

    message: MessageCode


class RegenerateReply(_OnMessage):
    """Regenerate: a new version of a reply (a sibling), answering the same prompt; `model`
    answers it with another model."""

    type: Literal["regenerate"]
    model: str | None = None


class SwitchVersion(_OnMessage):
    """The `< 2/3 >` arrows: show this version's branch down to its newest message."""

    type: Literal["switch"]


class EditMessage(_OnMessage):
    """Edit a user message and resend it: a new version of it, with a new reply."""

    type: Literal["edit"]
    # Not "text": the page's composer box is the one field named so.
    content: Annotated[StorableText, StringConstraints(max_length=100_000)]
    model: str | None = None


class DeleteMessage(_OnMessage):
    """Delete a message and everything below it (the form is the confirmation)."""

    type: Literal["delete"]


class ForkConversation(_OnMessage):
    """A new conversation carrying the path from the root down to this message."""

    type: Literal["fork"]


class ContinueReply(_OnMessage):
    """Continue a reply that hit the token limit."""

    type: Literal["continue"]


class PinConversation(_Incoming):
    """Pin or unpin the conversation (pinned ones come first in the list)."""

    type: Literal["pin"]
    pinned: Literal["on", "off"]


class RenameConversation(_Incoming):
    """Set the title; a generated title never replaces it afterwards."""

    type: Literal["rename"]
    title: Annotated[StorableText, StringConstraints(min_length=1, max_length=200)]


BranchAction = (
    RegenerateReply
    | SwitchVersion
    | EditMessage
    | DeleteMessage
    | ForkConversation
    | ContinueReply
    | PinConversation
    | RenameConversation
)

_MESSAGE_TYPES: dict[str, type[_Incoming]] = {
    "send": SendMessage,
    "stop": StopReply,
    "tool": ToolDecision,
    "regenerate": RegenerateReply,
    "switch": SwitchVersion,
    "edit": EditMessage,
    "delete": DeleteMessage,
    "fork": ForkConversation,
    "continue": ContinueReply,
    "pin": PinConversation,
    "rename": RenameConversation,
}


def parse_message(content: dict[str, Any]) -> SendMessage | StopReply | ToolDecision | BranchAction:
    """Validate one message; raises ValidationError, or ValueError for an unknown type."""
    # Empty option fields of the composer mean "use the default".
    cleaned = {
        k: v if k in ("text", "content", "title") else _blank_to_none(v) for k, v in content.items()
    }
    kind = cleaned.get("type")
    schema = _MESSAGE_TYPES.get(kind) if isinstance(kind, str) else None
    if schema is None:
        expected = ", ".join(repr(name) for name in _MESSAGE_TYPES)
        raise ValueError(f"unknown message type; expected one of {expected}")
    return schema.model_validate(cleaned)  # type: ignore[return-value]


def json_depth_exceeds(text: str, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether `text` nests arrays and objects more than `limit` deep (as JSON would parse it).

    A scan without recursion that stops at the first bracket too deep; strings are skipped
    whole by the regular expression, so brackets in message text do not count.
    """
    if text.count("[") + text.count("{") <= limit:
        return False
    depth = 0
    for match in _STRING_OR_BRACKET.finditer(text):
        token = match.group()
        if token in _OPENERS:
            depth += 1
            if depth > limit:
                return True
        elif token in "]}":
            depth -= 1
    return False


def read_frame(
    text_data: str | None, bytes_data: bytes | None, *, max_bytes: int
) -> dict[str, Any]:
    """The JSON object of one socket frame, within bounds of size and depth.

    Raises FrameError saying what is wrong: binary, too large, too deep, not JSON, not an object.
    """
    if bytes_data is not None:
        raise FrameError("Send text frames with JSON, not binary.")
    if text_data is None or len(text_data.encode("utf-8", "surrogatepass")) > max_bytes:
        raise FrameError(f"Message too large: the limit is {max_bytes} bytes.")
    if json_depth_exceeds(text_data):
        raise FrameError(f"Message nested too deeply: the limit is {MAX_JSON_DEPTH} levels.")
    try:
        content = json.loads(text_data)
    except (ValueError, RecursionError):
        # ValueError: not JSON, or an integer of more digits than Python converts.
        raise FrameError("Message is not valid JSON.") from None
    if not isinstance(content, dict):
        raise FrameError("Message must be a JSON object.")
    return content


def describe_error(error: ValidationError) -> str:
    """One line naming each bad field and what is wrong with it."""
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"])
        parts.append(f"{where}: {item['msg']}" if where else item["msg"])
    return "; ".join(parts)
