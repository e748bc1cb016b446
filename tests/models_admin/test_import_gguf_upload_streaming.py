"""GGUF uploads through the served ASGI app (`mlxweb.asgi.application`): the file is written
once, into the upload folder, as the chunks arrive; refusals stop reading and leave nothing."""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.conf import settings as django_settings
from django.contrib.auth.models import User
from django.test import Client
from django.urls import reverse
from django.utils.crypto import get_random_string

from models_admin.models import ModelJob

pytestmark = pytest.mark.django_db(transaction=True)

URL = reverse("models_admin:import_gguf")
CHUNK = 64 * 1024
BOUNDARY = "mlxweb-test-boundary"


@dataclass
class Upload:
    """One POST through the app, made chunk by chunk as the app asks for it."""

    consumed: int = 0
    messages: list[dict[str, Any]] = field(default_factory=list)
    # At each receive: (bytes handed over so far, bytes in the upload folder, bytes elsewhere).
    samples: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def status(self) -> int:
        return int(self.messages[0]["status"])

    @property
    def headers(self) -> dict[str, str]:
        return {
            bytes(k).decode().lower(): bytes(v).decode() for k, v in self.messages[0]["headers"]
        }

    @property
    def text(self) -> str:
        return b"".join(m.get("body", b"") for m in self.messages[1:]).decode()


