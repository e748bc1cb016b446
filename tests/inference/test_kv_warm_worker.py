"""Warm on open through the real worker and engine (tiny model): a finished reply's KV cache is
written to disk when the engine stops, `generation_warm` restores it in a new engine, and the
next turn records where its prefix came from."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer

from inference import services
from inference import worker as inference_worker
from inference.models import Generation
from inference.schemas import ChatMessage, GenerationParams
from tests.support.waiting import wait_until
from tests.support.worker import in_process_worker

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(300)]


@pytest.fixture
async def worker(tiny: str, tmp_path: Path, settings: Any) -> Any:
    settings.VAR_DIR = tmp_path / "var"
    settings.MLXWEB_KV_DIR = tmp_path / "var" / "kvcache"  # where the cache files go
    async with in_process_worker():
        yield


async def _reply(text: str, previous: Generation | None = None) -> Generation:
    layer = get_channel_layer()
    assert layer is not None
    channel = await layer.new_channel()
    group = f"test-{channel.rsplit('!', 1)[-1]}"
    await layer.group_add(group, channel)
    generation = await sync_to_async(services.generation_create)(
        model_id="tiny",
        messages=[ChatMessage(role="user", content=text)],
        params=GenerationParams(temperature=0.0, max_tokens=12),
        previous=previous,
        notify_group=group,
    )
    async with asyncio.timeout(120):
        while (await layer.receive(channel))["type"] != "generation.done":
            pass
    return await Generation.objects.aget(pk=generation.pk)


def _restored() -> bool:
    engine = inference_worker._engine
    slot = engine._slots.get("tiny") if engine is not None else None
    return slot is not None and slot.prompt_cache is not None and len(slot.prompt_cache) > 0


async def test_opening_a_conversation_restores_its_cache_after_a_restart(
    worker: AsyncIterator[None], tmp_path: Path
) -> None:
    # Long enough for its file to be worth reading (kvcache.MIN_DISK_REUSE tokens).
    question = "Tell me about the rivers and mountains of France, please. " * 14
    first = await _reply(question)
    assert first.state == Generation.State.COMPLETE
    assert first.details["prompt_cache"] == "none"

    await asyncio.to_thread(inference_worker.stop_engine)  # a restart: caches go to disk
    assert list((tmp_path / "var" / "kvcache").rglob("*.safetensors"))
    assert inference_worker._engine is None

    await sync_to_async(services.generation_warm)(replies=[None, first])
    await asyncio.to_thread(wait_until, _restored, timeout=60, what="the cache restored")

    second = await _reply("And of Italy?", previous=first)
    assert second.details["prompt_cache"] == "warm"
    assert second.cached_tokens >= first.prompt_tokens
    assert second.cached_tokens < second.prompt_tokens


def test_only_the_last_finished_reply_is_warmed(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[dict[str, Any]] = []
    monkeypatch.setattr(services, "_send", lambda channel, message: sent.append(message))
    done = Generation.objects.create(model_id="tiny", state=Generation.State.COMPLETE, text="Hi")
    empty = Generation.objects.create(model_id="tiny", state=Generation.State.ERROR)
    queued = Generation.objects.create(model_id="tiny", state=Generation.State.QUEUED)
    services.generation_warm(replies=[])
    services.generation_warm(replies=[done, None, empty])  # failed before writing: no reply
    services.generation_warm(replies=[done, queued])  # still to run: its cache is coming
    assert sent == []
    services.generation_warm(replies=[empty, done, None])
    assert sent == [{"type": "generation.warm", "code": str(done.code)}]
