from __future__ import annotations

import uuid
from typing import Any

from django.db import models
from django.utils import timezone


class Generation(models.Model):
    """One reply being (or having been) written by the engine: the record of a stream.

    The row exists before the first token; the worker flushes text into it as it goes and marks
    how it ended. Pages and final websocket frames render from this row, never from the stream.
    """

    class State(models.TextChoices):
        QUEUED = "queued"
        STREAMING = "streaming"
        COMPLETE = "complete"
        STOPPED = "stopped"
        INTERRUPTED = "interrupted"
        ERROR = "error"

    class FinishReason(models.TextChoices):
        EOS = "eos", "end of text"
        STOP_STRING = "stop_string", "stop string"
        MAX_TOKENS = "max_tokens", "token limit"
        STOPPED = "stopped", "stopped by the user"
        INTERRUPTED = "interrupted", "worker went away"
        ERROR = "error", "error"

    ACTIVE_STATES = (State.QUEUED, State.STREAMING)

    code = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    model_id = models.CharField(max_length=100)
    # The prompt as it was sent (list of {"role", "content"}) and the validated GenerationParams.
    messages = models.JSONField(default=list)
    params = models.JSONField(default=dict)
    # The Channels group that hears this generation's deltas and end.
    notify_group = models.CharField(max_length=100, blank=True)

    state = models.CharField(max_length=16, choices=State.choices, default=State.QUEUED)
    finish_reason = models.CharField(max_length=16, choices=FinishReason.choices, blank=True)
    error = models.TextField(blank=True)
    text = models.TextField(blank=True)

    prompt_tokens = models.PositiveIntegerField(default=0)
    cached_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    trimmed_messages = models.PositiveIntegerField(default=0)
    worker_id = models.CharField(max_length=100, blank=True)

    created_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    first_token_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        indexes = [models.Index(fields=["state"])]

    def __str__(self) -> str:
        return f"{self.model_id} {self.code} ({self.state})"

    @property
    def is_active(self) -> bool:
        return self.state in self.ACTIVE_STATES

    @property
    def ttft_ms(self) -> int | None:
        """Milliseconds from the request to the first token."""
        if self.first_token_at is None:
            return None
        return round((self.first_token_at - self.created_at).total_seconds() * 1000)

    @property
    def tokens_per_second(self) -> float | None:
        """Decode speed: tokens after the first over the time after the first."""
        if self.first_token_at is None or self.finished_at is None or self.completion_tokens < 2:
            return None
        seconds = (self.finished_at - self.first_token_at).total_seconds()
        return (self.completion_tokens - 1) / seconds if seconds > 0 else None

    def stats(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "completion_tokens": self.completion_tokens,
            "ttft_ms": self.ttft_ms,
            "tokens_per_second": self.tokens_per_second,
        }
