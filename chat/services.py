"""Conversation business logic: the only code that writes chat tables."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import re
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from chat import presets as chat_presets
from chat.models import Conversation, Message, ToolStep
from inference import services as inference
from inference.catalogue import UnknownModel
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
    conversation.title_edited = True  # a generated title never replaces the user's
    conversation.save(update_fields=["title", "title_edited"])
    return conversation


def conversation_pin(*, conversation: Conversation, pinned: bool) -> Conversation:
    """Pin (listed first, under "Pinned") or unpin a conversation."""
    conversation.pinned = pinned
    conversation.save(update_fields=["pinned"])
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
    # Tool steps in one query too: the page asks every reply whether a call is pending.
    # A reply's token trace (hundreds of bytes a token) is read only by the token view.
    rows = (
        conversation.messages.select_related("generation")
        .defer("generation__token_trace")
        .prefetch_related("tool_steps")
    )
    for message in rows.order_by("id"):
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


# Messages a page shows at first (the newest of the branch); earlier ones load as the reader
# scrolls up, this many at a time. A conversation of thousands of messages opens as fast as one
# of a hundred.
MESSAGE_WINDOW = 60


def path_window(
    path: list[Message], *, before: UUID | None = None, showing: UUID | None = None
) -> tuple[list[Message], int]:
    """The part of `path` a page shows and how many messages come before it: the newest
    MESSAGE_WINDOW, or the MESSAGE_WINDOW before the message `before` (loading earlier ones),
    or from a little above `showing` down to the end (a link to a message further up).
    Raises ChatError when `before` is not on the path."""
    end = len(path)
    if before is not None:
        end = next((i for i, m in enumerate(path) if m.code == before), -1)
        if end < 0:
            raise ChatError("That message is not on the branch shown.")
    start = max(end - MESSAGE_WINDOW, 0)
    if showing is not None and before is None:
        at = next((i for i, m in enumerate(path) if m.code == showing), None)
        if at is not None:
            start = min(start, max(at - 2, 0))
    return path[start:end], start


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


def _first_line_title(text: str) -> str:
    """The title a conversation has until the generated one arrives: its first message."""
    first_line = " ".join(text.split())
    return first_line[:TITLE_LENGTH] + "…" if len(first_line) > TITLE_LENGTH else first_line


def _check_idle(conversation: Conversation) -> None:
    """Refuse a new reply while one streams or a tool call waits (one reply at a time)."""
    if Message.objects.filter(
        conversation=conversation, generation__state__in=inference.ACTIVE_STATES
    ).exists():
        raise ChatError("Wait for the reply to finish, or stop it, before sending another.")
    if ToolStep.objects.filter(
        message__conversation=conversation, state__in=ToolStep.PENDING_STATES
    ).exists():
        raise ChatError("A tool call waits for you: approve or deny it, or stop the reply.")


def _generation_start(conversation: Conversation, **create: Any) -> Generation:
    """Start a generation for the conversation's owner, streamed to the conversation's group and
    replayable (`create`: the rest of `generation_create`'s arguments); ChatError when the
    owner's stream limit is reached."""
    try:
        return inference.generation_create(
            user=conversation.user,
            notify_group=conversation.group_name,
            replayable=True,
            **create,
        )
    except inference.GenerationLimitReached as e:
        raise ChatError(str(e)) from e


def reply_version_show(
    *, conversation: Conversation, target: Message, generation: Generation
) -> Message:
    """Show `generation` as a new version of the reply `target` (a sibling under the same
    parent), the conversation's leaf from now on."""
    reply = Message.objects.create(
        conversation=conversation,
        role=Message.Role.ASSISTANT,
        generation=generation,
        parent_id=target.parent_id,
    )
    Conversation.objects.filter(pk=conversation.pk).update(leaf=reply, updated_at=timezone.now())
    return reply


def _start_reply(
    conversation: Conversation,
    user_message: Message,
    *,
    model_id: str,
    params: dict[str, Any] | None,
) -> Message:
    """Start the reply to `user_message`, whose parent is the reply it follows (or None): the
    prompt is that reply's prompt and text plus this turn, so it is the path from the root."""
    # The conversation's sticky settings (its preset, its own values), then this turn's.
    sticky = chat_presets.generation_settings(conversation)
    generation_params = inference.generation_params(
        model_id=model_id,
        overrides={**sticky.sampling, **(params or {}), **_tool_overrides(conversation)},
    )
    last = (
        Message.objects.select_related("generation").get(pk=user_message.parent_id)
        if user_message.parent_id is not None
        else None
    )
    turn = [ChatMessage(role="user", content=user_message.content)]
    previous = last.generation if last is not None else None
    if last is not None and (
        previous is None or previous.prompt_id is None or previous.is_active
    ):
        # Nothing recorded to continue from (the reply's row is gone): send every turn.
        previous = None
        turn = _prompt_messages(conversation, conversation_path(conversation, leaf=user_message))
    system = chat_presets.system_turns(
        conversation, sticky, model_id=model_id, previous=previous
    )
    if system is not None:  # a new prompt, or a changed system prompt: start from the root
        if previous is not None:
            previous = None
            turn = _prompt_messages(
                conversation, conversation_path(conversation, leaf=user_message)
            )
        turn = [*system, *turn]
    generation = _generation_start(
        conversation,
        model_id=model_id,
        messages=turn,
        previous=previous,
        params=generation_params,
    )
    return Message.objects.create(
        conversation=conversation,
        role=Message.Role.ASSISTANT,
        generation=generation,
        parent=user_message,
    )


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
    _check_idle(conversation)
    if tools is not None and tools != conversation.tools_enabled:
        conversation.tools_enabled = tools
        conversation.save(update_fields=["tools_enabled"])
    model_id = model_id or conversation.model_id
    user_message = Message.objects.create(
        conversation=conversation,
        role=Message.Role.USER,
        content=text,
        parent_id=conversation.leaf_id,
    )
    reply = _start_reply(conversation, user_message, model_id=model_id, params=params)
    updates = {"updated_at": timezone.now(), "model_id": model_id, "leaf": reply}
    if conversation.title == Conversation._meta.get_field("title").default:
        updates["title"] = _first_line_title(text)
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
    # The system prompt sticks, as one set in the side panel would (chat.presets).
    conversation.system_prompt = system[0].content if system else ""
    conversation.save(update_fields=["title", "system_prompt"])
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
        # Only the message row is locked: PostgreSQL refuses FOR UPDATE on the nullable side
        # of the generation's outer join.
        Message.objects.select_for_update(of=("self",))
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


def tool_step_claim(*, step: ToolStep) -> bool:
    """Mark a queued step running; True for the one caller that did (every open tab tries),
    which then runs it with `tool_step_run`."""
    claimed = ToolStep.objects.filter(pk=step.pk, state=ToolStep.State.QUEUED).update(
        state=ToolStep.State.RUNNING
    )
    step.refresh_from_db()
    return bool(claimed)


def _step_end(
    step: ToolStep,
    *,
    ok: bool,
    text: str,
    data: dict[str, Any] | None = None,
    files: list[dict[str, str]] | None = None,
) -> ToolStep:
    """Record a running step's result (a step stopped meanwhile keeps its state)."""
    ToolStep.objects.filter(pk=step.pk, state=ToolStep.State.RUNNING).update(
        state=ToolStep.State.DONE if ok else ToolStep.State.FAILED,
        ok=ok,
        result=text[:MAX_RESULT_CHARS],
        data=data or {},
        files=files or [],
        finished_at=timezone.now(),
    )
    step.refresh_from_db()
    return step


def tool_step_fail(*, step: ToolStep, error: str) -> ToolStep:
    """End a running step that could not finish (its run raised outside the tool: the database,
    the process), so that the loop goes on and the model hears why."""
    return _step_end(step, ok=False, text=f"The tool could not finish: {error}")


def tool_step_run(*, step: ToolStep) -> ToolStep:
    """Run a step claimed with `tool_step_claim` (which left it running and refreshed) and
    record its result; a step in any other state is returned as it is. Synchronous and slow:
    call it off the event loop."""
    if step.state != ToolStep.State.RUNNING:
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
    return _step_end(step, ok=ok, text=text, data=data, files=files)


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
    generation = _generation_start(
        conversation,
        model_id=previous.model_id,
        messages=results,
        previous=previous,
        params=params,
    )
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


# --- branches (issue 9) ---------------------------------------------------------------------
# Messages form a tree: the versions of a turn (regenerated replies, edited user messages) are
# siblings, and `Conversation.leaf` is the last message of the branch shown. Every reply's
# prompt is the path from the root down to it.


def _message_for(conversation: Conversation, code: str) -> Message:
    """The conversation's message with this code; ChatError for anything else."""
    try:
        message = (
            Message.objects.select_related("generation")
            .filter(conversation=conversation, code=code)
            .first()
        )
    except ValidationError:  # not a UUID
        message = None
    if message is None:
        raise ChatError("No such message in this conversation.")
    return message


def _children_by_parent(conversation: Conversation) -> dict[int | None, list[int]]:
    children: dict[int | None, list[int]] = {}
    for pk, parent_id in conversation.messages.order_by("id").values_list("id", "parent_id"):
        children.setdefault(parent_id, []).append(pk)
    return children


def _subtree(children: dict[int | None, list[int]], root: int) -> set[int]:
    """`root` and every message below it."""
    found, todo = set(), [root]
    while todo:
        node = todo.pop()
        found.add(node)
        todo.extend(children.get(node, ()))
    return found


def newest_leaf(conversation: Conversation, message: Message) -> Message:
    """The newest message at or below `message`: the end of the branch last added to. A
    message's children are newer than it, so the newest of the subtree has none."""
    newest = max(_subtree(_children_by_parent(conversation), message.pk))
    return message if newest == message.pk else Message.objects.get(pk=newest)


def branch_switch(*, conversation: Conversation, message_code: str) -> Message:
    """Show the branch of this version (the `< 2/3 >` arrows): the conversation's leaf becomes
    the newest message below it. Returns the new leaf."""
    target = _message_for(conversation, message_code)
    leaf = newest_leaf(conversation, target)
    current = Conversation.objects.filter(pk=conversation.pk).values_list("leaf_id", flat=True)
    # A streaming reply stays on the branch shown: its tokens go to its place on the page.
    if leaf.pk != current.first() and active_replies(conversation=conversation):
        raise ChatError("Wait for the reply to finish, or stop it, before switching versions.")
    Conversation.objects.filter(pk=conversation.pk).update(leaf=leaf)
    conversation.leaf = leaf
    return leaf


def _regenerate_params(
    conversation: Conversation, old: Generation | None, model_id: str
) -> dict[str, Any]:
    # The old reply's settings, when answering with the same model; its seed is left out (a
    # fixed seed would write the same text again) and the tools are the conversation's now.
    if old is None or old.model_id != model_id:
        return {}
    dropped = ("tools", "tool_choice", "seed")
    return {k: v for k, v in old.params.items() if k not in dropped}


@transaction.atomic
def message_regenerate(
    *,
    conversation: Conversation,
    message_code: str,
    model_id: str | None = None,
    params: dict[str, Any] | None = None,
) -> Message:
    """A new version of a reply: a sibling assistant message answering exactly the same prompt
    node, shown from now on. `model_id` / `params` answer it with another model or settings.
    Raises ChatError (a user message, a reply still running, one without a prompt)."""
    conversation = Conversation.objects.select_for_update().get(pk=conversation.pk)
    target = _message_for(conversation, message_code)
    if target.role != Message.Role.ASSISTANT:
        raise ChatError("Only a reply can be regenerated; edit a message of yours instead.")
    _check_idle(conversation)
    old = target.generation
    model_id = model_id or (old.model_id if old is not None else conversation.model_id)
    overrides = {**_regenerate_params(conversation, old, model_id), **(params or {})}
    if old is not None and old.prompt_id is not None:
        generation_params = inference.generation_params(
            model_id=model_id, overrides={**overrides, **_tool_overrides(conversation)}
        )
        generation = _generation_start(
            conversation,
            model_id=model_id,
            messages=[],
            prompt=old.prompt,
            params=generation_params,
        )
        reply = Message.objects.create(
            conversation=conversation,
            role=Message.Role.ASSISTANT,
            generation=generation,
            parent_id=target.parent_id,
        )
    elif target.parent is not None and target.parent.role == Message.Role.USER:
        reply = _start_reply(conversation, target.parent, model_id=model_id, params=overrides)
    else:
        raise ChatError("This reply cannot be regenerated: its prompt is gone.")
    Conversation.objects.filter(pk=conversation.pk).update(
        leaf=reply, updated_at=timezone.now(), model_id=model_id
    )
    return reply


@transaction.atomic
def message_edit(
    *,
    conversation: Conversation,
    message_code: str,
    text: str,
    model_id: str | None = None,
    params: dict[str, Any] | None = None,
) -> tuple[Message, Message]:
    """Edit a user message and resend it: a new version of it (a sibling, the old one stays)
    with a new reply, shown from now on. Returns (user message, reply)."""
    text = text.strip()
    if not text:
        raise ChatError("Write a message first.")
    conversation = Conversation.objects.select_for_update().get(pk=conversation.pk)
    target = _message_for(conversation, message_code)
    if target.role != Message.Role.USER:
        raise ChatError("Only your own messages can be edited; regenerate a reply instead.")
    _check_idle(conversation)
    model_id = model_id or conversation.model_id
    user_message = Message.objects.create(
        conversation=conversation,
        role=Message.Role.USER,
        content=text,
        parent_id=target.parent_id,
    )
    reply = _start_reply(conversation, user_message, model_id=model_id, params=params)
    Conversation.objects.filter(pk=conversation.pk).update(
        leaf=reply, updated_at=timezone.now(), model_id=model_id
    )
    return user_message, reply


@transaction.atomic
def message_delete(*, conversation: Conversation, message_code: str) -> int:
    """Delete a message and everything below it; replies running there are stopped first and
    their tool calls end. When the branch shown goes, the leaf moves to the newest message left
    under the same parent (or anywhere). Returns how many messages went."""
    conversation = Conversation.objects.select_for_update().get(pk=conversation.pk)
    target = _message_for(conversation, message_code)
    children = _children_by_parent(conversation)
    doomed = _subtree(children, target.pk)
    for message in Message.objects.select_related("generation").filter(
        pk__in=doomed, generation__state__in=inference.ACTIVE_STATES
    ):
        assert message.generation is not None
        inference.generation_stop(generation=message.generation)
    ToolStep.objects.filter(message_id__in=doomed, state__in=ToolStep.PENDING_STATES).update(
        state=ToolStep.State.STOPPED, result="stopped", finished_at=timezone.now()
    )
    leaf_id = conversation.leaf_id
    if leaf_id is None or leaf_id in doomed:
        if target.parent_id is not None:
            left = _subtree(children, target.parent_id) - doomed
        else:
            left = {pk for pks in children.values() for pk in pks} - doomed
        leaf_id = max(left, default=None)
    Message.objects.filter(pk__in=doomed).delete()
    Conversation.objects.filter(pk=conversation.pk).update(leaf_id=leaf_id)
    conversation.leaf_id = leaf_id
    return len(doomed)


def _copy_tool_files(step: ToolStep, source: Path, target: Path) -> list[dict[str, str]]:
    # A copied step's files are copied into the fork's workspace, since the file view serves
    # only files inside the conversation's own one; a file that is gone or outside is dropped.
    copied = []
    for record in step.files if isinstance(step.files, list) else []:
        try:
            path = Path(str(record.get("path", ""))).resolve(strict=True)
            relative = path.relative_to(source)
        except (OSError, RuntimeError, ValueError, AttributeError):
            continue
        if not path.is_file():
            continue
        destination = target / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, destination)
        copied.append({**record, "path": str(destination)})
    return copied


