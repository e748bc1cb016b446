"""The command against a live server it started itself: `mlxweb serve` in a subprocess, then
`mlxweb status` and `mlxweb run` through its gRPC socket with an API key, and `/save`."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.cli.conftest import MLXWEB, ROOT
from tests.support.live import Site, free_port, wait_for_port, write_configs
from tests.support.waiting import wait_until


@dataclass
class Served:
    site: Site
    root: Path
    key: str

    def mlxweb(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(MLXWEB), *args], cwd=ROOT, env=self.site.env, input=stdin,
            capture_output=True, text=True, timeout=180,
        )  # fmt: skip


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("cli-site")
    shutil.copytree(tiny_model_dir, root / "models" / "tiny")
    configs = write_configs(root / "configs", model_id="tiny", model_dir="tiny")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MLXWEB_")},
        "DJANGO_SETTINGS_MODULE": "mlxweb.settings",
        "MLXWEB_CONFIG_DIR": str(configs),
        "MLXWEB_MODELS_DIR": str(root / "models"),
        "MLXWEB_VAR_DIR": str(root / "var"),
        "MLXWEB_DATABASE_URL": f"sqlite:///{root / 'db.sqlite3'}",
        "MLXWEB_SECRET_KEY": "cli-test",
        "MLXWEB_PORT": str(free_port()),
        "PYTHONUNBUFFERED": "1",
    }
    site = Site(env=env, log_dir=root)
    site.manage("migrate", "--noinput", "-v0")
    site.manage(
        "shell", "-c",
        "from django.contrib.auth.models import User; "
        "User.objects.create_superuser('ada', password='a-long-pass-phrase')",
    )  # fmt: skip
    key = site.manage("api_keys", "create", "--user", "ada", "--name", "cli").split()[-1]
    log = (root / "web.log").open("ab")
    process = subprocess.Popen(
        [str(MLXWEB), "serve", "--no-warm-up"], cwd=ROOT, env=env, stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    site.processes["web"] = process
    site.port = int(env["MLXWEB_PORT"])
    try:
        wait_for_port(site.port, process)
        yield Served(site=site, root=root, key=key)
    finally:
        site.stop_all()


def test_status_finds_the_server_mlxweb_serve_started(served: Served) -> None:
    # Before any request: the worker's heartbeat starts with the server (serve starts the
    # worker from Twisted's startup triggers, before the asyncio loop runs).
    def status() -> dict[str, Any]:
        result = served.mlxweb("status", "--json")
        assert result.returncode == 0, result.stderr + served.site.log("web")
        return dict(json.loads(result.stdout))

    data = wait_until(
        lambda: (s := status())["worker"]["alive"] and s, timeout=60, what="the worker alive"
    )
    assert data["running"] is True
    assert data["url"] == f"http://127.0.0.1:{served.site.port}/"
    assert data["grpc"] == f"unix://{served.root / 'var' / 'grpc.sock'}"
    assert set(data["worker"]) >= {"alive", "queued", "streaming"}


def test_run_answers_through_the_server_with_a_key(served: Served) -> None:
    result = served.mlxweb("run", "tiny", "Hello", "--max-tokens", "5", "--api-key", served.key)

    assert result.returncode == 0, result.stderr + served.site.log("web")
    assert "through the server at unix://" in result.stderr
    assert result.stdout.strip()
    with sqlite3.connect(served.root / "db.sqlite3") as db:
        (count,) = db.execute("SELECT count(*) FROM inference_generation").fetchone()
    assert count >= 1  # the server recorded the reply


def test_run_without_a_key_runs_in_its_own_process_and_says_why(served: Served) -> None:
    result = served.mlxweb("run", "tiny", "Hello", "--max-tokens", "3")

    assert result.returncode == 0, result.stderr
    assert "a server answers at unix://" in result.stderr and "no API key" in result.stderr


def test_a_chat_through_the_server_is_saved_for_the_browser(served: Served) -> None:
    result = served.mlxweb(
        "run", "tiny", "--max-tokens", "4", "--api-key", served.key,
        stdin="/system Be brief.\nHello\n/save From the server\n",
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    assert "through the server" in result.stderr
    with sqlite3.connect(served.root / "db.sqlite3") as db:
        titles = [row[0] for row in db.execute("SELECT title FROM chat_conversation")]
    assert "From the server" in titles
