"""Running the inference worker on an event loop: in the web process or in its own."""

from __future__ import annotations

import asyncio
import logging

from channels.layers import get_channel_layer
from channels.routing import ChannelNameRouter
from channels.worker import Worker
from django.conf import settings

from inference import cluster
from inference import worker as inference_worker

logger = logging.getLogger(__name__)


def prepare() -> None:
    """Before serving: the replies of workers whose heartbeat lapsed are taken over (queued
    ones routed again, streaming ones interrupted with their text and continued on a live
    worker: inference.cluster). Workers that are alive are left alone, whoever they are."""
    cluster.reap_dead_workers(me=inference_worker.WORKER_ID)


def start_worker(*, warm_up: bool = True, preload: list[str] | None = None) -> asyncio.Task[None]:
    """Start the Channels worker on the running loop: it listens on the shared inference
    channel (anything routed nowhere in particular, web processes of old) and on this worker's
    own channel (what the routing sends it, stop and sync for its replies). `preload` are the
    models to load now (default: the default model, when `warm_up`)."""
    own = inference_worker.WORKER_CHANNEL
    application = ChannelNameRouter(
        {
            settings.INFERENCE_CHANNEL: inference_worker.InferenceWorker.as_asgi(),
            own: inference_worker.InferenceWorker.as_asgi(),
        }
    )
    worker = Worker(
        application=application,
        channels=[settings.INFERENCE_CHANNEL, own],
        channel_layer=get_channel_layer(),
    )
    task = asyncio.ensure_future(worker.arun())
    asyncio.ensure_future(_start_runtime())
    logger.info(
        "inference worker %s listening on %r and %r",
        inference_worker.WORKER_ID,
        settings.INFERENCE_CHANNEL,
        own,
    )
    if warm_up or preload:
        asyncio.ensure_future(asyncio.to_thread(_warm_up, list(preload or [])))
    return task


async def drain(timeout: float) -> None:
    """SIGTERM on a worker: stop taking work, hand its replies to another worker or let them
    finish (at most `timeout` s); what is left is interrupted by `shutdown`."""
    for runtime in list(inference_worker.WorkerRuntime._by_loop.values()):
        if runtime.loop is asyncio.get_running_loop():
            await runtime.drain(timeout)


async def _start_runtime() -> None:
    """Start the worker's runtime (event pump and heartbeat) on the loop once it runs, so web
    processes see the worker alive before any request. `serve` calls `start_worker` from
    Twisted's startup triggers, before the asyncio loop is running."""
    inference_worker.WorkerRuntime.current()


def _warm_up(model_ids: list[str]) -> None:
    """Load the models now (the default one when none is named), so the first message does not
    wait for it. The heartbeat that follows tells the routing they are here."""
    from inference.catalogue import UnknownModel, get_catalogue

    catalogue = get_catalogue()
    for model_id in model_ids or [catalogue.default_model_id]:
        try:
            spec = catalogue.get(model_id)
        except UnknownModel as e:
            logger.error("cannot preload %s: %s", model_id, e)
            continue
        if not spec.is_available:
            logger.warning("model %s is not on this machine; not preloading", spec.id)
            continue
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
