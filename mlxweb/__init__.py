"""The mlxweb project: settings, URLs, the ASGI and Celery apps, and the command line.

Importing the package imports nothing else: `mlxweb.config` must load without Django or Celery
(the bench and the config tests use it alone). The Celery app is loaded when Django starts
(`MlxwebConfig.ready`), which is what Celery's Django recipe needs from `__init__`, and
`celery -A mlxweb` finds `mlxweb.celery` by itself.
"""

from __future__ import annotations

from typing import Any

__all__ = ("celery_app",)


def __getattr__(name: str) -> Any:
    if name == "celery_app":
        from mlxweb.celery import app

        return app
    raise AttributeError(f"module 'mlxweb' has no attribute {name!r}")
