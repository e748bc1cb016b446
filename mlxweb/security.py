"""Small pieces of the security settings that need code."""

from __future__ import annotations

from django.conf import settings
from django.http import HttpRequest


def client_ip(request: HttpRequest) -> str | None:
    """The address sign-in throttling counts failures against.

    Locally that is the peer's address. In production mode the peer is the TLS proxy, so it is the
    last address in X-Forwarded-For: the one the proxy appended (what a client sends itself comes
    before it and is not trusted).
    """
    if settings.MLXWEB_PRODUCTION:
        forwarded = request.META.get("HTTP_X_FORWARDED_FOR", "")
        last = forwarded.rsplit(",", 1)[-1].strip()
        if last:
            return last
    return request.META.get("REMOTE_ADDR")