@transaction.atomic
def conversation_fork(*, conversation: Conversation, message_code: str) -> Conversation:
    """A new conversation carrying the path from the root down to this message: copies of the
    messages, their replies and tool steps, with the conversation's settings. The original is
    untouched. Forked at a user message, the fork starts a reply to it."""
    target = _message_for(conversation, message_code)
    path = conversation_path(conversation, leaf=target)
    if any(m.generation is not None and m.generation.is_active for m in path):
        raise ChatError("Wait for the reply to finish, or stop it, before forking from it.")
    fork = Conversation.objects.create(
        user_id=conversation.user_id,
        model_id=conversation.model_id,
        title=f"{conversation.title} (fork)"[:200],
        # Named after the original on purpose: no generated title replaces it.
        title_edited=True,
        tools_enabled=conversation.tools_enabled,
        allowed_tools=list(conversation.allowed_tools),
        preset=conversation.preset,
        system_prompt=conversation.system_prompt,
        params=dict(conversation.params),
    )
    source_workspace: Path | None = None
    parent: Message | None = None
    for message in path:
        generation = None
        if message.generation is not None:
            generation = inference.generation_copy(
                generation=message.generation, user=conversation.user
            )
        parent = Message.objects.create(
            conversation=fork,
            role=message.role,
            parent=parent,
            content=message.content,
            generation=generation,
            created_at=message.created_at,
        )
        for step in message.tool_steps.all():
            if step.files and source_workspace is None:
                source_workspace = workspace_for(conversation).resolve()
            files = (
                _copy_tool_files(step, source_workspace, workspace_for(fork).resolve())
                if source_workspace is not None and step.files
                else []
            )
            ToolStep.objects.create(
                message=parent,
                call_id=step.call_id,
                name=step.name,
                arguments=step.arguments,
                mutating=step.mutating,
                state=step.state,
                ok=step.ok,
                result=step.result,
                data=step.data,
                files=files,
                created_at=step.created_at,
                finished_at=step.finished_at,
            )
    if parent is not None and parent.role == Message.Role.USER:
        parent = _start_reply(fork, parent, model_id=fork.model_id, params=None)
    fork.leaf = parent
    fork.save(update_fields=["leaf"])
    return fork


