"""API keys: the settings page, the command, and what a key may do."""

from __future__ import annotations

import re

import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth.models import User
from django.core.management import call_command
from django.test import AsyncClient, Client

from inference.api import services
from inference.api.models import ApiKey
from tests.api.conftest import Api, api_settings

pytestmark = pytest.mark.django_db


def test_it_stores_only_a_digest_of_the_key(owner: User) -> None:
    key, secret = services.api_key_create(user=owner, name="laptop")

    assert secret.startswith(f"mlxw_{key.prefix}_")
    stored = ApiKey.objects.get(pk=key.pk)
    assert secret not in {stored.prefix, stored.digest, stored.name}
    assert services.api_key_authenticate(secret=secret) == key


def test_it_refuses_a_wrong_or_revoked_key(owner: User) -> None:
    key, secret = services.api_key_create(user=owner, name="laptop")

    assert services.api_key_authenticate(secret=secret[:-1] + "x") is None
    assert services.api_key_authenticate(secret="mlxw_nope_nope") is None
    services.api_key_revoke(key=key)
    assert services.api_key_authenticate(secret=secret) is None


def test_it_records_when_a_key_was_last_used(owner: User) -> None:
    key, secret = services.api_key_create(user=owner, name="laptop")
    assert key.last_used_at is None

    services.api_key_authenticate(secret=secret)

    key.refresh_from_db()
    assert key.last_used_at is not None


def test_the_page_shows_a_new_key_once(owner_client: Client, owner: User) -> None:
    response = owner_client.post("/settings/keys/", {"name": "editor"})

    assert response.status_code == 200
    secret = re.search(r'id="new-key">(mlxw_[^<]+)<', response.content.decode())
    assert secret is not None
    assert services.api_key_authenticate(secret=secret.group(1)) is not None
    assert response["Cache-Control"] == "no-store"
    again = owner_client.get("/settings/keys/").content.decode()
    assert "editor" in again and secret.group(1) not in again


def test_the_page_lists_only_the_users_own_keys(
    owner_client: Client, owner: User, stranger: User
) -> None:
    services.api_key_create(user=owner, name="mine")
    services.api_key_create(user=stranger, name="not-mine")

    page = owner_client.get("/settings/keys/").content.decode()

    assert "mine" in page and "not-mine" not in page


def test_a_stranger_cannot_revoke_someone_elses_key(stranger_client: Client, owner: User) -> None:
    key, secret = services.api_key_create(user=owner, name="mine")

    response = stranger_client.post(f"/settings/keys/{key.code}/revoke/")

    assert response.status_code == 404
    assert services.api_key_authenticate(secret=secret) is not None


def test_the_owner_revokes_a_key(owner_client: Client, owner: User) -> None:
    key, secret = services.api_key_create(user=owner, name="mine")

    response = owner_client.post(f"/settings/keys/{key.code}/revoke/")

    assert response.status_code == 302
    assert services.api_key_authenticate(secret=secret) is None


def test_the_page_needs_a_sign_in(client: Client) -> None:
    response = client.get("/settings/keys/")

    assert response.status_code == 302
    assert "/login/" in response["Location"]


def test_revoke_refuses_get(owner_client: Client, owner: User) -> None:
    key, _ = services.api_key_create(user=owner, name="mine")

    assert owner_client.get(f"/settings/keys/{key.code}/revoke/").status_code == 405


def test_the_top_bar_links_the_keys_page(owner_client: Client) -> None:
    assert 'href="/settings/keys/"' in owner_client.get("/settings/keys/").content.decode()


def test_the_command_creates_lists_and_revokes(owner: User, capsys) -> None:  # type: ignore[no-untyped-def]
    call_command("api_keys", "create", "--user", owner.username, "--name", "ci")
    secret = capsys.readouterr().out.strip().splitlines()[-1]
    key = services.api_key_authenticate(secret=secret)
    assert key is not None and key.name == "ci"

    call_command("api_keys", "list")
    listing = capsys.readouterr().out
    assert key.prefix in listing and secret not in listing

    call_command("api_keys", "revoke", key.prefix)
    assert services.api_key_authenticate(secret=secret) is None


@pytest.mark.django_db(transaction=True)
async def test_the_browser_session_never_authorizes_the_api(owner: User) -> None:
    client = AsyncClient()
    await client.aforce_login(owner)

    response = await client.get("/v1/models")

    assert response.status_code == 401


@pytest.mark.django_db(transaction=True)
async def test_a_revoked_key_gets_401(owner: User) -> None:
    key, secret = await sync_to_async(services.api_key_create)(user=owner, name="gone")
    await sync_to_async(services.api_key_revoke)(key=key)

    response = await Api(secret).get("/v1/models")

    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.django_db(transaction=True)
async def test_a_wrong_key_gets_401() -> None:
    response = await Api("mlxw_000000000000_wrong").get("/v1/models")

    assert response.status_code == 401


@pytest.mark.django_db(transaction=True)
async def test_the_rate_limit_answers_429_with_retry_after(api: Api, settings) -> None:  # type: ignore[no-untyped-def]
    api_settings(settings, requests_per_minute=2)

    statuses = [(await api.get("/v1/models")).status_code for _ in range(2)]
    refused = await api.get("/v1/models")

    assert statuses == [200, 200]
    assert refused.status_code == 429
    assert 1 <= int(refused["Retry-After"]) <= 61
    assert refused.json()["error"]["type"] == "rate_limit_error"


@pytest.mark.django_db(transaction=True)
async def test_loopback_may_be_opened_without_keys(settings) -> None:  # type: ignore[no-untyped-def]
    assert (await Api(None).get("/v1/models")).status_code == 401

    api_settings(settings, open_on_loopback=True)

    assert (await Api(None).get("/v1/models")).status_code == 200
