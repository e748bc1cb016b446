"""Model library fixtures: a tiny Hugging Face-format llama, a local stand-in for the hub
(tests/support), and folders for the models and the Hugging Face cache."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mlxweb.config import BASE_DIR
from models_admin import tasks
from tests.support.fake_hub import REPO_EXTRAS, TINY_REPO, FakeHub
from tests.support.gguf_imports import SessionImport
from tests.support.hf_model import tiny_hf_model_files
from tests.support.waiting import wait_until


@pytest.fixture(scope="session")
def tiny_files() -> dict[str, bytes]:
    return tiny_hf_model_files()


@pytest.fixture
def tiny_hf_dir(models_root: Path, tiny_files: dict[str, bytes]) -> Path:
    """The tiny llama, Hugging Face format, as a folder in the models folder."""
    path = models_root / "tiny-hf"
    path.mkdir()
    for name, data in tiny_files.items():
        (path / name).write_bytes(data)
    return path


@pytest.fixture
def hf_cache(tmp_path: Path, settings: Any) -> Path:
    """An empty Hugging Face cache that the library pulls into and scans."""
    path = tmp_path / "hf-cache"
    settings.MLXWEB_HF_CACHE = path
    return path


@pytest.fixture
def library(models_root: Path, hf_cache: Path) -> Path:
    """Both folders the library may touch, empty; the models folder is returned."""
    return models_root


@pytest.fixture
def library_of(library: Path, settings: Any) -> Any:
    """Points the library at the models folder of one of the session's imports (see
    tests/support/gguf_imports.py) instead of the empty one; returns a function doing it."""
    from inference.catalogue import reset_catalogue

    def use(imported: SessionImport) -> Path:
        settings.MLXWEB_MODELS_DIR = imported.models_dir
        reset_catalogue()
        return imported.models_dir

    return use


@pytest.fixture(autouse=True)
def enqueued(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Jobs handed to Celery, recorded instead of published (unit tests have no broker)."""
    calls: list[dict[str, Any]] = []

    def record(args: Any = None, kwargs: Any = None, **options: Any) -> None:
        calls.append({"args": list(args or []), **options})

    monkeypatch.setattr(tasks.run_model_job, "apply_async", record)
    return calls


def retrying(operation: Any, timeout: float = 5.0) -> Any:
    """Run a database operation from a helper thread, retrying while SQLite's shared in-memory
    test database answers "table is locked" (it does not wait like a file database does)."""
    from django.db import OperationalError

    deadline = time.monotonic() + timeout
    while True:
        try:
            return operation()
        except OperationalError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.02)


@pytest.fixture
def running_job(library: Path) -> Any:
    """A pull job three quarters through its download, as its worker last reported."""
    from django.utils import timezone

    from models_admin import services
    from models_admin.models import ModelJob

    job = services.job_create(kind="pull", params={"repo_id": "org/model"})
    ModelJob.objects.filter(pk=job.pk).update(
        state=ModelJob.State.RUNNING,
        step="downloading 4 files",
        done=3 * 1024 * 1024,
        total=4 * 1024 * 1024,
        unit="bytes",
        speed=1024 * 1024,
        eta_seconds=1.0,
        log="looking up org/model@main\ndownloading 4 files",
        started_at=timezone.now(),
        heartbeat_at=timezone.now(),
    )
    job.refresh_from_db()
    return job


@pytest.fixture
def fast_progress(monkeypatch: pytest.MonkeyPatch) -> None:
    """Progress written to the job row ten times a second instead of once."""
    from models_admin import progress

    monkeypatch.setattr(progress, "FLUSH_INTERVAL_SECONDS", 0.1)


# ---------------------------------------------------------------------------------------------
# A stand-in for the Hugging Face hub


@pytest.fixture
def fake_hub(settings: Any, tiny_files: dict[str, bytes]) -> Iterator[FakeHub]:
    """A local hub serving the tiny llama as `test-org/tiny-llama`, with huggingface_hub
    pointed at it."""
    hub = FakeHub()
    hub.add_repo(TINY_REPO, {**tiny_files, **REPO_EXTRAS})
    hub.start()
    settings.MLXWEB_HF_ENDPOINT = hub.url
    yield hub
    hub.stop()


