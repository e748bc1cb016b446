"""The worker's heartbeat row carries the engine's memory budget and use
(`Engine.memory_status()`: budget_bytes, used_bytes, each model's KV cache bytes), which the
Models page shows and routing between workers reads; the engine's share is in the machine's
reservation table for the library's jobs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import sync_to_async

from inference import services
from inference import worker as inference_worker
from inference.memory import ReservationTable, weights_bytes_on_disk
from inference.models import WorkerHeartbeat
from tests.support.worker import in_process_worker

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(120)]


@pytest.fixture
async def worker(
    tiny: str, tiny_model_dir: Path, settings: Any, tmp_path: Path
) -> AsyncIterator[int]:
    budget = 20 * weights_bytes_on_disk(tiny_model_dir)
    config = settings.MLXWEB_CONFIG
    server = config.server.model_copy(update={"memory_budget_bytes": budget})
    settings.MLXWEB_CONFIG = config.model_copy(update={"server": server})
    settings.MLXWEB_MEMORY_TABLE = tmp_path / "memory.json"
    async with in_process_worker():
        yield budget


async def test_the_heartbeat_carries_the_memory_budget_and_use(
    worker: int, tiny_model_dir: Path, settings: Any
) -> None:
    await services.amodel_unload_after(model_id="tiny", seconds=600)

    beat = await sync_to_async(WorkerHeartbeat.objects.get)(worker_id=inference_worker.WORKER_ID)
    size = weights_bytes_on_disk(tiny_model_dir)
    assert beat.budget_bytes == worker
    assert size * 0.9 <= beat.used_bytes <= size * 1.5
    [loaded] = beat.loaded
    assert loaded["model_id"] == "tiny" and loaded["base_model"] is None
    assert loaded["kv_bytes"] >= 0
    assert beat.used_bytes == loaded["bytes"] + loaded["kv_bytes"]
    # The engine's share is what the library's jobs see.
    table = ReservationTable(settings.MLXWEB_MEMORY_TABLE)
    [entry] = await asyncio.to_thread(table.entries)
    assert (entry.kind, entry.nbytes) == ("engine", beat.used_bytes)

    # Unloaded, it holds nothing.
    assert await services.amodel_unload_after(model_id="tiny", seconds=0) is None
    beat = await sync_to_async(WorkerHeartbeat.objects.get)(worker_id=inference_worker.WORKER_ID)
    assert (beat.loaded, beat.used_bytes, beat.budget_bytes) == ([], 0, worker)
