"""Celery tasks of the model library: thin wrappers that load a job and run its service."""

from __future__ import annotations

import logging
from typing import Any

from celery import Task, shared_task
from celery.signals import worker_init, worker_ready

from models_admin import embedded, services
from models_admin.models import ModelJob

logger = logging.getLogger(__name__)


@shared_task(bind=True, acks_late=True, name="models_admin.run_model_job")
def run_model_job(self: Task, job_code: str) -> None:
    """Run one library job of any kind.

    Acknowledged late, and idempotent: `job_run` claims only a queued job whose task id is this
    message's, so a redelivered, duplicate or stale message finds nothing to do.
    """
    job = ModelJob.objects.filter(code=job_code).first()
    if job is None:
        logger.warning("job %s: no such job, message dropped", job_code)
        return
    services.job_run(job=job, task_id=self.request.id, worker=self.request.hostname or "")


@worker_init.connect
def _on_worker_init(**_kwargs: Any) -> None:
    # First thing, before anything that could fail: an orphaned embedded worker must still exit.
    embedded.watch_parent()


@worker_ready.connect
def _on_worker_ready(sender: Any = None, **_kwargs: Any) -> None:
    """A worker just started: jobs that were running under its name, or whose heartbeat went
    stale, died with an earlier process; mark them failed and remove their staging folders."""
    hostname = getattr(sender, "hostname", None) or ""
    try:
        services.job_reap_dead(worker=hostname)
        services.job_cleanup_staging()
    except Exception:  # e.g. migrations not applied yet: the worker still serves
        logger.exception("could not clean up after earlier workers")
