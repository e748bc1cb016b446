"""API keys and per-key limits: what the API views and `models_admin.api` authenticate with.

A key reads `mlxw_<prefix>_<secret>`: the prefix finds the row, the SHA-256 of the whole key is
compared with the stored digest in constant time. Limits (configs/server.yaml, `api`) are counted
in Django's cache, per key: requests in the current minute and generations running now.
"""

from __future__ import annotations

import hmac
import secrets
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth.models import User
from django.core.cache import cache
from django.http import HttpRequest
from django.utils import timezone

from inference.api.models import ApiKey

KEY_PREFIX = "mlxw_"
# last_used_at is written at most this often per key, not on every request.
LAST_USED_RESOLUTION = timedelta(seconds=60)
LOOPBACK_ADDRESSES = {"127.0.0.1", "::1"}
# A count of running generations outlives a crashed process in a shared cache by at most this.
_STREAMS_TTL_S = 3600


@dataclass(frozen=True)
class ApiCaller:
    """Who an API request acts as: a key's owner, or nobody (loopback without a key)."""

    user: Any | None
    key_id: int | None

    @property
    def is_staff(self) -> bool:
        return bool(self.user is not None and self.user.is_staff)

    @property
    def limit_key(self) -> str:
        return str(self.key_id) if self.key_id is not None else "loopback"


def _api_settings() -> Any:
    return settings.MLXWEB_CONFIG.server.api


def api_key_create(*, user: User, name: str) -> tuple[ApiKey, str]:
    """A new key for `user`, and its secret text: the only time the secret is known."""
    prefix = secrets.token_hex(6)
    secret = f"{KEY_PREFIX}{prefix}_{secrets.token_urlsafe(32)}"
    key = ApiKey.objects.create(
        user=user, name=name.strip()[:100] or "key", prefix=prefix, digest=ApiKey.digest_of(secret)
    )
    return key, secret


def api_key_revoke(*, key: ApiKey) -> None:
    """Stop a key from authorizing anything; the row stays, marked revoked."""
    if key.revoked_at is None:
        key.revoked_at = timezone.now()
        key.save(update_fields=["revoked_at"])


def api_keys_for(*, user: User) -> list[ApiKey]:
    return list(ApiKey.objects.filter(user=user))


def api_key_authenticate(*, secret: str) -> ApiKey | None:
    """The live key whose secret this is (its owner active), or None. Records the use."""
    if not secret.startswith(KEY_PREFIX) or len(secret) > 200:
        return None
    prefix, _, rest = secret[len(KEY_PREFIX) :].partition("_")
    if not prefix or not rest:
        return None
    key = ApiKey.objects.live().select_related("user").filter(prefix=prefix).first()
    if key is None or not key.user.is_active:
        return None
    if not hmac.compare_digest(key.digest, ApiKey.digest_of(secret)):
        return None
    now = timezone.now()
    if key.last_used_at is None or now - key.last_used_at >= LAST_USED_RESOLUTION:
        ApiKey.objects.filter(pk=key.pk).update(last_used_at=now)
        key.last_used_at = now
    return key


def bearer_token(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer ...` header's value, or None."""
    scheme, _, token = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def caller_for(*, authorization: str | None, local: bool) -> ApiCaller | None:
    """Who a call acts as, from its Authorization header's bearer key; None when it may not use
    the API. A call with no Authorization at all acts as a keyless caller only when it comes
    from this machine (`local`) and `api.open_on_loopback` allows it, never in production mode.
    HTTP and gRPC both ask here."""
    token = bearer_token(authorization)
    if token is None:
        open_here = _api_settings().open_on_loopback and not settings.MLXWEB_PRODUCTION
        if authorization is None and local and open_here:
            return ApiCaller(user=None, key_id=None)
        return None
    key = api_key_authenticate(secret=token)
    if key is None:
        return None
    return ApiCaller(user=key.user, key_id=key.pk)


def api_caller(request: HttpRequest) -> ApiCaller | None:
    """Who an HTTP request acts as (see `caller_for`); the browser session never counts."""
    return caller_for(
        authorization=request.headers.get("Authorization"),
        local=request.META.get("REMOTE_ADDR") in LOOPBACK_ADDRESSES,
    )


def request_admit(*, caller: ApiCaller) -> int | None:
    """Count a request against its key's requests per minute; None if admitted, else the
    seconds until the next minute starts (Retry-After)."""
    now = time.time()
    window = int(now // 60)
    name = f"api:rpm:{caller.limit_key}:{window}"
    cache.add(name, 0, timeout=120)
    try:
        count = cache.incr(name)
    except ValueError:  # expired between add and incr
        cache.set(name, 1, timeout=120)
        count = 1
    if count > _api_settings().requests_per_minute:
        return max(1, int(60 - now % 60) + 1)
    return None


def _streams_name(caller: ApiCaller) -> str:
    return f"api:streams:{caller.limit_key}"


def streams_acquire(*, caller: ApiCaller, count: int = 1) -> bool:
    """Take `count` of the key's concurrent generations; False (taking none) if it has too few
    left. Give them back with `streams_release`."""
    name = _streams_name(caller)
    cache.add(name, 0, timeout=_STREAMS_TTL_S)
    try:
        running = cache.incr(name, count)
    except ValueError:
        cache.set(name, count, timeout=_STREAMS_TTL_S)
        running = count
    if running > _api_settings().max_concurrent_streams:
        streams_release(caller=caller, count=count)
        return False
    return True


def streams_release(*, caller: ApiCaller, count: int = 1) -> None:
    try:
        if cache.decr(_streams_name(caller), count) < 0:
            cache.set(_streams_name(caller), 0, timeout=_STREAMS_TTL_S)
    except ValueError:
        pass
