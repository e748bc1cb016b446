"""models_admin.services job_*: create, run, cancel, retry, and dead workers."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.utils import timezone

from models_admin import services
from models_admin.models import ModelJob
from models_admin.progress import JobError, JobProgress
from models_admin.services import UnknownJobKind, get_job_kind, job_kind

pytestmark = pytest.mark.django_db(transaction=True)


@job_kind("test_echo", heavy=False, describe=lambda p: f"Echo {p['text']}")
def echo(*, text: str, progress: JobProgress, fail: str = "") -> dict[str, Any]:
    """A job kind that only reports, for the framework's own tests."""
    progress.step("echoing", total=2)
    progress.advance(2)
    if fail:
        raise JobError(fail)
    return {"echo": text}


@pytest.fixture
def echo_kind() -> Any:
    return echo


def test_it_enqueues_a_job_on_its_kinds_queue_after_commit(
    echo_kind: Any, enqueued: list[dict[str, Any]], admin_user: Any
) -> None:
    job = services.job_create(kind="test_echo", params={"text": "hi"}, user=admin_user)

    assert job.state == ModelJob.State.QUEUED
    assert job.title == "Echo hi"
    assert job.created_by == admin_user
    assert enqueued == [{"args": [str(job.code)], "task_id": job.task_id, "queue": "models.light"}]


def test_it_sends_memory_heavy_kinds_to_their_own_queue(enqueued: list[dict[str, Any]]) -> None:
    assert get_job_kind("convert").queue == "models.heavy"
    assert get_job_kind("quantize").queue == "models.heavy"
    assert get_job_kind("pull").queue == "models.light"


def test_it_refuses_an_unknown_kind() -> None:
    with pytest.raises(UnknownJobKind):
        services.job_create(kind="nope", params={})


def test_it_runs_a_job_and_records_its_result(echo_kind: Any) -> None:
    job = services.job_create(kind="test_echo", params={"text": "hi"}, enqueue=False)

    job = services.job_run(job=job, worker="test@here")

    assert job.state == ModelJob.State.SUCCEEDED
    assert job.result == {"echo": "hi"}
    assert (job.done, job.total, job.step) == (2, 2, "finished")
    assert job.worker == "test@here"
    assert job.started_at is not None and job.finished_at is not None
    assert job.log_lines == ["echoing"]


def test_it_records_a_failure_with_its_message(echo_kind: Any) -> None:
    job = services.job_create(
        kind="test_echo", params={"text": "hi", "fail": "It broke."}, enqueue=False
    )

    job = services.job_run(job=job)

    assert job.state == ModelJob.State.FAILED
    assert job.error == "It broke."
    assert job.is_retryable


def test_it_runs_a_job_once_only(echo_kind: Any) -> None:
    job = services.job_create(kind="test_echo", params={"text": "hi"}, enqueue=False)
    services.job_run(job=job)
    finished_at = ModelJob.objects.get(pk=job.pk).finished_at

    again = services.job_run(job=job)

    assert again.state == ModelJob.State.SUCCEEDED
    assert again.finished_at == finished_at


def test_it_ignores_a_message_meant_for_another_attempt(echo_kind: Any) -> None:
    job = services.job_create(kind="test_echo", params={"text": "hi"})

    job = services.job_run(job=job, task_id="some-older-message")

    assert job.state == ModelJob.State.QUEUED


def test_it_cancels_a_queued_job_at_once(echo_kind: Any) -> None:
    job = services.job_create(kind="test_echo", params={"text": "hi"})

    job = services.job_cancel(job=job)

    assert job.state == ModelJob.State.CANCELLED
    assert services.job_run(job=job, task_id=job.task_id).state == ModelJob.State.CANCELLED


def test_it_flags_a_running_job_for_cancelling(echo_kind: Any) -> None:
    job = services.job_create(kind="test_echo", params={"text": "hi"})
    ModelJob.objects.filter(pk=job.pk).update(state=ModelJob.State.RUNNING)

    job = services.job_cancel(job=job)

    assert job.state == ModelJob.State.RUNNING
    assert job.cancel_requested


