"""The branch actions of the chat (issue 9), one entry point for the socket and the forms.

Each action is validated by chat.schemas first; `branch_action` calls the service and says
what the open tabs must show afterwards. Raises ChatError, UnknownModel and pydantic's
ValidationError, which the callers turn into an error frame or a flash message.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.urls import reverse

from chat import services
from chat.models import Conversation
from chat.schemas import (
    BranchAction,
    ContinueReply,
    DeleteMessage,
    EditMessage,
    ForkConversation,
    PinConversation,
    RegenerateReply,
    RenameConversation,
    SwitchVersion,
)


@dataclass(frozen=True)
class Outcome:
    """What changed: the branch shown ("messages": every tab re-renders the list), only the
    conversation's title or pin ("sidebar"), or a new conversation to open ("navigate")."""

    kind: str
    location: str = ""


def branch_action(*, conversation: Conversation, action: BranchAction) -> Outcome:
    """Apply one validated action to the user's own conversation (the callers authorized it)."""
    if isinstance(action, RegenerateReply):
        services.message_regenerate(
            conversation=conversation, message_code=action.message, model_id=action.model
        )
    elif isinstance(action, ContinueReply):
        services.message_continue(conversation=conversation, message_code=action.message)
    elif isinstance(action, SwitchVersion):
        services.branch_switch(conversation=conversation, message_code=action.message)
    elif isinstance(action, EditMessage):
        services.message_edit(
            conversation=conversation,
            message_code=action.message,
            text=action.content,
            model_id=action.model,
        )
    elif isinstance(action, DeleteMessage):
        services.message_delete(conversation=conversation, message_code=action.message)
    elif isinstance(action, ForkConversation):
        fork = services.conversation_fork(conversation=conversation, message_code=action.message)
        return Outcome("navigate", reverse("chat:detail", args=[fork.code]))
    elif isinstance(action, PinConversation):
        services.conversation_pin(conversation=conversation, pinned=action.pinned == "on")
        return Outcome("sidebar")
    elif isinstance(action, RenameConversation):
        services.conversation_rename(conversation=conversation, title=action.title)
        return Outcome("sidebar")
    else:  # pragma: no cover - parse_message returns only the types above
        raise TypeError(f"not a branch action: {action!r}")
    conversation.refresh_from_db()
    return Outcome("messages")
