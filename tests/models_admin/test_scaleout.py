"""A real job through a real Celery worker on the local Redis (the scaled-out deployment)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mlxweb.config import BASE_DIR
from tests.support.fake_hub import TINY_REPO, FakeHub

from .conftest import Deployment, stop_process

REDIS_URL = "redis://127.0.0.1:6379/15"


@pytest.mark.scaleout
def test_it_pulls_through_a_celery_worker_on_redis(
    deployment: Deployment, fake_hub: FakeHub, tiny_files: dict[str, bytes]
) -> None:
    import redis

    redis.Redis.from_url(REDIS_URL).flushdb()
    env = {**deployment.env, "MLXWEB_REDIS_URL": REDIS_URL, "HF_ENDPOINT": fake_hub.url}
    deployment.env = env
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "mlxweb",
            "worker",
            "-Q",
            "models.heavy,models.light",
            "--pool=solo",
            "--concurrency=1",
            "-n",
            "scaleout-test@%h",
            "--loglevel=INFO",
        ],
        cwd=BASE_DIR,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        queued = deployment.manage("models", "pull", TINY_REPO, "--name", "tiny", "--background")
        code = queued.stdout.strip().rsplit(" ", 1)[-1]
        job = deployment.wait_for_job(code)
    finally:
        log = stop_process(worker)

    assert job["state"] == "succeeded", (job["error"], log[-3000:])
    assert job["worker"].startswith("scaleout-test@")
    assert job["unit"] == "bytes" and job["done"] == job["total"] == sum(
        map(len, tiny_files.values())
    )
    assert (deployment.models_dir / "tiny").is_symlink()
    assert "models_admin.run_model_job" in log
