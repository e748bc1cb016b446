"""daphne, bounding and streaming request bodies (`manage.py serve` runs this server).

Stock daphne takes a request body the way Twisted's `http.Request` does: all of it, into a
temporary file under TMPDIR, then parses a form POST in memory, and only then starts the
application and hands it every chunk at once. The body limits of `mlxweb.bodylimit` and the
streamed GGUF upload (`mlxweb.asgi.StreamingUploadASGIHandler`) came after that damage. Here:

- A declared `Content-Length` over the route's server cap gets 413 as soon as the headers are
  in, and the connection is closed; a chunked body is counted and cut off past the cap. The cap
  is the largest body the application could accept on that route (the GGUF upload route:
  `library.max_upload_bytes` plus the multipart envelope; every other route: the signed-in
  `limits.body_bytes`); the application's middleware still applies the finer limits (anonymous
  callers, staff only on the upload).
- Twisted never parses a body, and never stores one: the application starts when the headers are
  complete and each chunk goes on its queue as it arrives. While more than `QUEUE_HIGH_BYTES`
  wait unread there, the connection stops reading (TCP slows the client down) until the
  application takes them.

Bodyless requests and websocket upgrades go through daphne unchanged.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from functools import partial
from typing import Any
from urllib.parse import unquote

from daphne.http_protocol import HTTPFactory, WebRequest
from daphne.server import Server
from django.conf import settings
from django.urls import reverse

from mlxweb.bodylimit import MULTIPART_ALLOWANCE

logger = logging.getLogger(__name__)

# Twisted reads up to 64 KiB at a time: a few reads may wait in the application's queue.
QUEUE_HIGH_BYTES = 4 * 64 * 1024
QUEUE_LOW_BYTES = 64 * 1024


class BodyCaps:
    """The largest body any caller may send, per route; read from the settings once."""

    def __init__(self) -> None:
        limits = settings.MLXWEB_CONFIG.server.limits
        self.default = max(int(limits.body_bytes), int(limits.anonymous_body_bytes))
        self.upload = max(self.default, int(settings.MLXWEB_MAX_UPLOAD_BYTES) + MULTIPART_ALLOWANCE)
        self.upload_path = reverse("models_admin:import_gguf")

    def for_target(self, target: bytes) -> int:
        """The cap for a request line's target (`/path?query`), decoded as daphne decodes it."""
        path = unquote(target.split(b"?", 1)[0].decode("ascii", "replace"))
        return self.upload if path == self.upload_path else self.default


class ApplicationQueue(asyncio.Queue[dict[str, Any]]):
    """One connection's application input queue, counting the body bytes that wait in it.

    The application's `receive` is this queue's `get`, which ends in `get_nowait`: each message
    taken calls `on_take`, so the request can start reading from the client again.
    """

    def __init__(self) -> None:
        super().__init__()
        self.waiting_bytes = 0
        self.on_take: Callable[[], None] | None = None

    def put_nowait(self, item: dict[str, Any]) -> None:
        if item.get("type") == "http.request":
            self.waiting_bytes += len(item.get("body", b""))
        super().put_nowait(item)

    def get_nowait(self) -> dict[str, Any]:
        item = super().get_nowait()
        if item.get("type") == "http.request":
            self.waiting_bytes -= len(item.get("body", b""))
            if self.on_take is not None:
                self.on_take()
        return item


class _BodyStreamedSeparately:
    """Stands in for Twisted's `request.content` while the body streams to the application.

    daphne's `process()` seeks the content, then, finding it closed, leaves the body alone
    ("a prematurely abandoned request") instead of reading it into the queue: the request puts
    the chunks there itself as they arrive.
    """

    closed = True

    def seek(self, offset: int, whence: int = 0) -> int:
        return 0

    def read(self, size: int = -1) -> bytes:
        return b""

    def close(self) -> None:
        pass


