"""ASGI entry point: HTTP through the body limits into Django, websockets through the chat
consumers, and the inference worker's named channel (served in-process by `manage.py serve`, or by
`manage.py inference_worker` when scaled out over Redis)."""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any

import django
from django.core.handlers.asgi import ASGIHandler

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mlxweb.settings")


class ClientDisconnected(OSError):
    """The client went away (or the body limit cut it off) before the body ended.

    An OSError, so that Django's `HttpRequest.read` turns it into `UnreadablePostError`, which the
    CSRF check answers with a 403 instead of a 500.
    """


class StreamedBody:
    """A request body read from ASGI `receive` as the request reads it, never spooled.

    The view's thread calls `read`/`readline`; each pulls the next `http.request` message on the
    event loop, so one message is held at a time and the client is slowed down to the pace of
    the writes. The object is also the `receive` Django's disconnect listener gets: that one
    waits until the body has been read to its end (or cut off) before it reads on, so that it
    never takes a body chunk.
    """

    def __init__(self, receive: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._receive = receive
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._buffer = bytearray()
        self._body_read = asyncio.Event()  # the last body message, or a disconnect, was received
        self._disconnected = False
        self.closed = False

    async def __call__(self) -> dict[str, Any]:
        await self._body_read.wait()
        if self._disconnected:
            return {"type": "http.disconnect"}
        return dict(await self._receive())

    async def _next_message(self) -> dict[str, Any]:
        message = dict(await self._receive())
        if message["type"] == "http.disconnect":
            self._disconnected = True
            self._body_read.set()
        elif not message.get("more_body", False):
            self._body_read.set()
        return message

    def _fill(self, size: int) -> None:
        """Pull messages until the buffer holds `size` bytes (-1: all of it) or the body ends."""
        if threading.get_ident() == self._loop_thread:
            # Waiting here would block the loop that delivers the body.
            raise RuntimeError("a streamed body is read from a sync view's thread")
        while not self._body_read.is_set() and (size < 0 or len(self._buffer) < size):
            if self.closed:
                raise ValueError("read of a closed request body")
            future = asyncio.run_coroutine_threadsafe(self._next_message(), self._loop)
            message = future.result()
            self._buffer += message.get("body", b"")
        if self._disconnected:
            raise ClientDisconnected("the client went away before the request body ended")

    def read(self, size: int = -1) -> bytes:
        self._fill(size)
        end = len(self._buffer) if size < 0 else min(size, len(self._buffer))
        data = bytes(self._buffer[:end])
        del self._buffer[:end]
        return data

    def readline(self, size: int = -1) -> bytes:
        while (
            b"\n" not in self._buffer
            and not self._body_read.is_set()
            and (size < 0 or len(self._buffer) < size)
        ):
            self._fill(len(self._buffer) + 1)
        end = self._buffer.find(b"\n") + 1 or len(self._buffer)
        if size >= 0:
            end = min(end, size)
        data = bytes(self._buffer[:end])
        del self._buffer[:end]
        return data

    def close(self) -> None:
        self.closed = True
        self._buffer.clear()


class StreamingUploadASGIHandler(ASGIHandler):
    """Django's ASGI handler, except that a POST to the GGUF upload route is not read up front.

    Django's `read_body` spools every body into a temporary file before the view runs; for a
    multi-gigabyte GGUF that is a second full copy on disk besides the one the upload handler
    (`models_admin.uploads.GGUFUploadHandler`) writes into the upload folder. On that route the
    request gets a `StreamedBody` instead, so the multipart parser feeds the upload handler as
    the chunks arrive. Authentication and the staff check run before the body is touched; the
    body limit (`mlxweb.bodylimit`) still counts every chunk, because it wraps `receive`.
    """

    async def handle(self, scope: Any, receive: Any, send: Any) -> None:
        if scope.get("method") == "POST" and scope.get("path") == _upload_path():
            # `handle` hands the same `receive` to `read_body` and to the disconnect listener.
            receive = StreamedBody(receive, asyncio.get_running_loop())
        await super().handle(scope, receive, send)

    async def read_body(self, receive: Any) -> Any:
        if isinstance(receive, StreamedBody):
            return receive
        return await super().read_body(receive)


def _upload_path() -> str:
    from django.urls import reverse

    return reverse("models_admin:import_gguf")


# Django must be set up before anything imports models: `get_asgi_application()`'s own two steps,
# with the handler above in place of Django's.
django.setup(set_prefix=False)
django_asgi_app = StreamingUploadASGIHandler()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ChannelNameRouter, ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.conf import settings  # noqa: E402

import chat.routing  # noqa: E402
from inference.worker import InferenceWorker  # noqa: E402
from mlxweb.bodylimit import BodyLimitMiddleware  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": BodyLimitMiddleware(django_asgi_app),
        "websocket": AllowedHostsOriginValidator(
            AuthMiddlewareStack(URLRouter(chat.routing.websocket_urlpatterns))
        ),
        "channel": ChannelNameRouter({settings.INFERENCE_CHANNEL: InferenceWorker.as_asgi()}),
    }
)