# --- titles (issue 9) -----------------------------------------------------------------------
# Once the first exchange's reply has ended, the same model writes a title at batch priority
# (it never delays a reply). The title generation is found by its notify group, which is the
# conversation's own plus ".title": every open tab hears its end there and applies it; with no
# tab open, the next page that lists the conversation applies it (`titles_apply_pending`).

TITLE_MAX_TOKENS = 24
TITLE_EXCHANGE_CHARS = 1500
# An interrupted title generation (the worker went away) is tried again, this many in all.
TITLE_ATTEMPTS = 3
TITLE_INSTRUCTION = (
    "Write a short title (3 to 6 words) for the conversation below. Answer with the title "
    "only: no quotes, no explanation.\n\n"
)
_TITLE_PREFIX = re.compile(r"^\s*(title|titre|titel)\s*[:：-]\s*", re.IGNORECASE)
_THINKING = re.compile(r"<think>.*?(</think>|$)", re.DOTALL)


def title_group(conversation: Conversation) -> str:
    """The notify group of the conversation's title generation (a valid Channels group)."""
    return f"{conversation.group_name}.title"


def title_generation(conversation: Conversation) -> Generation | None:
    """The conversation's latest title generation, if any."""
    return (
        Generation.objects.filter(notify_group=title_group(conversation)).order_by("-id").first()
    )


