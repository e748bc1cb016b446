"""The registry of job kinds: what a `ModelJob.kind` names and how it runs.

A kind is one service function, registered with `@job_kind(...)`:

    @job_kind("validate", heavy=True, describe=lambda p: f"Validate {p['source']}")
    def model_validate(*, source: str, progress: JobProgress) -> dict[str, Any]: ...

The function gets the job's params as keyword arguments plus `progress`, reports through it,
raises `JobError` with a message for people, and returns the job's result (JSON-serialisable).
The Celery task, the job page, cancel and retry work for every registered kind unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.conf import settings

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

    @property
    def queue(self) -> str:
        return settings.MODELS_QUEUE_HEAVY if self.heavy else settings.MODELS_QUEUE_LIGHT


_KINDS: dict[str, JobKind] = {}


def job_kind(
    name: str, *, heavy: bool, describe: Callable[[dict[str, Any]], str]
) -> Callable[[RunFunction], RunFunction]:
    """Register the decorated service function as the runner of jobs of kind `name`."""

    def register(run: RunFunction) -> RunFunction:
        if name in _KINDS and _KINDS[name].run is not run:
            raise ValueError(f"job kind {name!r} is already registered")
        _KINDS[name] = JobKind(name=name, run=run, heavy=heavy, describe=describe)
        return run

    return register


def get_job_kind(name: str) -> JobKind:
    try:
        return _KINDS[name]
    except KeyError:
        raise UnknownJobKind(f"unknown job kind {name!r}") from None


def job_kinds() -> dict[str, JobKind]:
    return dict(_KINDS)
