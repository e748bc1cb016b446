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

    class Meta:
        ordering = ["-updated_at", "-id"]
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