def test_it_marks_the_job_of_a_dead_worker_failed_and_retries_it(
    echo_kind: Any, enqueued: list[dict[str, Any]]
) -> None:
    job = services.job_create(kind="test_echo", params={"text": "hi"})
    ModelJob.objects.filter(pk=job.pk).update(
        state=ModelJob.State.RUNNING,
        worker="models@gone",
        heartbeat_at=timezone.now() - timedelta(minutes=5),
    )

    assert services.job_reap_dead() == 1
    job.refresh_from_db()
    assert job.state == ModelJob.State.FAILED
    assert "worker running this job stopped" in job.error

    retry = services.job_retry(job=job)
    assert retry.retry_of == job and retry.state == ModelJob.State.QUEUED
    assert enqueued[-1]["task_id"] == retry.task_id
    retry = services.job_run(job=retry, task_id=retry.task_id)
    assert retry.state == ModelJob.State.SUCCEEDED
    with pytest.raises(services.JobStateError):
        services.job_retry(job=retry)


def test_it_reaps_jobs_running_under_the_name_of_a_restarted_worker(echo_kind: Any) -> None:
    alive = services.job_create(kind="test_echo", params={"text": "a"})
    mine = services.job_create(kind="test_echo", params={"text": "b"})
    ModelJob.objects.filter(pk=alive.pk).update(
        state="running", worker="other@host", heartbeat_at=timezone.now()
    )
    ModelJob.objects.filter(pk=mine.pk).update(
        state="running", worker="models@host", heartbeat_at=timezone.now()
    )

    assert services.job_reap_dead(worker="models@host") == 1
    assert ModelJob.objects.get(pk=alive.pk).state == ModelJob.State.RUNNING
    assert ModelJob.objects.get(pk=mine.pk).state == ModelJob.State.FAILED


def test_it_refuses_to_retry_a_job_twice_at_once(echo_kind: Any) -> None:
    job = services.job_create(kind="test_echo", params={"text": "hi", "fail": "x"}, enqueue=False)
    services.job_run(job=job)
    services.job_retry(job=job)

    with pytest.raises(services.JobStateError, match="already being retried"):
        services.job_retry(job=job)


def test_it_removes_staging_folders_of_jobs_that_died(library: Path, echo_kind: Any) -> None:
    running = services.job_create(kind="test_echo", params={"text": "a"})
    ModelJob.objects.filter(pk=running.pk).update(state="running", heartbeat_at=timezone.now())
    (library / f".staging-{running.code}").mkdir()
    (library / ".staging-0b5e9c8e-dead-4bad-8bad-000000000000").mkdir()
    (library / ".deleting-0b5e9c8e-dead-4bad-8bad-000000000001").mkdir()
    (library / "kept-model").mkdir()

    assert services.job_cleanup_staging() == 2

    assert sorted(p.name for p in library.iterdir()) == sorted(
        [f".staging-{running.code}", "kept-model"]
    )


def test_it_removes_old_uploads_no_queued_or_running_import_will_read(library: Path) -> None:
    import os

    uploads = services.upload_dir()
    uploads.mkdir()
    an_hour_ago = (timezone.now() - timedelta(hours=2)).timestamp()
    wanted, abandoned, fresh = (uploads / f"{n}.gguf" for n in ("wanted", "abandoned", "fresh"))
    for path in (wanted, abandoned, fresh):
        path.write_bytes(b"GGUF")
    for path in (wanted, abandoned):
        os.utime(path, (an_hour_ago, an_hour_ago))
    services.job_create(
        kind="import_gguf", params={"source": str(wanted), "name": "m", "uploaded_as": "m.gguf"}
    )

    assert services.job_cleanup_staging() == 1

    assert sorted(p.name for p in uploads.iterdir()) == ["fresh.gguf", "wanted.gguf"]
