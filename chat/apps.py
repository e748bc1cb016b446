from __future__ import annotations

from django.apps import AppConfig


class ChatConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "chat"

    def ready(self) -> None:
        from django.db.models.signals import post_migrate, pre_migrate

        from chat.search import drop_before_migrate, repair_after_migrate

        # SQLite's search triggers would stop Django from rebuilding a table in a migration:
        # they are off while migrations run, and back (the index refilled) after.
        pre_migrate.connect(drop_before_migrate, sender=self, dispatch_uid="chat.search.drop")
        post_migrate.connect(repair_after_migrate, sender=self, dispatch_uid="chat.search.repair")
