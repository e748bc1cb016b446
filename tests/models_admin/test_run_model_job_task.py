"""models_admin.tasks.run_model_job and the worker start-up hook, called directly."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
from django.utils import timezone

from models_admin import services, tasks
from models_admin.models import ModelJob
from tests.support.fake_hub import TINY_REPO, FakeHub

pytestmark = pytest.mark.django_db(transaction=True)


def test_it_runs_a_queued_job(library: Path, fake_hub: FakeHub) -> None:
    job = services.job_create(kind="pull", params={"repo_id": TINY_REPO})

    tasks.run_model_job(str(job.code))

    job.refresh_from_db()
    assert job.state == ModelJob.State.SUCCEEDED, job.error
    assert (library / "tiny-llama").is_symlink()


def test_it_does_nothing_for_a_job_that_already_ran(library: Path, fake_hub: FakeHub) -> None:
    job = services.job_create(kind="pull", params={"repo_id": TINY_REPO})
    tasks.run_model_job(str(job.code))
    fake_hub.requests.clear()

    tasks.run_model_job(str(job.code))

    assert fake_hub.requests == []


def test_it_drops_a_message_for_a_job_that_does_not_exist(
    caplog: pytest.LogCaptureFixture,
) -> None:
    code = str(uuid.uuid4())

    with caplog.at_level(logging.WARNING, logger="models_admin.tasks"):
        tasks.run_model_job(code)

    assert not ModelJob.objects.exists()
    assert [r.getMessage() for r in caplog.records] == [f"job {code}: no such job, message dropped"]


def test_it_marks_jobs_of_a_restarted_worker_failed_and_clears_their_staging(
    library: Path,
) -> None:
    job = services.job_create(kind="pull", params={"repo_id": TINY_REPO})
    ModelJob.objects.filter(pk=job.pk).update(
        state=ModelJob.State.RUNNING, worker="models@this-host", heartbeat_at=timezone.now()
    )
    (library / f".staging-{job.code}").mkdir()

    tasks._on_worker_ready(sender=SimpleNamespace(hostname="models@this-host"))

    job.refresh_from_db()
    assert job.state == ModelJob.State.FAILED and job.is_retryable
    assert list(library.iterdir()) == []
