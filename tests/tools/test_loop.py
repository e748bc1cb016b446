"""The chat's tool loop (issue 11) through the real engine and the tiny model, forced to call a
fake tool (`tool_choice` named), with the socket as the browser uses it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator

from chat import services
from chat.models import Conversation, Message, ToolStep
from inference.models import Generation
from inference.tools.base import ToolContext, ToolResult
from tests.chat.conftest import (
    connected_socket,
    running_worker,
)

__all__ = ["running_worker"]  # the chat tests' fixture, used here

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(300)]


class EchoTool:
    name = "echo"
    description = "Repeat the text back."
    parameters: dict[str, Any] = {
        "type": "object",
        # bounded: the tiny model writes noise, and an unbounded string runs to max_tokens
        "properties": {"text": {"type": "string", "maxLength": 8}},
        "required": ["text"],
        "additionalProperties": False,
    }

    def __init__(self, mutating: bool) -> None:
        self.mutating = mutating
        self.calls: list[dict[str, Any]] = []

    def availability(self) -> str | None:
        return None

    def run(self, arguments: dict[str, Any], context: ToolContext) -> ToolResult:
        self.calls.append(arguments)
        assert context.workspace.is_dir()
        return ToolResult(ok=True, text=f"echoed: {arguments.get('text', '')}")


def _install(monkeypatch: pytest.MonkeyPatch, tool: EchoTool, *, every_round: bool) -> None:
    """Offer only `tool`, and force the model to call it: in the first round, or every round
    (until the rounds run out and the reply must answer without tools)."""
    monkeypatch.setattr(services, "available_tools", lambda: {tool.name: tool})
    original = services._tool_overrides

    def forced(conversation: Conversation, *, final: bool = False) -> dict[str, Any]:
        values = original(conversation, final=final)
        first = not ToolStep.objects.filter(message__conversation=conversation).exists()
        if values and (every_round or first):
            values["tool_choice"] = tool.name
        return values

    monkeypatch.setattr(services, "_tool_overrides", forced)


def _max_rounds(settings: Any, rounds: int) -> None:
    config = settings.MLXWEB_CONFIG
    tools = config.server.tools.model_copy(update={"max_rounds": rounds})
    server = config.server.model_copy(update={"tools": tools})
    settings.MLXWEB_CONFIG = config.model_copy(update={"server": server})


async def _until(
    communicator: WebsocketCommunicator, check: Callable[[], bool], timeout: float = 150
) -> list[str]:
    """Read frames until `check()` (a database question) holds; every change the loop makes
    sends a frame. (A receive that times out ends the communicator's application.)"""
    frames: list[str] = []
    while not await sync_to_async(check)():
        frames.append(await communicator.receive_from(timeout=timeout))
    return frames


def _settled() -> bool:
    """The last assistant message has finished with an answer, not with tool calls. (A reply
    that ended with calls has no steps until a socket records them: "ended and no steps" held
    for a moment after every round, and a full run once stopped reading there.)"""
    last = Message.objects.filter(role="assistant").select_related("generation").last()
    return bool(
        last
        and last.generation
        and not last.generation.is_active
        and last.generation.finish_reason != Generation.FinishReason.TOOL_CALLS
    )


def _send(text: str) -> str:
    return json.dumps(
        {"type": "send", "text": text, "tools": "on", "max_tokens": 120, "temperature": 0}
    )


async def test_it_waits_for_approval_runs_the_tool_and_continues(
    owner, tiny, real_engine, running_worker, monkeypatch, client
) -> None:
    tool = EchoTool(mutating=True)
    _install(monkeypatch, tool, every_round=False)
    conversation = await Conversation.objects.acreate(user=owner, model_id=tiny)
    communicator = await connected_socket(owner, conversation)
    await communicator.send_to(text_data=_send("Echo hello"))
    frames = await _until(communicator, lambda: ToolStep.objects.filter(state="waiting").exists())
    step = await ToolStep.objects.aget()
    assert step.name == "echo" and step.mutating and not tool.calls
    await communicator.send_to(
        text_data=json.dumps({"type": "tool", "step": str(step.code), "decision": "approve"})
    )
    frames = await _until(communicator, _settled)
    await step.arefresh_from_db()
    assert step.state == ToolStep.State.DONE
    # every tab saw it running before its result came
    assert any('class="tool-step running"' in frame for frame in frames)
    assert step.result.startswith("echoed:")
    assert len(tool.calls) == 1
    assert any("echoed:" in frame for frame in frames)
    replies = [
        m async for m in Message.objects.filter(role="assistant").select_related("generation")
    ]
    assert len(replies) == 2
    first, second = (r.generation for r in replies)
    assert first is not None and first.finish_reason == Generation.FinishReason.TOOL_CALLS
    assert second is not None and second.state == Generation.State.COMPLETE
    chain = await sync_to_async(second.prompt_messages)()
    tool_turns = [m for m in chain if m["role"] == "tool"]
    assert tool_turns and tool_turns[0]["content"] == step.result
    assert tool_turns[0]["tool_call_id"] == step.call_id
    await communicator.disconnect()

    # A reload shows the step, its arguments and its result.
    await sync_to_async(client.force_login)(owner)
    page = await sync_to_async(client.get)(f"/c/{conversation.code}/")
    html = page.content.decode()
    assert 'class="tool-step done"' in html and "echoed:" in html


async def test_a_step_whose_run_breaks_ends_failed_and_the_reply_goes_on(
    owner, tiny, real_engine, running_worker, monkeypatch
) -> None:
    tool = EchoTool(mutating=False)
    _install(monkeypatch, tool, every_round=False)

    def no_workspace(conversation: Conversation) -> Any:
        raise OSError("No space left on device")

    monkeypatch.setattr(services, "workspace_for", no_workspace)
    conversation = await Conversation.objects.acreate(user=owner, model_id=tiny)
    communicator = await connected_socket(owner, conversation)
    await communicator.send_to(text_data=_send("Echo hello"))
    await _until(communicator, _settled)
    step = await ToolStep.objects.aget()
    assert step.state == ToolStep.State.FAILED and not tool.calls
    assert step.result == "The tool could not finish: No space left on device"
    # the model heard why and answered
    assert await Message.objects.filter(role="assistant").acount() == 2
    await communicator.disconnect()


async def test_a_denied_call_goes_back_as_denied(
    owner, tiny, real_engine, running_worker, monkeypatch
) -> None:
    tool = EchoTool(mutating=True)
    _install(monkeypatch, tool, every_round=False)
    conversation = await Conversation.objects.acreate(user=owner, model_id=tiny)
    communicator = await connected_socket(owner, conversation)
    await communicator.send_to(text_data=_send("Echo hello"))
    await _until(communicator, lambda: ToolStep.objects.filter(state="waiting").exists())
    step = await ToolStep.objects.aget()
    await communicator.send_to(
        text_data=json.dumps({"type": "tool", "step": str(step.code), "decision": "deny"})
    )
    await _until(communicator, _settled)
    await step.arefresh_from_db()
    assert step.state == ToolStep.State.DENIED and not tool.calls
    assert await Message.objects.filter(role="assistant").acount() == 2
    await communicator.disconnect()


async def test_it_stops_after_max_rounds_with_an_answer_without_tools(
    owner, tiny, real_engine, running_worker, monkeypatch, settings
) -> None:
    _max_rounds(settings, 2)
    tool = EchoTool(mutating=False)  # runs at once, no approval
    _install(monkeypatch, tool, every_round=True)
    conversation = await Conversation.objects.acreate(user=owner, model_id=tiny)
    communicator = await connected_socket(owner, conversation)
    await communicator.send_to(text_data=_send("Echo hello"))
    await _until(communicator, _settled)
    replies = [
        m async for m in Message.objects.filter(role="assistant").select_related("generation")
    ]
    # two rounds of calls, then the answer generated without tools
    assert len(replies) == 3
    assert len(tool.calls) == 2
    last = replies[-1].generation
    assert last is not None and last.finish_reason != Generation.FinishReason.TOOL_CALLS
    assert last.params.get("tools") == []
    await communicator.disconnect()


async def test_the_stop_button_ends_the_loop_while_a_call_waits(
    owner, tiny, real_engine, running_worker, monkeypatch
) -> None:
    tool = EchoTool(mutating=True)
    _install(monkeypatch, tool, every_round=False)
    conversation = await Conversation.objects.acreate(user=owner, model_id=tiny)
    communicator = await connected_socket(owner, conversation)
    await communicator.send_to(text_data=_send("Echo hello"))
    await _until(communicator, lambda: ToolStep.objects.filter(state="waiting").exists())
    reply = await Message.objects.aget(role="assistant")
    await communicator.send_to(text_data=json.dumps({"type": "stop", "reply": str(reply.code)}))
    await _until(communicator, lambda: ToolStep.objects.filter(state="stopped").exists())
    await asyncio.sleep(0.5)
    assert await Message.objects.filter(role="assistant").acount() == 1
    assert not tool.calls
    # the conversation takes a new turn
    await communicator.send_to(
        text_data=json.dumps({"type": "send", "text": "Hi", "tools": "off", "max_tokens": 4})
    )
    await _until(communicator, lambda: Message.objects.filter(role="assistant").count() == 2)
    await communicator.disconnect()
