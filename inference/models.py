from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Any

from django.conf import settings
from django.db import connection, models
from django.utils import timezone


class PromptMessage(models.Model):
    """One message of a prompt, as a node of the prompt tree.

    A prompt is the path from a root to a node: a generation points at the last message of its
    prompt, and the next turn of a conversation adds only its new messages under the previous
    generation's reply. Storage grows with the conversation instead of its square, and a branch
    (a regenerated or edited turn) is a sibling. Nodes are never edited once written.
    """

    class Role(models.TextChoices):
        SYSTEM = "system"
        DEVELOPER = "developer"
        USER = "user"
        ASSISTANT = "assistant"
        TOOL = "tool"
        # A completion prompt sent as it is, without the chat template: the whole prompt.
        RAW = "raw"

    parent = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.PROTECT, related_name="children"
    )
    role = models.CharField(max_length=16, choices=Role.choices)
    content = models.TextField(blank=True)
    # What a message carries besides its text: an assistant's "tool_calls", a tool result's
    # "tool_call_id", a "name".
    extra = models.JSONField(default=dict, blank=True)

    def __str__(self) -> str:
        return f"{self.role}: {self.content[:40]}"

    def as_dict(self) -> dict[str, Any]:
        return {"role": self.role, "content": self.content, **(self.extra or {})}

    @classmethod
    def chain(cls, leaf_id: int) -> list[dict[str, str]]:
        """The messages from the root down to `leaf_id`, as the chat template takes them.

        One recursive query (SQLite and PostgreSQL both have WITH RECURSIVE), however long the
        conversation.
        """
        table = connection.ops.quote_name(cls._meta.db_table)
        sql = f"""
            WITH RECURSIVE path(id, parent_id, role, content, extra, depth) AS (
                SELECT id, parent_id, role, content, extra, 0 FROM {table} WHERE id = %s
                UNION ALL
                SELECT node.id, node.parent_id, node.role, node.content, node.extra,
                    path.depth + 1
                FROM {table} AS node JOIN path ON node.id = path.parent_id
            )
            SELECT role, content, extra FROM path ORDER BY depth DESC
        """
        with connection.cursor() as cursor:
            cursor.execute(sql, [leaf_id])
            messages: list[dict[str, Any]] = []
            for role, content, extra in cursor.fetchall():
                # SQLite hands JSON back as text, PostgreSQL as a value.
                values = json.loads(extra) if isinstance(extra, str | bytes) else extra
                messages.append({"role": role, "content": content, **(values or {})})
            return messages

    @classmethod
    def extend(
        cls,
        parent: PromptMessage | None,
        role: str,
        content: str,
        extra: dict[str, Any] | None = None,
    ) -> PromptMessage:
        """The child of `parent` with this role, content and extra: the existing one, or a new one.

        Reusing a child keeps branches that share a prefix (a regenerated reply) in one path;
        roots are always new, so conversations never share nodes.
        """
        extra = extra or {}
        if parent is not None:
            siblings = cls.objects.filter(parent=parent, role=role, content=content)
            existing = next((m for m in siblings if (m.extra or {}) == extra), None)
            if existing is not None:
                return existing
        return cls.objects.create(parent=parent, role=role, content=content, extra=extra)


