"""The mlxweb project: settings, URLs, the ASGI and Celery apps, and the command line."""

from __future__ import annotations

# Celery's Django recipe: load the app whenever Django starts, so that `@shared_task` binds to it
# and `delay_on_commit` publishes through its broker.
from mlxweb.celery import app as celery_app

__all__ = ("celery_app",)
