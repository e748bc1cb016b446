"""`manage.py inference_worker`: the inference worker as its own process (scaled out over Redis).

With the in-memory channel layer the worker must live in the web process (`manage.py serve`
does that); this command is for deployments with a Redis URL. Run as many as there are
machines (or memory) for: each registers itself (inference.cluster), replies are routed to the
worker that holds their model, and a worker that dies has its replies continued by another.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from inference import runner

logger = logging.getLogger(__name__)


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"not a number of seconds: {value!r}") from None
    if not 0 <= seconds <= 3600:
        raise ValueError(f"between 0 and 3600 seconds, not {seconds}")
    return seconds


class Command(BaseCommand):
    help = "Run the inference worker (needs a Redis URL: the in-memory layer is per process)."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--no-warm-up", action="store_true", help="don't preload the model")
        parser.add_argument(
            "--preload",
            action="append",
            metavar="MODEL",
            default=[],
            help="load this model at start instead of the default one (repeatable)",
        )
        parser.add_argument(
            "--drain-timeout",
            type=_seconds,
            default=60.0,
            metavar="SECONDS",
            help="on SIGTERM with no other worker to hand replies to, wait this long for them "
            "to finish before ending them as interrupted (default 60)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if not settings.REDIS_URL:
            raise CommandError(
                "no redis_url is configured: with the in-memory channel layer the inference "
                "worker runs inside `manage.py serve`. Set MLXWEB_REDIS_URL to scale out."
            )
        from inference.catalogue import UnknownModel, get_catalogue

        catalogue = get_catalogue()
        for model_id in options["preload"]:
            try:
                catalogue.get(model_id)
            except UnknownModel as e:
                raise CommandError(f"--preload {model_id}: {e}") from e
        runner.prepare()
        asyncio.run(
            self._serve(
                warm_up=not options["no_warm_up"],
                preload=options["preload"],
                drain_timeout=options["drain_timeout"],
            )
        )
        runner.shutdown()
        logger.info("inference worker stopped")

    async def _serve(self, *, warm_up: bool, preload: list[str], drain_timeout: float) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        task = runner.start_worker(warm_up=warm_up, preload=preload)
        await stop.wait()
        logger.info("inference worker draining (up to %.0f s)", drain_timeout)
        await runner.drain(drain_timeout)
        logger.info("inference worker stopping")
        task.cancel()
