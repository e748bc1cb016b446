"""Request bodies through the real server (`manage.py serve`, daphne as `mlxweb.server` runs it):
refused or cut off at the route's cap before they are stored, streamed to the application, and
never copied into TMPDIR or held in the server's memory."""

from __future__ import annotations

import http.client
import os
import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.live import Browserless, Site

MiB = 1024**2
BOUNDARY = "mlxweb-server-bodies"


class ServerWatch:
    """Samples the server process's resident memory and its open files under TMPDIR."""

    def __init__(self, pid: int, tmp: Path) -> None:
        self.pid = pid
        self.tmp = tmp
        self.base_rss = self.rss()
        self.peak_rss = self.base_rss
        self.peak_tmp_bytes = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch)

    def rss(self) -> int:
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def tmp_bytes(self) -> int:
        total = 0
        for fd in os.listdir(f"/proc/{self.pid}/fd"):
            try:
                if os.readlink(f"/proc/{self.pid}/fd/{fd}").startswith(f"{self.tmp}/"):
                    total += os.stat(f"/proc/{self.pid}/fd/{fd}").st_size
            except OSError:
                continue
        return total

    def _watch(self) -> None:
        while not self._done.wait(0.02):
            self.peak_rss = max(self.peak_rss, self.rss())
            self.peak_tmp_bytes = max(self.peak_tmp_bytes, self.tmp_bytes())

    @property
    def rss_growth(self) -> int:
        return self.peak_rss - self.base_rss

    def __enter__(self) -> ServerWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("server-bodies")
    (root / "tmp").mkdir()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MLXWEB_")},
        "DJANGO_SETTINGS_MODULE": "mlxweb.settings",
        "MLXWEB_VAR_DIR": str(root / "var"),
        "MLXWEB_SECRET_KEY": "server-bodies-test",
        "TMPDIR": str(root / "tmp"),
        # No job worker: nothing here runs a job.
        "MLXWEB_CELERY_BROKER_URL": "memory://",
    }
    site = Site(env=env, log_dir=root)
    site.manage("migrate", "--noinput", "-v0")
    site.manage("shell", "-c", "from django.contrib.auth.models import User; "
                "User.objects.create_user('member', password='member-pass'); "
                "User.objects.create_superuser('staff', password='staff-pass')")  # fmt: skip
    site.serve("--no-worker", "--no-warm-up")
    yield site
    site.stop_all()


@pytest.fixture
def watch(site: Site) -> ServerWatch:
    return ServerWatch(site.processes["web"].pid, Path(site.env["TMPDIR"]))


def _connect(site: Site) -> socket.socket:
    return socket.create_connection(("127.0.0.1", site.port), timeout=30)


