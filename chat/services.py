"""Conversation business logic: the only code that writes chat tables."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.utils import timezone

from chat.models import Conversation, Message, ToolStep
from inference import services as inference
from inference.models import Generation
from inference.schemas import ChatMessage
from inference.tools.base import MAX_RESULT_CHARS, Tool, ToolContext
from inference.tools.registry import tool_spec, tools_for

logger = logging.getLogger(__name__)

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


def conversation_path(
    conversation: Conversation, *, leaf: Message | None = None
) -> list[Message]:
    """The messages from the root down to `leaf` (the conversation's current leaf when not
    given), oldest first. Each carries `sibling_index` (1-based) and `siblings` (the codes of
    its versions, oldest first), for the `< 2/3 >` navigation. One query, however many
    branches."""
    by_id: dict[int, Message] = {}
    children: dict[int | None, list[Message]] = {}
    for message in conversation.messages.select_related("generation").order_by("id"):
        by_id[message.pk] = message
        children.setdefault(message.parent_id, []).append(message)
    # Without a leaf (rows written by hand), the newest message.
    leaf_id = leaf.pk if leaf is not None else conversation.leaf_id or max(by_id, default=None)
    path: list[Message] = []
    node = by_id.get(leaf_id) if leaf_id is not None else None
    while node is not None:
        versions = children[node.parent_id]
        node.siblings = [m.code for m in versions]  # type: ignore[attr-defined]
        node.sibling_index = versions.index(node) + 1  # type: ignore[attr-defined]
        path.append(node)
        node = by_id.get(node.parent_id) if node.parent_id is not None else None
    path.reverse()
    return path


def _prompt_messages(conversation: Conversation, path: list[Message]) -> list[ChatMessage]:
    """The conversation so far as the model sees it, rebuilt from the turns of `path`. Failed
    replies are left out.

    Only for a conversation whose last reply has no recorded prompt to continue from: usually
    the next prompt is the last reply's prompt and text plus the new turn (`message_send`).
    """
    turns: list[ChatMessage] = []
    for message in path:
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
    tools: bool | None = None,
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
    if ToolStep.objects.filter(
        message__conversation=conversation, state__in=ToolStep.PENDING_STATES
    ).exists():
        raise ChatError("A tool call waits for you: approve or deny it, or stop the reply.")
    if tools is not None and tools != conversation.tools_enabled:
        conversation.tools_enabled = tools
        conversation.save(update_fields=["tools_enabled"])
    model_id = model_id or conversation.model_id
    generation_params = inference.generation_params(
        model_id=model_id, overrides={**(params or {}), **_tool_overrides(conversation)}
    )

    last = (
        Message.objects.select_related("generation").get(pk=conversation.leaf_id)
        if conversation.leaf_id is not None
        else None
    )
    user_message = Message.objects.create(
        conversation=conversation, role=Message.Role.USER, content=text, parent=last
    )
    turn = [ChatMessage(role="user", content=text)]
    previous = last.generation if last is not None else None
    if last is not None and (previous is None or previous.prompt_id is None):
        # Nothing recorded to continue from (the reply's row is gone): send every turn.
        previous = None
        turn = _prompt_messages(conversation, conversation_path(conversation, leaf=user_message))
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
        conversation=conversation,
        role=Message.Role.ASSISTANT,
        generation=generation,
        parent=user_message,
    )
    updates = {"updated_at": timezone.now(), "model_id": model_id, "leaf": reply}
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
    parent: Message | None = None
    pending: list[ChatMessage] = list(system)
    for message in turns:
        if message.role == "user":
            parent = Message.objects.create(
                conversation=conversation,
                role=Message.Role.USER,
                content=message.content,
                parent=parent,
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
        parent = Message.objects.create(
            conversation=conversation,
            role=Message.Role.ASSISTANT,
            generation=previous,
            parent=parent,
        )
        pending = []
    conversation.leaf = parent
    conversation.save(update_fields=["leaf"])
    return conversation


def reply_stop(*, conversation: Conversation, reply_code: str) -> Message:
    """Stop a streaming reply of this conversation; its text is kept. A reply in its tool loop
    stops whole: calls waiting or running end as stopped and the reply does not continue."""
    reply = (
        Message.objects.select_related("generation")
        .filter(conversation=conversation, code=reply_code, role=Message.Role.ASSISTANT)
        .first()
    )
    if reply is None or reply.generation is None:
        raise ChatError("No such reply in this conversation.")
    inference.generation_stop(generation=reply.generation)
    ToolStep.objects.filter(message=reply, state__in=ToolStep.PENDING_STATES).update(
        state=ToolStep.State.STOPPED, result="stopped", finished_at=timezone.now()
    )
    return reply


def active_replies(*, conversation: Conversation) -> list[Message]:
    return list(
        conversation.messages.select_related("generation").filter(
            generation__state__in=inference.ACTIVE_STATES
        )
    )


# --- tools (issue 11) -----------------------------------------------------------------------


@functools.cache
def _configured_tools() -> dict[str, Tool]:
    return tools_for(settings.MLXWEB_CONFIG.server.tools)


def available_tools() -> dict[str, Tool]:
    """The server's tools that can be used now, by name (tests replace this)."""
    return {name: t for name, t in _configured_tools().items() if t.availability() is None}


