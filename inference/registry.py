"""Where inference workers register themselves: each worker's heartbeat (its id, its own channel,
the models it has loaded, its memory budget and use, its queue) is written every few seconds
and read by every process that routes replies, shows status or looks for dead workers.

With Redis (`redis_url`, the scale-out set-up) the registry lives in Redis, beside the channel
layer the workers already listen on: a key per worker (JSON, with a time-to-live) and a sorted
set of worker ids by their last beat; declaring a worker dead is an atomic script that removes
it only if its beat is still older than the cutoff, so one process takes its replies over.
Without Redis (one process, the embedded defaults) the same is the `WorkerHeartbeat` table of
the database every process already shares; declaring dead is a conditional DELETE.
"""

from __future__ import annotations

import json
import threading
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from django.conf import settings
from django.utils import timezone

if TYPE_CHECKING:
    from inference.models import WorkerHeartbeat


@dataclass(frozen=True)
class Beat:
    """One worker's last heartbeat."""

    worker_id: str
    updated_at: datetime
    # [{"model_id", "bytes", "kv_bytes", "loaded_at", "expires_at", "base_model", "exclusive"?}]
    loaded: list[dict[str, Any]] = field(default_factory=list)
    queued: int = 0
    streaming: int = 0
    channel_name: str = ""
    budget_bytes: int = 0
    used_bytes: int = 0
    draining: bool = False


class Registry(Protocol):
    def beat(self, beat: Beat) -> bool:
        """Write the worker's beat; True when the worker was not registered (its first beat,
        or another process declared it dead meanwhile)."""
        ...

    def beats(self) -> list[Beat]:
        """Every registered worker (alive or lapsed, until declared dead), by id."""
        ...

    def get(self, worker_id: str) -> Beat | None: ...

    def claim_lapsed(self, worker_id: str, cutoff: datetime) -> bool:
        """Remove the worker if its last beat is older than `cutoff`; True for the one caller
        that removed it (the one that takes over its replies)."""
        ...


class TableRegistry:
    """The registry as `WorkerHeartbeat` rows (no Redis)."""

    # (Imported where used: RedisRegistry is usable without Django's apps, from a benchmark.)

    def beat(self, beat: Beat) -> bool:
        from inference.models import WorkerHeartbeat

        values = asdict(beat)
        worker_id = values.pop("worker_id")
        _, created = WorkerHeartbeat.objects.update_or_create(worker_id=worker_id, defaults=values)
        return bool(created)

    def beats(self) -> list[Beat]:
        from inference.models import WorkerHeartbeat

        return [_from_row(row) for row in WorkerHeartbeat.objects.order_by("worker_id")]

    def get(self, worker_id: str) -> Beat | None:
        from inference.models import WorkerHeartbeat

        row = WorkerHeartbeat.objects.filter(worker_id=worker_id).first()
        return _from_row(row) if row is not None else None

    def claim_lapsed(self, worker_id: str, cutoff: datetime) -> bool:
        from inference.models import WorkerHeartbeat

        deleted, _ = WorkerHeartbeat.objects.filter(
            worker_id=worker_id, updated_at__lt=cutoff
        ).delete()
        return bool(deleted)


def _from_row(row: WorkerHeartbeat) -> Beat:
    return Beat(
        worker_id=row.worker_id,
        updated_at=row.updated_at,
        loaded=[entry for entry in row.loaded or [] if isinstance(entry, dict)],
        queued=row.queued,
        streaming=row.streaming,
        channel_name=row.channel_name,
        budget_bytes=int(row.budget_bytes),
        used_bytes=int(row.used_bytes),
        draining=row.draining,
    )


# Removes a worker only if its beat is still older than the cutoff (it may have come back).
_CLAIM = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) < tonumber(ARGV[2]) then
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('DEL', KEYS[2])
  return 1
end
return 0
"""


class RedisRegistry:
    """The registry in Redis: `mlxweb:worker:<id>` (the beat as JSON, expiring `ttl_s` after
    it was written, so that workers nobody declared dead do not stay forever) and
    `mlxweb:workers` (ids scored by their last beat's time)."""

    IDS = "mlxweb:workers"
    KEY_PREFIX = "mlxweb:worker:"

    def __init__(self, url: str, ttl_s: float) -> None:
        import redis

        self.client = redis.Redis.from_url(url, socket_timeout=15, decode_responses=True)
        self.ttl_ms = max(1000, int(ttl_s * 1000))
        self._claim = self.client.register_script(_CLAIM)

    @classmethod
    def _key(cls, worker_id: str) -> str:
        return f"{cls.KEY_PREFIX}{worker_id}"

    def beat(self, beat: Beat) -> bool:
        data = {**asdict(beat), "updated_at": beat.updated_at.isoformat()}
        with self.client.pipeline(transaction=True) as pipe:
            pipe.zadd(self.IDS, {beat.worker_id: beat.updated_at.timestamp()})
            pipe.set(self._key(beat.worker_id), json.dumps(data), px=self.ttl_ms)
            added, _ = pipe.execute()
        return bool(added)

    def beats(self) -> list[Beat]:
        ids = sorted(str(i) for i in self.client.zrange(self.IDS, 0, -1))
        if not ids:
            return []
        found = []
        gone = []
        values = self.client.mget([self._key(i) for i in ids])
        for worker_id, raw in zip(ids, values, strict=True):
            beat = _from_json(raw)
            if beat is None:
                gone.append(worker_id)  # its key expired: long dead, and nobody declared it
            else:
                found.append(beat)
        if gone:
            self.client.zrem(self.IDS, *gone)
        return found

    def get(self, worker_id: str) -> Beat | None:
        return _from_json(self.client.get(self._key(worker_id)))

    def claim_lapsed(self, worker_id: str, cutoff: datetime) -> bool:
        claimed = self._claim(
            keys=[self.IDS, self._key(worker_id)], args=[worker_id, cutoff.timestamp()]
        )
        return bool(claimed)


def _from_json(raw: Any) -> Beat | None:
    if not raw:
        return None
    try:
        data = json.loads(raw)
        updated = datetime.fromisoformat(str(data.pop("updated_at")))
        if timezone.is_naive(updated):
            updated = updated.replace(tzinfo=UTC)
        data["loaded"] = [e for e in data.get("loaded") or [] if isinstance(e, dict)]
        return Beat(updated_at=updated, **data)
    except (ValueError, TypeError, KeyError):
        return None


_lock = threading.Lock()
_redis: dict[str, RedisRegistry] = {}  # by URL: one client (and its pool) per process


def registry() -> Registry:
    """Redis when `redis_url` is set (every process of a scaled-out site has it), else the
    table."""
    url = getattr(settings, "REDIS_URL", "") or ""
    if not url:
        return TableRegistry()
    with _lock:
        found = _redis.get(url)
        if found is None:
            from inference.cluster import DEAD_AFTER_S

            # Long enough that a lapsed worker is still there to be declared dead (and its
            # replies taken over) by the next process that looks.
            found = _redis[url] = RedisRegistry(url, ttl_s=20 * DEAD_AFTER_S)
    return found
