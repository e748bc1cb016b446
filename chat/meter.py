"""The context meter and the cache-aware composer (issue 9).

Numbers come from measurements, never from guesses dressed up as them:

- the conversation's size is the last reply's `prompt_tokens + completion_tokens` (the engine
  counted them), against the model's context from its config or catalogue entry;
- what the prompt cache holds: the engine keeps each finished reply's KV cache (its prompt and
  what it wrote) under its tokens, so the next turn of the same model starts with that prefix
  cached, provided the prompt starts the same way (same model, same system prompt, nothing
  trimmed from its start). Another conversation may have pushed it out of the cache since, so
  the page says "up to";
- when the worker has the model loaded, it counts the next prompt exactly
  (`inference.services.prompt_probe`: the engine templates and tokenizes it and asks its KV
  caches how much of it they hold, touching nothing); otherwise the new text's tokens are
  estimated at 4 characters a token and the page says so;
- the wait before the first token is the tokens still to compute over this machine's prefill
  speed for the model, measured on its past replies: (prompt_tokens - cached_tokens) over
  (first_token_at - started_at).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.utils import timezone
from pydantic import ValidationError

from chat import presets as chat_presets
from chat import services
from chat.models import Conversation, Message
from inference import services as inference
from inference.catalogue import UnknownModel
from inference.models import Generation
from inference.schemas import ChatMessage, GenerationParams

# Characters per token when nothing can count them: the usual figure for English text with
# BPE vocabularies; shown as an estimate.
CHARS_PER_TOKEN = 4
# The role markers a chat template adds around one user turn (SmolLM2, Llama 3, Qwen: 4 to 8).
TURN_OVERHEAD_TOKENS = 8
# Past replies that measure the prefill speed: the newest ones, and only prompts long enough
# for the time to mean something.
SPEED_SAMPLE = 50
MIN_MEASURED_TOKENS = 32
SPEED_MAX_AGE = timedelta(days=30)


@dataclass(frozen=True)
class PrefillSpeed:
    """Tokens per second of prompt processing, and how many replies measured it."""

    tokens_per_second: float
    replies: int


def prefill_speed(model_id: str) -> PrefillSpeed | None:
    """This machine's measured prefill speed for `model_id`, or None before any reply long
    enough to measure it."""
    rows = (
        Generation.objects.filter(
            model_id=model_id,
            started_at__isnull=False,
            first_token_at__isnull=False,
            created_at__gte=timezone.now() - SPEED_MAX_AGE,
        )
        .order_by("-id")
        .values_list("prompt_tokens", "cached_tokens", "started_at", "first_token_at")[
            : SPEED_SAMPLE * 4
        ]
    )
    tokens = 0
    seconds = 0.0
    replies = 0
    for prompt_tokens, cached_tokens, started_at, first_token_at in rows:
        if started_at is None or first_token_at is None:
            continue
        computed = prompt_tokens - cached_tokens
        elapsed = (first_token_at - started_at).total_seconds()
        if computed < MIN_MEASURED_TOKENS or elapsed <= 0:
            continue
        tokens += computed
        seconds += elapsed
        replies += 1
        if replies >= SPEED_SAMPLE:
            break
    if replies == 0 or seconds <= 0:
        return None
    return PrefillSpeed(tokens / seconds, replies)


@dataclass(frozen=True)
class Meter:
    """What the composer shows about the next prompt."""

    model_id: str
    model_name: str
    context: int
    used: int | None  # the conversation's tokens, measured by the last reply
    trimmed_last: int  # messages the last reply left out
    writing: bool  # a reply is being written: its counts are not final
    new_tokens: int  # the typed text's tokens
    new_tokens_counted: bool  # counted by the tokenizer, else estimated
    next_prompt: int
    cached: int
    no_cache_reason: str
    prompt_limit: int
    trims_next: bool
    speed: PrefillSpeed | None
    loaded: bool | None  # whether the worker has the model loaded (None: no worker seen)
    # Counted by the worker's engine (inference.services.prompt_probe): exact, not estimated.
    probed: bool = False
    cache_source: str = ""  # "memory" or "disk" when probed
    trimmed_next: int = 0  # messages the next turn leaves out, when probed

    @property
    def percent(self) -> int:
        return min(100, round(100 * (self.used or 0) / self.context)) if self.context else 0

    @property
    def to_compute(self) -> int:
        return max(0, self.next_prompt - self.cached)

    @property
    def wait_seconds(self) -> float | None:
        if self.speed is None:
            return None
        return self.to_compute / self.speed.tokens_per_second

    @property
    def recompute_seconds(self) -> float | None:
        """The wait if nothing were cached (another model or system prompt)."""
        if self.speed is None:
            return None
        return self.next_prompt / self.speed.tokens_per_second


def _last_reply(conversation: Conversation) -> Message | None:
    if conversation.leaf_id is None:
        return None
    leaf = Message.objects.select_related("generation").filter(pk=conversation.leaf_id).first()
    if leaf is None or leaf.role != Message.Role.ASSISTANT:
        return None
    return leaf


def _loaded(model_id: str) -> bool | None:
    status = inference.worker_status()
    if not status.alive:
        return None
    return any(m.model_id == model_id for m in status.loaded)


@dataclass(frozen=True)
class ProbeQuestion:
    """What to ask the worker about the next prompt (inference.services.aprompt_probe)."""

    model_id: str
    messages: list[ChatMessage]
    params: GenerationParams


def conversation_meter(conversation: Conversation, *, text: str, model_id: str = "") -> Meter:
    """The meter for the next turn of `conversation` from the database alone (no worker):
    `text` typed so far and `model_id` picked in the composer (the conversation's model when
    blank or unknown)."""
    return _estimate(conversation, text=text, model_id=model_id)[0]


async def aconversation_meter(
    conversation: Conversation, *, text: str, model_id: str = ""
) -> Meter:
    """`conversation_meter`, with the worker's exact counts when it has the model loaded.

    Async because the worker may run in this process: a sync view waiting for it would hold
    the thread that the worker's consumer needs for its database hop, and time out."""
    reading, question = await sync_to_async(_estimate)(conversation, text=text, model_id=model_id)
    if question is None:
        return reading
    answer = await inference.aprompt_probe(
        model_id=question.model_id, messages=question.messages, params=question.params
    )
    return with_probe_answer(reading, answer)


