"""Request bodies are refused with 413 while they are read, before Django buffers them."""

from __future__ import annotations

import asyncio
import tempfile
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.conf import settings
from django.contrib.auth.models import User
from django.core.asgi import get_asgi_application
from django.core.signals import request_finished, request_started
from django.db import close_old_connections
from django.test import Client
from django.urls import reverse

from mlxweb.bodylimit import BodyLimitMiddleware

CHUNK = 64 * 1024
ANONYMOUS = 64 * 1024
SIGNED_IN = 2 * 1024 * 1024


@dataclass
class Exchange:
    """One request through the ASGI app: what the server read and what it answered."""

    consumed: int = 0
    messages: list[dict[str, Any]] = field(default_factory=list)
    spools_rolled_to_disk: int = 0

    @property
    def status(self) -> int:
        return int(self.messages[0]["status"])

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.messages[1:])


class _SpySpool(tempfile.SpooledTemporaryFile):  # type: ignore[type-arg]
    """Django's ASGI body spool, counting the ones that rolled over to a file on disk."""

    rolled: list[bool] = []

    def close(self) -> None:
        _SpySpool.rolled.append(bool(getattr(self, "_rolled", False)))
        super().close()


@pytest.fixture
def spool_spy(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[bool]]:
    _SpySpool.rolled = []
    monkeypatch.setattr("django.core.handlers.asgi.tempfile.SpooledTemporaryFile", _SpySpool)
    yield _SpySpool.rolled


def _send_body(
    path: str,
    *,
    size: int,
    declare: bool,
    cookie: str | None = None,
    content_type: bytes = b"application/x-www-form-urlencoded",
) -> Exchange:
    """POST `size` bytes in 64 KiB chunks, made as they are read (the test holds none of them)."""
    app = BodyLimitMiddleware(get_asgi_application())
    exchange = Exchange()
    headers = [(b"host", b"127.0.0.1"), (b"content-type", content_type)]
    if declare:
        headers.append((b"content-length", str(size).encode()))
    if cookie:
        headers.append((b"cookie", f"{settings.SESSION_COOKIE_NAME}={cookie}".encode()))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    sent = 0

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent >= size:
            await asyncio.Future()  # a client that waits for the answer
        n = min(CHUNK, size - sent)
        sent += n
        exchange.consumed = sent
        return {"type": "http.request", "body": b"a" * n, "more_body": sent < size}

    async def send(message: dict[str, Any]) -> None:
        exchange.messages.append(message)

    # As Django's test client does: a request's end must not close the test's connection (the
    # test database is a file, whose connection holds the test's transaction).
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    try:
        async_to_sync(app)(scope, receive, send)
    finally:
        request_started.connect(close_old_connections)
        request_finished.connect(close_old_connections)
    return exchange


def _cookie(user: User) -> str:
    client = Client()
    client.force_login(user)
    return client.cookies[settings.SESSION_COOKIE_NAME].value


def test_it_uses_the_configured_limits() -> None:
    limits = settings.MLXWEB_CONFIG.server.limits
    assert (limits.anonymous_body_bytes, limits.body_bytes) == (ANONYMOUS, SIGNED_IN)
    # Below Django's in-memory size, so no route but the upload ever spools to disk.
    assert SIGNED_IN < settings.FILE_UPLOAD_MAX_MEMORY_SIZE


def test_it_refuses_a_declared_anonymous_body_before_reading_it(db, spool_spy) -> None:
    exchange = _send_body(reverse("login"), size=128 * 1024**2, declare=True)
    assert exchange.status == 413
    assert b"at most 65536 bytes" in exchange.body
    assert exchange.consumed == 0
    assert spool_spy == []


