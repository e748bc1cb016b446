"""Template helpers of the branch features: a message's versions, the sidebar's date groups."""

from __future__ import annotations

import datetime
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from django import template
from django.utils import timezone
from django.utils.formats import date_format

from chat.models import Conversation, Message

register = template.Library()


@dataclass
class Versions:
    """Where a message stands among its versions (the siblings with its parent)."""

    index: int
    count: int
    previous: str = ""
    next: str = ""


@register.simple_tag
def message_versions(message: Message) -> Versions:
    """The `< 2/3 >` navigation of a message. `conversation_path` sets `siblings` and
    `sibling_index` on the messages of a page; a message rendered alone (a frame) asks."""
    siblings = getattr(message, "siblings", None)
    if siblings is None:
        siblings = list(
            Message.objects.filter(
                conversation_id=message.conversation_id, parent_id=message.parent_id
            )
            .order_by("id")
            .values_list("code", flat=True)
        )
    codes = [str(code) for code in siblings]
    index = codes.index(str(message.code)) + 1 if str(message.code) in codes else 1
    return Versions(
        index=index,
        count=max(len(codes), 1),
        previous=codes[index - 2] if index > 1 else "",
        next=codes[index] if index < len(codes) else "",
    )


@dataclass
class SidebarGroup:
    """A heading of the conversation list and its conversations, newest first."""

    label: str
    items: list[Conversation] = field(default_factory=list)


def group_label(updated: datetime.date, today: datetime.date) -> str:
    """Today, Yesterday, Previous 7 days, Previous 30 days, then the month ("March 2026")."""
    days = (today - updated).days
    if days <= 0:
        return "Today"
    if days == 1:
        return "Yesterday"
    if days <= 7:
        return "Previous 7 days"
    if days <= 30:
        return "Previous 30 days"
    return date_format(updated, "F Y")


@register.filter
def sidebar_groups(conversations: Iterable[Conversation]) -> list[SidebarGroup]:
    """The conversations under their headings: Pinned first, then by the day of their last
    change in the server's time zone."""
    today = timezone.localdate()
    groups: dict[str, SidebarGroup] = {}
    pinned = SidebarGroup("Pinned")
    for item in conversations:
        if item.pinned:
            pinned.items.append(item)
            continue
        label = group_label(timezone.localdate(item.updated_at), today)
        groups.setdefault(label, SidebarGroup(label)).items.append(item)
    ordered = [pinned] if pinned.items else []
    ordered.extend(groups.values())  # the list is newest first, so the groups are too
    return ordered


@register.filter
def can_continue(message: Any) -> bool:
    """Whether a reply ended at the token limit, so that Continue makes sense."""
    generation = getattr(message, "generation", None)
    return bool(
        generation is not None
        and not generation.is_active
        and generation.finish_reason == "max_tokens"
    )
