"""The inference worker: a Channels background worker on the named channel `inference`.

It takes generation requests from the channel layer, hands them to the engine thread, and turns
the engine's events into database writes (the record) and group messages (the live view):

    chat consumer --generation.start--> InferenceWorker --submit--> Engine thread (MLX)
    chat consumer <--generation.delta/done-- event pump <--Started/Delta/Finished--

A consumer instance handles one message at a time, so messages only enqueue; the event pump is a
separate task on the same loop. Everything that touches MLX stays in the engine thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from channels.consumer import AsyncConsumer
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings

from inference import cluster, metrics
from inference.models import Generation
from inference.parsing import OutputFormat, OutputSplitter
from inference.registry import Beat, registry
from inference.schemas import GenerationParams

logger = logging.getLogger(__name__)

# How often the text of a streaming generation is written to its row. Reloads show the text as
# of the last flush, then the worker's snapshot fills the gap.
FLUSH_INTERVAL_S = 0.5
# How often the worker writes its heartbeat row (inference.services.worker_status and the
# routing in inference.cluster read it): MLXWEB_HEARTBEAT_S, 5 s unless set.
HEARTBEAT_S = cluster.HEARTBEAT_S

WORKER_ID = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
# This worker's own channel (inference.cluster.worker_channel): starts routed to it, and stop
# and sync for its replies, come there; it also listens on the shared `inference` channel.
WORKER_CHANNEL = cluster.worker_channel(WORKER_ID)

_engine_lock = threading.Lock()
_engine: Any = None
# Set by use_engine: the process serves with that engine only, never one of its own.
_engine_fixed = False


def use_engine(engine: Any) -> None:
    """Serve with `engine` (started) instead of an `Engine` of this process's own: a
    distributed group's rank 0 (inference.distributed) does, with its `GroupEngine`."""
    global _engine, _engine_fixed
    with _engine_lock:
        _engine, _engine_fixed = engine, True


def get_engine() -> Any:
    """The process-wide engine, started on first use."""
    global _engine
    with _engine_lock:
        if _engine_fixed:
            return _engine
        if _engine is None or not _engine.alive:
            from inference.catalogue import get_catalogue
            from inference.engine import Engine
            from inference.memory import configured_budget, configured_table_path

            server = settings.MLXWEB_CONFIG.server
            _engine = Engine(
                catalogue=get_catalogue(),
                converted_dir=settings.MLXWEB_CONVERTED_DIR,
                max_loaded_models=server.max_loaded_models,
                max_prompt_tokens=server.limits.max_prompt_tokens,
                max_new_tokens=server.limits.max_new_tokens,
                prompt_cache_entries=server.prompt_cache.max_entries,
                prompt_cache_bytes=server.prompt_cache.max_bytes,
                prefill_batch_size=server.batch.prefill_batch_size,
                completion_batch_size=server.batch.completion_batch_size,
                prefill_step_size=server.batch.prefill_step_size,
                cpu_float32_max_bytes=server.cpu_float32_max_bytes,
                keep_alive=server.keep_alive,
                kv_cache=_kv_cache_settings(server),
                memory_budget_bytes=configured_budget(),
                memory_table=configured_table_path(),
                max_batch_tokens=server.scheduler.max_batch_tokens,
                target_latency_ms=server.scheduler.target_latency_ms,
                enable_speculative=server.scheduler.enable_speculative,
            )
            _engine.start()
        return _engine


def _kv_cache_settings(server: Any) -> Any:
    """server.yaml's prompt_cache and kv_persistence, as the engine takes them."""
    from inference.kvcache import KVCacheSettings

    cache, persistence = server.prompt_cache, server.kv_persistence
    folder = None
    if persistence.enabled:
        folder = settings.PATHS.resolve(persistence.dir) if persistence.dir else None
        # MLXWEB_KV_DIR: the tests' own folder, so that runs never share cache files.
        folder = folder or getattr(settings, "MLXWEB_KV_DIR", None) or settings.VAR_DIR / "kvcache"
    return KVCacheSettings(
        max_entries=cache.max_entries,
        max_bytes=cache.max_bytes,
        kv_bits=cache.kv_bits,
        kv_group_size=cache.kv_group_size,
        max_kv_size=cache.max_kv_size,
        persist_dir=folder,
        persist_max_bytes=persistence.max_bytes,
    )


def stop_engine() -> None:
    """Stop the process-wide engine (shutdown, tests)."""
    global _engine
    with _engine_lock:
        if _engine is not None:
            _engine.stop()
            _engine = None


