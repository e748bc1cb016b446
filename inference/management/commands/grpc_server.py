"""`manage.py grpc_server`: the gRPC service as its own process (scaled out over Redis).

With the in-memory channel layer the gRPC server must live in the web process (`manage.py serve`
starts it there); this command is for deployments with a Redis URL, where it reaches the
inference worker (`manage.py inference_worker`) through the channel layer like any web process.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from inference.grpc.server import GrpcServer

logger = logging.getLogger(__name__)


class Command(BaseCommand):
    help = "Run the gRPC server (needs a Redis URL: the in-memory layer is per process)."

    def add_arguments(self, parser: Any) -> None:
        grpc_settings = settings.MLXWEB_CONFIG.server.grpc
        parser.add_argument(
            "--socket",
            type=Path,
            default=grpc_settings.socket_path(settings.VAR_DIR),
            help="the Unix socket to listen on (default: grpc.socket, else <var_dir>/grpc.sock)",
        )
        parser.add_argument(
            "--tcp-port",
            type=int,
            default=grpc_settings.tcp_port,
            help="also listen on 127.0.0.1 at this port (default: grpc.tcp_port)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if not settings.REDIS_URL:
            raise CommandError(
                "no redis_url is configured: with the in-memory channel layer the gRPC server "
                "runs inside `manage.py serve`. Set MLXWEB_REDIS_URL to scale out."
            )
        port = options["tcp_port"]
        if port is not None and not 1 <= port <= 65535:
            raise CommandError(f"--tcp-port: {port} is not a TCP port")
        server = GrpcServer(socket_path=options["socket"].absolute(), tcp_port=port)
        try:
            asyncio.run(self._serve(server))
        except OSError as e:
            raise CommandError(f"cannot start the gRPC server: {e}") from e
        logger.info("gRPC server process stopped")

    async def _serve(self, server: GrpcServer) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await server.start()
        self.stdout.write(f"mlxweb gRPC is serving at {', '.join(server.targets)}")
        await stop.wait()
        logger.info("gRPC server stopping")
        await server.stop()
