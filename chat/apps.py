from __future__ import annotations

from typing import Any

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
        # A reply whose worker died (or drained) goes on as a new generation (issue 13,
        # inference.cluster.resume): the message shows the new one from now on.
        from inference.cluster import generation_resumed

        generation_resumed.connect(_show_resumed, dispatch_uid="chat.resumed")


def _show_resumed(sender: Any, old: Any, new: Any, **kwargs: Any) -> bool:
    """Point the message that showed `old` at its continuation `new`; True when one did."""
    from chat.models import Message

    return bool(Message.objects.filter(generation=old).update(generation=new))
