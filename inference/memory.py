"""One memory budget per machine for the models, their KV caches and memory-heavy library jobs.

The budget is `memory_budget_bytes` (server.yaml), else `memory_budget_fraction` of what MLX may
use: the recommended working set of the GPU (Metal) or its memory (CUDA), or the machine's RAM
when MLX runs on the CPU.

Within one engine, the engine thread counts what it holds (`EngineMemory`): each loaded model's
weights and each model's KV caches (the prompt cache and the running batch's caches). Across
processes on the machine, the processes that take memory put their share in one small table, a
JSON file under an exclusive lock (`ReservationTable`): the engine writes what it uses, a library
job (convert, quantize, import, validate, export) reserves its estimate before it starts and
waits, saying "waiting for memory", while the rest of the table leaves it no room. Entries of
processes that died are dropped on every read, so a killed job never holds memory for good.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_FRACTION = 0.75
# How often the engine re-reads the table and re-publishes what it uses.
ENGINE_REFRESH_S = 1.0


class NotEnoughMemory(RuntimeError):
    """A model or job needs more than the whole budget: it can never fit, however long it waits."""


def gib(nbytes: float) -> str:
    """Bytes for people: '1.25 GB'."""
    if abs(nbytes) >= 1e9:
        return f"{nbytes / 1e9:.2f} GB"
    return f"{nbytes / 1e6:.1f} MB"


# ------------------------------------------------------------------ the budget


def system_memory_bytes() -> int:
    """The machine's physical memory (0 if the system does not say)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0


def device_memory_bytes() -> int:
    """What MLX may use on its default device: the GPU's recommended working set (Metal) or its
    memory (CUDA), else the machine's RAM (MLX on the CPU)."""
    import mlx.core as mx

    if mx.default_device() == mx.gpu:
        try:
            info = mx.device_info()
        except (RuntimeError, AttributeError):
            info = {}
        for key in ("max_recommended_working_set_size", "memory_size", "total_memory"):
            value = info.get(key)
            if isinstance(value, int) and value > 0:
                return value
    return system_memory_bytes()


def budget_bytes(configured: int | None, fraction: float = DEFAULT_FRACTION) -> int:
    """The budget: `configured` if given, else `fraction` of `device_memory_bytes()`."""
    if configured is not None and configured > 0:
        return int(configured)
    return int(device_memory_bytes() * fraction)


def weights_bytes_on_disk(path: Path | None) -> int:
    """The size of a model's weights files: a GGUF file, or the safetensors of a folder."""
    if path is None:
        return 0
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(p.stat().st_size for p in path.glob("*.safetensors") if p.is_file())
    return 0


# ------------------------------------------------------------------ the cross-process table


@dataclass(frozen=True)
class Reservation:
    """One process's share of the budget."""

    key: str
    pid: int
    nbytes: int
    what: str
    kind: str  # "engine" or "job"
    waiting: bool = False  # a job that asked for `nbytes` and has not got them yet
    since: float = 0.0


class ReservationTable:
    """The processes' shares of the machine's budget: a JSON file under an exclusive lock."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, dict[str, Any]]]:
        """The table, locked against the other processes; what the block leaves is written."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                entries = self._read()
                before = json.dumps(entries, sort_keys=True)
                yield entries
                if json.dumps(entries, sort_keys=True) != before:
                    tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
                    tmp.write_text(json.dumps(entries))
                    os.replace(tmp, self.path)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        # Entries of processes that are gone hold nothing.
        return {
            key: entry
            for key, entry in data.items()
            if isinstance(entry, dict) and _alive(int(entry.get("pid", 0)))
        }

    def entries(self) -> list[Reservation]:
        with self._locked() as entries:
            return [_reservation(key, entry) for key, entry in entries.items()]

    def put(self, reservation: Reservation) -> None:
        with self._locked() as entries:
            entries[reservation.key] = _entry(reservation)

    def remove(self, key: str) -> None:
        with self._locked() as entries:
            entries.pop(key, None)

    def try_reserve(self, reservation: Reservation, budget: int) -> tuple[bool, int]:
        """Hold `reservation.nbytes` if the others' held shares leave room within `budget`;
        else record it as waiting. Returns (held, bytes the others hold)."""
        with self._locked() as entries:
            others = sum(
                int(e.get("nbytes", 0))
                for key, e in entries.items()
                if key != reservation.key and not e.get("waiting")
            )
            held = others + reservation.nbytes <= budget
            entries[reservation.key] = _entry(
                Reservation(**{**reservation.__dict__, "waiting": not held})
            )
            return held, others


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _entry(r: Reservation) -> dict[str, Any]:
    return {
        "pid": r.pid,
        "nbytes": int(r.nbytes),
        "what": r.what,
        "kind": r.kind,
        "waiting": r.waiting,
        "since": r.since,
    }