@pytest.fixture
def spool_dir(tmp_path: Path, settings: Any, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty folder every temporary file of this process goes to (Django's body spool uses
    the `tempfile` default, its upload handlers FILE_UPLOAD_TEMP_DIR)."""
    folder = tmp_path / "spool"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    settings.FILE_UPLOAD_TEMP_DIR = str(folder)
    return folder


def _bytes_open_under(folder: Path) -> int:
    """Bytes in the files this process has open under `folder`, unlinked ones included
    (a TemporaryFile has no name in the folder's listing)."""
    total = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith(f"{folder}/"):
                total += os.stat(f"/proc/self/fd/{fd}").st_size
        except OSError:
            continue
    return total


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir()) if folder.is_dir() else 0


def _uploads(library: Path) -> list[str]:
    folder = library / ".uploads"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def _signed_in(user: User | None) -> tuple[str, str]:
    """The Cookie header of a browser (signed in as `user`) and its form's CSRF token.

    The token is the cookie's secret itself, which Django accepts as well as a masked one.
    """
    secret = get_random_string(32)
    cookies = [f"{django_settings.CSRF_COOKIE_NAME}={secret}"]
    if user is not None:
        client = Client()
        client.force_login(user)
        session = client.cookies[django_settings.SESSION_COOKIE_NAME].value
        cookies.append(f"{django_settings.SESSION_COOKIE_NAME}={session}")
    return "; ".join(cookies), secret


def _gguf(size: int) -> Iterator[bytes]:
    yield b"GGUF"
    sent = 4
    while sent < size:
        n = min(CHUNK, size - sent)
        yield bytes([sent // CHUNK % 251]) * n
        sent += n


def _multipart(
    file_chunks: Iterator[bytes], *, token: str | None, fields: dict[str, str] | None = None
) -> Iterator[bytes]:
    """A browser's form post: the token and the other fields first, then the file."""
    form = {"bits": "keep", "group_size": "64", **(fields or {})}
    if token is not None:
        form["csrfmiddlewaretoken"] = token
    head = "".join(
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
        for name, value in form.items()
    )
    head += (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="upload"; '
        'filename="Big Model.Q8_0.gguf"\r\nContent-Type: application/octet-stream\r\n\r\n'
    )
    yield head.encode()
    yield from file_chunks
    yield f"\r\n--{BOUNDARY}--\r\n".encode()


def _post(
    body: Iterator[bytes],
    *,
    cookie: str | None,
    length: int | None,
    library: Path,
    spool: Path,
) -> Upload:
    """POST `body` through the served app; `length`: the declared Content-Length, if any."""
    from mlxweb.asgi import application

    upload = Upload()
    headers = [
        (b"host", b"127.0.0.1"),
        (b"content-type", f"multipart/form-data; boundary={BOUNDARY}".encode()),
    ]
    if length is not None:
        headers.append((b"content-length", str(length).encode()))
    if cookie:
        headers.append((b"cookie", cookie.encode()))
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": URL, "raw_path": URL.encode(), "query_string": b"",
        "root_path": "", "headers": headers, "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }  # fmt: skip
    pending = bytearray()
    source = iter(body)
    finished = False

    async def receive() -> dict[str, Any]:
        nonlocal finished
        if finished:
            await asyncio.Future()  # a client that waits for the answer
        upload.samples.append(
            (upload.consumed, _folder_bytes(library / ".uploads"), _bytes_open_under(spool))
        )
        while len(pending) < CHUNK and (piece := next(source, None)) is not None:
            pending.extend(piece)
        chunk = bytes(pending[:CHUNK])
        del pending[:CHUNK]
        upload.consumed += len(chunk)
        finished = not pending and _exhausted(source, pending)
        return {"type": "http.request", "body": chunk, "more_body": not finished}

    async def send(message: dict[str, Any]) -> None:
        upload.messages.append(message)

    async_to_sync(application)(scope, receive, send)
    return upload


def _exhausted(source: Iterator[bytes], pending: bytearray) -> bool:
    """Whether the body has no more bytes (peeking one piece into `pending`)."""
    piece = next(source, None)
    if piece is None:
        return True
    pending.extend(piece)
    return False


def _length(size: int, token: str | None) -> int:
    return sum(len(part) for part in _multipart(_gguf(size), token=token))


def test_it_writes_an_upload_once_into_the_upload_folder_as_it_arrives(
    admin_user: User, library: Path, spool_dir: Path
) -> None:
    size = 8 * 1024**2  # past FILE_UPLOAD_MAX_MEMORY_SIZE: Django's own spool would go to disk
    assert size > django_settings.FILE_UPLOAD_MAX_MEMORY_SIZE
    cookie, token = _signed_in(admin_user)
    tracemalloc.start()
    try:
        upload = _post(
            _multipart(_gguf(size), token=token),
            cookie=cookie,
            length=_length(size, token),
            library=library,
            spool=spool_dir,
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert upload.status == 302, upload.text
    job = ModelJob.objects.get()
    assert upload.headers["location"] == reverse("models_admin:job_detail", args=[job.code])
    stored = Path(job.params["source"])
    assert stored.parent == library / ".uploads"
    assert job.params["uploaded_as"] == "Big Model.Q8_0.gguf"
    expected = hashlib.sha256(b"".join(_gguf(size))).hexdigest()
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == expected
    assert _uploads(library) == [stored.name]
    # The file grew in the upload folder while the body was still arriving...
    for consumed, in_folder, _ in upload.samples:
        if consumed > 2 * CHUNK:
            assert in_folder >= consumed - 3 * CHUNK, (consumed, in_folder)
    # ...and no other copy was ever written, nor held in memory.
    assert max(elsewhere for _, _, elsewhere in upload.samples) == 0
    assert list(spool_dir.iterdir()) == []
    assert peak < 4 * 1024**2


def test_it_keeps_an_upload_by_moving_it_into_the_models_folder(
    admin_user: User, library: Path, spool_dir: Path
) -> None:
    cookie, token = _signed_in(admin_user)
    size = 3 * 1024**2
    fields = {"keep_upload": "on"}
    body = _multipart(_gguf(size), token=token, fields=fields)
    length = sum(len(p) for p in _multipart(_gguf(size), token=token, fields=fields))

    upload = _post(body, cookie=cookie, length=length, library=library, spool=spool_dir)

    assert upload.status == 302, upload.text
    kept = library / "Big-Model.Q8_0.gguf"
    assert ModelJob.objects.get().params["source"] == str(kept)
    assert kept.stat().st_size == size
    assert _uploads(library) == []
    assert max(elsewhere for _, _, elsewhere in upload.samples) == 0


def test_it_sends_anonymous_people_to_sign_in_without_reading_the_body(
    db: Any, library: Path, spool_dir: Path
) -> None:
    cookie, token = _signed_in(None)
    small = 32 * 1024  # within the anonymous limit, so Django answers
    upload = _post(
        _multipart(_gguf(small), token=token),
        cookie=cookie,
        length=_length(small, token),
        library=library,
        spool=spool_dir,
    )

    assert upload.status == 302
    assert upload.headers["location"].startswith(reverse("login"))
    assert upload.consumed == 0
    assert _uploads(library) == [] and not ModelJob.objects.exists()


def test_it_refuses_a_big_anonymous_upload_before_reading_it(
    db: Any, library: Path, spool_dir: Path
) -> None:
    size = 8 * 1024**2
    upload = _post(
        _multipart(_gguf(size), token=None),
        cookie=None,
        length=_length(size, None),
        library=library,
        spool=spool_dir,
    )

    assert upload.status == 413 and upload.consumed == 0
    assert _uploads(library) == []


def test_it_refuses_people_who_are_not_staff(owner: User, library: Path, spool_dir: Path) -> None:
    cookie, token = _signed_in(owner)
    size = 1024**2  # within the signed-in limit, so the view answers
    upload = _post(
        _multipart(_gguf(size), token=token),
        cookie=cookie,
        length=_length(size, token),
        library=library,
        spool=spool_dir,
    )

    assert upload.status == 403
    # (Django's 403 page checks CSRF, which reads the form: in memory, under the 2 MiB limit.)
    assert max(elsewhere for _, _, elsewhere in upload.samples) == 0
    assert _uploads(library) == [] and not ModelJob.objects.exists()


def test_it_refuses_an_upload_without_the_csrf_token_and_keeps_nothing(
    admin_user: User, library: Path, spool_dir: Path
) -> None:
    cookie, _ = _signed_in(admin_user)
    size = 3 * 1024**2
    upload = _post(
        _multipart(_gguf(size), token=None),
        cookie=cookie,
        length=_length(size, None),
        library=library,
        spool=spool_dir,
    )

    assert upload.status == 403
    assert "CSRF" in upload.text
    assert _uploads(library) == [] and not ModelJob.objects.exists()
    assert max(elsewhere for _, _, elsewhere in upload.samples) == 0


def test_it_stops_reading_an_upload_that_is_not_a_gguf(
    admin_user: User, library: Path, spool_dir: Path
) -> None:
    cookie, token = _signed_in(admin_user)
    size = 8 * 1024**2
    png = b"\x89PNG" + bytes(size - 4)
    length = sum(len(p) for p in _multipart(iter([png]), token=token))
    upload = _post(
        _multipart(iter([png]), token=token),
        cookie=cookie,
        length=length,
        library=library,
        spool=spool_dir,
    )

    assert upload.status == 400
    assert "Big Model.Q8_0.gguf is not a GGUF file" in upload.text
    assert upload.consumed <= 4 * CHUNK
    assert _uploads(library) == [] and not ModelJob.objects.exists()


def test_it_reads_nothing_of_an_upload_without_a_length(
    admin_user: User, library: Path, spool_dir: Path
) -> None:
    # Django's multipart parser reads only a declared Content-Length; a chunked body used to be
    # read (and spooled) whole anyway before the view looked at it.
    cookie, token = _signed_in(admin_user)
    upload = _post(
        _multipart(_gguf(4 * 1024**2), token=token),
        cookie=cookie,
        length=None,
        library=library,
        spool=spool_dir,
    )

    assert upload.status == 403
    assert upload.consumed == 0
    assert _uploads(library) == [] and not ModelJob.objects.exists()


def test_it_refuses_a_declared_upload_over_the_limit_before_reading_it(
    admin_user: User, library: Path, spool_dir: Path, settings: Any
) -> None:
    settings.MLXWEB_MAX_UPLOAD_BYTES = 2 * 1024**2
    cookie, token = _signed_in(admin_user)
    size = 16 * 1024**2
    upload = _post(
        _multipart(_gguf(size), token=token),
        cookie=cookie,
        length=_length(size, token),
        library=library,
        spool=spool_dir,
    )

    assert upload.status == 413 and upload.consumed == 0
    assert _uploads(library) == []


def test_it_stops_reading_a_file_over_the_limit_inside_the_envelope(
    admin_user: User, library: Path, spool_dir: Path, settings: Any
) -> None:
    # The body limit allows the file's limit plus room for the multipart envelope; a file that
    # uses that room is refused by the upload handler, which stops reading there.
    settings.MLXWEB_MAX_UPLOAD_BYTES = 2 * 1024**2
    cookie, token = _signed_in(admin_user)
    size = 2 * 1024**2 + 512 * 1024
    upload = _post(
        _multipart(_gguf(size), token=token),
        cookie=cookie,
        length=_length(size, token),
        library=library,
        spool=spool_dir,
    )

    assert upload.status == 413
    assert "larger than the upload limit" in upload.text
    assert upload.consumed <= 2 * 1024**2 + 4 * CHUNK
    assert _uploads(library) == [] and not ModelJob.objects.exists()
