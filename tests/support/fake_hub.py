"""A stand-in for the Hugging Face hub: a local HTTP server with the part of the hub's API that
huggingface_hub's snapshot_download uses, with knobs for slow, broken and failing transfers."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

# The repo the `fake_hub` fixture serves the tiny llama as.
TINY_REPO = "test-org/tiny-llama"

# What a real repo also holds, and a pull must never fetch: pickles, code, the model card.
REPO_EXTRAS = {
    "pytorch_model.bin": b"\x80\x04pickled weights must never be downloaded",
    "modeling_tiny.py": b"raise SystemExit('remote code must never be downloaded')\n",
    "README.md": b"# tiny llama\n",
}


@dataclass
class FakeRepo:
    repo_id: str
    files: dict[str, bytes]
    commit: str
    gated: bool = False

    def sha256(self, name: str) -> str:
        return hashlib.sha256(self.files[name]).hexdigest()

    def git_oid(self, name: str) -> str:
        data = self.files[name]
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class FakeHub:
    """The part of the hub's HTTP API that huggingface_hub 2.4's snapshot_download uses.

    Serves repo info, the recursive tree listing and `resolve` (HEAD and GET with Range), with
    the headers huggingface_hub reads (X-Repo-Commit, ETag, Content-Length, X-Error-Code).
    `drop_after[file] = n` closes the connection once after sending n bytes of that file;
    `down_after_drop` then also puts that file in `unavailable`, whose files answer HTTP 503
    until taken out (an outage longer than a client's retries); `bytes_per_second` slows every
    file transfer down. `hold_after[file] = n` sends n bytes of that file, sets `holding` and
    waits for `release` before sending the rest: a transfer caught mid-way for as long as a
    test needs.
    """

    repos: dict[str, FakeRepo] = field(default_factory=dict)
    requests: list[dict[str, Any]] = field(default_factory=list)
    drop_after: dict[str, int] = field(default_factory=dict)
    down_after_drop: bool = False
    unavailable: set[str] = field(default_factory=set)
    bytes_per_second: float | None = None
    hold_after: dict[str, int] = field(default_factory=dict)
    holding: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    served: dict[str, int] = field(default_factory=dict)
    server: ThreadingHTTPServer | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        assert self.server is not None
        port = self.server.server_address[1]
        return f"http://127.0.0.1:{port}"

    def add_repo(self, repo_id: str, files: dict[str, bytes], *, gated: bool = False) -> FakeRepo:
        commit = hashlib.sha1(
            repo_id.encode() + b"".join(files[k] for k in sorted(files))
        ).hexdigest()
        repo = FakeRepo(repo_id=repo_id, files=dict(files), commit=commit, gated=gated)
        self.repos[repo_id] = repo
        return repo

    def file_requests(self, name: str, method: str = "GET") -> list[dict[str, Any]]:
        return [
            r for r in self.requests if r["method"] == method and r["path"].endswith(f"/{name}")
        ]

    def start(self) -> None:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_HEAD(self) -> None:
                hub._handle(self, head=True)

            def do_GET(self) -> None:
                hub._handle(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.release.set()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    # -- request handling ----------------------------------------------------------------------

    def _send(
        self,
        h: BaseHTTPRequestHandler,
        status: int,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        *,
        head: bool = False,
    ) -> None:
        h.send_response(status)
        for key, value in (headers or {}).items():
            h.send_header(key, value)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head:
            h.wfile.write(body)

    def _error(
        self, h: BaseHTTPRequestHandler, status: int, code: str, head: bool, **extra: str
    ) -> None:
        body = json.dumps({"error": code}).encode()
        headers = {"X-Error-Code": code, "X-Error-Message": code, **extra}
        headers["Content-Type"] = "application/json"
        self._send(h, status, body, headers, head=head)

    def _json(self, h: BaseHTTPRequestHandler, data: Any, head: bool) -> None:
        body = json.dumps(data).encode()
        self._send(h, 200, body, {"Content-Type": "application/json"}, head=head)

    def _handle(self, h: BaseHTTPRequestHandler, *, head: bool) -> None:
        path = unquote(urlsplit(h.path).path)
        with self.lock:
            self.requests.append(
                {"method": h.command, "path": path, "range": h.headers.get("Range")}
            )
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo = self.repos.get(f"{parts[2]}/{parts[3]}")
            rest = parts[4:]
            if repo is None:
                return self._error(h, 404, "RepoNotFound", head)
            if repo.gated:
                return self._error(h, 401, "GatedRepo", head)
            if rest and rest[0] in {"revision", "tree"}:
                revision = "/".join(rest[1:])
                if revision not in {"main", repo.commit}:
                    return self._error(h, 404, "RevisionNotFound", head)
            if rest[:1] == ["tree"]:
                return self._json(h, self._tree(repo), head)
            return self._json(h, self._info(repo), head)
        if len(parts) >= 5 and parts[2] == "resolve":
            repo = self.repos.get(f"{parts[0]}/{parts[1]}")
            if repo is None:
                return self._error(h, 404, "RepoNotFound", head)
            if repo.gated:
                return self._error(h, 401, "GatedRepo", head)
            revision, name = parts[3], "/".join(parts[4:])
            if revision not in {"main", repo.commit}:
                return self._error(h, 404, "RevisionNotFound", head)
            if name not in repo.files:
                return self._error(h, 404, "EntryNotFound", head, **{"X-Repo-Commit": repo.commit})
            if name in self.unavailable and not head:
                return self._error(h, 503, "ServiceUnavailable", head)
            return self._file(h, repo, name, head)
        return self._error(h, 404, "RepoNotFound", head)

    def _info(self, repo: FakeRepo) -> dict[str, Any]:
        return {
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "sha": repo.commit,
            "private": False,
            "gated": False,
            "siblings": [{"rfilename": name} for name in sorted(repo.files)],
        }

    def _tree(self, repo: FakeRepo) -> list[dict[str, Any]]:
        entries = []
        for name in sorted(repo.files):
            entry: dict[str, Any] = {
                "type": "file",
                "path": name,
                "size": len(repo.files[name]),
                "oid": repo.git_oid(name),
            }
            if name.endswith((".safetensors", ".bin")):
                entry["lfs"] = {
                    "oid": repo.sha256(name),
                    "size": len(repo.files[name]),
                    "pointerSize": 134,
                }
            entries.append(entry)
        return entries

    def _file(self, h: BaseHTTPRequestHandler, repo: FakeRepo, name: str, head: bool) -> None:
        data = repo.files[name]
        headers = {
            "X-Repo-Commit": repo.commit,
            "ETag": f'"{repo.sha256(name)}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        if head:
            h.send_response(200)
            for key, value in headers.items():
                h.send_header(key, value)
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            return
        start = 0
        status = 200
        requested = h.headers.get("Range")
        if requested and requested.startswith("bytes="):
            start = int(requested.removeprefix("bytes=").split("-")[0] or 0)
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        h.send_response(status)
        for key, value in headers.items():
            h.send_header(key, value)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        drop = self.drop_after.pop(name, None) if status == 200 else None
        hold = self.hold_after.pop(name, None)
        sent = 0
        chunk = 16 * 1024
        limit = len(body) if drop is None else drop
        while sent < limit:
            if hold is not None and sent >= hold:
                hold = None
                self.holding.set()
                if not self.release.wait(60):
                    return  # nobody let it go on: the connection closes with the file cut
            end = min(sent + chunk, limit) if hold is None else min(sent + chunk, limit, hold)
            piece = body[sent:end]
            try:
                h.wfile.write(piece)
                h.wfile.flush()
            except OSError:
                return
            sent += len(piece)
            with self.lock:
                self.served[name] = self.served.get(name, 0) + len(piece)
            if self.bytes_per_second:
                time.sleep(len(piece) / self.bytes_per_second)
        if drop is not None:
            # The transfer breaks half-way, as on a flaky network.
            if self.down_after_drop:
                self.unavailable.add(name)
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)


def closed_port_url() -> str:
    """The URL of a local port nothing listens on: "no network" for the hub client."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"
