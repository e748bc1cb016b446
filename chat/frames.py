"""Websocket frames: HTML fragments with htmx out-of-band swap targets.

Every frame renders a partial of templates/chat/conversation.html, the same partials the page
and the HTTP views use, so a streamed reply and a reloaded one look the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from django.template.loader import render_to_string

from chat.models import Conversation, Message
from inference import services as inference

TEMPLATE = "chat/conversation.html"


def _render(partial: str, context: dict[str, Any]) -> str:
    return render_to_string(f"{TEMPLATE}#{partial}", context)


def model_choices() -> list[dict[str, Any]]:
    """The picker's options: the models that generate text (embedding models cannot chat);
    unavailable ones are shown with the reason ("reason") but cannot be chosen."""
    choices = []
    for spec in inference.model_list(task="generate"):
        reason = spec.unavailable_reason()
        choices.append(
            {"id": spec.id, "name": spec.name, "available": not reason, "reason": reason}
        )
    return choices


def turn_frame(*, conversation: Conversation, messages: Sequence[Message]) -> str:
    """New messages appended to every tab's list, and the sidebar's title/order refreshed."""
    conversation.refresh_from_db()
    conversations = Conversation.objects.filter(user_id=conversation.user_id)
    return _render(
        "turn-frame",
        {"conversation": conversation, "conversations": conversations, "messages": messages},
    )


def composer_frame(*, conversation: Conversation) -> str:
    conversation.refresh_from_db()
    return _render(
        "composer-frame",
        {
            "conversation": conversation,
            "models": model_choices(),
            "selected_model": conversation.model_id,
            "oob": True,
        },
    )


def reply_frame(message: Message) -> str:
    """The final render of a reply, replacing the streamed text."""
    return _render(
        "message", {"message": message, "conversation": message.conversation, "oob": True}
    )


def delta_frame(*, code: str, text: str, channel: str = "content") -> str:
    """Streamed text appended to the live reply: the answer, or (channel "reasoning", the
    worker's split) its Thinking section. The browser renders the markdown as it grows."""
    target = "reasoning" if channel == "reasoning" else "text"
    return _render("delta-frame", {"code": code, "text": text, "target": target})


def snapshot_frame(*, code: str, text: str) -> str:
    """The whole live reply from the worker's raw text so far, split and rendered."""
    return _render("streaming-text", {"code": code, "text": text, "oob": True})


def error_frame(text: str) -> str:
    return _render("socket-error", {"error": text, "oob": True})
