from __future__ import annotations

from django.apps import AppConfig


class MlxwebConfig(AppConfig):
    """The project itself, registered only for its management commands (serve)."""

    name = "mlxweb"
    verbose_name = "mlxweb"
