"""The chat websocket with a scripted engine: authorization, validation, streaming, stop, sync."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from pydantic import ValidationError

from chat.models import Conversation, Message, ToolStep
from chat.schemas import (
    MAX_JSON_DEPTH,
    FrameError,
    SendMessage,
    describe_error,
    json_depth_exceeds,
    parse_message,
    read_frame,
)
from inference.models import Generation
from inference.schemas import GenerationParams
from tests.chat.conftest import communicator_for, connected_socket, frames_until, session_cookie_for

pytestmark = [pytest.mark.django_db(transaction=True)]


@pytest.fixture
def conversation(owner, models_root) -> Conversation:  # type: ignore[no-untyped-def]
    return Conversation.objects.create(user=owner, model_id="smollm2-135m-instruct")


def _reply_requests(fake_engine: Any) -> list[Any]:
    """The engine's requests for replies: the conversation's title generation (issue 9) is
    requested in between, once the first reply has ended."""
    from chat.services import TITLE_INSTRUCTION

    return [
        r
        for r in fake_engine.requests
        if not str(r.messages[-1].get("content", "")).startswith(TITLE_INSTRUCTION)
    ]


def _send(text: str, **extra: Any) -> str:
    return json.dumps({"type": "send", "text": text, "HEADERS": {"HX-Request": "true"}, **extra})


async def test_it_streams_tokens_and_ends_with_the_saved_reply(
    owner, conversation, fake_engine, running_worker
) -> None:
    communicator = await connected_socket(owner, conversation)
    await communicator.send_to(text_data=_send("Say hello"))

    frames = await frames_until(communicator, 'class="body md"')
    assert "Say hello" in frames
    assert 'hx-swap-oob="beforeend:#reply-' in frames  # token deltas
    assert "<p>Hello there, friend.</p>" in frames  # the final markdown render
    reply = await Message.objects.select_related("generation").aget(role="assistant")
    assert reply.generation is not None
    assert reply.generation.text == "Hello there, friend."
    assert reply.generation.state == Generation.State.COMPLETE
    assert reply.generation.finish_reason == "eos"
    assert reply.generation.completion_tokens == 5
    assert reply.generation.first_token_at is not None
    assert fake_engine.requests[0].messages == [{"role": "user", "content": "Say hello"}]
    await communicator.disconnect()


async def test_it_refuses_anonymous_sockets(conversation) -> None:
    communicator = communicator_for(None, conversation.code)
    connected, code = await communicator.connect()
    assert not connected
    assert code == 4401


async def test_it_closes_a_strangers_socket(stranger, conversation) -> None:
    cookie = await sync_to_async(session_cookie_for)(stranger)
    communicator = communicator_for(cookie, conversation.code)
    connected, code = await communicator.connect()
    assert not connected
    assert code == 4404


async def test_it_refuses_a_foreign_origin(owner, conversation) -> None:
    cookie = await sync_to_async(session_cookie_for)(owner)
    communicator = communicator_for(cookie, conversation.code, origin=b"http://evil.example")
    connected, _ = await communicator.connect()
    assert not connected


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        ("not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        (json.dumps({"type": "dance"}), "unknown message type"),
        (_send(""), "Write a message first"),
        (_send("hi", temperature="hot"), "temperature"),
        (_send("hi", temperature=9), "temperature"),
        (_send("hi", model="../../etc/passwd"), "Unknown model"),
        (json.dumps({"type": "stop", "reply": "nope"}), "reply"),
        (json.dumps({"type": "send", "text": "hi", "surprise": 1}), "surprise"),
        (json.dumps({"type": "tool", "step": "nope", "decision": "approve"}), "step"),
        (json.dumps({"type": "tool", "step": "0" * 32, "decision": "maybe"}), "decision"),
        (json.dumps({"type": "tool", "step": "0" * 32, "decision": "approve"}), "no longer waits"),
    ],
)
async def test_it_answers_bad_messages_with_an_error_and_stays_usable(
    owner, conversation, fake_engine, running_worker, payload, error
) -> None:
    communicator = await connected_socket(owner, conversation)
    await communicator.send_to(text_data=payload)
    frame = await communicator.receive_from(timeout=5)
    assert 'id="socket-error"' in frame
    assert error in frame
    assert await Generation.objects.acount() == 0

    await communicator.send_to(text_data=_send("still here?"))
    await frames_until(communicator, 'class="body md"')
    await communicator.disconnect()


async def test_it_refuses_messages_over_the_size_limit(owner, conversation, settings) -> None:
    communicator = await connected_socket(owner, conversation)
    await communicator.send_to(text_data=_send("x" * 70_000))
    frame = await communicator.receive_from(timeout=5)
    assert "too large" in frame
    await communicator.disconnect()


async def test_it_escapes_html_in_user_text(owner, conversation, fake_engine, running_worker):
    communicator = await connected_socket(owner, conversation)
    await communicator.send_to(text_data=_send("<script>alert(1)</script>"))
    frames = await frames_until(communicator, 'class="body md"')
    assert "<script>alert(1)</script>" not in frames
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in frames
    await communicator.disconnect()


async def test_it_stops_a_reply_and_keeps_its_text(
    owner, conversation, fake_engine, running_worker
) -> None:
    communicator = await connected_socket(owner, conversation)
    fake_engine.words = ["one", " two", " three", " four"]
    fake_engine.pause_after = 1  # hold the engine after the first word
    await communicator.send_to(text_data=_send("Count"))
    await frames_until(communicator, ">one<")
    reply = await Message.objects.aget(role="assistant")
    await communicator.send_to(text_data=json.dumps({"type": "stop", "reply": str(reply.code)}))
    await asyncio.sleep(0.05)
    fake_engine.gate.set()
    frames = await frames_until(communicator, "Stopped")
    assert 'class="body md"' in frames
    generation = await Generation.objects.aget()
    assert generation.state == Generation.State.STOPPED
    assert generation.text.startswith("one")
    assert "four" not in generation.text
    await communicator.disconnect()


async def test_it_keeps_streaming_after_the_socket_leaves(
    owner, conversation, fake_engine, running_worker
) -> None:
    communicator = await connected_socket(owner, conversation)
    fake_engine.delay = 0.05
    await communicator.send_to(text_data=_send("Go on"))
    await frames_until(communicator, "beforeend:#reply-")
    await communicator.disconnect()
    for _ in range(100):
        generation = await Generation.objects.aget()
        if not generation.is_active:
            break
        await asyncio.sleep(0.05)
    assert generation.state == Generation.State.COMPLETE
    assert generation.text == "Hello there, friend."


async def test_it_sends_a_new_tab_the_text_so_far_then_keeps_streaming(
    owner, conversation, fake_engine, running_worker
) -> None:
    first = await connected_socket(owner, conversation)
    fake_engine.words = ["alpha", " beta", " gamma", " delta"]
    fake_engine.pause_after = 2
    await first.send_to(text_data=_send("Greek"))
    await frames_until(first, "beta")

    second = await connected_socket(owner, conversation)
    snapshot = await second.receive_from(timeout=5)
    assert 'hx-swap-oob="true"' in snapshot
    assert "alpha beta" in snapshot  # the exact text so far, replacing what the page showed
    fake_engine.gate.set()
    frames = await frames_until(second, 'class="body md"')
    assert "<p>alpha beta gamma delta</p>" in frames
    await first.disconnect()
    await second.disconnect()


async def test_a_tab_that_joins_after_the_reply_ended_gets_its_final_frame(
    owner, conversation, fake_engine, running_worker
) -> None:
    # The page rendered the reply while it streamed, but it ended before this socket joined
    # the conversation's group: without a frame on connect the tab would wait on forever.
    first = await connected_socket(owner, conversation)
    fake_engine.words = ["quick", " reply"]
    await first.send_to(text_data=_send("Hi"))
    await frames_until(first, 'class="body md"')
    await first.disconnect()

    late = await connected_socket(owner, conversation)
    frames = await frames_until(late, 'class="body md"')
    assert 'hx-swap-oob="true"' in frames and "<p>quick reply</p>" in frames
    await late.disconnect()


async def test_reasoning_deltas_stream_into_the_thinking_section(owner, conversation) -> None:
    from channels.layers import get_channel_layer

    socket = await connected_socket(owner, conversation)
    layer = get_channel_layer()
    for channel, text in (("reasoning", "Let me think"), ("content", "The answer")):
        await layer.group_send(
            conversation.group_name,
            {"type": "generation.delta", "code": "c0de", "text": text, "channel": channel},
        )
    thinking = await frames_until(socket, "Let me think")
    answer = await frames_until(socket, "The answer")
    assert "#reply-c0de-reasoning" in thinking and "#reply-c0de-text" in answer
    await socket.disconnect()


async def test_it_refuses_a_second_turn_while_a_reply_streams(
    owner, conversation, fake_engine, running_worker
) -> None:
    communicator = await connected_socket(owner, conversation)
    fake_engine.gate.clear()
    await communicator.send_to(text_data=_send("first"))
    await communicator.send_to(text_data=_send("second"))
    frames = await frames_until(communicator, "socket-error")
    assert "Wait for the reply to finish" in frames
    fake_engine.gate.set()
    await frames_until(communicator, 'class="body md"')
    assert await Message.objects.filter(role="user").acount() == 1
    await communicator.disconnect()


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        ("[" * 30_000 + "]" * 30_000, "nested too deeply"),
        ('{"a":' * 9_000 + "1" + "}" * 9_000, "nested too deeply"),
        (_send("hi", HEADERS={"x": [[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]}), "nested too deeply"),
        ('{"type": "send", "text": "' + "[" * 30_000 + '"}', ""),  # brackets in text are text
        ('{"type": "send", "text": "hi", "seed": ' + "9" * 5000 + "}", "not valid JSON"),
        ('{"type": "send", "text": "\\ud800"}', "unicode string"),
        ('{"type": "send", "text": "a\\u0000b"}', "NUL"),
        ('{"type": "send", "text": "hi", "stop": ["\\u0000"]}', "NUL"),
    ],
)
async def test_it_answers_hostile_json_with_an_error_and_stays_open(
    owner, conversation, fake_engine, running_worker, payload, error
) -> None:
    communicator = await connected_socket(owner, conversation)
    await communicator.send_to(text_data=payload)
    if error:
        frame = await communicator.receive_from(timeout=5)
        assert 'id="socket-error"' in frame
        assert error in frame
    else:
        await frames_until(communicator, 'class="body md"')

    await communicator.send_to(text_data=_send("still here?"))
    await frames_until(communicator, "still here?")
    await frames_until(communicator, 'class="body md"')
    await communicator.disconnect()


async def test_it_sends_the_model_the_whole_conversation_each_turn(
    owner, conversation, fake_engine, running_worker
) -> None:
    communicator = await connected_socket(owner, conversation)
    for text in ("First", "Second", "Third"):
        await communicator.send_to(text_data=_send(text))
        await frames_until(communicator, 'class="body md"')

    reply = "Hello there, friend."
    assert _reply_requests(fake_engine)[2].messages == [
        {"role": "user", "content": "First"},
        {"role": "assistant", "content": reply},
        {"role": "user", "content": "Second"},
        {"role": "assistant", "content": reply},
        {"role": "user", "content": "Third"},
    ]
    await communicator.disconnect()


async def test_it_refuses_a_reply_over_the_users_queued_limit(owner, settings) -> None:
    config = settings.MLXWEB_CONFIG
    limits = config.server.limits.model_copy(update={"max_queued_replies_per_user": 2})
    settings.MLXWEB_CONFIG = config.model_copy(
        update={"server": config.server.model_copy(update={"limits": limits})}
    )
    # No worker runs: every reply stays queued.
    sockets = []
    for _ in range(3):
        conversation = await Conversation.objects.acreate(
            user=owner, model_id="smollm2-135m-instruct"
        )
        sockets.append(await connected_socket(owner, conversation))
    for communicator in sockets[:2]:
        await communicator.send_to(text_data=_send("Queue me"))
        await frames_until(communicator, "Queue me")

    await sockets[2].send_to(text_data=_send("One too many"))
    frames = await frames_until(sockets[2], "socket-error")
    assert "You have 2 replies waiting to start (the limit is 2)" in frames
    assert await Generation.objects.acount() == 2
    assert not await Message.objects.filter(content="One too many").aexists()
    for communicator in sockets:
        await communicator.disconnect()


# --------------------------------------------------------------------------- fuzzing the schema
# A short run here; the long one: pytest tests/chat/test_consumer.py -k frame
# --hypothesis-profile=fuzz (tests/chat/conftest.py).

_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40)
_json = st.recursive(
    _scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children),
    max_leaves=40,
)
_fields = {
    "text": st.text() | _json,
    "model": st.text(max_size=20) | _json,
    "temperature": st.floats() | st.integers() | st.text(max_size=5) | _json,
    "top_p": st.floats() | _json,
    "top_k": st.integers() | _json,
    "min_p": st.floats() | _json,
    "repetition_penalty": st.floats() | _json,
    "max_tokens": st.integers() | st.text(max_size=8) | _json,
    "seed": st.integers() | _json,
    "stop": st.text() | st.lists(st.text(max_size=70), max_size=10) | _json,
    "reply": st.uuids().map(str) | st.text(max_size=40) | _json,
    "HEADERS": _json,
    "csrfmiddlewaretoken": st.text(max_size=10) | _json,
}
_messages = st.fixed_dictionaries(
    {"type": st.sampled_from(["send", "stop", "other", ""]) | _json},
    optional={**_fields, "surprise": _json},
)
_frames = st.one_of(
    st.text(),
    _json.map(json.dumps),
    _messages.map(json.dumps),
    _messages.map(lambda m: json.dumps(m, ensure_ascii=False)),
    st.tuples(st.sampled_from("[{"), st.integers(0, 40_000)).map(
        lambda t: t[0] * t[1] + ("]" if t[0] == "[" else "}") * t[1]
    ),
    st.integers(0, 40_000).map(lambda n: '{"type": "send", "text": "hi", "HEADERS": ' + "[" * n),
)


def _depth(value: object) -> int:
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    return 0


@hypothesis_settings(deadline=None)
@given(_frames)
def test_every_frame_is_a_message_or_a_clear_error(frame: str) -> None:
    try:
        message = parse_message(read_frame(frame, None, max_bytes=65_536))
    except FrameError as e:
        assert str(e).endswith(".")
        return
    except ValidationError as e:
        assert describe_error(e)
        return
    except ValueError as e:
        assert "message type" in str(e)
        return
    if isinstance(message, SendMessage):
        try:
            GenerationParams.model_validate(message.sampling())
        except ValidationError as e:
            assert describe_error(e)


@hypothesis_settings(deadline=None)
@given(_json)
def test_the_depth_scan_agrees_with_the_parser(value: object) -> None:
    text = json.dumps(value)
    assert json_depth_exceeds(text) == (_depth(value) > MAX_JSON_DEPTH)
    assert json_depth_exceeds(json.dumps([[value]]), MAX_JSON_DEPTH + 2) == json_depth_exceeds(text)


async def test_it_sends_every_turn_when_the_last_reply_has_no_record(
    owner, conversation, fake_engine, running_worker
) -> None:
    communicator = await connected_socket(owner, conversation)
    await communicator.send_to(text_data=_send("First"))
    await frames_until(communicator, 'class="body md"')
    await Generation.objects.all().adelete()  # the reply's row is gone: nothing to continue

    await communicator.send_to(text_data=_send("Second"))
    await frames_until(communicator, 'class="body md"')
    assert _reply_requests(fake_engine)[1].messages == [
        {"role": "user", "content": "First"},
        {"role": "user", "content": "Second"},
    ]
    await communicator.disconnect()


async def test_it_refuses_a_decision_on_a_strangers_tool_call(
    owner, stranger, conversation
) -> None:
    def waiting_step_of_the_stranger() -> ToolStep:
        theirs = Conversation.objects.create(user=stranger, model_id="smollm2-135m-instruct")
        reply = Message.objects.create(conversation=theirs, role=Message.Role.ASSISTANT)
        return ToolStep.objects.create(
            message=reply, call_id="c1", name="python", mutating=True, state=ToolStep.State.WAITING
        )

    step = await sync_to_async(waiting_step_of_the_stranger)()
    communicator = await connected_socket(owner, conversation)
    await communicator.send_to(
        text_data=json.dumps({"type": "tool", "step": str(step.code), "decision": "approve"})
    )

    frame = await communicator.receive_from(timeout=5)
    assert 'id="socket-error"' in frame and "no longer waits" in frame
    await sync_to_async(step.refresh_from_db)()
    assert step.state == ToolStep.State.WAITING
    await communicator.disconnect()
