"""`manage.py serve`: the whole app in one process on embedded defaults.

daphne serves HTTP and websockets, as `mlxweb.server.BoundedServer` (request bodies bounded and
streamed to the application, never buffered whole); unless a Redis URL moves it out, the inference
worker runs on the same event loop (the in-memory channel layer only reaches within one process),
and so does the gRPC server (`grpc.enabled`: its Unix socket, optionally localhost TCP).
"""

from __future__ import annotations

import faulthandler
import logging
import signal
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand

logger = logging.getLogger(__name__)


class Command(BaseCommand):
    help = "Serve mlxweb (HTTP, websockets and, by default, the inference worker)."

    def add_arguments(self, parser: Any) -> None:
        server = settings.MLXWEB_CONFIG.server
        parser.add_argument("--host", default=server.host)
        parser.add_argument("--port", type=int, default=server.port)
        parser.add_argument(
            "--no-worker", action="store_true", help="don't run the inference worker here"
        )
        parser.add_argument("--no-warm-up", action="store_true", help="don't preload the model")
        parser.add_argument("--no-grpc", action="store_true", help="don't run the gRPC server here")

    def handle(self, *args: Any, **options: Any) -> None:
        # Importing daphne.server installs Twisted's asyncio reactor: do it before the reactor.
        import daphne.server  # noqa: F401
        from channels.routing import get_default_application
        from daphne.endpoints import build_endpoint_description_strings
        from twisted.internet import reactor

        from inference import runner
        from mlxweb.server import BoundedServer
        from models_admin.embedded import start_embedded_worker, stop_embedded_worker

        if not 1 <= options["port"] <= 65535:
            self.stderr.write(f"--port: {options['port']} is not a TCP port")
            raise SystemExit(2)
        # `kill -USR1 <pid>` writes every thread's stack to stderr (the server's log): what a
        # server that stopped answering is waiting for, without stopping it.
        faulthandler.register(signal.SIGUSR1, all_threads=True)
        run_worker = settings.INFERENCE_IN_PROCESS and not options["no_worker"]
        if run_worker:
            runner.prepare()
            warm_up = not options["no_warm_up"]
            reactor.callWhenRunning(lambda: runner.start_worker(warm_up=warm_up))  # type: ignore[attr-defined]
        if settings.MLXWEB_CONFIG.server.grpc.enabled and not options["no_grpc"]:
            from inference.grpc.server import run_in_reactor

            run_in_reactor(reactor)
        host, port = options["host"], options["port"]
        # Model library jobs: a child Celery worker unless a Redis URL moves it out.
        job_worker = start_embedded_worker()
        self.stdout.write(f"mlxweb is serving at http://{host}:{port}/")
        BoundedServer(
            application=get_default_application(),
            endpoints=build_endpoint_description_strings(host=host, port=port),
            signal_handlers=True,
            action_logger=None,
            root_path="",
            verbosity=0,
        ).run()
        if run_worker:
            # The reactor has stopped (SIGTERM/SIGINT): unfinished replies keep their text.
            runner.shutdown()
        stop_embedded_worker(job_worker)
