"""Sign-in throttling (django-axes): per account and per address, with a lockout that expires."""

from __future__ import annotations

from datetime import timedelta

from django.contrib.auth.models import User
from django.test import Client
from django.urls import reverse
from django.utils import timezone

PASSWORD = "correct-horse-battery"


def _sign_in(client: Client, username: str, password: str, address: str = "10.0.0.1") -> int:
    response = client.post(
        reverse("login"), {"username": username, "password": password}, REMOTE_ADDR=address
    )
    return response.status_code


def test_it_locks_an_account_out_after_too_many_wrong_passwords(owner: User, settings) -> None:
    assert settings.AXES_FAILURE_LIMIT == 5
    client = Client()
    for _ in range(4):
        assert _sign_in(client, "alice", "wrong") == 200  # the form again, with its error
    assert _sign_in(client, "alice", "wrong") == 429  # the fifth locks the account
    # Now even the right password is refused, from this address or any other.
    assert _sign_in(client, "alice", PASSWORD) == 429
    assert _sign_in(Client(), "alice", PASSWORD, address="10.9.9.9") == 429
    response = Client().post(
        reverse("login"), {"username": "alice", "password": PASSWORD}, REMOTE_ADDR="10.9.9.9"
    )
    assert "Too many sign-in attempts" in response.content.decode()


def test_it_locks_an_address_out_that_guesses_many_accounts(owner: User, stranger: User) -> None:
    client = Client()
    for name in ("a", "b", "c", "d", "e"):
        _sign_in(client, name, "wrong", address="10.0.0.7")
    assert _sign_in(Client(), "mallory", PASSWORD, address="10.0.0.7") == 429
    # Another address is not locked out.
    assert _sign_in(Client(), "mallory", PASSWORD, address="10.0.0.8") == 302


def test_the_lockout_expires(owner: User, settings) -> None:
    client = Client()
    for _ in range(5):
        _sign_in(client, "alice", "wrong")
    assert _sign_in(client, "alice", PASSWORD) == 429
    from axes.models import AccessAttempt

    AccessAttempt.objects.update(
        attempt_time=timezone.now() - settings.AXES_COOLOFF_TIME - timedelta(seconds=1)
    )
    assert _sign_in(client, "alice", PASSWORD) == 302


def test_a_right_password_before_the_limit_resets_the_count(owner: User) -> None:
    client = Client()
    for _ in range(4):
        _sign_in(client, "alice", "wrong")
    assert _sign_in(client, "alice", PASSWORD) == 302
    other = Client()
    for _ in range(4):
        assert _sign_in(other, "alice", "wrong") == 200
    assert _sign_in(other, "alice", PASSWORD) == 302


def test_production_mode_counts_the_address_the_proxy_saw(settings, rf) -> None:
    from mlxweb.security import client_ip

    request = rf.get("/", REMOTE_ADDR="127.0.0.1", HTTP_X_FORWARDED_FOR="6.6.6.6, 203.0.113.9")
    assert client_ip(request) == "127.0.0.1"
    settings.MLXWEB_PRODUCTION = True
    assert client_ip(request) == "203.0.113.9"
