"""Running the inference worker on an event loop: in the web process or in its own."""

from __future__ import annotations

import asyncio
import logging

from channels.layers import get_channel_layer
from channels.routing import get_default_application
from channels.worker import Worker
from django.conf import settings

from inference import worker as inference_worker
from inference.services import generation_mark_orphans_interrupted

logger = logging.getLogger(__name__)


def prepare() -> None:
    """Before serving: whatever a dead worker left streaming is interrupted, text kept."""
    generation_mark_orphans_interrupted(worker_id=inference_worker.WORKER_ID)


def start_worker(*, warm_up: bool = True) -> asyncio.Task[None]:
    """Start the Channels worker for the inference channel on the running loop."""
    worker = Worker(
        application=get_default_application(),
        channels=[settings.INFERENCE_CHANNEL],
        channel_layer=get_channel_layer(),
    )
    task = asyncio.ensure_future(worker.arun())
    asyncio.ensure_future(_start_runtime())
    logger.info(
        "inference worker %s listening on %r",
        inference_worker.WORKER_ID,
        settings.INFERENCE_CHANNEL,
    )
    if warm_up:
        asyncio.ensure_future(asyncio.to_thread(_warm_up))
    return task


async def _start_runtime() -> None:
    """Start the worker's runtime (event pump and heartbeat) on the loop once it runs, so web
    processes see the worker alive before any request. `serve` calls `start_worker` from
    Twisted's startup triggers, before the asyncio loop is running."""
    inference_worker.WorkerRuntime.current()


def _warm_up() -> None:
    """Load the default model now, so the first message does not wait for it."""
    from inference.catalogue import get_catalogue

    catalogue = get_catalogue()
    spec = catalogue.get(catalogue.default_model_id)
    if not spec.is_available:
        logger.warning("default model %s is not on this machine; not preloading", spec.id)
        return
    try:
        inference_worker.get_engine().load(spec.id)
    except Exception as e:
        logger.error("could not preload %s: %s", spec.id, e)


def shutdown() -> None:
    """Stop cleanly: unfinished replies keep their text and are marked interrupted.

    Runs synchronously outside the event loop (the ORM refuses async contexts).
    """
    for runtime in list(inference_worker.WorkerRuntime._by_loop.values()):
        runtime.interrupt_all()
    inference_worker.stop_engine()