def _reservation(key: str, entry: dict[str, Any]) -> Reservation:
    return Reservation(
        key=key,
        pid=int(entry.get("pid", 0)),
        nbytes=int(entry.get("nbytes", 0)),
        what=str(entry.get("what", "")),
        kind=str(entry.get("kind", "")),
        waiting=bool(entry.get("waiting", False)),
        since=float(entry.get("since", 0.0)),
    )


@contextlib.contextmanager
def reserved(
    table: ReservationTable,
    *,
    nbytes: int,
    budget: int,
    what: str,
    on_wait: Callable[[int], None] = lambda free: None,
    check: Callable[[], None] = lambda: None,
    poll: float = 0.5,
) -> Iterator[Reservation]:
    """Hold `nbytes` of the budget for the block (a library job's), waiting until they fit.

    While waiting, `on_wait(free_bytes)` is called after each try and `check()` may raise to give
    up (a cancelled job). Raises NotEnoughMemory at once if `nbytes` exceeds the whole budget.
    """
    if nbytes > budget:
        raise NotEnoughMemory(
            f"{what} needs about {gib(nbytes)}, more than the whole memory budget "
            f"({gib(budget)}; memory_budget_bytes in server.yaml)"
        )
    reservation = Reservation(
        key=f"job-{uuid.uuid4().hex[:12]}",
        pid=os.getpid(),
        nbytes=nbytes,
        what=what,
        kind="job",
        since=time.time(),
    )
    try:
        while True:
            held, others = table.try_reserve(reservation, budget)
            if held:
                break
            on_wait(max(0, budget - others))
            check()
            time.sleep(poll)
        yield reservation
    finally:
        table.remove(reservation.key)


# ------------------------------------------------------------------ the engine's share


@dataclass
class ModelMemory:
    """What one loaded model takes."""

    model_id: str
    weights_bytes: int
    kv_bytes: int = 0


@dataclass
class LoadPlan:
    """What must happen for a model to load: idle models to unload first, or wait."""

    evict: list[str] = field(default_factory=list)
    wait: bool = False


