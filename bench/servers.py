"""The bench's own way to run servers: a free port, a subprocess that listens on it, and a
cookie-keeping HTTP client that signs in to mlxweb with its forms.

The test suite has a richer helper (tests/support/live.py) for many processes at once; the bench
imports nothing from `tests`, so it keeps these few functions of its own.
"""

from __future__ import annotations

import http.cookiejar
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class ServerGone(RuntimeError):
    """The server process exited, or never listened."""


def free_port() -> int:
    """A TCP port on the loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening(port: int, process: subprocess.Popen[bytes], timeout: float) -> None:
    """Return once `port` accepts connections; ServerGone if `process` dies first or too late."""
    deadline = time.monotonic() + timeout
    while process.poll() is None:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        if time.monotonic() > deadline:
            raise ServerGone(f"nothing listened on port {port} within {timeout:.0f} s")
        time.sleep(0.1)
    raise ServerGone(f"the server exited with {process.returncode} before listening")


def stop(process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """SIGTERM the process group, then SIGKILL it if it lingers."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


class MlxwebServer:
    """`manage.py serve` in a subprocess with the given environment, logging to `log_path`."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.log_path = log_path
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    def manage(self, *args: str, timeout: float = 120) -> None:
        result = subprocess.run(
            [sys.executable, "manage.py", *args], cwd=ROOT, env=self.env, capture_output=True,
            text=True, timeout=timeout, check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise ServerGone(f"manage.py {' '.join(args)} failed:\n{result.stderr[-3000:]}")

    def start(self, timeout: float = 180) -> None:
        self.port = free_port()
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "manage.py", "serve", "--port", str(self.port)], cwd=ROOT,
                env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        listening(self.port, self.process, timeout)

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class FormClient:
    """Keeps cookies and posts forms with the CSRF token of the page that shows them."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar))

    def page(self, path: str) -> str:
        with self.opener.open(self.base_url + path, timeout=30) as response:
            return str(response.read().decode())

    def submit(self, path: str, fields: dict[str, str], *, form_on: str | None = None) -> str:
        """POST `fields` to `path`; the final URL after redirects."""
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', self.page(form_on or path))
        if token is None:
            raise ServerGone(f"no CSRF token on {form_on or path}")
        body = urllib.parse.urlencode({**fields, "csrfmiddlewaretoken": token.group(1)})
        request = urllib.request.Request(
            self.base_url + path, data=body.encode(), headers={"Referer": self.base_url + path}
        )
        with self.opener.open(request, timeout=30) as response:
            return str(response.geturl())

    def cookie_header(self) -> str:
        return "; ".join(f"{c.name}={c.value}" for c in self.jar)
