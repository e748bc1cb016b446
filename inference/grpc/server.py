"""The gRPC server (grpc.aio) on the running event loop: a Unix socket, optionally localhost TCP.

`manage.py serve` runs it on daphne's loop (Twisted's asyncio reactor), beside the in-process
inference worker: `run_in_reactor`. `manage.py grpc_server` runs it on a loop of its own, with
the Redis channel layer between it and the worker: `GrpcServer.start` / `stop`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
from pathlib import Path
from typing import Any

import grpc
from django.conf import settings
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from inference.grpc import mlxweb_pb2_grpc as pb_grpc
from inference.grpc.service import SERVICE_NAME, MlxwebService

logger = logging.getLogger(__name__)

# How long calls in flight get to end when the server stops; the rest are cancelled, which
# stops their generations (the text so far is kept).
STOP_GRACE_S = 2.0
# How long cancelled calls get to stop their generations after that.
CLEANUP_S = 10.0


class SocketInUse(OSError):
    """Another live server answers on the Unix socket (or holds the TCP port)."""


def claim_socket(path: Path) -> None:
    """Make `path` free for a new Unix socket: refuse if a server answers there, remove a
    socket file a dead server left behind. gRPC would unlink a live one silently."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() and not path.is_symlink():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError as e:
        if e.errno not in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK):
            raise
    else:
        raise SocketInUse(f"another server is listening on {path}")
    finally:
        probe.close()
    path.unlink(missing_ok=True)


class GrpcServer:
    """mlxweb's gRPC service and the standard health service, on one grpc.aio server."""

    def __init__(self, *, socket_path: Path | None, tcp_port: int | None = None) -> None:
        self.socket_path = socket_path
        self.tcp_port = tcp_port
        self.server: Any = None
        self.health = health_aio.HealthServicer()
        self.service = MlxwebService()

    @classmethod
    def from_settings(cls) -> GrpcServer:
        grpc_settings = settings.MLXWEB_CONFIG.server.grpc
        return cls(
            socket_path=grpc_settings.socket_path(settings.VAR_DIR),
            tcp_port=grpc_settings.tcp_port,
        )

    @property
    def targets(self) -> list[str]:
        """Where clients reach it (mlxweb.client's target strings)."""
        targets = [f"unix://{self.socket_path}"] if self.socket_path is not None else []
        return targets + ([f"127.0.0.1:{self.tcp_port}"] if self.tcp_port else [])

    async def start(self) -> None:
        """Bind and start serving on the running loop; raises OSError if it cannot bind."""
        # A call's message may be as large as an HTTP request body may be.
        limit = settings.MLXWEB_CONFIG.server.limits.body_bytes
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limit),
                # Without this a second server could share the TCP port, unnoticed.
                ("grpc.so_reuseport", 0),
            ]
        )
        pb_grpc.add_MlxwebServicer_to_server(self.service, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if self.socket_path is not None:
            claim_socket(self.socket_path)
            # Only this user may connect: the socket is made 0600, never briefly open to others
            # (the umask covers the moment between bind and chmod). 0o077 only tightens what
            # other threads create meanwhile.
            previous = os.umask(0o077)
            try:
                server.add_insecure_port(f"unix:{self.socket_path}")
            finally:
                os.umask(previous)
        if self.tcp_port:
            try:
                server.add_insecure_port(f"127.0.0.1:{self.tcp_port}")
            except RuntimeError as e:
                self._remove_socket()
                raise SocketInUse(f"cannot listen on 127.0.0.1:{self.tcp_port}: {e}") from e
        await server.start()
        if self.socket_path is not None:
            os.chmod(self.socket_path, 0o600)
        self.server = server
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        logger.info("gRPC serving on %s", ", ".join(self.targets))

    async def stop(self, grace: float = STOP_GRACE_S) -> None:
        """Say NOT_SERVING, let calls in flight end for `grace` seconds, cancel the rest."""
        if self.server is None:
            return
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        # grpc.aio cancels the calls still running but does not wait for them: their clean-up
        # (stopping their generations) must run before the loop stops.
        await self.service.wait_for_calls(CLEANUP_S)
        self.server = None
        self._remove_socket()
        logger.info("gRPC server stopped")

    def _remove_socket(self) -> None:
        if self.socket_path is not None:
            with contextlib.suppress(OSError):
                self.socket_path.unlink()


def run_in_reactor(reactor: Any) -> GrpcServer:
    """Start the gRPC server once Twisted's asyncio reactor runs, and stop it before the
    reactor shuts down (while the loop still runs the calls' clean-up).

    A server that cannot bind (another one holds the socket or the port) is logged and left
    out: the web app goes on without it.
    """
    from twisted.internet.defer import Deferred

    server = GrpcServer.from_settings()

    def started(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            logger.error("gRPC server not started: %s", task.exception())

    def start() -> None:
        asyncio.ensure_future(server.start()).add_done_callback(started)

    def stop() -> Deferred[None]:
        return Deferred.fromFuture(asyncio.ensure_future(server.stop()))

    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", stop)
    return server