@functools.cache
def _idle_budget() -> int:
    """The memory budget a worker whose engine has not started reports."""
    from inference.memory import configured_budget

    return configured_budget()


def _serves(model_id: str) -> bool:
    """Whether this worker can serve `model_id`: any model, unless its engine is fixed to one
    (a distributed group's, which has a `model_id`)."""
    engine = _engine
    if not _engine_fixed or engine is None:
        return True
    return getattr(engine, "model_id", model_id) == model_id


def _now(ts: float | None = None) -> datetime:
    return datetime.fromtimestamp(time.time() if ts is None else ts, tz=UTC)


def _iso_or_none(ts: float | None) -> str | None:
    return None if ts is None else _now(ts).isoformat()


@dataclass
class _Stream:
    """What the worker holds in memory about one generation it is serving."""

    code: str
    group: str
    generation: Generation
    user: str  # whose turn it is when streams are handed out; "" for nobody in particular
    params: GenerationParams = field(default_factory=GenerationParams)
    text: str = ""  # raw, as the model wrote it
    sent: int = 0  # characters of visible text sent to the group so far
    splitter: OutputSplitter | None = None  # made when the engine says how the model writes
    tokens: int = 0
    flushed_at: float = 0.0
    first_token_at: float | None = None
    last_token_at: float | None = None
    submitted: bool = False
    finished: bool = False
    pending_writes: dict[str, Any] = field(default_factory=dict)
    # The token trace (issue 9's token-level fork), kept when the row asks for it
    # (details["trace"]); a continued reply starts with its source's entries.
    trace: list[dict[str, Any]] | None = None


# --- database side (sync, run in Django's thread pool) -------------------------------------


@database_sync_to_async
def _load_queued(code: str) -> tuple[Generation, list[dict[str, Any]]] | None:
    """The queued row and its prompt (one query for the row, one for the whole prompt), once
    this worker has claimed it: a row routed to another worker, or already started, is not
    taken (a start that reached two workers runs once)."""
    claimed = (
        Generation.objects.filter(code=code, state=Generation.State.QUEUED)
        .filter(worker_id__in=("", WORKER_ID))
        .update(worker_id=WORKER_ID)
    )
    if not claimed:
        return None
    generation = Generation.objects.filter(code=code, state=Generation.State.QUEUED).first()
    if generation is None:
        return None
    return generation, generation.prompt_messages()


@database_sync_to_async
def _write_heartbeat(
    loaded: list[dict[str, Any]],
    queued: int,
    streaming: int,
    memory: dict[str, Any],
    draining: bool = False,
) -> bool:
    """Register this worker's beat (inference.registry); True when it had to be made (first
    beat, or it was declared dead)."""
    return registry().beat(
        Beat(
            worker_id=WORKER_ID,
            updated_at=_now(),
            loaded=loaded,
            queued=queued,
            streaming=streaming,
            channel_name=WORKER_CHANNEL,
            budget_bytes=int(memory["budget_bytes"]),
            used_bytes=int(memory["used_bytes"]),
            draining=draining,
        )
    )


@database_sync_to_async
def _update(code: str, **fields: Any) -> None:
    Generation.objects.filter(code=code).update(**fields)


@database_sync_to_async
def _stop_unstarted(code: str) -> bool:
    queued = Generation.objects.filter(code=code, state=Generation.State.QUEUED)
    return bool(queued.finish(Generation.FinishReason.STOPPED))


