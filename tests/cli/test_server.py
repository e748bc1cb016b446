"""`mlxweb status` against a stand-in /health and with nothing running; `mlxweb serve`'s
arguments are `manage.py serve`'s."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from models_admin.models import ModelJob
from tests.support.live import free_port

pytestmark = pytest.mark.django_db

HEALTH = {
    "status": "ok",
    "worker": {"alive": True, "id": "worker-1", "queued": 2, "streaming": 1},
    "models": [
        {"id": "tiny", "bytes": 5 * 2**20, "loaded_at": "2026-01-01T10:00:00Z", "expires_at": None}
    ],
}


@pytest.fixture
def health_server() -> Iterator[str]:
    """A stand-in server answering GET /health as mlxweb does."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps(HEALTH).encode()
            self.send_response(200 if self.path == "/health" else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


def nowhere(tmp_path: Path) -> list[str]:
    return ["--url", f"http://127.0.0.1:{free_port()}/", "--target", f"unix://{tmp_path}/x.sock"]


def test_status_says_nothing_runs_with_status_1(tmp_path: Path, cli: Any) -> None:
    text = cli("status", *nowhere(tmp_path))
    data = json.loads(cli("status", "--json", *nowhere(tmp_path)).out)

    assert text.code == 1
    assert "No mlxweb server answers at http://127.0.0.1:" in text.out
    assert data["running"] is False and data["url"] is None
    assert data["worker"]["alive"] is False


def test_status_reports_the_servers_worker_models_and_the_jobs_running(
    health_server: str, library: Path, running_job: ModelJob, tmp_path: Path, cli: Any
) -> None:
    target = f"unix://{tmp_path}/x.sock"
    result = cli("status", "--url", health_server, "--target", target)
    data = json.loads(cli("status", "--json", "--url", health_server, "--target", target).out)

    assert result.code == 0
    assert f"mlxweb is serving at {health_server}" in result.out
    assert "Inference worker: alive (worker-1), 2 queued, 1 streaming" in result.out
    assert "tiny" in result.out and "5.0 MB" in result.out, result.out
    assert "Download org/model" in result.out or running_job.title in result.out
    assert data["running"] is True and data["url"] == health_server
    loaded = {"id": "tiny", "bytes": 5 * 2**20, "loaded_at": "2026-01-01T10:00:00Z"}
    assert data["models"] == [loaded]
    assert [job["code"] for job in data["jobs"]] == [str(running_job.code)]
    assert data["jobs"][0]["percent"] == 75.0


def test_serve_takes_manage_py_serves_arguments(cli: Any) -> None:
    assert "--no-warm-up  don't preload the model" in cli("serve", "--help").out
    result = cli("serve", "--port", "70000")

    assert result.code == 2
    assert "70000 is not a TCP port" in result.err