def title_from_text(text: str) -> str:
    """A model's answer as a title: its first line without a "Title:" prefix, quotes, markdown
    emphasis or a final full stop; at most TITLE_LENGTH characters. Empty when nothing is
    left."""
    text = _THINKING.sub("", text)
    line = next((line for line in text.splitlines() if line.strip()), "")
    line = _TITLE_PREFIX.sub("", line)
    line = " ".join(line.strip().strip("*#_`\"'“”‘’«» ").split())
    line = line.rstrip(".。!;:,").strip()
    if len(line) > TITLE_LENGTH:
        line = line[:TITLE_LENGTH].rsplit(" ", 1)[0] + "…"
    return line


@transaction.atomic
def title_start(*, conversation: Conversation) -> Generation | None:
    """Start the title generation once the first exchange's reply has ended (once: later calls
    return the same generation). None when no title is due: the user set one, there is no
    ended first reply yet, or the server is too busy now (tried again at the next reply's end
    or the next visit)."""
    conversation = Conversation.objects.select_for_update().get(pk=conversation.pk)
    if conversation.title_edited:
        return None
    attempts = list(
        Generation.objects.filter(notify_group=title_group(conversation)).order_by("-id")
    )
    if attempts and (
        attempts[0].state != Generation.State.INTERRUPTED or len(attempts) >= TITLE_ATTEMPTS
    ):
        return attempts[0]
    first = (
        conversation.messages.filter(parent__isnull=True, role=Message.Role.USER)
        .order_by("id")
        .first()
    )
    reply = (
        first.children.select_related("generation").order_by("id").first()
        if first is not None
        else None
    )
    if first is None or reply is None or reply.generation is None or reply.generation.is_active:
        return None
    if conversation.title not in (
        Conversation._meta.get_field("title").default,
        _first_line_title(first.content),
    ):
        return None  # a title from elsewhere (an import): kept
    answer = reply.generation.content or reply.generation.text
    exchange = (
        f"User: {first.content[:TITLE_EXCHANGE_CHARS]}\n\n"
        f"Assistant: {answer[:TITLE_EXCHANGE_CHARS]}"
    )
    model_id = reply.generation.model_id
    try:
        params = inference.generation_params(
            model_id=model_id, overrides={"temperature": 0.2, "max_tokens": TITLE_MAX_TOKENS}
        )
        return inference.generation_create(
            model_id=model_id,
            messages=[ChatMessage(role="user", content=TITLE_INSTRUCTION + exchange)],
            params=params,
            user=conversation.user,
            notify_group=title_group(conversation),
            priority="batch",
        )
    except (
        inference.GenerationLimitReached,
        inference.GenerationQueueFull,
        inference.NotAGenerationModel,
        UnknownModel,
    ) as e:
        logger.info("no title for conversation %s now: %s", conversation.code, e)
        return None