class WorkerRuntime:
    """Per-event-loop state of the worker: the streams it serves and the event pump.

    At most `max_concurrent_streams` generations are in the engine at once, and at most
    `max_streaming_replies_per_user` of one user's. The rest wait in a queue per user; a free
    stream goes to the waiting user served longest ago, so one user's many replies take turns
    with everyone else's instead of holding them up.
    """

    _by_loop: dict[int, WorkerRuntime] = {}

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.events: asyncio.Queue[tuple[Any, float]] = asyncio.Queue()
        self.streams: dict[str, _Stream] = {}
        self.waiting: dict[str, deque[tuple[_Stream, Any]]] = {}  # by user
        self.served: dict[str, int] = {}  # user -> when they last got a stream (a counter)
        self.serves = 0
        self.channel_layer = get_channel_layer()
        # SIGTERM (inference.runner.drain): no new work; replies finish or are handed over.
        self.draining = False
        self.beats = 0
        self.pump_task = loop.create_task(self._pump())
        self.heartbeat_task = loop.create_task(self._heartbeat())
        # One lifetime: whoever stops the pump (shutdown, a test) stops the heartbeat too.
        self.pump_task.add_done_callback(lambda _: self.heartbeat_task.cancel())

    @property
    def max_streams(self) -> int:
        return int(settings.MLXWEB_CONFIG.server.limits.max_concurrent_streams)

    @property
    def max_streams_per_user(self) -> int:
        return int(settings.MLXWEB_CONFIG.server.limits.max_streaming_replies_per_user)

    @classmethod
    def current(cls) -> WorkerRuntime:
        loop = asyncio.get_running_loop()
        runtime = cls._by_loop.get(id(loop))
        if runtime is None or runtime.loop is not loop or runtime.pump_task.done():
            runtime = cls(loop)
            cls._by_loop[id(loop)] = runtime
        return runtime

    # --- requests from the channel ---------------------------------------------------------

    async def start(self, code: str) -> None:
        if code in self.streams:
            return
        loaded = await _load_queued(code)
        if loaded is None:
            logger.info("generation %s is not queued any more; skipped", code)
            return
        generation, messages = loaded
        if self.draining or not _serves(generation.model_id):
            # Not for this worker (draining, or a group serving another model): pass it on.
            target = await database_sync_to_async(cluster.pass_on)(
                code, generation.model_id, me=WORKER_ID
            )
            if target:
                logger.info("generation %s passed on to %s", code, target)
                return
        from inference.engine import GenerationRequest

        params = GenerationParams.model_validate(generation.params)
        prompt_text = None
        if len(messages) == 1 and messages[0]["role"] == "raw":
            prompt_text, messages = messages[0]["content"], []
        # A continued reply (inference.services.generation_continue): its row starts with the
        # text to continue from, and its trace with that text's tokens when they are known;
        # the engine writes what follows.
        details = generation.details or {}
        prefix = generation.text[: int(details.get("prefix_chars") or 0)]
        prefix_tokens = tuple(
            int(entry["id"])
            for entry in (generation.token_trace or [])[: int(details.get("prefix_tokens") or 0)]
        )
        request = GenerationRequest(
            id=code,
            model_id=generation.model_id,
            messages=messages,
            params=params,
            prompt_text=prompt_text,
            assistant_prefix=prefix,
            assistant_prefix_tokens=prefix_tokens,
            priority="batch" if details.get("priority") == "batch" else "interactive",
        )
        user = str(generation.user_id or "")
        stream = _Stream(
            code=code,
            group=generation.notify_group,
            generation=generation,
            user=user,
            params=params,
            text=prefix,
        )
        if (generation.details or {}).get("trace") and params.logprobs:
            stream.trace = list(generation.token_trace or [])
        self.streams[code] = stream
        await _update(code, worker_id=WORKER_ID)
        self.waiting.setdefault(user, deque()).append((stream, request))
        await self._submit_waiting()
        if not stream.submitted:
            logger.info("generation %s waits for a free stream", code)

    def _active_count(self, user: str | None = None) -> int:
        return sum(
            1
            for s in self.streams.values()
            if s.submitted and not s.finished and (user is None or s.user == user)
        )

    def _next_waiting(self) -> tuple[_Stream, Any] | None:
        """The head of the queue of the waiting user served longest ago who may stream now."""
        if self._active_count() >= self.max_streams:
            return None
        per_user = self.max_streams_per_user
        ready = [u for u in self.waiting if self._active_count(u) < per_user]
        if not ready:
            return None

        # Interactive replies first (a person waits; titles and validation can), then the
        # user served longest ago.
        def background(u: str) -> bool:
            return all(request.priority == "batch" for _, request in self.waiting[u])

        user = min(ready, key=lambda u: (background(u), self.served.get(u, -1)))
        queue = self.waiting[user]
        item = next((i for i in queue if i[1].priority != "batch"), queue[0])
        queue.remove(item)
        if not queue:
            del self.waiting[user]
        self.serves += 1
        self.served[user] = self.serves
        return item

    async def _submit_waiting(self) -> None:
        while (item := self._next_waiting()) is not None:
            await self._submit(*item)
        self._update_gauges()

    def _queued_count(self) -> int:
        return sum(len(queue) for queue in self.waiting.values())

    def _update_gauges(self) -> None:
        metrics.QUEUE_DEPTH.set(self._queued_count())
        metrics.ACTIVE_STREAMS.set(self._active_count())

    async def _heartbeat(self) -> None:
        """Write this worker's status row every HEARTBEAT_S (worker_status() and the routing
        read it), then look for workers whose heartbeat lapsed and take over their replies."""
        while True:
            try:
                await self.write_heartbeat()
            except Exception:
                logger.exception("could not write the worker's heartbeat")
            if not self.draining:
                try:
                    await database_sync_to_async(cluster.reap_dead_workers)(me=WORKER_ID)
                except Exception:
                    logger.exception("could not look for dead workers")
            await asyncio.sleep(HEARTBEAT_S)

    async def write_heartbeat(self) -> None:
        engine = _engine  # never start the engine just to say it has nothing loaded
        loaded = []
        memory = {"budget_bytes": _idle_budget(), "used_bytes": 0}
        if engine is not None and engine.alive:
            # The memory budget (inference.memory): the row's budget_bytes/used_bytes, and
            # each model's KV cache bytes beside its weights.
            memory = engine.memory_status()
            kv = {m["model_id"]: m["kv_bytes"] for m in memory["models"]}
            for info in engine.loaded_models():
                loaded.append(
                    {
                        "model_id": info["model_id"],
                        "bytes": info["bytes"],
                        "kv_bytes": int(kv.get(info["model_id"], 0)),
                        "base_model": info.get("base_model"),
                        "loaded_at": _now(info["loaded_at"]).isoformat(),
                        "expires_at": _iso_or_none(info.get("expires_at")),
                        # A group serves only its model: routing sends it no other.
                        **({"exclusive": True} if _engine_fixed else {}),
                    }
                )
        self._update_gauges()
        made = await _write_heartbeat(
            loaded, self._queued_count(), self._active_count(), memory, self.draining
        )
        self.beats += 1
        if made and self.beats > 1:
            self._declared_dead()

    def _declared_dead(self) -> None:
        """This worker's row was gone: another process declared it dead (it missed its beats,
        stalled) and handed its replies over. Drop them here, unwritten, so that the rows the
        others took over are not written twice."""
        logger.warning("this worker was declared dead while alive; dropping its replies")
        engine = _engine
        for code, stream in list(self.streams.items()):
            if stream.submitted and not stream.finished and engine is not None:
                engine.cancel(code)
        self.streams.clear()
        self.waiting.clear()
        self._update_gauges()

    async def hand_over(self) -> int:
        """Draining with another worker alive: every reply here ends interrupted with its text
        and goes on there (inference.cluster.hand_over_reply); the queued ones are routed
        again. Returns how many were handed over."""
        engine = _engine
        handed = 0
        for code, stream in list(self.streams.items()):
            if stream.finished:
                continue
            self.streams.pop(code, None)  # the pump ignores its last events
            if stream.submitted:
                if engine is not None:
                    engine.cancel(code)
                await database_sync_to_async(cluster.hand_over_reply)(
                    code, WORKER_ID, text=stream.text, tokens=stream.tokens
                )
            else:
                queue = self.waiting.get(stream.user, deque())
                for item in list(queue):
                    if item[0] is stream:
                        queue.remove(item)
                if not queue:
                    self.waiting.pop(stream.user, None)
                await database_sync_to_async(cluster.pass_on)(
                    code, stream.generation.model_id, me=WORKER_ID
                )
            handed += 1
        self._update_gauges()
        return handed

    async def drain(self, timeout: float) -> None:
        """SIGTERM: take no new work (the row says draining at once), hand every reply to
        another live worker, or with none let them finish for up to `timeout` seconds."""
        self.draining = True
        await self.write_heartbeat()
        others = await database_sync_to_async(cluster.live_workers)(exclude={WORKER_ID})
        if others and self.streams:
            handed = await self.hand_over()
            logger.info("draining: %d repl(ies) handed over", handed)
        deadline = self.loop.time() + timeout
        while any(not s.finished for s in self.streams.values()) and self.loop.time() < deadline:
            await asyncio.sleep(0.1)

    async def _submit(self, stream: _Stream, request: Any) -> None:
        loop = self.loop
        events = self.events

        def emit(event: Any) -> None:
            # Called on the engine thread: stamp the time there, hand over to this loop.
            # After shutdown the loop is closed; runner.shutdown() records what streamed.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(events.put_nowait, (event, time.time()))

        stream.submitted = True
        try:
            engine = await asyncio.to_thread(get_engine)
            engine.submit(request, emit)
        except Exception as e:  # the engine could not even be started
            logger.exception("could not submit generation %s", stream.code)
            from inference.engine import Finished

            emit(
                Finished(
                    request_id=stream.code,
                    finish_reason="error",
                    prompt_tokens=0,
                    completion_tokens=0,
                    error=f"engine unavailable: {e}",
                )
            )

    async def stop(self, code: str) -> None:
        stream = self.streams.get(code)
        if stream is not None and stream.submitted:
            get_engine().cancel(code)
            return
        if stream is not None:  # waiting for a free slot: never reached the engine
            queue = self.waiting.get(stream.user, deque())
            for item in queue:
                if item[0] is stream:
                    queue.remove(item)
                    break
            if not queue:
                self.waiting.pop(stream.user, None)
            self.streams.pop(code, None)
        if await _stop_unstarted(code):
            await self._notify_done(stream.group if stream else await self._group_of(code), code)

    async def sync(self, code: str, reply_channel: str) -> None:
        stream = self.streams.get(code)
        if stream is not None and not stream.finished:
            await self.channel_layer.send(
                reply_channel,
                {"type": "generation.snapshot", "code": code, "text": stream.text},
            )
        elif stream is None:
            # Finished before the asker joined its group: let it re-render from the row.
            await self.channel_layer.send(reply_channel, {"type": "generation.done", "code": code})

    @staticmethod
    @database_sync_to_async
    def _group_of(code: str) -> str:
        row = Generation.objects.filter(code=code).values_list("notify_group", flat=True).first()
        return row or ""

    # --- events from the engine ------------------------------------------------------------

    async def _pump(self) -> None:
        from inference.engine import Delta, Finished, Started

        while True:
            batch = [await self.events.get()]
            while not self.events.empty():
                batch.append(self.events.get_nowait())
            deltas: dict[str, list[Any]] = {}
            try:
                for event, ts in batch:
                    stream = self.streams.get(event.request_id)
                    if stream is None:
                        continue
                    if isinstance(event, Started):
                        stream.splitter = self._splitter(stream, event.output)
                        if stream.text:
                            # A continued reply: the splitter reads the prefix first (it may
                            # end inside reasoning); the group already has it from the row.
                            pieces = stream.splitter.feed(stream.text)
                            stream.sent = sum(len(piece) for _, piece in pieces)
                        if event.provenance:
                            stream.pending_writes["provenance"] = {
                                **(stream.generation.provenance or {}),
                                **event.provenance,
                            }
                        metrics.generation_started(
                            stream.generation.model_id,
                            prompt_tokens=event.prompt_tokens,
                            cached_tokens=event.cached_tokens,
                        )
                        await database_sync_to_async(stream.generation.mark_streaming)(
                            started_at=_now(ts),
                            prompt_tokens=event.prompt_tokens,
                            cached_tokens=event.cached_tokens,
                            trimmed_messages=event.trimmed_messages,
                        )
                    elif isinstance(event, Delta):
                        deltas.setdefault(stream.code, []).append(event)
                        if stream.last_token_at is not None:
                            metrics.tokens_streamed(
                                stream.generation.model_id,
                                tokens=event.tokens - stream.tokens,
                                seconds=ts - stream.last_token_at,
                            )
                        stream.last_token_at = ts
                        stream.tokens = event.tokens
                        if stream.first_token_at is None:
                            stream.first_token_at = ts
                            stream.pending_writes["first_token_at"] = _now(ts)
                    elif isinstance(event, Finished):
                        await self._send_deltas(deltas.pop(stream.code, None), stream)
                        await self._finish(stream, event, ts)
                for code, parts in deltas.items():
                    stream = self.streams.get(code)
                    if stream is not None:
                        await self._send_deltas(parts, stream)
                        if time.monotonic() - stream.flushed_at >= FLUSH_INTERVAL_S:
                            await self._flush(stream)
            except Exception:
                # The pump must outlive a database hiccup: the next event flushes again.
                logger.exception("inference event pump failed on a batch; continuing")

    @staticmethod
    def _splitter(stream: _Stream, output: OutputFormat) -> OutputSplitter:
        params = stream.params
        tools = [t.as_template_tool() for t in params.tools] if params.uses_tools else None
        return OutputSplitter(output, tools_enabled=params.uses_tools, tools=tools)

    async def _send_deltas(self, parts: list[Any] | None, stream: _Stream) -> None:
        """Send the deltas' text to the group, split into channels (reasoning / content),
        tool-call markup held back; logprobs ride on the first message."""
        if not parts:
            return
        text = "".join(part.text for part in parts)
        stream.text += text
        logprobs = [entry for part in parts for entry in (part.logprobs or [])]
        if stream.trace is not None and logprobs:
            from inference.provenance import trace_entry

            stream.trace.extend(trace_entry(entry) for entry in logprobs)
        if stream.splitter is None:  # no Started seen (cannot happen; be safe)
            stream.splitter = self._splitter(stream, OutputFormat())
        await self._send_pieces(stream, stream.splitter.feed(text), logprobs)

    async def _send_pieces(
        self, stream: _Stream, pieces: list[tuple[str, str]], logprobs: list[dict[str, Any]]
    ) -> None:
        if not stream.group:
            return
        if not pieces and logprobs:
            pieces = [("content", "")]
        for channel, piece in pieces:
            message: dict[str, Any] = {
                "type": "generation.delta",
                "code": stream.code,
                "text": piece,
                "offset": stream.sent,
                "channel": channel,
            }
            if stream.params.logprobs:
                message["logprobs"], logprobs = logprobs, []
            stream.sent += len(piece)
            await self.channel_layer.group_send(stream.group, message)

    async def _flush(self, stream: _Stream) -> None:
        fields = {"text": stream.text, "completion_tokens": stream.tokens, **stream.pending_writes}
        stream.pending_writes.clear()
        stream.flushed_at = time.monotonic()
        await _update(stream.code, **fields)

    async def _finish(self, stream: _Stream, event: Any, ts: float) -> None:
        stream.finished = True
        reason = event.finish_reason
        stream.tokens = event.completion_tokens
        splitter = stream.splitter or self._splitter(stream, OutputFormat())
        await self._send_pieces(stream, splitter.flush(), [])
        parsed = splitter.result()
        if parsed.tool_calls and reason in ("eos", "stop_string"):
            reason = Generation.FinishReason.TOOL_CALLS
        fields = {
            **stream.pending_writes,
            "text": stream.text,
            "content": parsed.content,
            "reasoning": parsed.reasoning,
            "tool_calls": parsed.tool_calls,
            "error": event.error,
            "finished_at": _now(ts),
            "completion_tokens": event.completion_tokens,
        }
        if event.prompt_tokens:
            fields["prompt_tokens"] = event.prompt_tokens
        if stream.trace is not None:
            fields["token_trace"] = stream.trace
        if getattr(event, "prompt_cache", ""):
            # Where its KV prefix came from: memory, disk, warm (restored on open) or none.
            details = fields.get("details", stream.generation.details) or {}
            fields["details"] = {**details, "prompt_cache": event.prompt_cache}
        if getattr(event, "details", None):
            # How the engine computed it: decode path, prefill chunks, speculative decoding's
            # acceptance and speed-up (inference.engine.Finished.details).
            details = fields.get("details", stream.generation.details) or {}
            fields["details"] = {**details, **event.details}
        stream.pending_writes.clear()
        await database_sync_to_async(stream.generation.finish)(reason, **fields)
        created = stream.generation.created_at.timestamp()
        metrics.generation_finished(
            stream.generation.model_id,
            finish_reason=str(reason),
            completion_tokens=event.completion_tokens,
            ttft=stream.first_token_at - created if stream.first_token_at is not None else None,
        )
        self.streams.pop(stream.code, None)
        logger.info("generation %s ended: %s (%d tokens)", stream.code, reason, stream.tokens)
        await self._notify_done(stream.group, stream.code)
        await self._submit_waiting()

    async def _notify_done(self, group: str, code: str) -> None:
        if group:
            await self.channel_layer.group_send(group, {"type": "generation.done", "code": code})

    def interrupt_all(self) -> None:
        """Shutdown: keep every unfinished stream's text and mark it interrupted (sync)."""
        for stream in list(self.streams.values()):
            if stream.finished:
                continue
            Generation.objects.filter(code=stream.code).active().interrupt(
                text=stream.text, completion_tokens=stream.tokens
            )
        self.streams.clear()
        self.waiting.clear()


