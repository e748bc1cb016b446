"""Library jobs share the memory budget (models_admin.services.jobs.job_memory): a heavy job
waits, saying so, while the loaded models and other jobs leave it no room, runs once they give
memory back, may be cancelled while it waits, and fails at once if it could never fit."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from django.db import connection

from inference.memory import Reservation, ReservationTable, weights_bytes_on_disk
from models_admin import services
from models_admin.models import ModelJob
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(120)]


@pytest.fixture
def table(tmp_path: Path, settings: Any) -> ReservationTable:
    settings.MLXWEB_MEMORY_TABLE = tmp_path / "memory.json"
    return ReservationTable(settings.MLXWEB_MEMORY_TABLE)


@pytest.fixture
def set_budget(settings: Any) -> Callable[[int], None]:
    def set_it(nbytes: int) -> None:
        config = settings.MLXWEB_CONFIG
        server = config.server.model_copy(update={"memory_budget_bytes": nbytes})
        settings.MLXWEB_CONFIG = config.model_copy(update={"server": server})

    return set_it


def convert_job(tiny_hf_dir: Path) -> ModelJob:
    params = {"source": str(tiny_hf_dir), "name": "tiny-mlx"}
    return services.job_create(kind="convert", params=params, enqueue=False)


def in_background(action: Callable[[], None]) -> threading.Thread:
    def run() -> None:
        try:
            action()
        finally:
            connection.close()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def waiting_step(job: ModelJob) -> str | None:
    step = ModelJob.objects.get(pk=job.pk).step
    return step if step.startswith("waiting for memory") else None


def test_a_job_waits_for_memory_then_runs(
    library: Path,
    tiny_hf_dir: Path,
    table: ReservationTable,
    set_budget: Callable[[int], None],
) -> None:
    size = weights_bytes_on_disk(tiny_hf_dir)
    set_budget(3 * size)  # the convert job needs 2 x its source
    table.put(Reservation("engine-x", os.getpid(), 2 * size, "inference engine", "engine"))
    job = convert_job(tiny_hf_dir)
    seen: list[Any] = []

    def free_it_once_the_job_waits() -> None:
        try:
            seen.append(wait_until(lambda: waiting_step(job), timeout=30, what="the job to wait"))
            seen.append([r.waiting for r in table.entries() if r.kind == "job"])
        finally:
            table.remove("engine-x")

    helper = in_background(free_it_once_the_job_waits)
    job = services.job_run(job=job, interval=0.1)
    helper.join(30)

    assert job.state == ModelJob.State.SUCCEEDED, job.error
    assert seen and "needs about" in seen[0] and "free" in seen[0]
    assert seen[1] == [True]  # in the table as waiting, holding nothing
    assert "memory reserved; starting" in job.log
    assert (library / "tiny-mlx" / "config.json").is_file()
    # Its share is given back.
    assert [r for r in table.entries() if r.kind == "job"] == []


def test_a_waiting_job_can_be_cancelled(
    library: Path,
    tiny_hf_dir: Path,
    table: ReservationTable,
    set_budget: Callable[[int], None],
) -> None:
    size = weights_bytes_on_disk(tiny_hf_dir)
    set_budget(3 * size)
    table.put(Reservation("engine-x", os.getpid(), 2 * size, "inference engine", "engine"))
    job = convert_job(tiny_hf_dir)

    def cancel_once_it_waits() -> None:
        wait_until(lambda: waiting_step(job), timeout=30, what="the job to wait")
        services.job_cancel(job=ModelJob.objects.get(pk=job.pk))

    helper = in_background(cancel_once_it_waits)
    job = services.job_run(job=job, interval=0.1)
    helper.join(30)

    assert job.state == ModelJob.State.CANCELLED
    assert not (library / "tiny-mlx").exists()
    assert [r.key for r in table.entries()] == ["engine-x"]


def test_a_job_bigger_than_the_whole_budget_fails_at_once(
    library: Path,
    tiny_hf_dir: Path,
    table: ReservationTable,
    set_budget: Callable[[int], None],
) -> None:
    set_budget(weights_bytes_on_disk(tiny_hf_dir))

    job = services.job_run(job=convert_job(tiny_hf_dir))

    assert job.state == ModelJob.State.FAILED
    assert "more than the whole memory budget" in job.error
    assert "memory_budget_bytes" in job.error
    assert table.entries() == []


def test_light_jobs_hold_no_memory(tiny_hf_dir: Path) -> None:
    assert services.get_job_kind("pull").memory_factor == 0
    assert services.get_job_kind("delete").memory_factor == 0
    convert = services.get_job_kind("convert")
    params = {"source": str(tiny_hf_dir)}
    assert services.jobs.job_memory_bytes(kind=convert, params=params) == 2 * (
        weights_bytes_on_disk(tiny_hf_dir)
    )