def title_apply(*, conversation: Conversation) -> bool:
    """Apply the finished title generation, unless the user set the title. Returns whether the
    title changed (idempotent: every tab and the sidebar may call it)."""
    generation = title_generation(conversation)
    if generation is None or generation.state != Generation.State.COMPLETE:
        return False
    title = title_from_text(generation.content or generation.text)
    if not title:
        return False
    changed = (
        Conversation.objects.filter(pk=conversation.pk, title_edited=False)
        .exclude(title=title)
        .update(title=title)
    )
    if changed:
        conversation.title = title
    return bool(changed)


# Title generations end within minutes of the conversation's last change; looking further
# back would only re-read titles already applied.
TITLE_PENDING_WINDOW = timedelta(days=1)


def titles_apply_pending(*, user: AbstractBaseUser) -> int:
    """Apply the titles that finished while no tab of their conversation was open (the page
    calls it before listing conversations). Returns how many changed."""
    recent = Conversation.objects.filter(
        user_id=user.pk,
        title_edited=False,
        updated_at__gte=timezone.now() - TITLE_PENDING_WINDOW,
    )
    groups = {title_group(c): c for c in recent.only("id", "code", "title")}
    if not groups:
        return 0
    finished = Generation.objects.filter(
        notify_group__in=list(groups), state=Generation.State.COMPLETE
    ).order_by("id")
    latest = {g.notify_group: g for g in finished.only("notify_group", "text", "content")}
    changed = 0
    for group, generation in latest.items():
        conversation = groups[group]
        title = title_from_text(generation.content or generation.text)
        if title and title != conversation.title:
            changed += Conversation.objects.filter(pk=conversation.pk, title_edited=False).update(
                title=title
            )
    return changed


@transaction.atomic
def message_continue(*, conversation: Conversation, message_code: str) -> Message:
    """Continue a reply that hit the token limit: a new version of it (a sibling) whose text is
    the old text and what the model writes after it, answering the same prompt. The old
    version stays. Raises ChatError when the reply cannot be continued."""
    conversation = Conversation.objects.select_for_update().get(pk=conversation.pk)
    target = _message_for(conversation, message_code)
    generation = target.generation
    if target.role != Message.Role.ASSISTANT or generation is None:
        raise ChatError("Only a reply can be continued.")
    if generation.finish_reason != Generation.FinishReason.MAX_TOKENS:
        raise ChatError("Only a reply that hit the token limit can be continued.")
    _check_idle(conversation)
    try:
        continued = inference.generation_continue(
            generation=generation, user=conversation.user, notify_group=conversation.group_name
        )
    except inference.NotContinuable as e:
        raise ChatError(f"This reply cannot be continued: {e}.") from e
    except inference.GenerationLimitReached as e:
        raise ChatError(str(e)) from e
    return reply_version_show(conversation=conversation, target=target, generation=continued)
