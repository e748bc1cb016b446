from __future__ import annotations

import hashlib
import uuid

from django.conf import settings
from django.db import models


class ApiKeyQuerySet(models.QuerySet["ApiKey"]):
    def live(self) -> ApiKeyQuerySet:
        """Keys that still authorize requests."""
        return self.filter(revoked_at__isnull=True)


class ApiKey(models.Model):
    """A secret that lets a program use the APIs as its owner.

    Only a SHA-256 digest of the secret is kept: the key is shown once, when it is created. The
    secret is 256 random bits, so a plain digest (not a slow password hash) is enough to make a
    leaked table useless. `prefix` is the key's public part, for lookup and for telling keys
    apart on the settings page.
    """

    code = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_keys"
    )
    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=32, unique=True)
    digest = models.CharField(max_length=64)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    objects = ApiKeyQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    @property
    def is_revoked(self) -> bool:
        return self.revoked_at is not None

    @staticmethod
    def digest_of(secret: str) -> str:
        return hashlib.sha256(secret.encode()).hexdigest()
