"""models_admin.embedded: the job worker `manage.py serve` starts, on the filesystem broker."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mlxweb.config import BASE_DIR
from models_admin.embedded import start_embedded_worker, stop_embedded_worker, worker_command
from tests.support.waiting import wait_until

from .conftest import Deployment


def test_it_serves_both_queues_one_job_at_a_time() -> None:
    command = worker_command()

    assert command[command.index("-Q") + 1] == "models.heavy,models.light"
    assert "--pool=solo" in command and "--concurrency=1" in command


@pytest.mark.django_db(transaction=True)
def test_it_runs_a_convert_job_with_no_broker_server(
    deployment: Deployment,
    tiny_files: dict[str, bytes],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    source = deployment.models_dir / "tiny-hf"
    source.mkdir()
    for name, data in tiny_files.items():
        (source / name).write_bytes(data)
    for key, value in deployment.env.items():
        monkeypatch.setenv(key, value)

    worker = start_embedded_worker()
    assert worker is not None
    try:
        queued = deployment.manage(
            "models", "convert", "tiny-hf", "-q", "--bits", "4", "--background"
        )
        code = queued.stdout.strip().rsplit(" ", 1)[-1]
        job = deployment.wait_for_job(code)
    finally:
        stop_embedded_worker(worker)

    assert worker.poll() is not None
    assert job["state"] == "succeeded", job["error"]
    assert job["worker"].startswith("models@")
    assert (deployment.models_dir / "tiny-hf-4bit" / "model.safetensors").is_file()
    assert sorted(p.name for p in deployment.models_dir.iterdir()) == ["tiny-hf", "tiny-hf-4bit"]
    # The message went through files under the var folder, not a server.
    assert (Path(deployment.env["MLXWEB_VAR_DIR"]) / "celery" / "queue").is_dir()


def test_it_leaves_jobs_to_a_separate_worker_when_redis_is_configured(settings: object) -> None:
    settings.REDIS_URL = "redis://127.0.0.1:6379/15"  # type: ignore[attr-defined]

    assert start_embedded_worker() is None


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" in f.read()
    except FileNotFoundError:
        return True


def test_it_stops_when_serve_is_killed(deployment: Deployment, tmp_path: Path) -> None:
    """The worker notices its parent died (SIGKILL gives no chance to stop it) and exits."""
    worker_log = tmp_path / "worker.log"
    with worker_log.open("w") as log:  # the worker inherits the stand-in's stderr
        serve_stand_in = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import django, time; django.setup();"
                "from models_admin.embedded import start_embedded_worker;"
                "print(start_embedded_worker().pid, flush=True); time.sleep(600)",
            ],
            cwd=BASE_DIR,
            env=deployment.env,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
    assert serve_stand_in.stdout is not None
    worker_pid = int(serve_stand_in.stdout.readline())
    # Celery says "ready" after worker_init, where the worker starts watching its parent.
    wait_until(
        lambda: " ready." in worker_log.read_text(), timeout=60, what="the worker to be ready"
    )
    assert not _gone(worker_pid)

    serve_stand_in.kill()
    serve_stand_in.wait()

    wait_until(lambda: _gone(worker_pid), timeout=30, interval=0.2, what="the worker to exit")
