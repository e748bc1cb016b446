"""A GGUF upload through the real server (`manage.py serve`: daphne as `mlxweb.server` runs it):
what lands on disk, and where, and how much memory the server holds while the upload streams."""

from __future__ import annotations

import http.client
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.live import ROOT, Browserless, free_port, wait_for_port

SIZE = 64 * 1024**2
BOUNDARY = "mlxweb-live-boundary"


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _open_bytes_under(pid: int, folder: Path) -> int:
    """Bytes in the files `pid` has open under `folder`, unlinked temporary files included."""
    total = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(f"{folder}/"):
                total += os.stat(f"/proc/{pid}/fd/{fd}").st_size
        except OSError:
            continue
    return total


@pytest.fixture(scope="module")
def upload(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    """One staff upload of SIZE bytes; the peak bytes in the server's temporary folder, and how
    far the server's resident memory grew."""
    root = tmp_path_factory.mktemp("live-upload")
    tmp = root / "tmp"
    tmp.mkdir()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MLXWEB_")},
        "DJANGO_SETTINGS_MODULE": "mlxweb.settings",
        "MLXWEB_VAR_DIR": str(root / "var"),
        "MLXWEB_SECRET_KEY": "live-upload-test",
        "TMPDIR": str(tmp),
        # No job worker: the import job would remove the upload this test looks at.
        "MLXWEB_CELERY_BROKER_URL": "memory://",
    }

    def manage(*args: str) -> None:
        subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=env, check=True,
                       capture_output=True, timeout=120)  # fmt: skip

    manage("migrate", "--noinput", "-v0")
    manage("shell", "-c", "from django.contrib.auth.models import User; "
           "User.objects.create_superuser('staff', password='live-upload-pass')")  # fmt: skip
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "manage.py", "serve", "--port", str(port), "--no-worker", "--no-warm-up"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for_port(port, server)
        browser = Browserless(f"http://127.0.0.1:{port}")
        browser.post("/login/", {"username": "staff", "password": "live-upload-pass"})
        _, page = browser.get("/models/import/")
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page)
        assert token
        head = (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="csrfmiddlewaretoken"\r\n\r\n'
            f"{token.group(1)}\r\n"
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="bits"\r\n\r\nkeep\r\n'
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="group_size"\r\n\r\n64\r\n'
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="upload"; '
            'filename="live.gguf"\r\nContent-Type: application/octet-stream\r\n\r\n'
        ).encode()
        tail = f"\r\n--{BOUNDARY}--\r\n".encode()
        peak = 0
        base_rss = peak_rss = _rss(server.pid)
        done = threading.Event()

        def watch() -> None:
            nonlocal peak, peak_rss
            while not done.wait(0.02):
                peak = max(peak, _open_bytes_under(server.pid, tmp))
                peak_rss = max(peak_rss, _rss(server.pid))

        watcher = threading.Thread(target=watch)
        watcher.start()
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        connection.putrequest("POST", "/models/import/")
        for name, value in {
            "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
            "Content-Length": str(len(head) + SIZE + len(tail)),
            "Cookie": browser.cookie_header(),
            "Referer": f"http://127.0.0.1:{port}/models/import/",
        }.items():
            connection.putheader(name, value)
        connection.endheaders()
        connection.send(head + b"GGUF" + b"\x01" * (1024**2 - 4))
        for _ in range(SIZE // 1024**2 - 1):
            connection.send(b"\x01" * 1024**2)
        connection.send(tail)
        response = connection.getresponse()
        text = response.read().decode(errors="replace")
        done.set()
        watcher.join()
        uploads = root / "var" / "models" / ".uploads"
        yield {
            "status": response.status,
            "location": response.getheader("Location") or "",
            "text": text,
            "stored": sorted(p.stat().st_size for p in uploads.iterdir()),
            "peak_tmp_bytes": peak,
            "rss_growth": peak_rss - base_rss,
            "tmp_listing": sorted(os.listdir(tmp)),
        }
    finally:
        server.terminate()
        server.wait(30)


def test_it_takes_an_upload_through_the_real_server(upload: dict[str, object]) -> None:
    assert upload["status"] == 302, upload["text"]
    assert str(upload["location"]).startswith("/models/jobs/")
    assert upload["stored"] == [SIZE]
    assert upload["tmp_listing"] == []


def test_the_server_writes_no_other_copy(upload: dict[str, object]) -> None:
    assert upload["peak_tmp_bytes"] == 0


def test_the_server_holds_a_few_chunks_not_the_upload(upload: dict[str, object]) -> None:
    # Stock daphne grew by ~12 times the upload here (the body queued whole, a multipart parse).
    growth = upload["rss_growth"]
    assert isinstance(growth, int) and growth < SIZE // 4, growth