# ---------------------------------------------------------------------------------------------
# Other processes (a real Celery worker), sharing a file database with the test


@dataclass
class Deployment:
    """Environment for manage.py and Celery processes: their own SQLite file, var folder,
    models folder and Hugging Face cache, all under a temporary folder."""

    root: Path
    env: dict[str, str]

    @property
    def db_path(self) -> Path:
        return self.root / "db.sqlite3"

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    def manage(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=BASE_DIR,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    def job(self, code: str) -> dict[str, Any] | None:
        with sqlite3.connect(self.db_path) as db:
            db.row_factory = sqlite3.Row
            row = db.execute(
                "SELECT * FROM models_admin_modeljob WHERE code = ?", [code.replace("-", "")]
            ).fetchone()
        return dict(row) if row is not None else None

    def wait_for_job(self, code: str, timeout: float = 90) -> dict[str, Any]:
        def ended() -> dict[str, Any] | None:
            row = self.job(code)
            if row is not None and row["state"] in {"succeeded", "failed", "cancelled"}:
                return row
            return None

        return wait_until(ended, timeout=timeout, interval=0.1, what=f"job {code} to end")


@pytest.fixture
def deployment(tmp_path: Path) -> Deployment:
    root = tmp_path / "deployment"
    (root / "models").mkdir(parents=True)
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "mlxweb.settings",
        "MLXWEB_DATABASE_URL": f"sqlite:///{root / 'db.sqlite3'}",
        "MLXWEB_VAR_DIR": str(root / "var"),
        "MLXWEB_MODELS_DIR": str(root / "models"),
        "HF_HUB_CACHE": str(root / "hf-cache"),
        "MLXWEB_LOG_LEVEL": "INFO",
    }
    env.pop("MLXWEB_REDIS_URL", None)
    deployment = Deployment(root=root, env=env)
    deployment.manage("migrate", "--noinput")
    return deployment


def stop_process(process: subprocess.Popen[Any]) -> str:
    """Stop a child process and return what it wrote."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.stdout.read() if process.stdout else ""


def finished_validation(path: str, **result: Any) -> Any:
    """A Validate job of the model at `path` that succeeded, with a report as it would store."""
    from django.utils import timezone

    from models_admin import services
    from models_admin.models import ModelJob

    report = {
        "candidate": Path(path).name,
        "reference": "model.Q4_K_M.gguf (dequantized)",
        "n_tokens": 32,
        "prompts": [
            {
                "prompt": "What is the capital of France? Answer briefly.",
                "candidate_text": "The capital of France is Paris.",
                "reference_text": "The capital of France is Paris.",
                "candidate_tokens": [1, 2],
                "reference_tokens": [1, 2],
                "prefix_tokens": 32,
                "matching_tokens": 31,
            }
        ],
        "prefix_agreement": 0.95,
        "token_agreement": 0.96875,
        "identical_answers": 1,
        "perplexity": 12.5,
        "reference_perplexity": 12.25,
        "perplexity_ratio": 12.5 / 12.25,
        "text_tokens": 200,
        "same_tokenization": True,
        "size_bytes": 80_000_000,
        "reference_size_bytes": 98_000_000,
        "memory_bytes": 80_000_000,
        "reference_memory_bytes": 540_000_000,
        "decode_tok_s": 42.5,
        "reference_decode_tok_s": 20.25,
        "seconds": 12.0,
        "notes": [],
        "summary": "token agreement 97% ...",
        "path": path,
        "reference_kind": "gguf",
        "reference_path": "/models/model.Q4_K_M.gguf",
        **result,
    }
    job = services.job_create(kind="validate", params={"source": path}, enqueue=False)
    ModelJob.objects.filter(pk=job.pk).update(
        state=ModelJob.State.SUCCEEDED, result=report, finished_at=timezone.now()
    )
    job.refresh_from_db()
    return job
