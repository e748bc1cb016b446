"""Who a gRPC call acts as: the HTTP APIs' keys and limits, read from the call's metadata."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth.models import User
from django.core.cache import cache

from inference.api import services
from inference.grpc.service import CallFailed, authenticate
from tests.api.conftest import api_settings

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(60)]


class Context:
    """The part of grpc.aio's ServicerContext that `authenticate` reads."""

    def __init__(self, key: str | None = None, peer: str = "unix:/tmp/grpc.sock") -> None:
        self.metadata = [("authorization", f"Bearer {key}")] if key is not None else []
        self._peer = peer

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return self.metadata

    def peer(self) -> str:
        return self._peer


@pytest.fixture(autouse=True)
def fresh_limits() -> None:
    cache.clear()


async def test_a_key_acts_as_its_owner(owner: User) -> None:
    _, secret = await _new_key(owner)

    caller = await authenticate(Context(secret))

    assert caller.user == owner


async def test_a_revoked_key_is_unauthenticated(owner: User) -> None:
    key, secret = await _new_key(owner)
    await _revoke(key)

    with pytest.raises(CallFailed) as failed:
        await authenticate(Context(secret))

    assert failed.value.code == grpc.StatusCode.UNAUTHENTICATED


async def test_it_counts_requests_per_minute_per_key(owner: User, settings: Any) -> None:
    api_settings(settings, requests_per_minute=2)
    _, secret = await _new_key(owner)

    await authenticate(Context(secret))
    await authenticate(Context(secret))
    with pytest.raises(CallFailed) as failed:
        await authenticate(Context(secret))

    assert failed.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "try again in" in failed.value.message


async def test_local_calls_need_no_key_only_when_the_api_is_open_on_loopback(
    settings: Any,
) -> None:
    with pytest.raises(CallFailed):
        await authenticate(Context())

    api_settings(settings, open_on_loopback=True)
    for peer in ("unix:/tmp/grpc.sock", "ipv4:127.0.0.1:50000"):
        caller = await authenticate(Context(peer=peer))
        assert caller.user is None
    with pytest.raises(CallFailed):
        await authenticate(Context(peer="ipv4:10.0.0.5:50000"))
    with pytest.raises(CallFailed):
        await authenticate(Context("mlxw_wrong_key"))  # a key that is sent must be valid

    settings.MLXWEB_PRODUCTION = True
    with pytest.raises(CallFailed) as failed:
        await authenticate(Context())
    assert failed.value.code == grpc.StatusCode.UNAUTHENTICATED


async def _new_key(owner: User) -> tuple[Any, str]:
    return await sync_to_async(services.api_key_create)(user=owner, name="grpc")


async def _revoke(key: Any) -> None:
    await sync_to_async(services.api_key_revoke)(key=key)