def _estimate(
    conversation: Conversation, *, text: str, model_id: str
) -> tuple[Meter, ProbeQuestion | None]:
    try:
        spec = inference.model_get(model_id=model_id or conversation.model_id)
    except UnknownModel:
        spec = inference.model_get(model_id=conversation.model_id)
    reply = _last_reply(conversation)
    generation = reply.generation if reply is not None else None
    writing = generation is not None and generation.is_active
    used = None
    trimmed_last = 0
    if generation is not None and generation.prompt_tokens:
        used = generation.prompt_tokens + generation.completion_tokens
        trimmed_last = generation.trimmed_messages

    new_tokens = math.ceil(len(text.strip()) / CHARS_PER_TOKEN) if text.strip() else 0
    next_prompt = (used or 0) + new_tokens + (TURN_OVERHEAD_TOKENS if text.strip() else 0)

    sticky = chat_presets.generation_settings(conversation)
    reason = ""
    if generation is None or used is None:
        reason = "no reply yet in this conversation"
    elif writing:
        reason = "a reply is being written"
    elif generation.model_id != spec.id:
        reason = f"the last reply came from {generation.model_id}: switching model recomputes"
    elif generation.state == Generation.State.ERROR:
        reason = "the last reply failed"
    elif trimmed_last:
        reason = "the last prompt was trimmed to fit, so the next one starts differently"
    elif (
        chat_presets.system_turns(conversation, sticky, model_id=spec.id, previous=generation)
        is not None
    ):
        reason = "the system prompt changed since the last reply"
    cached = 0 if reason else min(used or 0, max(0, next_prompt - 1))

    params = inference.generation_params(model_id=spec.id, overrides=sticky.sampling)
    context = spec.context_length
    wanted = params.max_tokens
    limit = min(
        settings.MLXWEB_CONFIG.server.limits.max_prompt_tokens,
        max(context - wanted, context // 4),
    )
    loaded = _loaded(spec.id)
    reading = Meter(
        model_id=spec.id,
        model_name=spec.name,
        context=context,
        used=used,
        trimmed_last=trimmed_last,
        writing=writing,
        new_tokens=new_tokens,
        new_tokens_counted=False,
        next_prompt=next_prompt,
        cached=cached,
        no_cache_reason=reason,
        prompt_limit=limit,
        trims_next=next_prompt > limit,
        speed=prefill_speed(spec.id),
        loaded=loaded,
    )
    question = None
    # The heartbeat may be seconds old (a model loaded since): ask any live worker, whose
    # engine answers at once, loaded or not.
    if loaded is not None and not writing:
        question = _probe_question(conversation, sticky, generation, spec.id, text, params)
    return reading, question


def _next_prompt(
    conversation: Conversation,
    sticky: chat_presets.GenerationSettings,
    generation: Generation | None,
    *,
    model_id: str,
    text: str,
) -> list[ChatMessage]:
    """The messages the next turn would send, as chat.services builds them: the last reply's
    prompt and text plus the new turn, or the whole path after a new system prompt."""
    turn = ChatMessage(role="user", content=text.strip())
    system = chat_presets.system_turns(conversation, sticky, model_id=model_id, previous=generation)
    if system is None and generation is not None:
        prior = [ChatMessage.model_validate(m) for m in generation.prompt_messages()]
        said = generation.text
        if generation.content or generation.tool_calls:
            said = generation.content
        if said or generation.tool_calls:
            prior.append(
                ChatMessage.model_validate(
                    {"role": "assistant", "content": said, "tool_calls": generation.tool_calls}
                )
            )
        return [*prior, turn]
    turns: list[ChatMessage] = list(system or [])
    for message in services.conversation_path(conversation):
        if message.role == Message.Role.USER:
            turns.append(ChatMessage(role="user", content=message.content))
        elif message.generation is not None and message.generation.text:
            turns.append(ChatMessage(role="assistant", content=message.generation.text))
    return [*turns, turn]


def _probe_question(
    conversation: Conversation,
    sticky: chat_presets.GenerationSettings,
    generation: Generation | None,
    model_id: str,
    text: str,
    params: GenerationParams,
) -> ProbeQuestion | None:
    try:
        messages = _next_prompt(conversation, sticky, generation, model_id=model_id, text=text)
        tools = services._tool_overrides(conversation)
        if tools:
            params = params.model_copy(update={"tools": GenerationParams(**tools).tools})
    except ValidationError:  # a row the prompt schema no longer takes: keep the estimate
        return None
    return ProbeQuestion(model_id=model_id, messages=messages, params=params)


def with_probe_answer(reading: Meter, answer: dict[str, Any] | None) -> Meter:
    """`reading` with the worker's exact counts for the next prompt, when it answered."""
    if answer is not None and answer.get("loaded") is False:
        return replace(reading, loaded=False)
    if answer is None or "error" in answer:
        return reading  # no worker answered, or the prompt cannot be counted: the estimate
    prompt_tokens = int(answer.get("prompt_tokens", 0))
    cached = int(answer.get("cached_tokens", 0))
    trimmed = int(answer.get("trimmed_messages", 0))
    return replace(
        reading,
        loaded=True,
        probed=True,
        next_prompt=prompt_tokens,
        cached=cached,
        cache_source=str(answer.get("cache_source", "")),
        new_tokens=max(0, prompt_tokens - (reading.used or 0)),
        new_tokens_counted=True,
        trims_next=trimmed > 0,
        trimmed_next=trimmed,
        no_cache_reason=reading.no_cache_reason if not cached else "",
    )
