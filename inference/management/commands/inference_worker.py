"""`manage.py inference_worker`: the inference worker as its own process (scaled out over Redis).

With the in-memory channel layer the worker must live in the web process (`manage.py serve`
does that); this command is for deployments with a Redis URL.
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


class Command(BaseCommand):
    help = "Run the inference worker (needs a Redis URL: the in-memory layer is per process)."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--no-warm-up", action="store_true", help="don't preload the model")

    def handle(self, *args: Any, **options: Any) -> None:
        if not settings.REDIS_URL:
            raise CommandError(
                "no redis_url is configured: with the in-memory channel layer the inference "
                "worker runs inside `manage.py serve`. Set MLXWEB_REDIS_URL to scale out."
            )
        runner.prepare()
        asyncio.run(self._serve(warm_up=not options["no_warm_up"]))
        runner.shutdown()
        logger.info("inference worker stopped")

    async def _serve(self, *, warm_up: bool) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        task = runner.start_worker(warm_up=warm_up)
        await stop.wait()
        logger.info("inference worker stopping")
        task.cancel()