class GenerationQuerySet(models.QuerySet["Generation"]):
    """Generation rows, with the state changes that apply to many at once."""

    def active(self) -> GenerationQuerySet:
        """Queued or streaming."""
        return self.filter(state__in=Generation.ACTIVE_STATES)

    def finish(self, reason: str, **values: Any) -> int:
        """End these rows with `reason` (see `Generation.finish`); returns how many changed."""
        return self.update(**Generation.end_values(reason, **values))

    def interrupt(self, **values: Any) -> int:
        """Mark these rows interrupted (their worker went away); the text they have is kept."""
        return self.finish(Generation.FinishReason.INTERRUPTED, **values)


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
        TOOL_CALLS = "tool_calls", "tool calls"

    ACTIVE_STATES = (State.QUEUED, State.STREAMING)
    # The state a row ends in, by finish reason; every other reason means it completed.
    END_STATES: dict[str, str] = {
        FinishReason.STOPPED: State.STOPPED,
        FinishReason.INTERRUPTED: State.INTERRUPTED,
        FinishReason.ERROR: State.ERROR,
    }
    MAX_ERROR_LENGTH = 10_000

    code = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    model_id = models.CharField(max_length=100)
    # Whose reply this is: per-user limits and fair scheduling count by it. Null for requests
    # that belong to nobody in particular.
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="generations",
    )
    # The last message of the prompt as it was sent; the rest are its ancestors.
    prompt = models.ForeignKey(
        PromptMessage, null=True, on_delete=models.PROTECT, related_name="generations"
    )
    # The validated GenerationParams.
    params = models.JSONField(default=dict)
    # The Channels group that hears this generation's deltas and end.
    notify_group = models.CharField(max_length=100, blank=True)

    state = models.CharField(max_length=16, choices=State.choices, default=State.QUEUED)
    finish_reason = models.CharField(max_length=16, choices=FinishReason.choices, blank=True)
    error = models.TextField(blank=True)
    # The raw reply as the model wrote it; once finished, what it means: the answer without
    # reasoning and tool-call markup, the reasoning, the calls ({"id", "name", "arguments"}).
    text = models.TextField(blank=True)
    content = models.TextField(blank=True)
    reasoning = models.TextField(blank=True)
    tool_calls = models.JSONField(default=list, blank=True)

    prompt_tokens = models.PositiveIntegerField(default=0)
    cached_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    trimmed_messages = models.PositiveIntegerField(default=0)
    worker_id = models.CharField(max_length=100, blank=True)
    # Where the reply came from, to show and to replay: model revision or file hash,
    # quantization, chat-template hash, sampler settings, seed, mlx and mlx-lm versions.
    provenance = models.JSONField(default=dict, blank=True)
    # Per generated token: {"token", "logprob", "top": [{"token", "logprob"}, ...]}, kept for
    # the token-level fork when the reply asked for it.
    token_trace = models.JSONField(default=list, blank=True)
    # What the engine reports besides the counts: speculative decoding's acceptance, where the
    # prompt cache came from, and the like.
    details = models.JSONField(default=dict, blank=True)

    created_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    first_token_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    objects = GenerationQuerySet.as_manager()

    class Meta:
        indexes = [
            models.Index(fields=["state"]),
            models.Index(fields=["user", "state"], name="inference_gen_user_state"),
        ]

    def __str__(self) -> str:
        return f"{self.model_id} {self.code} ({self.state})"

    @property
    def is_active(self) -> bool:
        return self.state in self.ACTIVE_STATES

    def prompt_messages(self) -> list[dict[str, Any]]:
        """The prompt as it was sent: [{"role", "content", ...extra}, ...], oldest first."""
        return PromptMessage.chain(self.prompt_id) if self.prompt_id is not None else []

    @classmethod
    def end_values(
        cls,
        reason: str,
        *,
        finished_at: datetime | None = None,
        error: str = "",
        **values: Any,
    ) -> dict[str, Any]:
        """The fields an ending with `reason` writes: state, finish reason, time, error, and
        whatever else is given (text, token counts); fields not given keep their value."""
        return {
            "state": cls.END_STATES.get(reason, cls.State.COMPLETE),
            "finish_reason": reason,
            "finished_at": finished_at or timezone.now(),
            "error": error[: cls.MAX_ERROR_LENGTH],
            **values,
        }

    def mark_streaming(
        self,
        *,
        started_at: datetime,
        prompt_tokens: int,
        cached_tokens: int,
        trimmed_messages: int,
    ) -> None:
        """The engine accepted the prompt: prefill and decoding are under way."""
        self._write(
            {
                "state": self.State.STREAMING,
                "started_at": started_at,
                "prompt_tokens": prompt_tokens,
                "cached_tokens": cached_tokens,
                "trimmed_messages": trimmed_messages,
            }
        )

    def finish(self, reason: str, **values: Any) -> None:
        """End this generation: the state follows from `reason` (eos, stop_string and
        max_tokens complete it; stopped, interrupted and error are their own states).

        Keyword arguments are the other fields to write with it (`text`, `completion_tokens`,
        `prompt_tokens`, `error`, `finished_at`); only the fields written are saved.
        """
        self._write(self.end_values(reason, **values))

    def _write(self, fields: dict[str, Any]) -> None:
        # An UPDATE of these fields alone, like save(update_fields=...), except that a row
        # deleted meanwhile is no error: the worker must not fail on it.
        for name, value in fields.items():
            setattr(self, name, value)
        type(self).objects.filter(pk=self.pk).update(**fields)

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


class WorkerHeartbeat(models.Model):
    """What an inference worker is doing, written by it every few seconds.

    A row, not process memory, so that every web process (one or many, behind Redis) can tell
    whether the worker is alive and what it has loaded.
    """

    worker_id = models.CharField(max_length=100, unique=True)
    updated_at = models.DateTimeField(default=timezone.now)
    # [{"model_id", "bytes", "loaded_at" (ISO time), "expires_at" (ISO time or null)}]
    loaded = models.JSONField(default=list, blank=True)
    queued = models.PositiveIntegerField(default=0)
    streaming = models.PositiveIntegerField(default=0)
    # Scale-out (issue 13): the worker's own channel (stop and sync for its replies go there),
    # its memory budget and what of it is used, and whether it is draining (takes no new work).
    channel_name = models.CharField(max_length=200, blank=True)
    budget_bytes = models.BigIntegerField(default=0)
    used_bytes = models.BigIntegerField(default=0)
    draining = models.BooleanField(default=False)

    def __str__(self) -> str:
        return f"{self.worker_id} at {self.updated_at}"
