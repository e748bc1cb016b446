"""The job lifecycle: create, cancel, retry, run; dead workers and what they left behind; and
the registry of job kinds, what a `ModelJob.kind` names and how it runs.

A kind is one service function, registered with `@job_kind(...)` (one module each under
`models_admin.services.kinds`):

    @job_kind("validate", heavy=True, describe=lambda p: f"Validate {p['source']}")
    def model_validate(*, source: str, progress: JobProgress) -> dict[str, Any]: ...

The function gets the job's params as keyword arguments plus `progress`, reports through it,
raises `JobError` with a message for people, and returns the job's result (JSON-serialisable).
The Celery task, the job page, cancel and retry work for every registered kind unchanged.

A heavy kind holds its share of the machine's memory budget (inference.memory) while it runs:
`memory_factor` times the size of its `source` on disk. It waits, its step saying "waiting for
memory", while the loaded models and the other jobs leave it no room; the engine unloads idle
models for it.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.db.models import Q
from django.utils import timezone

from models_admin import progress as progress_module
from models_admin.models import ModelJob
from models_admin.progress import JobCancelled, JobError, JobProgress, monitored
from models_admin.services.library import library_scan
from models_admin.services.uploads import upload_cleanup

if TYPE_CHECKING:
    from models_admin.progress import ProgressMirror

logger = logging.getLogger(__name__)

# A running job writes a heartbeat every second; this long without one means its process died.
HEARTBEAT_STALE_AFTER = timedelta(seconds=60)
WORKER_GONE_ERROR = (
    "The worker running this job stopped before the job finished (it was killed, or the server "
    "restarted). Retry the job; its unfinished output is removed when a worker starts."
)


class JobStateError(Exception):
    """The job is not in a state that allows this (e.g. retrying a running job)."""


RunFunction = Callable[..., dict[str, Any]]


class UnknownJobKind(LookupError):
    """No job kind is registered under this name."""


@dataclass(frozen=True)
class JobKind:
    """A registered kind of job."""

    name: str
    run: RunFunction
    # Memory-heavy kinds (loading whole models) go to a queue served one job at a time.
    heavy: bool
    describe: Callable[[dict[str, Any]], str]
    # The memory it holds while it runs, as a multiple of its source's size (0: none).
    memory_factor: float = 0.0

    @property
    def queue(self) -> str:
        return settings.MODELS_QUEUE_HEAVY if self.heavy else settings.MODELS_QUEUE_LIGHT


_KINDS: dict[str, JobKind] = {}
DEFAULT_HEAVY_MEMORY_FACTOR = 2.0


def job_kind(
    name: str,
    *,
    heavy: bool,
    describe: Callable[[dict[str, Any]], str],
    memory_factor: float | None = None,
) -> Callable[[RunFunction], RunFunction]:
    """Register the decorated service function as the runner of jobs of kind `name`.

    `memory_factor`: the share of the memory budget the job holds while it runs, as a multiple
    of its `source` param's size on disk; left out, 2 for heavy kinds (a model loaded and the one
    being written) and none for the others."""
    factor = (
        (DEFAULT_HEAVY_MEMORY_FACTOR if heavy else 0.0) if memory_factor is None else memory_factor
    )

    def register(run: RunFunction) -> RunFunction:
        if name in _KINDS and _KINDS[name].run is not run:
            raise ValueError(f"job kind {name!r} is already registered")
        _KINDS[name] = JobKind(
            name=name, run=run, heavy=heavy, describe=describe, memory_factor=factor
        )
        return run

    return register


def get_job_kind(name: str) -> JobKind:
    try:
        return _KINDS[name]
    except KeyError:
        raise UnknownJobKind(f"unknown job kind {name!r}") from None


def job_kinds() -> dict[str, JobKind]:
    return dict(_KINDS)


def job_create(
    *, kind: str, params: dict[str, Any], user: Any = None, enqueue: bool = True
) -> ModelJob:
    """Record a job and, once the transaction commits, hand it to the Celery worker.

    With `enqueue=False` the caller runs it itself with `job_run` (the command line does).
    """
    registered = get_job_kind(kind)
    job = ModelJob.objects.create(
        kind=kind,
        params=params,
        title=registered.describe(params)[:300],
        created_by=user if user is not None and user.is_authenticated else None,
        task_id=str(uuid.uuid4()) if enqueue else "",
    )
    if enqueue:
        _enqueue(job)
    return job


def _enqueue(job: ModelJob) -> None:
    from models_admin.tasks import run_model_job

    # apply_async_on_commit is delay_on_commit with options: the queue of the kind, and the
    # task id recorded on the row, which is how a task knows it is the one meant to run it.
    run_model_job.apply_async_on_commit(
        args=[str(job.code)], task_id=job.task_id, queue=get_job_kind(job.kind).queue
    )


def job_cancel(*, job: ModelJob) -> ModelJob:
    """Cancel a job: a queued one at once, a running one at its next check (about a second)."""
    now = timezone.now()
    updated = ModelJob.objects.filter(pk=job.pk, state=ModelJob.State.QUEUED).update(
        state=ModelJob.State.CANCELLED,
        cancel_requested=True,
        finished_at=now,
        step="cancelled before it started",
    )
    if not updated:
        ModelJob.objects.filter(pk=job.pk, state=ModelJob.State.RUNNING).update(
            cancel_requested=True
        )
    job.refresh_from_db()
    return job


def job_retry(*, job: ModelJob, user: Any = None, enqueue: bool = True) -> ModelJob:
    """A new job with the same kind and parameters as a failed or cancelled one."""
    if not job.is_retryable:
        raise JobStateError(f"A {job.state} job cannot be retried.")
    if job.retries.filter(state__in=ModelJob.ACTIVE_STATES).exists():
        raise JobStateError("This job is already being retried.")
    retry = job_create(
        kind=job.kind, params=job.params, user=user or job.created_by, enqueue=enqueue
    )
    retry.retry_of = job
    retry.save(update_fields=["retry_of"])
    return retry


def job_run(
    *,
    job: ModelJob,
    task_id: str | None = None,
    worker: str = "",
    mirror: ProgressMirror | None = None,
    interval: float | None = None,
) -> ModelJob:
    """Run a queued job here and now, recording progress and its end on the row.

    Idempotent: only a queued job is run (and, given a task id, only by the task meant for it),
    so a redelivered or duplicate message does nothing. Never raises for the job's own failure;
    re-raises KeyboardInterrupt and the like after recording them.
    """
    claim = ModelJob.objects.filter(pk=job.pk, state=ModelJob.State.QUEUED)
    if task_id is not None:
        claim = claim.filter(task_id=task_id)
    now = timezone.now()
    if not claim.update(
        state=ModelJob.State.RUNNING, started_at=now, heartbeat_at=now, worker=worker[:200]
    ):
        job.refresh_from_db()
        logger.info("job %s: not run, it is %s", job.code, job.state)
        return job
    job.refresh_from_db()
    logger.info("job %s: %s started on %s", job.code, job.title, worker or "this process")

    progress = JobProgress(job_code=str(job.code), mirror=mirror)
    if job.cancel_requested:
        progress.cancel()
    state, error, result = ModelJob.State.FAILED, "", {}
    interrupted: BaseException | None = None
    try:
        with monitored(
            job_id=job.pk,
            progress=progress,
            interval=interval or progress_module.FLUSH_INTERVAL_SECONDS,
        ):
            progress.check_cancelled()
            kind = get_job_kind(job.kind)
            with job_memory(kind=kind, job=job, progress=progress):
                result = kind.run(progress=progress, **job.params) or {}
            state = ModelJob.State.SUCCEEDED
    except JobCancelled:
        state = ModelJob.State.CANCELLED
        progress.log("cancelled")
    except JobError as e:
        error = str(e)
        progress.log(f"error: {e}")
    except Exception as e:
        logger.exception("job %s failed", job.code)
        error = f"Unexpected error: {type(e).__name__}: {e}"
        progress.log(traceback.format_exc()[-4000:])
    except BaseException as e:  # KeyboardInterrupt, SystemExit: record, then let it go on
        interrupted = e
        state = ModelJob.State.CANCELLED if isinstance(e, KeyboardInterrupt) else state
        error = "" if isinstance(e, KeyboardInterrupt) else WORKER_GONE_ERROR
        progress.log(f"interrupted ({type(e).__name__})")

    snapshot = progress.snapshot()
    snapshot.update(speed=None, eta_seconds=None)
    if state == ModelJob.State.SUCCEEDED:
        snapshot["step"] = "finished"
        if snapshot["total"]:
            snapshot["done"] = snapshot["total"]
    elif state == ModelJob.State.CANCELLED:
        snapshot["step"] = "cancelled"
    finished = timezone.now()
    ModelJob.objects.filter(pk=job.pk).update(
        state=state,
        error=error[:5000],
        result=result,
        finished_at=finished,
        heartbeat_at=finished,
        **snapshot,
    )
    job.refresh_from_db()
    logger.info("job %s: %s", job.code, job.state)
    if state == ModelJob.State.SUCCEEDED:
        try:
            library_scan()
        except Exception:
            logger.exception("library scan after job %s failed", job.code)
    if interrupted is not None:
        raise interrupted
    return job


def job_memory_bytes(*, kind: JobKind, params: dict[str, Any]) -> int:
    """The memory a job of `kind` holds while it runs: `memory_factor` times its source's size
    on disk (a GGUF file, or a folder's safetensors); 0 if it has none or it cannot be read (the
    kind itself then says what is wrong with the source)."""
    from inference.memory import weights_bytes_on_disk

    source = params.get("source")
    if kind.memory_factor <= 0 or not isinstance(source, str) or not source:
        return 0
    try:
        return int(kind.memory_factor * weights_bytes_on_disk(Path(source)))
    except (OSError, ValueError):
        return 0


@contextlib.contextmanager
def job_memory(*, kind: JobKind, job: ModelJob, progress: JobProgress) -> Iterator[None]:
    """Hold the job's share of the memory budget for the block, waiting (its step says so, and
    it may be cancelled) while it does not fit; JobError if it never could."""
    from inference.memory import (
        NotEnoughMemory,
        ReservationTable,
        configured_budget,
        configured_table_path,
        gib,
        reserved,
    )

    nbytes = job_memory_bytes(kind=kind, params=job.params)
    if nbytes <= 0:
        yield
        return
    budget = configured_budget()
    waited = False

    def on_wait(free: int) -> None:
        nonlocal waited
        text = (
            f"waiting for memory: needs about {gib(nbytes)}, {gib(free)} of {gib(budget)} "
            "free (loaded models and other jobs hold the rest)"
        )
        if waited:
            progress.set_step_text(text)
        else:
            progress.step(text)
        waited = True

    table = ReservationTable(configured_table_path())
    try:
        with reserved(
            table,
            nbytes=nbytes,
            budget=budget,
            what=job.title or job.kind,
            on_wait=on_wait,
            check=progress.check_cancelled,
        ):
            if waited:
                progress.log("memory reserved; starting")
            yield
    except NotEnoughMemory as e:
        raise JobError(str(e)) from e


def job_reap_dead(*, worker: str | None = None) -> int:
    """Mark running jobs whose process died as failed (retryable); how many were.

    A job is dead when its heartbeat is stale, or when `worker` (a worker that just started)
    is the name it was running under.
    """
    now = timezone.now()
    dead = Q(heartbeat_at__lt=now - HEARTBEAT_STALE_AFTER) | Q(heartbeat_at__isnull=True)
    if worker:
        dead |= Q(worker=worker)
    count = ModelJob.objects.filter(Q(state=ModelJob.State.RUNNING) & dead).update(
        state=ModelJob.State.FAILED,
        error=WORKER_GONE_ERROR,
        finished_at=now,
        speed=None,
        eta_seconds=None,
    )
    if count:
        logger.warning("marked %d job(s) of a dead worker failed", count)
    return count


def job_cleanup_staging() -> int:
    """Remove staging and deleting folders left by jobs that are no longer running."""
    models_dir = Path(settings.MLXWEB_MODELS_DIR)
    if not models_dir.is_dir():
        return 0
    running = {
        str(c)
        for c in ModelJob.objects.filter(state=ModelJob.State.RUNNING).values_list(
            "code", flat=True
        )
    }
    removed = 0
    for child in models_dir.iterdir():
        prefix, _, code = child.name.partition("-")
        if prefix not in {".staging", ".deleting"} or code in running:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
        logger.info("removed %s, left by a job that did not finish", child)
        removed += 1
    return removed + upload_cleanup()
