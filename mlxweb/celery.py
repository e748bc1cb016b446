"""The Celery app that runs model library jobs, configured from Django settings (CELERY_*).

Embedded default (no Redis URL): kombu's `filesystem://` transport, messages as files under
`VAR_DIR/celery/`. Chosen over `sqla+sqlite://` because it needs no second database next to the
app's SQLite file (two processes polling one SQLite file every second is where "database is
locked" comes from), no SQLAlchemy at run time, keeps queued jobs across restarts (they are files)
and can be inspected with `ls`. It loses an unacknowledged message when the worker is killed, which
costs nothing here: the job row is the record, and a job whose worker died is marked failed and
can be retried. Settings switch remote control off in this mode (it needs a fanout exchange).

With `redis_url` set, Redis is the broker and the worker is its own process (see README).
"""

from __future__ import annotations

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mlxweb.settings")

app = Celery("mlxweb")
# Lazy: settings are read when the app is first used, not when this module is imported.
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
