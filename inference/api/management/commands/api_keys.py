"""`manage.py api_keys create|list|revoke`: API keys for scripts (the settings page's twin)."""

from __future__ import annotations

from argparse import ArgumentParser
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from inference.api import services
from inference.api.models import ApiKey


class Command(BaseCommand):
    help = "Create, list and revoke API keys. `create` prints the new key as its last line."

    def add_arguments(self, parser: ArgumentParser) -> None:
        actions = parser.add_subparsers(dest="action", required=True)
        create = actions.add_parser("create", help="make a key; the key is the last line")
        create.add_argument("--user", required=True, help="the owner's username")
        create.add_argument("--name", required=True, help="a label for the key")
        listing = actions.add_parser("list", help="keys (never their secrets)")
        listing.add_argument("--user", help="only this user's keys")
        revoke = actions.add_parser("revoke", help="stop a key from working")
        revoke.add_argument("prefix", help="the key's prefix (shown by list) or the whole key")

    def handle(self, *args: Any, **options: Any) -> None:
        action = options["action"]
        if action == "create":
            self._create(options["user"], options["name"])
        elif action == "list":
            self._list(options.get("user"))
        else:
            self._revoke(options["prefix"])

    def _create(self, username: str, name: str) -> None:
        user = get_user_model().objects.filter(username=username).first()
        if user is None:
            raise CommandError(f"No user {username!r}.")
        key, secret = services.api_key_create(user=user, name=name)
        self.stdout.write(f"Created key {key.name!r} ({key.prefix}) for {username}.")
        self.stdout.write(secret)

    def _list(self, username: str | None) -> None:
        keys = ApiKey.objects.select_related("user").order_by("user__username", "-created_at")
        if username:
            keys = keys.filter(user__username=username)
        for key in keys:
            used = key.last_used_at.isoformat(timespec="seconds") if key.last_used_at else "never"
            state = "revoked" if key.is_revoked else "live"
            self.stdout.write(
                f"{key.prefix}  {key.user.get_username():<20} {state:<8} used {used:<25} {key.name}"
            )

    def _revoke(self, ref: str) -> None:
        prefix = ref
        if ref.startswith(services.KEY_PREFIX):
            prefix = ref[len(services.KEY_PREFIX) :].partition("_")[0]
        key = ApiKey.objects.filter(prefix=prefix).first()
        if key is None:
            raise CommandError(f"No key {prefix!r}.")
        services.api_key_revoke(key=key)
        self.stdout.write(f"Revoked {key.prefix} ({key.name}).")