class BoundedWebRequest(WebRequest):  # type: ignore[misc]  # daphne is untyped
    """daphne's request, bounding the body and streaming it to the application (see module)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._cap = 0
        self._received = 0
        self._expected: int | None = None
        self._streaming = False
        self._body_complete = False
        self._refused = False
        self._finish_after_body = False
        self._reading_paused = False
        # Twisted's own form parsing reads the whole body into memory.
        super().__init__(*args, parsePOSTFormSubmission=False, **kwargs)

    # Twisted's channel calls these: headers done, each body chunk, body done.

    def gotLength(self, length: int | None) -> None:
        channel = self.channel
        # Twisted sets these in requestReceived, after the body; the scope needs them now.
        self.method, self.uri, self.clientproto = channel._command, channel._path, channel._version
        self.path = self.uri.split(b"?", 1)[0]
        self._cap = self.server.body_caps.for_target(self.uri)
        self._expected = length
        if length is not None and length > self._cap:
            logger.info(
                "refused a %d-byte body to %s (cap %d)",
                length,
                self.path.decode("ascii", "replace"),
                self._cap,
            )
            # No "100 Continue" after the refusal (the channel sends it after gotLength).
            self.requestHeaders.removeHeader(b"Expect")
            self._refuse()
            return
        if length == 0 or self.requestHeaders.hasHeader(b"Upgrade"):
            # Nothing to stream: daphne's way (a websocket upgrade carries no body).
            super().gotLength(length)
            return
        self._streaming = True
        self.content = _BodyStreamedSeparately()
        # daphne builds the scope and starts the application (synchronously: the queue is set
        # when this returns), then leaves the body to handleContentChunk.
        self.process()
        if self.application_queue is not None:
            self.application_queue.on_take = self._resume_reading_if_drained

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused or self.finished:
            return
        self._received += len(data)
        if self._received > self._cap:
            logger.info(
                "cut off a body past %d bytes to %s",
                self._cap,
                self.path.decode("ascii", "replace"),
            )
            self._refuse()
            return
        if self._finish_after_body:
            return  # discarded: the answer is given
        if not self._streaming:
            super().handleContentChunk(data)
            return
        queue = self.application_queue
        if queue is None or not data:
            return
        more_body = self._expected is None or self._received < self._expected
        queue.put_nowait({"type": "http.request", "body": data, "more_body": more_body})
        if queue.waiting_bytes > QUEUE_HIGH_BYTES and not self._reading_paused:
            self._reading_paused = True
            self.channel._networkProducer.pauseProducing()

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._refused:
            return
        if not self._streaming:
            super().requestReceived(command, path, version)
            return
        self._body_complete = True
        self._resume_reading()
        if self._finish_after_body:
            self.finish()
        elif self._expected is None and self.application_queue is not None:
            # A chunked body's end is only known now.
            self.application_queue.put_nowait(
                {"type": "http.request", "body": b"", "more_body": False}
            )

    # The application's side.

    def _resume_reading_if_drained(self) -> None:
        if self.application_queue.waiting_bytes <= QUEUE_LOW_BYTES:
            self._resume_reading()

    def _resume_reading(self) -> None:
        # Twisted deletes `channel` when the request is done, and sets it to None when the
        # connection is lost.
        channel = getattr(self, "channel", None)
        if self._reading_paused and channel is not None:
            self._reading_paused = False
            channel._networkProducer.resumeProducing()

    def handle_reply(self, message: dict[str, Any]) -> None:
        if not self._refused:
            super().handle_reply(message)

    def finish(self) -> None:
        if self._streaming and not self._body_complete and not self._refused:
            # The application answered before the body ended (a refusal, a bad upload). Twisted
            # would hand the connection to the next request while the rest of this body is
            # still coming, so the request ends once the body has been read (and discarded:
            # it is within the cap); the client reads the answer instead of a reset.
            if not self._finish_after_body:
                self._finish_after_body = True
                if self.application_queue is not None:
                    self.application_queue.on_take = None
                self._resume_reading()
            return
        if self.application_queue is not None:
            self.application_queue.on_take = None
        super().finish()

    def _refuse(self) -> None:
        """413 (unless an answer has begun), then close: the rest of the body is never read."""
        self._refused = True
        if self.application_queue is not None:
            self.application_queue.on_take = None
            self.send_disconnect()
        if not self.startedWriting:
            body = f"Request body too large: at most {self._cap} bytes here.\n".encode()
            self.setResponseCode(413)
            self.responseHeaders.setRawHeaders(b"Content-Type", [b"text/plain; charset=utf-8"])
            self.responseHeaders.setRawHeaders(b"Content-Length", [str(len(body)).encode()])
            self.responseHeaders.setRawHeaders(b"Connection", [b"close"])
            self.write(body)
        self.channel.persistent = False
        self.channel.loseConnection()


class BoundedHTTPFactory(HTTPFactory):  # type: ignore[misc]  # daphne is untyped
    """daphne's HTTP factory, with `BoundedWebRequest` as each connection's request class."""

    def buildProtocol(self, addr: Any) -> Any:
        protocol = super().buildProtocol(addr)
        protocol.requestFactory = BoundedWebRequest
        return protocol


class BoundedServer(Server):  # type: ignore[misc]  # daphne is untyped
    """daphne's server with bounded, streamed request bodies (see module)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.body_caps = BodyCaps()

    # daphne's run() builds `HTTPFactory(self)` itself and has no hook for the class: whatever
    # it assigns, its listeners get ours.
    @property
    def http_factory(self) -> HTTPFactory:
        return self._bounded_http_factory

    @http_factory.setter
    def http_factory(self, _daphnes: HTTPFactory) -> None:
        self._bounded_http_factory = BoundedHTTPFactory(self)

    def create_application(self, protocol: Any, scope: dict[str, Any]) -> ApplicationQueue | None:
        """daphne's, with an `ApplicationQueue` as the application's input queue."""
        assert "application_instance" not in self.connections[protocol]
        input_queue = ApplicationQueue()
        scope.setdefault("asgi", {"version": "3.0"})
        application_instance = self.application(
            scope=scope, receive=input_queue.get, send=partial(self.handle_reply, protocol)
        )
        if protocol not in self.connections:
            return None
        self.connections[protocol]["application_instance"] = asyncio.ensure_future(
            application_instance, loop=asyncio.get_event_loop()
        )
        return input_queue
