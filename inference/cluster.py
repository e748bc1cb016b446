"""Many inference workers on one channel layer: registry, routing, failover and hand-over.

The registry (`inference.registry`) holds each worker's heartbeat: in Redis when the site runs
on Redis (a key per worker with a time-to-live, and the ids by their last beat), else in the
`WorkerHeartbeat` table. Each worker's beat names its own channel on the channel layer
(`worker_channel`), which it listens on beside the shared `inference` channel; the messages for
one reply (stop, sync) go to the channel of the worker that owns it (`Generation.worker_id`).

- Routing (`send_start`): a reply goes to a live, non-draining worker that has its model loaded
  and a free stream, else to an idle one that can load it (most free memory), else to the least
  busy one that can serve it. Load is counted from the rows routed to each worker, which is
  exact at once, where a heartbeat lags by up to `HEARTBEAT_S`. With no worker registered the
  shared channel takes it (one worker, in-process mode, workers of old).
- Failover (`reap_dead_workers`): a worker whose heartbeat is older than `DEAD_AFTER_S` is
  declared dead by whoever notices first (claimed by removing it from the registry, atomically,
  so only one does): its
  queued replies are routed again, its streaming ones are marked interrupted with their text and
  continued on a live worker (`resume`), unless the user had asked to stop them.
- Hand-over (`hand_over_reply`): a draining worker does the same for its own replies.

Every state change on a row is a conditional UPDATE (the row still active, still this worker's),
so two processes that notice the same death never resume a reply twice.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import transaction
from django.db.models import Count, Q
from django.dispatch import Signal
from django.utils import timezone

from inference.models import Generation
from inference.registry import Beat, registry

logger = logging.getLogger(__name__)


def _heartbeat_interval() -> float:
    raw = os.environ.get("MLXWEB_HEARTBEAT_S", "").strip()
    if not raw:
        return 5.0
    try:
        value = float(raw)
    except ValueError:
        raise ImproperlyConfigured(
            f"MLXWEB_HEARTBEAT_S must be a number of seconds, not {raw!r}"
        ) from None
    if not 0.2 <= value <= 60:
        raise ImproperlyConfigured(f"MLXWEB_HEARTBEAT_S must be between 0.2 and 60, not {value}")
    return value


# How often a worker writes its row (MLXWEB_HEARTBEAT_S, the same for every process), and how
# old a row is when its worker is declared dead.
HEARTBEAT_S = _heartbeat_interval()
DEAD_AFTER_S = 3 * HEARTBEAT_S

# Sent, inside the transaction that creates it, when a reply lost with its worker is continued
# by a new generation: `old` (interrupted, text kept) and `new` (its continuation). A receiver
# that shows `new` in place of `old` (the chat repoints its message) returns True; when none
# does, nobody would see the continuation and it is not made (an API request whose client got
# the interruption, a title).
generation_resumed = Signal()


def worker_channel(worker_id: str) -> str:
    """The channel a worker listens on beside the shared one (a valid channel-layer name)."""
    safe = re.sub(r"[^a-zA-Z0-9_.-]", "-", worker_id)
    return f"{settings.INFERENCE_CHANNEL}.w.{safe}"[:99]


@dataclass(frozen=True)
class WorkerInfo:
    """One worker as its heartbeat row describes it."""

    worker_id: str
    channel: str
    models: tuple[str, ...]  # loaded
    exclusive: bool  # serves only its loaded models (a distributed group)
    budget_bytes: int
    used_bytes: int
    queued: int
    streaming: int
    draining: bool
    updated_at: datetime
    alive: bool
    active: int = 0  # replies routed to it and not ended (from the rows)

    @property
    def free_bytes(self) -> int:
        return max(0, self.budget_bytes - self.used_bytes)

    def can_serve(self, model_id: str) -> bool:
        return model_id in self.models or not self.exclusive


def _info(beat: Beat, now: datetime, active: dict[str, int]) -> WorkerInfo:
    loaded = beat.loaded
    return WorkerInfo(
        worker_id=beat.worker_id,
        channel=beat.channel_name,
        models=tuple(str(entry.get("model_id", "")) for entry in loaded),
        exclusive=any(entry.get("exclusive") for entry in loaded),
        budget_bytes=int(beat.budget_bytes),
        used_bytes=int(beat.used_bytes),
        queued=beat.queued,
        streaming=beat.streaming,
        draining=beat.draining,
        updated_at=beat.updated_at,
        alive=(now - beat.updated_at).total_seconds() < DEAD_AFTER_S,
        active=active.get(beat.worker_id, 0),
    )


def workers() -> list[WorkerInfo]:
    """Every registered worker, alive or not (until someone declares it dead), by id."""
    now = timezone.now()
    rows = (
        Generation.objects.active()
        .exclude(worker_id="")
        .values("worker_id")
        .annotate(n=Count("id"))
    )
    active = {row["worker_id"]: row["n"] for row in rows}
    return [_info(b, now, active) for b in registry().beats()]


def live_workers(*, exclude: Collection[str] = ()) -> list[WorkerInfo]:
    """The workers that take new work: alive, not draining, with a channel of their own."""
    return [
        w
        for w in workers()
        if w.alive and not w.draining and w.channel and w.worker_id not in exclude
    ]


def pick_worker(model_id: str, *, exclude: Collection[str] = ()) -> WorkerInfo | None:
    """Where a reply from `model_id` should go (see the module's docstring); None when no
    registered worker takes work."""
    candidates = [w for w in live_workers(exclude=exclude) if w.can_serve(model_id)]
    if not candidates:
        return None
    room = int(settings.MLXWEB_CONFIG.server.limits.max_concurrent_streams)
    holding = [w for w in candidates if model_id in w.models]
    others = [w for w in candidates if model_id not in w.models]
    with_room = [w for w in holding if w.active < room]
    if with_room:
        return min(with_room, key=lambda w: (w.active, -w.free_bytes, w.worker_id))
    idle = [w for w in others if w.active == 0]
    if idle:
        return max(idle, key=lambda w: (w.free_bytes, w.worker_id))
    if holding:
        return min(holding, key=lambda w: (w.active, w.worker_id))
    return max(others, key=lambda w: (w.free_bytes, -w.active, w.worker_id))


def _send(channel: str, message: dict[str, Any]) -> None:
    # Through inference.services' own sender: one seam for every message to a worker.
    from inference import services

    services._send(channel, message)


def _group_send(group: str, message: dict[str, Any]) -> None:
    if not group:
        return
    layer = get_channel_layer()
    assert layer is not None, "CHANNEL_LAYERS is not configured"
    async_to_sync(layer.group_send)(group, message)


def send_start(code: str, model_id: str, *, exclude: Collection[str] = (), owner: str = "") -> str:
    """Route the queued generation `code` and send it its `generation.start`; returns the
    worker's id ("" for the shared channel). `owner` is whose the row is now (a draining
    worker passing it on, a dead worker's row): the row moves only if it still is, and is
    still queued, so a row is never sent to two workers."""
    target = pick_worker(model_id, exclude=exclude)
    worker_id = target.worker_id if target is not None else ""
    moved = Generation.objects.filter(
        code=code, state=Generation.State.QUEUED, worker_id=owner
    ).update(worker_id=worker_id)
    if not moved:
        return ""
    channel = target.channel if target is not None else settings.INFERENCE_CHANNEL
    _send(channel, {"type": "generation.start", "code": code})
    return worker_id


def pass_on(code: str, model_id: str, *, me: str) -> str:
    """A worker that will not serve its queued row `code` (draining, or a group serving another
    model) hands it to another live worker; returns that worker's id, "" when there is none
    (the caller then serves it itself, or fails it)."""
    target = pick_worker(model_id, exclude={me})
    if target is None:
        return ""
    moved = Generation.objects.filter(
        code=code, state=Generation.State.QUEUED, worker_id=me
    ).update(worker_id=target.worker_id)
    if moved:
        _send(target.channel, {"type": "generation.start", "code": code})
    return target.worker_id


def owner_channel(worker_id: str) -> str:
    """The channel of the worker that owns a reply; the shared channel when it has none (a
    row from before routing, or its worker's row is gone)."""
    if worker_id:
        beat = registry().get(worker_id)
        if beat is not None and beat.channel_name:
            return beat.channel_name
    return str(settings.INFERENCE_CHANNEL)


def channel_for_model(model_id: str) -> str:
    """The channel of the worker a request for `model_id` would go to now (a probe, a warm-up,
    an embedding, a keep-alive); the shared channel when none is registered."""
    target = pick_worker(model_id)
    return target.channel if target is not None else str(settings.INFERENCE_CHANNEL)


def is_dead(worker_id: str) -> bool:
    """Whether a reply's worker is gone: its row lapsed or was removed."""
    if not worker_id:
        return False
    beat = registry().get(worker_id)
    if beat is None:
        return True
    return (timezone.now() - beat.updated_at).total_seconds() >= DEAD_AFTER_S


def mark_stop_requested(generation: Generation) -> None:
    """Record that the user stopped this reply, so that a failover does not continue it."""
    with transaction.atomic():
        row = Generation.objects.select_for_update().filter(pk=generation.pk).first()
        if row is None or not row.is_active:
            return
        Generation.objects.filter(pk=row.pk).update(
            details={**(row.details or {}), "stop_requested": True}
        )


# --- failover --------------------------------------------------------------------------------


class _Unclaimed(Exception):
    """Nobody shows the continuation: the transaction that made it is rolled back."""


def resume(row: Generation) -> Generation | None:
    """Continue an interrupted reply on a live worker: a new generation whose text starts with
    the kept text (`inference.services.generation_continue`), details {"resumed_from": code},
    the old row's details {"resumed_by": code}. None when it cannot be continued or nobody
    would show it (see `generation_resumed`)."""
    from inference import services
    from inference.schemas import GenerationParams

    values = dict(row.params or {})
    if (row.provenance or {}).get("seed_source") == "picked":
        values["seed"] = None  # the continuation draws its own, as "Continue" does
    values["max_tokens"] = max(1, int(values.get("max_tokens") or 1) - row.completion_tokens)
    try:
        params = GenerationParams.model_validate(values)
        with transaction.atomic():
            new = services.generation_continue(
                generation=row,
                params=params,
                notify_group=row.notify_group,
                replayable=bool((row.details or {}).get("trace")),
            )
            new.details = {**(new.details or {}), "resumed_from": str(row.code)}
            Generation.objects.filter(pk=new.pk).update(details=new.details)
            Generation.objects.filter(pk=row.pk).update(
                details={**(row.details or {}), "resumed_by": str(new.code)}
            )
            answers = generation_resumed.send(sender=Generation, old=row, new=new)
            if not any(answer for _, answer in answers):
                raise _Unclaimed
    except _Unclaimed:
        logger.info("generation %s left interrupted: nobody shows a continuation", row.code)
        return None
    except Exception as e:  # NotContinuable, a limit reached, a model gone: it stays as it is
        logger.warning("generation %s could not be resumed: %s", row.code, e)
        return None
    logger.info("generation %s resumed as %s", row.code, new.code)
    return new


def hand_over_reply(
    code: str, from_worker: str, *, text: str | None = None, tokens: int | None = None
) -> Generation | None:
    """End a streaming reply of `from_worker` (dead, or draining) with its text (`text` when
    the worker knows it better than the row) and continue it elsewhere; stopped instead when the
    user asked. Returns the continuation, if any. A no-op if the row is no longer that worker's
    active reply (someone else handled it)."""
    rows = Generation.objects.active().filter(code=code, worker_id=from_worker)
    values: dict[str, Any] = {}
    if text is not None:
        values = {"text": text, "completion_tokens": tokens or 0}
    row = rows.first()
    if row is None:
        return None
    stopped = bool((row.details or {}).get("stop_requested"))
    reason = Generation.FinishReason.STOPPED if stopped else Generation.FinishReason.INTERRUPTED
    if not rows.finish(reason, **values):
        return None
    row.refresh_from_db()
    new = None if stopped else resume(row)
    if new is not None:
        _group_send(
            row.notify_group,
            {"type": "generation.resumed", "code": str(new.code), "resumed_from": code},
        )
    _group_send(row.notify_group, {"type": "generation.done", "code": code})
    return new


def take_over(worker_id: str) -> int:
    """Handle the active replies of a worker that is gone: queued ones are routed again,
    streaming ones handed over. Returns how many were handled."""
    rows = list(Generation.objects.active().filter(worker_id=worker_id).order_by("id"))
    for row in rows:
        if row.state == Generation.State.QUEUED:
            send_start(str(row.code), row.model_id, exclude={worker_id}, owner=worker_id)
        else:
            hand_over_reply(str(row.code), worker_id)
    return len(rows)


def reap_dead_workers(*, me: str = "") -> int:
    """Declare dead every worker whose heartbeat lapsed (not `me`) and take over its replies;
    also the active replies of workers with no row at all (a reaper that died half-way).
    Returns how many replies were handled. Called by every worker on each heartbeat, by a
    worker as it starts, and by web processes when a reply's owner looks gone."""
    cutoff = timezone.now() - timedelta(seconds=DEAD_AFTER_S)
    handled = 0
    workers = registry()
    lapsed = [b.worker_id for b in workers.beats() if b.updated_at < cutoff and b.worker_id != me]
    for worker_id in lapsed:
        if not workers.claim_lapsed(worker_id, cutoff):
            continue  # another process claimed it, or it came back
        logger.warning("inference worker %s missed its heartbeats: declared dead", worker_id)
        handled += take_over(worker_id)
    known = [b.worker_id for b in workers.beats()]
    orphans = (
        Generation.objects.active()
        .filter(created_at__lt=cutoff)
        .exclude(Q(worker_id="") | Q(worker_id=me) | Q(worker_id__in=known))
        .values_list("worker_id", flat=True)
        .distinct()
    )
    for worker_id in list(orphans):
        handled += take_over(worker_id)
    return handled
