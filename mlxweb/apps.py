from __future__ import annotations

from django.apps import AppConfig


class MlxwebConfig(AppConfig):
    """The project itself: its management commands (serve) and the Celery app."""

    name = "mlxweb"
    verbose_name = "mlxweb"

    def ready(self) -> None:
        # Celery's Django recipe: load the app whenever Django starts, so that `@shared_task`
        # binds to it and `delay_on_commit` publishes through its broker.
        from mlxweb.celery import app  # noqa: F401
