"""Through the real engine: websocket -> consumer -> worker -> MLX -> back, and the database."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator

from chat import services
from chat.models import Conversation
from inference.models import Generation
from tests.chat.conftest import connected_socket

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(300)]


def _limits(settings: Any, **changes: Any) -> None:
    config = settings.MLXWEB_CONFIG
    limits = config.server.limits.model_copy(update=changes)
    server = config.server.model_copy(update={"limits": limits})
    settings.MLXWEB_CONFIG = config.model_copy(update={"server": server})


async def _until_done(
    communicator: WebsocketCommunicator, timeout: float = 120
) -> list[tuple[float, str]]:
    frames: list[tuple[float, str]] = []
    async with asyncio.timeout(timeout):
        while True:
            frame = await communicator.receive_from(timeout=timeout)
            frames.append((time.monotonic(), frame))
            if 'class="body md"' in frame:
                return frames


def _send(text: str, **options: Any) -> str:
    return json.dumps({"type": "send", "text": text, **options})


async def test_it_streams_a_real_reply_and_records_it(
    owner, tiny, real_engine, running_worker
) -> None:
    conversation = await Conversation.objects.acreate(user=owner, model_id=tiny)
    communicator = await connected_socket(owner, conversation)
    await communicator.send_to(text_data=_send("Hello", max_tokens=24, temperature=0))
    frames = await _until_done(communicator)

    deltas = [f for _, f in frames if "beforeend:#reply-" in f]
    assert len(deltas) >= 2, "tokens arrive in several frames, not all at once"
    generation = await Generation.objects.aget()
    assert generation.state == Generation.State.COMPLETE
    assert generation.finish_reason in {"eos", "max_tokens"}
    assert 0 < generation.completion_tokens <= 24
    assert generation.prompt_tokens > 0
    assert generation.ttft_ms is not None and generation.ttft_ms >= 0
    await communicator.disconnect()


async def test_it_streams_two_chats_at_the_same_time(
    owner, tiny, real_engine, running_worker
) -> None:
    first = await Conversation.objects.acreate(user=owner, model_id=tiny)
    second = await Conversation.objects.acreate(user=owner, model_id=tiny)
    a = await connected_socket(owner, first)
    b = await connected_socket(owner, second)
    options = {"max_tokens": 200, "temperature": 0.8, "seed": 1}
    await a.send_to(text_data=_send("Tell a story", **options))
    await b.send_to(text_data=_send("Tell another story", **options))
    frames_a, frames_b = await asyncio.gather(_until_done(a), _until_done(b))

    def delta_times(frames: list[tuple[float, str]]) -> list[float]:
        return [t for t, f in frames if "beforeend:#reply-" in f]

    times_a, times_b = delta_times(frames_a), delta_times(frames_b)
    assert times_a and times_b
    # Batched: each reply receives tokens while the other is still streaming.
    assert times_b[0] < times_a[-1] and times_a[0] < times_b[-1]
    assert await Generation.objects.filter(state="complete").acount() == 2
    await a.disconnect()
    await b.disconnect()


async def test_it_stops_a_real_reply_and_keeps_its_text(
    owner, tiny, real_engine, running_worker
) -> None:
    conversation = await Conversation.objects.acreate(user=owner, model_id=tiny)
    communicator = await connected_socket(owner, conversation)
    await communicator.send_to(text_data=_send("Go on", max_tokens=2000, temperature=0.8))
    while "beforeend:#reply-" not in await communicator.receive_from(timeout=60):
        pass
    reply = await sync_to_async(lambda: conversation.messages.get(role="assistant"))()
    await communicator.send_to(text_data=json.dumps({"type": "stop", "reply": str(reply.code)}))
    frames = await _until_done(communicator)
    assert "Stopped" in frames[-1][1]
    generation = await Generation.objects.aget()
    assert generation.state == Generation.State.STOPPED
    assert generation.text and generation.completion_tokens < 2000
    await communicator.disconnect()


async def test_it_trims_the_oldest_turns_and_says_so(
    owner, tiny, real_engine, running_worker, settings
) -> None:
    _limits(settings, max_prompt_tokens=120)
    conversation = await Conversation.objects.acreate(user=owner, model_id=tiny)
    communicator = await connected_socket(owner, conversation)
    long_turn = "This sentence makes the conversation longer and longer. " * 4
    for _ in range(3):
        await communicator.send_to(text_data=_send(long_turn, max_tokens=8, temperature=0))
        frames = await _until_done(communicator)
    assert "left out to fit the model" in frames[-1][1]
    last = await Generation.objects.order_by("-id").afirst()
    assert last is not None and last.trimmed_messages > 0
    assert last.state == Generation.State.COMPLETE
    await communicator.disconnect()


async def test_it_reports_an_engine_error_on_the_reply_and_keeps_serving(
    owner, tiny, models_root, real_engine, running_worker
) -> None:
    broken = models_root / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama"}')
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    conversation = await Conversation.objects.acreate(user=owner, model_id="broken")
    communicator = await connected_socket(owner, conversation)
    await communicator.send_to(text_data=_send("Hello"))
    frames = await _until_done(communicator)
    assert "Error:" in frames[-1][1]
    generation = await Generation.objects.aget()
    assert generation.state == Generation.State.ERROR and generation.error

    await communicator.send_to(text_data=_send("Hello again", model=tiny, max_tokens=4))
    await _until_done(communicator)
    assert await Generation.objects.filter(state="complete").acount() == 1
    await communicator.disconnect()


async def _send_replies(user: Any, model_id: str, count: int) -> list[int]:
    """Start `count` replies of `user`, each in a new conversation; their Generation ids."""
    ids = []
    for n in range(count):
        conversation = await Conversation.objects.acreate(user=user, model_id=model_id)
        _, reply = await sync_to_async(services.message_send)(
            conversation=conversation,
            text=f"Tell story number {n}",
            params={"max_tokens": 12, "temperature": 0},
        )
        assert reply.generation_id is not None
        ids.append(reply.generation_id)
    return ids


async def _all_finished(timeout: float = 120) -> dict[int, Generation]:
    async with asyncio.timeout(timeout):
        while await Generation.objects.active().aexists():
            await asyncio.sleep(0.05)
    return {g.pk: g async for g in Generation.objects.all()}


async def test_it_takes_turns_between_users_when_one_queues_many_replies(
    owner, stranger, tiny, real_engine, running_worker, settings
) -> None:
    _limits(settings, max_concurrent_streams=1, max_queued_replies_per_user=20)
    flood = await _send_replies(owner, tiny, 6)
    [theirs] = await _send_replies(stranger, tiny, 1)

    rows = await _all_finished()
    assert all(g.state == Generation.State.COMPLETE for g in rows.values())
    started = {pk: g.started_at for pk, g in rows.items() if g.started_at is not None}
    assert len(started) == len(rows)
    after_theirs = [pk for pk in flood if started[pk] > started[theirs]]
    # First come, first served would start it last; taking turns, it starts next.
    assert len(after_theirs) >= len(flood) - 2, started


async def test_it_streams_at_most_the_per_user_limit_at_once(
    owner, tiny, real_engine, running_worker, settings
) -> None:
    _limits(settings, max_concurrent_streams=8, max_streaming_replies_per_user=1)
    ids = await _send_replies(owner, tiny, 3)

    rows = await _all_finished()
    for earlier, later in itertools.pairwise(ids):
        started, finished = rows[later].started_at, rows[earlier].finished_at
        assert started is not None and finished is not None
        assert started >= finished  # one after the other


@pytest.mark.slow
async def test_it_answers_paris_with_the_default_model(
    owner, smollm2_models_root, real_engine, running_worker
) -> None:
    conversation = await Conversation.objects.acreate(user=owner, model_id="smollm2-135m-instruct")
    communicator = await connected_socket(owner, conversation)
    await communicator.send_to(
        text_data=_send(
            "What is the capital of France? Answer briefly.", temperature=0, max_tokens=32
        )
    )
    frames = await _until_done(communicator, timeout=240)
    assert "Paris" in frames[-1][1]
    generation = await Generation.objects.aget()
    assert "Paris" in generation.text
    assert generation.state == Generation.State.COMPLETE
    await communicator.disconnect()
