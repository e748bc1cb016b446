"""Starting and stopping the gRPC server: in `manage.py serve`, and on its own over Redis."""

from __future__ import annotations

import os
import signal
import socket as sockets
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mlxweb.client import Client, ClientError, Delta, Finished, Started
from tests.chat.test_scaleout import scaled_site  # noqa: F401
from tests.support.live import ROOT, Site, free_port, write_configs
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.timeout(300)]

HELLO = [{"role": "user", "content": "Say hello"}]


@pytest.fixture
def site(tmp_path: Path, tiny_model_dir: Path) -> Iterator[Site]:
    models = tmp_path / "models"
    (models).mkdir()
    (models / "tiny").symlink_to(tiny_model_dir, target_is_directory=True)
    configs = write_configs(tmp_path / "configs", model_id="tiny", model_dir="tiny")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MLXWEB_")},
        "DJANGO_SETTINGS_MODULE": "mlxweb.settings",
        "MLXWEB_CONFIG_DIR": str(configs),
        "MLXWEB_MODELS_DIR": str(models),
        "MLXWEB_VAR_DIR": str(tmp_path / "var"),
        "MLXWEB_DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
        "MLXWEB_SECRET_KEY": "grpc-server-test",
        "PYTHONUNBUFFERED": "1",
    }
    site = Site(env=env, log_dir=tmp_path)
    site.manage("migrate", "--noinput", "-v0")
    try:
        yield site
    finally:
        site.stop_all()


def test_serve_stops_it_cleanly_and_never_takes_a_live_socket(site: Site) -> None:
    socket = Path(site.env["MLXWEB_VAR_DIR"]) / "grpc.sock"
    site.serve("--no-warm-up")
    with Client(str(socket)) as client:
        wait_until(client.is_serving, timeout=60, what="the gRPC server")

    # A second server on the same data folder leaves the first one's socket alone.
    second = site.start("second", "serve", "--port", str(free_port()), "--no-worker")
    wait_until(
        lambda: "gRPC server not started" in site.log("second"),
        timeout=60,
        what="the second server to give up the socket",
    )
    assert "another server is listening" in site.log("second")
    site.stop("second")
    assert second.returncode is not None
    with Client(str(socket)) as client:
        assert client.is_serving()

    assert site.stop("web") == 0
    assert "gRPC server stopped" in site.log("web")
    assert not socket.exists()


def test_stopping_the_server_mid_reply_ends_the_call_and_keeps_the_text(site: Site) -> None:
    create_user = "from django.contrib.auth.models import User; User.objects.create_user('ada')"
    site.manage("shell", "-c", create_user)
    key = site.manage("api_keys", "create", "--user", "ada", "--name", "grpc").split()[-1]
    socket = Path(site.env["MLXWEB_VAR_DIR"]) / "grpc.sock"
    site.serve("--no-warm-up")
    with Client(str(socket), api_key=key) as client:
        wait_until(client.is_serving, timeout=60, what="the gRPC server")
        events = client.chat(model="tiny", messages=HELLO, max_tokens=2000, temperature=0)
        started = next(events)
        assert isinstance(started, Started) and isinstance(next(events), Delta)

        assert site.stop("web") == 0
        with pytest.raises(ClientError) as error:
            list(events)

    assert error.value.code in {"CANCELLED", "UNAVAILABLE"}
    db = sqlite3.connect(site.env["MLXWEB_DATABASE_URL"].removeprefix("sqlite:///"))
    with db:
        state, text = db.execute(
            "SELECT state, text FROM inference_generation WHERE code = ?",
            (started.code.replace("-", ""),),
        ).fetchone()
    db.close()
    assert state in {"stopped", "interrupted"} and text


def test_a_stale_socket_is_replaced(site: Site) -> None:
    socket = Path(site.env["MLXWEB_VAR_DIR"]) / "grpc.sock"
    socket.parent.mkdir(parents=True, exist_ok=True)
    # What a killed server leaves: a socket file nobody listens on.
    with sockets.socket(sockets.AF_UNIX) as dead:
        dead.bind(str(socket))
    site.serve("--no-warm-up", "--no-worker")
    with Client(str(socket)) as client:
        wait_until(client.is_serving, timeout=60, what="the gRPC server")


def test_grpc_server_alone_needs_the_redis_layer(site: Site) -> None:
    result = subprocess.run(
        [sys.executable, "manage.py", "grpc_server"],
        cwd=ROOT,
        env=site.env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert result.returncode == 1
    assert "runs inside `manage.py serve`" in result.stderr


@pytest.mark.scaleout
def test_grpc_server_streams_from_a_separate_worker_over_redis(scaled_site) -> None:  # noqa: F811
    site, _ = scaled_site
    create_user = "from django.contrib.auth.models import User; User.objects.create_user('ada')"
    site.manage("shell", "-c", create_user)
    key = site.manage("api_keys", "create", "--user", "ada", "--name", "grpc").split()[-1]
    port = free_port()
    site.start("worker", "inference_worker", "--no-warm-up")
    site.start("grpc", "grpc_server", "--tcp-port", str(port))
    with Client(f"127.0.0.1:{port}", api_key=key) as client:
        wait_until(client.is_serving, timeout=60, what="the gRPC server")
        events = list(client.chat(model="tiny", messages=HELLO, max_tokens=8, temperature=0))
        assert client.health()["worker_alive"] is True

    assert isinstance(events[0], Started) and isinstance(events[-1], Finished)
    assert "".join(e.text for e in events if isinstance(e, Delta))
    assert events[-1].finish_reason in {"eos", "max_tokens"}
    assert site.stop("grpc", signal.SIGTERM) == 0
    assert not (Path(site.env["MLXWEB_VAR_DIR"]) / "grpc.sock").exists()
