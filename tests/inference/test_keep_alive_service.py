"""`inference.services.model_unload_after`: through the in-memory channel layer to the inference
worker, whose engine applies the keep-alive to the tiny model, and back into the worker's
status (the heartbeat row `/api/ps` and `/health` read)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings as django_settings

from inference import services
from inference import worker as inference_worker
from inference.catalogue import UnknownModel
from tests.support.worker import in_process_worker

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(120)]


@pytest.fixture
async def worker(tiny: str) -> AsyncIterator[None]:
    async with in_process_worker():
        yield


async def _loaded() -> dict[str, services.LoadedModelInfo]:
    status = await sync_to_async(services.worker_status)()
    return {model.model_id: model for model in status.loaded}


async def test_it_loads_the_model_and_reports_when_it_expires(worker: None) -> None:
    before = datetime.now(UTC)

    expires = await services.amodel_unload_after(model_id="tiny", seconds=600)

    assert expires is not None
    assert before + timedelta(seconds=599) <= expires <= datetime.now(UTC) + timedelta(seconds=600)
    # The worker wrote its heartbeat once applied: no wait for the next one.
    assert (await _loaded())["tiny"].expires_at == expires


async def test_zero_unloads_the_model(worker: None) -> None:
    await services.amodel_unload_after(model_id="tiny", seconds=None)
    assert (await _loaded())["tiny"].expires_at is None

    assert await services.amodel_unload_after(model_id="tiny", seconds=0) is None
    assert "tiny" not in await _loaded()


async def test_the_sync_service_waits_for_the_worker(worker: None) -> None:
    unload_after = sync_to_async(services.model_unload_after, thread_sensitive=False)
    assert await unload_after(model_id="tiny", seconds=30) is not None
    assert "tiny" in await _loaded()


async def test_zero_does_not_start_an_engine_to_unload_nothing(worker: None) -> None:
    assert await services.amodel_unload_after(model_id="tiny", seconds=0) is None
    assert inference_worker._engine is None


async def test_an_unknown_model_is_refused_before_the_worker(worker: None) -> None:
    with pytest.raises(UnknownModel):
        await services.amodel_unload_after(model_id="no-such-model", seconds=30)


async def test_a_model_that_cannot_load_is_a_load_failure(worker: None, models_root: Path) -> None:
    (models_root / "broken").mkdir()
    (models_root / "broken" / "config.json").write_text('{"model_type": "llama"}')
    (models_root / "broken" / "model.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(services.ModelLoadFailed):
        await services.amodel_unload_after(model_id="broken", seconds=30)


@pytest.mark.parametrize(
    "message",
    [
        {"model_id": 7, "seconds": 30},
        {"model_id": "tiny", "seconds": "soon"},
        {"model_id": "tiny", "seconds": True},
    ],
)
async def test_it_refuses_a_malformed_message_put_on_the_channel(
    worker: None, message: dict[str, object]
) -> None:
    layer = get_channel_layer()
    assert layer is not None
    reply = await layer.new_channel()
    await layer.send(
        django_settings.INFERENCE_CHANNEL,
        {"type": "model.unload_after", "reply_channel": reply, **message},
    )
    answer = await asyncio.wait_for(layer.receive(reply), 30)
    assert (answer["type"], answer["kind"]) == ("model.error", "invalid")


def test_it_refuses_a_number_that_is_not_finite(models_root: Path) -> None:
    with pytest.raises(ValueError, match="finite"):
        services.model_unload_after(model_id="tiny", seconds=float("inf"))