def _tool_overrides(conversation: Conversation, *, final: bool = False) -> dict[str, Any]:
    """The generation parameters that offer the tools to a reply of this conversation. `final`:
    the reply used its rounds and must answer without them."""
    if not conversation.tools_enabled or final:
        return {}
    specs = [tool_spec(t).model_dump() for t in available_tools().values()]
    return {"tools": specs} if specs else {}


def workspace_for(conversation: Conversation) -> Path:
    """The conversation's folder for tool files (made on first use)."""
    path = Path(settings.VAR_DIR) / "workspaces" / str(conversation.code)
    path.mkdir(parents=True, exist_ok=True)
    return path


@transaction.atomic
def tool_steps_record(*, reply: Message) -> list[ToolStep]:
    """The steps of a reply whose generation ended with tool calls, made once (every open tab
    asks). Calls to tools this server does not offer fail at once; mutating ones wait for the
    user unless allowed in this conversation. Returns the steps it made: none when the reply
    called no tools or another tab made them first."""
    reply = (
        Message.objects.select_for_update()
        .select_related("generation", "conversation")
        .get(pk=reply.pk)
    )
    generation = reply.generation
    conversation = reply.conversation
    if (
        generation is None
        or generation.finish_reason != Generation.FinishReason.TOOL_CALLS
        or not conversation.tools_enabled
        or reply.tool_steps.exists()
    ):
        return []
    tools = available_tools()
    for call in generation.tool_calls:
        name = str(call.get("name", ""))
        # The parser keeps arguments as the model wrote them: a JSON string, as OpenAI sends them.
        arguments = call.get("arguments")
        if isinstance(arguments, str):
            with contextlib.suppress(ValueError):
                arguments = json.loads(arguments)
        tool = tools.get(name)
        values: dict[str, Any] = {}
        if tool is None:
            problem = f"There is no tool {name!r} here."
            values = {
                "state": ToolStep.State.FAILED,
                "result": problem,
                "finished_at": timezone.now(),
            }
        elif not isinstance(arguments, dict):
            problem = "The arguments are not a JSON object."
            values = {
                "state": ToolStep.State.FAILED,
                "result": problem,
                "finished_at": timezone.now(),
            }
        elif tool.mutating and name not in conversation.allowed_tools:
            values = {"state": ToolStep.State.WAITING}
        ToolStep.objects.create(
            message=reply,
            call_id=str(call.get("id") or f"call_{name}")[:128],
            name=name[:64],
            arguments=arguments if isinstance(arguments, dict) else {"raw": arguments},
            mutating=bool(tool and tool.mutating),
            **values,
        )
    return list(reply.tool_steps.all())


def tool_step_decide(*, conversation: Conversation, step_code: str, decision: str) -> ToolStep:
    """The user's answer to a waiting call: "approve", "deny" or "always" (approve, and allow
    this tool without asking for the rest of the conversation)."""
    step = ToolStep.objects.filter(
        message__conversation=conversation, code=step_code, state=ToolStep.State.WAITING
    ).first()
    if step is None:
        raise ChatError("That tool call no longer waits for a decision.")
    if decision == "deny":
        values: dict[str, Any] = {
            "state": ToolStep.State.DENIED,
            "result": "The user denied this tool call.",
            "finished_at": timezone.now(),
        }
    else:
        values = {"state": ToolStep.State.QUEUED}
        if decision == "always" and step.name not in conversation.allowed_tools:
            conversation.allowed_tools = [*conversation.allowed_tools, step.name]
            conversation.save(update_fields=["allowed_tools"])
    ToolStep.objects.filter(pk=step.pk, state=ToolStep.State.WAITING).update(**values)
    step.refresh_from_db()
    return step