# --- embeddings ------------------------------------------------------------------------------

# Running embedding requests: the loop keeps only weak references to its tasks.
_embedding_tasks: set[asyncio.Task[None]] = set()


def _embedding_refusal(message: dict[str, Any]) -> tuple[str, str]:
    """(kind, why) for a malformed ("invalid") or too large ("too_large") request, ("", "") if
    it is fine: anything may put messages on the channel, not only
    `inference.services.aembed`, which checks the same."""
    from inference.services import MAX_EMBEDDING_INPUTS, MAX_EMBEDDING_TEXT_CHARS

    texts = message.get("texts")
    if not isinstance(message.get("model_id"), str):
        return "invalid", "model_id must be a string"
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        return "invalid", "texts must be a list of strings"
    if len(texts) > MAX_EMBEDDING_INPUTS:
        return "too_large", f"{len(texts)} inputs: at most {MAX_EMBEDDING_INPUTS} per request"
    if any(len(t) > MAX_EMBEDDING_TEXT_CHARS for t in texts):
        return "too_large", f"an input is over {MAX_EMBEDDING_TEXT_CHARS} characters"
    return "", ""


def _settle(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


async def _serve_embedding(message: dict[str, Any], reply_channel: str) -> None:
    """Compute one embedding request on the engine thread and send the answer back."""
    from inference import metrics
    from inference.engine import EmbeddingResult

    layer = get_channel_layer()
    kind, refusal = _embedding_refusal(message)
    if kind:
        await layer.send(reply_channel, {"type": "embedding.error", "error": refusal, "kind": kind})
        return
    model_id, texts = message["model_id"], message["texts"]
    loop = asyncio.get_running_loop()
    result: asyncio.Future[EmbeddingResult] = loop.create_future()

    def reply(answer: EmbeddingResult) -> None:
        # Called on the engine thread; after shutdown the loop is closed and nobody waits.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_settle, result, answer)

    try:
        engine = await asyncio.to_thread(get_engine)
        engine.embed(model_id, texts, reply)
        answer = await result
    except Exception as e:  # the engine could not even be started
        logger.exception("embedding request for %s failed", model_id)
        answer = EmbeddingResult([], 0, error=f"engine unavailable: {e}", kind="error")
    if answer.kind:
        await layer.send(
            reply_channel, {"type": "embedding.error", "error": answer.error, "kind": answer.kind}
        )
        return
    metrics.embedding_served(model_id)
    await layer.send(
        reply_channel,
        {
            "type": "embedding.result",
            "vectors": answer.vectors,
            "prompt_tokens": answer.prompt_tokens,
        },
    )


# --- keep-alive ------------------------------------------------------------------------------

_keep_alive_tasks: set[asyncio.Task[None]] = set()


def _keep_alive_refusal(message: dict[str, Any]) -> str:
    """Why a "model.unload_after" message is malformed, "" if it is fine (anything may put
    messages on the channel, not only `inference.services.model_unload_after`)."""
    seconds = message.get("seconds")
    if not isinstance(message.get("model_id"), str):
        return "model_id must be a string"
    if seconds is not None and (
        isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds != seconds
    ):
        return "seconds must be a number or null"
    return ""


async def _serve_unload_after(message: dict[str, Any]) -> None:
    """Apply a model's keep-alive on the engine thread, write the heartbeat at once (so
    /api/ps and /health show the change) and answer the reply channel, if any."""
    from inference.catalogue import UnknownModel

    layer = get_channel_layer()
    reply_channel = message.get("reply_channel")
    answer: dict[str, Any]
    refusal = _keep_alive_refusal(message)
    if refusal:
        answer = {"type": "model.error", "error": refusal, "kind": "invalid"}
    else:
        model_id, seconds = message["model_id"], message["seconds"]
        try:
            engine = _engine
            if seconds == 0 and (engine is None or not engine.alive):
                expires_at = None  # nothing loaded: nothing to unload, nothing to start
            else:
                engine = await asyncio.to_thread(get_engine)
                expires_at = await asyncio.to_thread(engine.unload_after, model_id, seconds)
            answer = {"type": "model.keep_alive", "expires_at": _iso_or_none(expires_at)}
        except UnknownModel as e:
            answer = {"type": "model.error", "error": str(e), "kind": "unknown_model"}
        except Exception as e:
            logger.warning("keep-alive for %s failed: %s", model_id, e)
            answer = {"type": "model.error", "error": str(e) or type(e).__name__, "kind": "error"}
        try:
            await WorkerRuntime.current().write_heartbeat()
        except Exception:
            logger.exception("could not write the worker's heartbeat")
    if isinstance(reply_channel, str) and reply_channel:
        await layer.send(reply_channel, answer)


# --- cache probes (the chat composer) --------------------------------------------------------

_probe_tasks: set[asyncio.Task[None]] = set()
# The composer waits for less than this; a late answer goes to a channel nobody reads.
PROBE_TIMEOUT_S = 2.0


def _probe_request(message: dict[str, Any]) -> Any:
    """The request a "cache.probe" message describes, or a str saying why it is malformed
    (anything may put messages on the channel, not only `inference.services.prompt_probe`)."""
    from pydantic import ValidationError

    from inference.engine import GenerationRequest
    from inference.schemas import ChatMessage

    model_id, messages, params = (
        message.get("model_id"),
        message.get("messages"),
        message.get("params") or {},
    )
    if not isinstance(model_id, str):
        return "model_id must be a string"
    if not isinstance(messages, list) or not messages:
        return "messages must be a non-empty list"
    if not isinstance(params, dict):
        return "params must be an object"
    try:
        checked = [ChatMessage.model_validate(m) for m in messages]
        sampling = GenerationParams.model_validate(params)
    except ValidationError as e:
        return f"invalid probe: {e.errors()[0]['msg']}"
    return GenerationRequest(
        id=f"probe-{uuid.uuid4().hex}",
        model_id=model_id,
        messages=[{"role": m.role, "content": m.content, **m.extra()} for m in checked],
        params=sampling,
    )


async def _serve_probe(message: dict[str, Any]) -> None:
    """What a prompt would cost now (tokens, the prefix the KV caches hold, turns trimmed),
    answered by the engine thread for a loaded model; nothing is loaded for a probe."""
    reply_channel = message.get("reply_channel")
    if not isinstance(reply_channel, str) or not reply_channel:
        return
    request = _probe_request(message)
    answer: dict[str, Any]
    engine = _engine
    if isinstance(request, str):
        answer = {"error": request}
    elif engine is None or not engine.alive or not hasattr(engine, "probe"):
        answer = {"loaded": False}
    else:
        loop = asyncio.get_running_loop()
        result: asyncio.Future[dict[str, Any]] = loop.create_future()

        def reply(found: dict[str, Any]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits
                loop.call_soon_threadsafe(_settle, result, found)

        engine.probe(request, reply)
        try:
            answer = await asyncio.wait_for(result, PROBE_TIMEOUT_S)
        except TimeoutError:
            answer = {"error": "the engine did not answer in time"}
    await get_channel_layer().send(reply_channel, {"type": "cache.probe_result", **answer})


@database_sync_to_async
def _warm_request(code: str) -> tuple[str, list[dict[str, Any]]] | None:
    """The model and messages of a finished reply's conversation so far, its reply included
    (as the next turn's prompt will show it: inference.services._prompt_for)."""
    generation = Generation.objects.filter(code=code).first()
    if generation is None or generation.is_active or generation.prompt_id is None:
        return None
    messages = generation.prompt_messages()
    if not messages or messages[0].get("role") == "raw":
        return None
    said = generation.content if generation.content or generation.tool_calls else generation.text
    reply: dict[str, Any] = {"role": "assistant", "content": said}
    if generation.tool_calls:
        reply["tool_calls"] = generation.tool_calls
    return generation.model_id, [*messages, reply]


async def _serve_warm(message: dict[str, Any]) -> None:
    try:
        code = str(uuid.UUID(str(message.get("code"))))
    except ValueError:
        logger.warning("generation.warm: not a generation code: %r", message.get("code"))
        return
    try:
        request = await _warm_request(code)
        if request is None:
            return
        engine = await asyncio.to_thread(get_engine)
        engine.warm(*request)  # queued for the engine thread; returns at once
    except Exception:
        logger.exception("could not warm generation %s", code)


_warm_tasks: set[asyncio.Task[None]] = set()


class InferenceWorker(AsyncConsumer):
    """Handles `generation.start`, `generation.stop`, `generation.sync`, `generation.warm`,
    `embedding.request`, `model.unload_after` and `cache.probe` on the channel."""

    async def generation_start(self, message: dict[str, Any]) -> None:
        await WorkerRuntime.current().start(str(message["code"]))

    async def generation_warm(self, message: dict[str, Any]) -> None:
        # A task of its own: starting the engine and reading the row must not hold up the
        # generation messages behind this one.
        task = asyncio.get_running_loop().create_task(_serve_warm(message))
        _warm_tasks.add(task)
        task.add_done_callback(_warm_tasks.discard)

    async def generation_stop(self, message: dict[str, Any]) -> None:
        await WorkerRuntime.current().stop(str(message["code"]))

    async def generation_sync(self, message: dict[str, Any]) -> None:
        await WorkerRuntime.current().sync(str(message["code"]), str(message["reply_channel"]))

    async def embedding_request(self, message: dict[str, Any]) -> None:
        # A task of its own: a consumer handles one message at a time, and generation
        # messages must not wait while vectors are computed.
        task = asyncio.get_running_loop().create_task(
            _serve_embedding(message, str(message["reply_channel"]))
        )
        _embedding_tasks.add(task)
        task.add_done_callback(_embedding_tasks.discard)

    async def cache_probe(self, message: dict[str, Any]) -> None:
        # A task of its own: the answer waits for the engine thread's next pause.
        task = asyncio.get_running_loop().create_task(_serve_probe(message))
        _probe_tasks.add(task)
        task.add_done_callback(_probe_tasks.discard)

    async def model_unload_after(self, message: dict[str, Any]) -> None:
        # A task of its own: loading a model takes seconds, and generation messages behind
        # this one must not wait for it.
        task = asyncio.get_running_loop().create_task(_serve_unload_after(message))
        _keep_alive_tasks.add(task)
        task.add_done_callback(_keep_alive_tasks.discard)
