"""What is in memory, for the Models page: each live inference worker's loaded models (their
weights, KV caches and when they unload) and memory budget, from the workers' heartbeat rows,
and the library jobs holding or waiting for a share of this machine's budget (inference.memory's
reservation table)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.utils import timezone
from django.utils.dateparse import parse_datetime

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModelRow:
    model_id: str
    weights_bytes: int
    kv_bytes: int
    loaded_at: datetime | None
    # None: it stays loaded (no keep-alive, or requests for it are running).
    expires_at: datetime | None
    base_model: str | None = None  # a LoRA adapter's base

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes


@dataclass(frozen=True)
class WorkerMemoryRow:
    worker_id: str
    updated_at: datetime
    budget_bytes: int
    used_bytes: int
    loaded: list[LoadedModelRow] = field(default_factory=list)
    queued: int = 0
    streaming: int = 0
    draining: bool = False

    @property
    def free_bytes(self) -> int:
        return max(0, self.budget_bytes - self.used_bytes)

    @property
    def percent_used(self) -> int:
        if self.budget_bytes <= 0:
            return 0
        return min(100, round(100 * self.used_bytes / self.budget_bytes))


@dataclass(frozen=True)
class JobMemoryRow:
    what: str
    nbytes: int
    waiting: bool


@dataclass(frozen=True)
class MemoryOverview:
    workers: list[WorkerMemoryRow]
    jobs: list[JobMemoryRow]
    budget_bytes: int  # this machine's, as server.yaml sets it


def _when(value: object) -> datetime | None:
    return parse_datetime(value) if isinstance(value, str) else None


def _int(value: object) -> int:
    try:
        return max(0, int(value))  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return 0


def memory_overview() -> MemoryOverview:
    """The live workers (heartbeat younger than inference.cluster.DEAD_AFTER_S: three missed
    beats), newest first, and the jobs in this machine's reservation table."""
    from inference.cluster import DEAD_AFTER_S
    from inference.memory import ReservationTable, configured_budget, configured_table_path
    from inference.services import worker_beats

    since = timezone.now() - timedelta(seconds=DEAD_AFTER_S)
    workers = []
    for beat in [b for b in worker_beats() if b.updated_at >= since]:
        loaded = [
            LoadedModelRow(
                model_id=str(info.get("model_id", "")),
                weights_bytes=_int(info.get("bytes")),
                kv_bytes=_int(info.get("kv_bytes")),
                loaded_at=_when(info.get("loaded_at")),
                expires_at=_when(info.get("expires_at")),
                base_model=str(info["base_model"]) if info.get("base_model") else None,
            )
            for info in (beat.loaded or [])
            if isinstance(info, dict)
        ]
        workers.append(
            WorkerMemoryRow(
                worker_id=beat.worker_id,
                updated_at=beat.updated_at,
                budget_bytes=_int(beat.budget_bytes),
                used_bytes=_int(beat.used_bytes),
                loaded=loaded,
                queued=beat.queued,
                streaming=beat.streaming,
                draining=beat.draining,
            )
        )
    try:
        entries = ReservationTable(configured_table_path()).entries()
    except OSError as e:
        logger.warning("cannot read the memory table: %s", e)
        entries = []
    jobs = [JobMemoryRow(r.what, r.nbytes, r.waiting) for r in entries if r.kind == "job"]
    return MemoryOverview(workers=workers, jobs=jobs, budget_bytes=configured_budget())


@dataclass(frozen=True)
class AdapterRow:
    """A LoRA adapter folder of the models folder, as the catalogue sees it."""

    model_id: str
    path: str
    base_model: str | None
    problem: str | None  # why it cannot load; None when it is ready


def adapter_list() -> list[AdapterRow]:
    """The catalogue's LoRA adapters (inference.catalogue), ready or not."""
    from inference import services as inference_services

    return [
        AdapterRow(
            model_id=spec.id,
            path=str(spec.adapter_path),
            base_model=spec.base_id,
            problem=spec.problem
            or (None if spec.is_available else f"the base model {spec.base_id!r} is not here"),
        )
        for spec in inference_services.model_list()
        if spec.adapter_path is not None
    ]