def tool_step_run(*, step: ToolStep) -> ToolStep:
    """Run a queued step (claimed first, so only one caller runs it) and record its result.
    Synchronous and slow: call it off the event loop."""
    claimed = ToolStep.objects.filter(pk=step.pk, state=ToolStep.State.QUEUED).update(
        state=ToolStep.State.RUNNING
    )
    step.refresh_from_db()
    if not claimed:
        return step
    conversation = step.message.conversation
    tool = available_tools().get(step.name)

    def cancelled() -> bool:
        return ToolStep.objects.filter(pk=step.pk, state=ToolStep.State.STOPPED).exists()

    data: dict[str, Any] = {}
    files: list[dict[str, str]] = []
    if tool is None:
        ok, text = False, f"The tool {step.name!r} is not available."
    else:
        context = ToolContext(
            workspace=workspace_for(conversation),
            cancelled=cancelled,
            timeout=settings.MLXWEB_CONFIG.server.tools.timeout,
        )
        try:
            result = tool.run(dict(step.arguments), context)
        except Exception as exc:  # a tool must not raise; if one does, the model hears why
            logger.exception("tool %s raised", step.name)
            ok, text = False, f"The tool failed: {exc}"
        else:
            ok, text, data = result.ok, result.text or result.error, result.data
            files = [{"name": f.name, "mime": f.mime, "path": str(f.path)} for f in result.files]
    ToolStep.objects.filter(pk=step.pk, state=ToolStep.State.RUNNING).update(
        state=ToolStep.State.DONE if ok else ToolStep.State.FAILED,
        ok=ok,
        result=text[:MAX_RESULT_CHARS],
        data=data,
        files=files,
        finished_at=timezone.now(),
    )
    step.refresh_from_db()
    return step


@transaction.atomic
def tool_round_continue(*, reply: Message) -> Message | None:
    """Once every call of `reply` has ended, send the results back and continue the reply in a
    new assistant message; None while calls are pending, when the loop was stopped, or when it
    already continued. After `tools.max_rounds` rounds the continuation gets no tools."""
    conversation = Conversation.objects.select_for_update().get(pk=reply.conversation_id)
    reply = Message.objects.select_related("generation").get(pk=reply.pk)
    steps = list(reply.tool_steps.all())
    if (
        not steps
        or conversation.leaf_id != reply.pk
        or reply.generation is None
        or any(step.is_pending or step.state == ToolStep.State.STOPPED for step in steps)
    ):
        return None
    # The replies since the user's last turn: this reply and the ones it continues.
    rounds = 0
    node: Message | None = reply
    while node is not None and node.role == Message.Role.ASSISTANT:
        rounds += 1
        node = node.parent
    final = rounds >= settings.MLXWEB_CONFIG.server.tools.max_rounds
    previous = reply.generation
    params = inference.generation_params(
        model_id=previous.model_id,
        overrides={
            **{k: v for k, v in previous.params.items() if k not in ("tools", "tool_choice")},
            **_tool_overrides(conversation, final=final),
        },
    )
    results = [
        ChatMessage(role="tool", content=step.result, tool_call_id=step.call_id, name=step.name)
        for step in steps
    ]
    try:
        generation = inference.generation_create(
            model_id=previous.model_id,
            messages=results,
            previous=previous,
            params=params,
            user=conversation.user,
            notify_group=conversation.group_name,
        )
    except inference.GenerationLimitReached as e:
        raise ChatError(str(e)) from e
    message = Message.objects.create(
        conversation=conversation,
        role=Message.Role.ASSISTANT,
        generation=generation,
        parent=reply,
    )
    Conversation.objects.filter(pk=conversation.pk).update(
        updated_at=timezone.now(), leaf=message
    )
    return message
