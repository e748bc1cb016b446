"""Websocket frames of the branch actions: the branch shown, the sidebar, a page to open.

Rendered from the page's own partials (templates/chat/parts/), like chat.frames.
"""

from __future__ import annotations

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.template.loader import render_to_string

from chat import services
from chat.models import Conversation

TEMPLATE = "chat/parts/branch_frame.html"


def branch_frame(*, conversation: Conversation, messages: bool = True, location: str = "") -> str:
    """The sidebar and the thread header, out of band; with `messages`, the whole list (the
    path to the conversation's leaf) replaces the tab's; with `location`, a link the page's
    script follows (a forked conversation opens in the tab that asked for it)."""
    conversation.refresh_from_db()
    shown, earlier = (
        services.path_window(services.conversation_path(conversation)) if messages else ([], 0)
    )
    context = {
        "conversation": conversation,
        "conversations": Conversation.objects.filter(user_id=conversation.user_id),
        "chat_messages": shown,
        "earlier_count": earlier,
        "messages_frame": messages,
        "location": location,
    }
    return render_to_string(TEMPLATE, context)


def branch_broadcast(*, conversation: Conversation, messages: bool = True) -> None:
    """Send every open tab of the conversation the branch frame (for changes made over HTTP: a
    form posted without the socket, a ?m= link), so that none shows a branch it no longer
    continues."""
    layer = get_channel_layer()
    if layer is None:
        return
    html = branch_frame(conversation=conversation, messages=messages)
    async_to_sync(layer.group_send)(conversation.group_name, {"type": "chat.html", "html": html})
