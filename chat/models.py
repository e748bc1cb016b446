from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models
from django.utils import timezone

from inference.models import Generation


class Conversation(models.Model):
    """A user's chat with one model at a time; addressed in URLs by `code`."""

    code = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="conversations"
    )
    title = models.CharField(max_length=200, default="New chat")
    model_id = models.CharField(max_length=100)
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(default=timezone.now)
    # Tools (issue 11): whether replies are offered the server's tools, and the mutating tools
    # the user allowed once for all in this conversation ("always allow").
    tools_enabled = models.BooleanField(default=False)
    allowed_tools = models.JSONField(default=list, blank=True)
    # Messages form a tree (regenerated and edited turns are siblings); `leaf` is the last
    # message of the branch shown, and the page shows the path from the root to it.
    leaf = models.ForeignKey(
        "Message", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    pinned = models.BooleanField(default=False)
    # Whether the user set the title (a generated title never replaces theirs).
    title_edited = models.BooleanField(default=False)
    # The sticky settings of the conversation (issue 9): a preset's name (a built-in from
    # configs/presets/ or one of the user's `Preset` rows), the system prompt and the sampling
    # values that override it.
    preset = models.CharField(max_length=100, blank=True)
    system_prompt = models.TextField(blank=True)
    params = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["-pinned", "-updated_at", "-id"]
        indexes = [models.Index(fields=["user", "-updated_at"])]

    def __str__(self) -> str:
        return self.title

    @property
    def group_name(self) -> str:
        """The Channels group that every open tab of this conversation joins."""
        return f"conversation.{self.code.hex}"

    def touch(self) -> None:
        self.updated_at = timezone.now()
        self.save(update_fields=["updated_at"])


class Message(models.Model):
    """One turn. A user turn holds its text; an assistant turn is a view of its Generation."""

    class Role(models.TextChoices):
        USER = "user"
        ASSISTANT = "assistant"

    code = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    conversation = models.ForeignKey(
        Conversation, on_delete=models.CASCADE, related_name="messages"
    )
    role = models.CharField(max_length=16, choices=Role.choices)
    # The message this one answers or follows; null for the first message. Siblings (same
    # parent) are the versions of one turn: regenerated replies, edited user messages.
    parent = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.CASCADE, related_name="children"
    )
    content = models.TextField(blank=True)
    generation = models.OneToOneField(
        Generation, null=True, blank=True, on_delete=models.SET_NULL, related_name="message"
    )
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return f"{self.role}: {self.text[:40]}"

    @property
    def text(self) -> str:
        if self.role == self.Role.ASSISTANT:
            return self.generation.text if self.generation else ""
        return self.content

    @property
    def tools_pending(self) -> bool:
        """Whether a tool call of this reply still waits for approval or runs."""
        return any(step.state in ToolStep.PENDING_STATES for step in self.tool_steps.all())


class Preset(models.Model):
    """A user's own preset: a system prompt and sampling values, optionally a model, and
    optionally extending another preset (a built-in or one of theirs) by name."""

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="presets"
    )
    name = models.CharField(max_length=100)
    description = models.CharField(max_length=300, blank=True)
    extends = models.CharField(max_length=100, blank=True)
    system_prompt = models.TextField(blank=True)
    params = models.JSONField(default=dict, blank=True)
    model_id = models.CharField(max_length=100, blank=True)
    # Whether conversations with this preset offer the server's tools; null: leave as it is.
    tools = models.BooleanField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.UniqueConstraint(fields=["user", "name"], name="chat_preset_user_name")
        ]

    def __str__(self) -> str:
        return self.name


class ToolStep(models.Model):
    """One tool call of a reply: what the model asked for, the user's decision, the result.

    A reply whose generation ends with tool calls gets one step per call; once every step has
    ended, the results go back to the model as `tool` messages in a new assistant message that
    continues the reply. Steps are the record: the page renders them on reload.
    """

    class State(models.TextChoices):
        WAITING = "waiting", "waiting for approval"
        QUEUED = "queued"
        RUNNING = "running"
        DONE = "done"
        FAILED = "failed"
        DENIED = "denied"
        STOPPED = "stopped"

    PENDING_STATES = (State.WAITING, State.QUEUED, State.RUNNING)

    code = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    message = models.ForeignKey(Message, on_delete=models.CASCADE, related_name="tool_steps")
    call_id = models.CharField(max_length=128)
    name = models.CharField(max_length=64)
    arguments = models.JSONField(default=dict, blank=True)
    mutating = models.BooleanField(default=False)
    state = models.CharField(max_length=16, choices=State.choices, default=State.QUEUED)
    ok = models.BooleanField(default=False)
    # What went back to the model, the tool's details and files ({"name", "mime", "path"}).
    result = models.TextField(blank=True)
    data = models.JSONField(default=dict, blank=True)
    files = models.JSONField(default=list, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["id"]
        constraints = [
            models.UniqueConstraint(fields=["message", "call_id"], name="chat_toolstep_call")
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.state})"

    @property
    def is_pending(self) -> bool:
        return self.state in self.PENDING_STATES