class EngineMemory:
    """The engine thread's accounting against the budget (only the engine thread calls it,
    except `status()`, which any thread may read)."""

    def __init__(
        self,
        *,
        budget: int,
        table: ReservationTable | None = None,
        key: str | None = None,
    ) -> None:
        self.budget = int(budget)
        self.table = table
        self.key = key or f"engine-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        # Real sizes of models loaded before (by id and weights size on disk): better than the
        # files' size when the model is served dequantized.
        self.known: dict[tuple[str, int], int] = {}
        self._others: list[Reservation] = []
        self._others_read_at = -1e9
        self._status: dict[str, Any] = {
            "budget_bytes": self.budget,
            "used_bytes": 0,
            "free_bytes": self.budget,
            "models": [],
            "jobs": [],
        }

    # --- other processes (library jobs) ---------------------------------------------------

    def others(self, *, fresh: bool = False) -> list[Reservation]:
        """The other processes' entries in the table (re-read at most every ENGINE_REFRESH_S
        unless `fresh`)."""
        if self.table is None:
            return []
        now = time.monotonic()
        if fresh or now - self._others_read_at >= ENGINE_REFRESH_S:
            try:
                self._others = [r for r in self.table.entries() if r.key != self.key]
            except OSError as e:
                logger.warning("cannot read the memory table %s: %s", self.table.path, e)
                self._others = []
            self._others_read_at = now
        return self._others

    def others_held(self, *, fresh: bool = False) -> int:
        return sum(r.nbytes for r in self.others(fresh=fresh) if not r.waiting)

    def waiting_jobs(self) -> list[Reservation]:
        return [r for r in self.others() if r.waiting]

    # --- estimates and plans --------------------------------------------------------------

    def estimate(self, model_id: str, on_disk: int) -> int:
        return self.known.get((model_id, on_disk), on_disk)

    def remember(self, model_id: str, on_disk: int, actual: int) -> None:
        self.known[(model_id, on_disk)] = actual

    def plan_load(
        self,
        *,
        model_id: str,
        need: int,
        models: list[ModelMemory],
        idle_lru: list[str],
    ) -> LoadPlan:
        """How to make room for `need` bytes: the least recently used idle models to unload
        (`idle_lru`, oldest first), or wait (busy models or library jobs hold the rest).

        Raises NotEnoughMemory if the model could not fit even alone.
        """
        if need > self.budget:
            raise NotEnoughMemory(
                f"model {model_id!r} needs about {gib(need)}, more than the whole memory "
                f"budget ({gib(self.budget)}; memory_budget_bytes in server.yaml)"
            )
        sizes = {m.model_id: m.weights_bytes + m.kv_bytes for m in models}
        used = sum(sizes.values()) + self.others_held(fresh=True)
        evict: list[str] = []
        for candidate in idle_lru:
            if used + need <= self.budget:
                break
            evict.append(candidate)
            used -= sizes.get(candidate, 0)
        if used + need > self.budget:
            return LoadPlan(evict=[], wait=True)
        return LoadPlan(evict=evict)

    def room(self, models: list[ModelMemory]) -> int:
        """Bytes left in the budget now."""
        used = sum(m.weights_bytes + m.kv_bytes for m in models) + self.others_held()
        return self.budget - used

    def idle_to_unload_for_jobs(self, models: list[ModelMemory], idle_lru: list[str]) -> list[str]:
        """Idle models (oldest first) whose unloading lets the first waiting job fit."""
        waiting = sorted(self.waiting_jobs(), key=lambda r: r.since)
        if not waiting:
            return []
        job = waiting[0]
        sizes = {m.model_id: m.weights_bytes + m.kv_bytes for m in models}
        free = self.budget - sum(sizes.values()) - self.others_held()
        evict: list[str] = []
        for candidate in idle_lru:
            if free >= job.nbytes:
                break
            evict.append(candidate)
            free += sizes.get(candidate, 0)
        return evict if free >= job.nbytes else []

    # --- what is used, for status pages and the other processes ---------------------------

    def publish(self, models: list[ModelMemory]) -> dict[str, Any]:
        """Record what the engine uses (in the table too) and return the status."""
        mine = sum(m.weights_bytes + m.kv_bytes for m in models)
        jobs = [r for r in self.others() if r.kind == "job" and not r.waiting]
        others = sum(r.nbytes for r in self.others() if not r.waiting)
        used = mine + others
        status = {
            "budget_bytes": self.budget,
            "used_bytes": used,
            "free_bytes": max(0, self.budget - used),
            "models": [
                {
                    "model_id": m.model_id,
                    "weights_bytes": m.weights_bytes,
                    "kv_bytes": m.kv_bytes,
                    "bytes": m.weights_bytes + m.kv_bytes,
                }
                for m in models
            ],
            "jobs": [{"what": r.what, "bytes": r.nbytes} for r in jobs],
            "other_bytes": others - sum(r.nbytes for r in jobs),
            "waiting_jobs": [
                {"what": r.what, "bytes": r.nbytes} for r in self.others() if r.waiting
            ],
        }
        if self.table is not None:
            try:
                self.table.put(
                    Reservation(
                        key=self.key,
                        pid=os.getpid(),
                        nbytes=mine,
                        what=f"inference engine ({len(models)} model(s))",
                        kind="engine",
                        since=time.time(),
                    )
                )
            except OSError as e:
                logger.warning("cannot write the memory table %s: %s", self.table.path, e)
        self._status = status
        return status

    def withdraw(self) -> None:
        """The engine stopped: it holds nothing any more."""
        self._status = {**self._status, "models": [], "used_bytes": 0, "free_bytes": self.budget}
        if self.table is not None:
            with contextlib.suppress(OSError):
                self.table.remove(self.key)

    def status(self) -> dict[str, Any]:
        """The last published status (any thread)."""
        status = self._status
        return {**status, "models": [dict(m) for m in status["models"]]}


def cache_bytes(*caches: Any) -> int:
    """Bytes held by prompt caches and batch generators (whatever of theirs reports it)."""
    total = 0
    for cache in caches:
        if cache is None:
            continue
        for attribute in ("nbytes", "prompt_cache_nbytes"):
            value = getattr(cache, attribute, None)
            if isinstance(value, int):
                total += value
                break
    return total


# ------------------------------------------------------------------ from the Django settings


def configured_budget() -> int:
    """The budget server.yaml sets (memory_budget_bytes, else memory_budget_fraction)."""
    from django.conf import settings

    server = settings.MLXWEB_CONFIG.server
    return budget_bytes(server.memory_budget_bytes, server.memory_budget_fraction)


def configured_table_path() -> Path:
    """The machine's reservation table: var_dir/memory/reservations.json (tests may set
    settings.MLXWEB_MEMORY_TABLE)."""
    from django.conf import settings

    path = getattr(settings, "MLXWEB_MEMORY_TABLE", None)
    return Path(path) if path else Path(settings.VAR_DIR) / "memory" / "reservations.json"