def _head(path: str, headers: dict[str, str]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def _send_chunked(sock: socket.socket, total: int) -> int:
    """Send up to `total` bytes as 64 KiB chunks; returns how many went out before the server
    closed the connection."""
    chunk = b"a" * 65536
    frame = b"10000\r\n" + chunk + b"\r\n"
    sent = 0
    try:
        while sent < total:
            sock.sendall(frame)
            sent += len(chunk)
        sock.sendall(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass
    return sent


def test_it_refuses_a_declared_oversize_body_before_it_is_sent(
    site: Site, watch: ServerWatch
) -> None:
    with watch, _connect(site) as sock:
        sock.sendall(
            _head("/login/", {
                "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
                "Content-Length": str(200 * MiB),
            })
        )  # fmt: skip
        answer = _read_all(sock)  # not a byte of the body was sent
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert b"connection: close" in answer.lower()
    assert watch.peak_tmp_bytes == 0
    assert watch.rss_growth < 16 * MiB
    assert os.listdir(site.env["TMPDIR"]) == []


def test_it_cuts_off_a_chunked_body_past_the_cap(site: Site, watch: ServerWatch) -> None:
    with watch, _connect(site) as sock:
        sock.sendall(
            _head("/login/", {
                "Content-Type": "application/x-www-form-urlencoded",
                "Transfer-Encoding": "chunked",
            })
        )  # fmt: skip
        sent = _send_chunked(sock, 200 * MiB)
        answer = _read_all(sock)
    # The server stopped reading past the cap (2 MiB, the signed-in limit, for this route);
    # what got out fits in the sockets' buffers.
    assert sent < 64 * MiB
    assert answer == b"" or answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert watch.peak_tmp_bytes == 0
    assert watch.rss_growth < 16 * MiB
    assert os.listdir(site.env["TMPDIR"]) == []


def test_it_reads_out_a_body_the_application_refused_and_answers(site: Site) -> None:
    # Within the server's cap, over the anonymous limit: the application answers 413 before
    # reading; the server reads the rest (discarding it) so the client gets the answer.
    body = b"a" * MiB
    connection = http.client.HTTPConnection("127.0.0.1", site.port, timeout=30)
    connection.request(
        "POST", "/login/", body=body,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )  # fmt: skip
    response = connection.getresponse()
    assert response.status == 413
    assert b"at most 65536 bytes" in response.read()


def test_it_still_takes_ordinary_form_posts(site: Site) -> None:
    browser = Browserless(site.url)
    url, page = browser.post("/login/", {"username": "member", "password": "member-pass"})
    assert not url.endswith("/login/"), page[:500]
    # Signed in, on one kept-alive connection: streamed bodies leave it ready for the next.
    connection = http.client.HTTPConnection("127.0.0.1", site.port, timeout=30)
    for _ in range(3):
        connection.request(
            "POST", "/login/", body=b"username=member&password=wrong",
            headers={"Content-Type": "application/x-www-form-urlencoded",
                     "Cookie": browser.cookie_header()},
        )  # fmt: skip
        response = connection.getresponse()
        response.read()
        assert response.status == 403  # no CSRF token: Django read the body and answered


def test_it_streams_a_chunked_body_to_the_application(site: Site) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", site.port, timeout=30)
    connection.request(
        "POST", "/login/", body=iter([b"username=", b"member&pass", b"word=x"]),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        encode_chunked=True,
    )  # fmt: skip
    response = connection.getresponse()
    response.read()
    assert response.status == 403  # read whole, then refused for want of a CSRF token


def test_it_answers_a_refused_upload_after_reading_it_out(site: Site, watch: ServerWatch) -> None:
    # The upload handler stops at the first bytes (not a GGUF) and the view answers 400 while
    # most of the body is still on its way: the client sends it all, then reads the answer.
    browser = Browserless(site.url)
    browser.post("/login/", {"username": "staff", "password": "staff-pass"})
    _, page = browser.get("/models/import/")
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page)
    assert token
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="csrfmiddlewaretoken"\r\n\r\n'
        f"{token.group(1)}\r\n"
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="upload"; '
        'filename="notes.gguf"\r\nContent-Type: application/octet-stream\r\n\r\n'
    ).encode()
    tail = f"\r\n--{BOUNDARY}--\r\n".encode()
    size = 32 * MiB
    with watch:
        connection = http.client.HTTPConnection("127.0.0.1", site.port, timeout=60)
        connection.putrequest("POST", "/models/import/")
        for name, value in {
            "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
            "Content-Length": str(len(head) + size + len(tail)),
            "Cookie": browser.cookie_header(),
            "Referer": f"{site.url}/models/import/",
        }.items():
            connection.putheader(name, value)
        connection.endheaders()
        connection.send(head)
        for _ in range(size // MiB):
            connection.send(b"x" * MiB)
        connection.send(tail)
        response = connection.getresponse()
        text = response.read().decode()
    assert response.status == 400
    assert "notes.gguf is not a GGUF file" in text
    assert watch.rss_growth < 16 * MiB
    assert watch.peak_tmp_bytes == 0