def test_it_stops_reading_a_streamed_anonymous_body_at_the_limit(db, spool_spy) -> None:
    tracemalloc.start()
    try:
        exchange = _send_body(reverse("login"), size=128 * 1024**2, declare=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert exchange.status == 413
    assert exchange.consumed <= ANONYMOUS + CHUNK
    assert peak < 4 * 1024**2
    assert spool_spy == [False]  # Django's spool stayed in memory and was closed
    assert len(exchange.messages) == 2  # only the 413: Django sent nothing after it


def test_it_stops_a_body_that_outgrows_its_content_length(db) -> None:
    app = BodyLimitMiddleware(get_asgi_application())
    messages: list[dict[str, Any]] = []
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/login/",
        "query_string": b"",
        "headers": [(b"host", b"127.0.0.1"), (b"content-length", b"10")],
    }
    reads = 0

    async def receive() -> dict[str, Any]:
        nonlocal reads
        reads += 1
        return {"type": "http.request", "body": b"a" * CHUNK, "more_body": True}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    async_to_sync(app)(scope, receive, send)
    assert messages[0]["status"] == 413
    assert reads <= 2


def test_it_passes_small_anonymous_bodies_to_django(db) -> None:
    exchange = _send_body(reverse("login"), size=1000, declare=True)
    assert exchange.status != 413  # Django answers (a CSRF failure: this client has no token)
    assert exchange.consumed == 1000


def test_it_gives_signed_in_users_the_moderate_limit(owner: User, spool_spy) -> None:
    cookie = _cookie(owner)
    url = reverse("chat:create")
    fits = _send_body(url, size=ANONYMOUS * 4, declare=True, cookie=cookie)
    assert fits.status != 413
    assert fits.consumed == ANONYMOUS * 4

    declared = _send_body(url, size=64 * 1024**2, declare=True, cookie=cookie)
    assert declared.status == 413 and declared.consumed == 0
    assert f"at most {SIGNED_IN} bytes".encode() in declared.body

    streamed = _send_body(url, size=64 * 1024**2, declare=False, cookie=cookie)
    assert streamed.status == 413
    assert streamed.consumed <= SIGNED_IN + CHUNK
    assert not any(spool_spy)


def test_a_forged_session_cookie_gets_the_anonymous_limit(db) -> None:
    exchange = _send_body(
        reverse("chat:create"), size=ANONYMOUS * 4, declare=True, cookie="not-a-session"
    )
    assert exchange.status == 413 and exchange.consumed == 0


def test_it_gives_the_upload_route_the_upload_limit_for_staff_only(
    owner: User, admin_user: User, settings, spool_spy
) -> None:
    settings.MLXWEB_MAX_UPLOAD_BYTES = 8 * 1024**2
    url = reverse("models_admin:import_gguf")
    multipart = b"multipart/form-data; boundary=xyz"
    admin = _cookie(admin_user)

    over = _send_body(url, size=64 * 1024**2, declare=True, cookie=admin, content_type=multipart)
    assert over.status == 413 and over.consumed == 0
    streamed = _send_body(
        url, size=64 * 1024**2, declare=False, cookie=admin, content_type=multipart
    )
    assert streamed.status == 413
    assert streamed.consumed <= 9 * 1024**2 + CHUNK
    under = _send_body(url, size=4 * 1024**2, declare=True, cookie=admin, content_type=multipart)
    assert under.status != 413 and under.consumed == 4 * 1024**2

    # Not staff: the upload route is just another signed-in route; anonymous: the smallest.
    user = _send_body(url, size=4 * 1024**2, declare=True, cookie=_cookie(owner))
    assert user.status == 413 and user.consumed == 0
    anonymous = _send_body(url, size=ANONYMOUS * 2, declare=True)
    assert anonymous.status == 413 and anonymous.consumed == 0


def test_it_refuses_a_bad_content_length(db) -> None:
    app = BodyLimitMiddleware(get_asgi_application())
    messages: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        raise AssertionError("the body must not be read")

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    scope = {"type": "http", "method": "POST", "path": "/login/", "headers": [
        (b"content-length", b"-5")]}  # fmt: skip
    async_to_sync(app)(scope, receive, send)
    assert messages[0]["status"] == 400


def test_the_served_application_has_the_limits() -> None:
    from mlxweb.asgi import application

    http = application.application_mapping["http"]
    assert isinstance(http, BodyLimitMiddleware)
