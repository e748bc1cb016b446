"""Conversation business logic: the only code that writes chat tables."""

from __future__ import annotations

from typing import Any

from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.utils import timezone

from chat.models import Conversation, Message
from inference import services as inference
from inference.schemas import ChatMessage

TITLE_LENGTH = 60


class ChatError(Exception):
    """A request the user can correct; the message is shown to them."""


def conversation_create(*, user: AbstractBaseUser, model_id: str | None = None) -> Conversation:
    model_id = model_id or inference.default_model_id()
    inference.model_get(model_id=model_id)  # raises UnknownModel for ids outside the catalogue
    return Conversation.objects.create(user_id=user.pk, model_id=model_id)


def conversation_rename(*, conversation: Conversation, title: str) -> Conversation:
    title = " ".join(title.split())
    if not title:
        raise ChatError("A title cannot be empty.")
    conversation.title = title[:200]
    conversation.save(update_fields=["title"])
    return conversation


@transaction.atomic
def conversation_delete(*, conversation: Conversation) -> None:
    """Delete a conversation; a reply still streaming is stopped first."""
    for message in conversation.messages.select_related("generation").filter(
        generation__isnull=False
    ):
        assert message.generation is not None
        inference.generation_stop(generation=message.generation)
    conversation.delete()


def _prompt_messages(conversation: Conversation) -> list[ChatMessage]:
    """The conversation so far as the model sees it, rebuilt from every turn. Failed replies are
    left out.

    Only for a conversation whose last reply has no recorded prompt to continue from: usually
    the next prompt is the last reply's prompt and text plus the new turn (`message_send`).
    """
    turns: list[ChatMessage] = []
    for message in conversation.messages.select_related("generation"):
        if message.role == Message.Role.USER:
            turns.append(ChatMessage(role="user", content=message.content))
        elif message.generation is not None and message.generation.text:
            turns.append(ChatMessage(role="assistant", content=message.generation.text))
    return turns


@transaction.atomic
def message_send(
    *,
    conversation: Conversation,
    text: str,
    model_id: str | None = None,
    params: dict[str, Any] | None = None,
) -> tuple[Message, Message]:
    """Add the user's turn and start the reply; returns (user message, assistant message).

    The reply's Generation row exists before the worker sees it, so a reload at any moment
    shows it. Raises ChatError for what the user can fix, UnknownModel / ValidationError for
    bad ids and parameters.
    """
    text = text.strip()
    if not text:
        raise ChatError("Write a message first.")
    conversation = Conversation.objects.select_for_update().get(pk=conversation.pk)
    if Message.objects.filter(
        conversation=conversation, generation__state__in=inference.ACTIVE_STATES
    ).exists():
        raise ChatError("Wait for the reply to finish, or stop it, before sending another.")
    model_id = model_id or conversation.model_id
    generation_params = inference.generation_params(model_id=model_id, overrides=params)

    last = conversation.messages.select_related("generation").order_by("-id").first()
    user_message = Message.objects.create(
        conversation=conversation, role=Message.Role.USER, content=text
    )
    turn = [ChatMessage(role="user", content=text)]
    previous = last.generation if last is not None else None
    if last is not None and (previous is None or previous.prompt_id is None):
        # Nothing recorded to continue from (the reply's row is gone): send every turn.
        previous, turn = None, _prompt_messages(conversation)
    try:
        generation = inference.generation_create(
            model_id=model_id,
            messages=turn,
            previous=previous,
            params=generation_params,
            user=conversation.user,
            notify_group=conversation.group_name,
        )
    except inference.GenerationLimitReached as e:
        raise ChatError(str(e)) from e
    reply = Message.objects.create(
        conversation=conversation, role=Message.Role.ASSISTANT, generation=generation
    )
    updates = {"updated_at": timezone.now(), "model_id": model_id}
    if conversation.title == Conversation._meta.get_field("title").default:
        first_line = " ".join(text.split())
        updates["title"] = (
            first_line[:TITLE_LENGTH] + "…" if len(first_line) > TITLE_LENGTH else first_line
        )
    Conversation.objects.filter(pk=conversation.pk).update(**updates)
    return user_message, reply


@transaction.atomic
def conversation_import(
    *,
    user: AbstractBaseUser,
    model_id: str,
    messages: list[ChatMessage],
    params: dict[str, Any] | None = None,
    title: str = "",
) -> Conversation:
    """Save a chat held elsewhere (the command line's `mlxweb run`) as a conversation of
    `user`, so the browser shows it and can go on with it.

    `messages` alternate user and assistant turns, after an optional system message (kept in
    the first reply's prompt, as the model saw it). Each assistant turn becomes a finished
    generation. Raises ChatError for a chat with no exchange, UnknownModel for a bad id.
    """
    system = [m for m in messages[:1] if m.role == "system"]
    turns = messages[len(system) :]
    if not turns or any(
        m.role != ("user" if i % 2 == 0 else "assistant") for i, m in enumerate(turns)
    ):
        raise ChatError("A chat to save alternates user and assistant turns, user first.")
    generation_params = inference.generation_params(model_id=model_id, overrides=params)
    conversation = conversation_create(user=user, model_id=model_id)
    first_line = " ".join((title or turns[0].content).split())
    conversation.title = (
        first_line[:TITLE_LENGTH] + "…" if len(first_line) > TITLE_LENGTH else first_line
    ) or conversation.title
    conversation.save(update_fields=["title"])
    previous = None
    pending: list[ChatMessage] = list(system)
    for message in turns:
        if message.role == "user":
            Message.objects.create(
                conversation=conversation, role=Message.Role.USER, content=message.content
            )
            pending.append(message)
            continue
        previous = inference.generation_record(
            model_id=model_id,
            messages=pending,
            text=message.content,
            params=generation_params,
            previous=previous,
            user=conversation.user,
        )
        Message.objects.create(
            conversation=conversation, role=Message.Role.ASSISTANT, generation=previous
        )
        pending = []
    return conversation


def reply_stop(*, conversation: Conversation, reply_code: str) -> Message:
    """Stop a streaming reply of this conversation; its text is kept."""
    reply = (
        Message.objects.select_related("generation")
        .filter(conversation=conversation, code=reply_code, role=Message.Role.ASSISTANT)
        .first()
    )
    if reply is None or reply.generation is None:
        raise ChatError("No such reply in this conversation.")
    inference.generation_stop(generation=reply.generation)
    return reply


def active_replies(*, conversation: Conversation) -> list[Message]:
    return list(
        conversation.messages.select_related("generation").filter(
            generation__state__in=inference.ACTIVE_STATES
        )
    )
