"""Priorities through the real worker and engine on the tiny model: a batch-priority reply
(a title, validation) waits behind an interactive one for a free stream, and the row records
how the engine computed each reply."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from asgiref.sync import sync_to_async

from inference import services
from inference.models import Generation
from inference.schemas import ChatMessage, GenerationParams
from tests.support.worker import in_process_worker

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(300)]


@pytest.fixture
async def one_stream_worker(tiny: str, settings: Any) -> AsyncIterator[None]:
    config = settings.MLXWEB_CONFIG
    limits = config.server.limits.model_copy(update={"max_concurrent_streams": 1})
    server = config.server.model_copy(update={"limits": limits})
    settings.MLXWEB_CONFIG = config.model_copy(update={"server": server})
    async with in_process_worker():
        yield


async def _create(text: str, priority: str = "interactive", max_tokens: int = 4) -> Generation:
    return await sync_to_async(services.generation_create)(
        model_id="tiny",
        messages=[ChatMessage(role="user", content=text)],
        params=GenerationParams.model_validate({"temperature": 0.0, "max_tokens": max_tokens}),
        priority=priority,
    )


async def _until(check: Any, what: str, timeout: float = 120) -> None:
    async with asyncio.timeout(timeout):
        while not await sync_to_async(check)():
            await asyncio.sleep(0.05)


def _row(generation: Generation) -> Generation:
    return Generation.objects.get(pk=generation.pk)


async def test_an_interactive_reply_gets_the_free_stream_before_a_batch_one(
    one_stream_worker: None,
) -> None:
    busy = await _create("Tell me a long story.", max_tokens=1500)
    await _until(lambda: _row(busy).state == Generation.State.STREAMING, "the first reply")
    background = await _create("Write a title for this chat.", priority="batch")
    interactive = await _create("Say hi.")
    # Both wait in the worker (it took them) while the only stream is busy.
    await _until(lambda: all(_row(g).worker_id for g in (background, interactive)), "both queued")
    row = sync_to_async(_row)
    assert (await row(background)).state == Generation.State.QUEUED
    await sync_to_async(services.generation_stop)(generation=await row(busy))
    await _until(lambda: not _row(background).is_active, "the batch reply")
    first, second = await row(interactive), await row(background)
    assert first.finish_reason == second.finish_reason == "max_tokens"
    assert first.finished_at is not None and second.started_at is not None
    assert first.finished_at <= second.started_at
    assert second.details["priority"] == "batch"
    assert "priority" not in first.details
    # The engine's account of each reply: the decode path and the prefill chunks.
    assert first.details["decode_path"] == "solo"
    assert first.details["prefill_chunks"] >= 1


def test_priority_must_be_interactive_or_batch(tiny: str) -> None:
    with pytest.raises(ValueError, match="priority"):
        services.generation_create(
            model_id="tiny",
            messages=[ChatMessage(role="user", content="hi")],
            params=GenerationParams(),
            priority="urgent",
        )
