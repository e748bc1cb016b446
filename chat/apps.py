from __future__ import annotations

from django.apps import AppConfig


class ChatConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "chat"

    def ready(self) -> None:
        from django.db.models.signals import post_migrate

        from chat.search import repair_after_migrate

        # Search triggers die with a table SQLite rebuilds in a later migration: put them back.
        post_migrate.connect(repair_after_migrate, dispatch_uid="chat.search.repair")
