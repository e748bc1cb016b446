from __future__ import annotations

from django.apps import AppConfig


class ModelsAdminConfig(AppConfig):
    """The model library: the Models page, its background jobs and `manage.py models`."""

    default_auto_field = "django.db.models.BigAutoField"
    name = "models_admin"
    verbose_name = "Model library"

    def ready(self) -> None:
        # Registers the job kinds (services) and the worker_ready hook (tasks).
        from models_admin import services, tasks  # noqa: F401
