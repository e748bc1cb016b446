"""Request body limits, enforced while the body is read, before Django buffers it.

Django's ASGI handler reads a whole request body (spooling it to a temporary file past
FILE_UPLOAD_MAX_MEMORY_SIZE) before any middleware or view runs, so a limit checked in Django
comes after the damage. This wrapper sits in front of it: a declared Content-Length over the
limit gets a 413 before a byte is read, and a body that grows past the limit while streaming gets
a 413 at that point, while Django is told the client went away (it then drops what it had).

Limits (configs/server.yaml): anonymous requests get `limits.anonymous_body_bytes`, signed-in
ones (a session, or a valid API key) `limits.body_bytes`, staff on the GGUF upload route
`library.max_upload_bytes` and signed-in users on the conversations import route
`chat.transfer.MAX_IMPORT_BYTES` (each plus room for the multipart envelope). Who is signed in is
only looked up when a body is bigger than the anonymous limit, so ordinary requests cost nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from http.cookies import CookieError, SimpleCookie
from importlib import import_module
from types import SimpleNamespace
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.urls import reverse

logger = logging.getLogger(__name__)

# ASGI's shapes, loosely: Django's handler and the servers each spell them a little differently.
Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Any]]
Send = Callable[[Any], Awaitable[None]]
ASGIApp = Callable[[Any, Any, Any], Awaitable[None]]

# A multipart upload carries boundaries, headers and the form's other fields besides the file.
MULTIPART_ALLOWANCE = 1024 * 1024
_BODYLESS = {"GET", "HEAD", "OPTIONS", "DELETE", "TRACE"}


class RequestTooLarge(Exception):
    """The body went past its limit while being read."""


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return bytes(value)
    return None


def _content_length(scope: Scope) -> int | None:
    raw = _header(scope, b"content-length")
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        return -1
    return value if value >= 0 else -1


def _session_key(scope: Scope) -> str | None:
    raw = _header(scope, b"cookie")
    if not raw:
        return None
    try:
        cookie = SimpleCookie(raw.decode("latin-1"))
    except CookieError:
        return None
    morsel = cookie.get(settings.SESSION_COOKIE_NAME)
    return morsel.value if morsel is not None else None


def _signed_in_user(session_key: str) -> Any:
    """The session's user (AnonymousUser if none), as Django would find it for the request."""
    from django.contrib.auth import get_user

    engine = import_module(settings.SESSION_ENGINE)
    session = engine.SessionStore(session_key)
    # get_user needs only request.session (it checks the session's password hash too).
    return get_user(SimpleNamespace(session=session))  # type: ignore[arg-type]


def _upload_path() -> str:
    return reverse("models_admin:import_gguf")


def _import_path() -> str:
    return reverse("chat:transfer")


def _api_key_is_valid(authorization: bytes) -> bool:
    """Whether an `Authorization: Bearer` header carries a live API key (inference.api)."""
    from inference.api.services import api_key_authenticate

    scheme, _, token = authorization.decode("latin-1").partition(" ")
    return scheme.lower() == "bearer" and api_key_authenticate(secret=token.strip()) is not None


async def _limit_for(scope: Scope) -> int:
    """The largest body this request may send, given who sends it and where."""
    limits = settings.MLXWEB_CONFIG.server.limits
    # A request with a valid API key counts as signed in (API calls carry no session cookie).
    authorization = _header(scope, b"authorization")
    if authorization and await sync_to_async(_api_key_is_valid)(authorization):
        return int(limits.body_bytes)
    session_key = _session_key(scope)
    if session_key is None:
        return int(limits.anonymous_body_bytes)
    user = await sync_to_async(_signed_in_user)(session_key)
    if not user.is_authenticated:
        return int(limits.anonymous_body_bytes)
    if user.is_staff and scope.get("path") == _upload_path():
        return int(settings.MLXWEB_MAX_UPLOAD_BYTES) + MULTIPART_ALLOWANCE
    if scope.get("path") == _import_path():
        # A conversations import (chat.transfer): the file's own limit, for any signed-in user.
        from chat.transfer import MAX_IMPORT_BYTES

        return max(int(limits.body_bytes), MAX_IMPORT_BYTES + MULTIPART_ALLOWANCE)
    return int(limits.body_bytes)


async def _refuse(send: Send, status: int, text: str) -> None:
    body = text.encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _too_large(limit: int) -> str:
    return f"Request body too large: this request may send at most {limit} bytes.\n"


class BodyLimitMiddleware:
    """ASGI middleware for the HTTP app: 413 for bodies over the caller's limit (see module)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        anonymous = int(settings.MLXWEB_CONFIG.server.limits.anonymous_body_bytes)
        declared = _content_length(scope)
        if declared == -1:
            await _refuse(send, 400, "Bad Content-Length.\n")
            return
        chunked = declared is None and scope.get("method", "GET") not in _BODYLESS
        limit = anonymous
        if chunked or (declared is not None and declared > anonymous):
            limit = await _limit_for(scope)
        if declared is not None and declared > limit:
            logger.info("refused a %d-byte body to %s (limit %d)", declared, scope["path"], limit)
            await _refuse(send, 413, _too_large(limit))
            return
        await self._serve_counting(scope, receive, send, limit)

    async def _serve_counting(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        received = 0
        refused = False

        async def counting_receive() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    refused = True
                    logger.info("refused a body past %d bytes to %s", limit, scope["path"])
                    await _refuse(send, 413, _too_large(limit))
                    # Django stops reading, discards its spool file and sends nothing.
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            if not refused:
                await send(message)

        await self.app(scope, counting_receive, guarded_send)
