"""The job worker `manage.py serve` runs as its child when no Redis URL is configured.

One Celery worker, solo pool: one job at a time, so memory-heavy jobs never overlap, on the
filesystem broker (no server to start). It runs in its own session so that Ctrl-C in the
terminal reaches `serve` only, which then stops the worker: running jobs are cancelled (they
remove their staging folders), the worker gets SIGTERM, and SIGKILL if it does not stop in time.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from django.conf import settings

from mlxweb.config import BASE_DIR

logger = logging.getLogger(__name__)

PARENT_PID_ENV = "MLXWEB_JOB_WORKER_PARENT_PID"
STOP_TIMEOUT_SECONDS = 15.0


def embedded_worker_name() -> str:
    return f"models@{socket.gethostname()}"


def worker_command() -> list[str]:
    """The embedded worker's command line (serving both job queues, one job at a time)."""
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "mlxweb",
        "--quiet",  # no banner in serve's output
        "worker",
        "--pool=solo",
        "--concurrency=1",
        "-Q",
        f"{settings.MODELS_QUEUE_HEAVY},{settings.MODELS_QUEUE_LIGHT}",
        "-n",
        embedded_worker_name(),
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        "--loglevel=INFO",
    ]


def start_embedded_worker() -> subprocess.Popen[bytes] | None:
    """Start the job worker as a child process, unless a separate worker serves a real broker."""
    if settings.REDIS_URL or not str(settings.CELERY_BROKER_URL).startswith("filesystem://"):
        logger.info(
            "jobs go to %s: run `celery -A mlxweb worker` separately", settings.CELERY_BROKER_URL
        )
        return None
    env = {**os.environ, PARENT_PID_ENV: str(os.getpid())}
    env.setdefault("DJANGO_SETTINGS_MODULE", "mlxweb.settings")
    process = subprocess.Popen(worker_command(), cwd=BASE_DIR, env=env, start_new_session=True)
    logger.info("started the job worker (pid %d)", process.pid)
    return process


def stop_embedded_worker(process: subprocess.Popen[bytes] | None) -> None:
    """Cancel the worker's running job, stop the worker, and record what it could not finish."""
    if process is None:
        return
    from models_admin import services
    from models_admin.models import ModelJob

    name = embedded_worker_name()
    if process.poll() is None:
        ModelJob.objects.filter(state=ModelJob.State.RUNNING, worker=name).update(
            cancel_requested=True
        )
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            logger.warning(
                "the job worker did not stop in %.0f s: killing it", STOP_TIMEOUT_SECONDS
            )
            process.kill()
            process.wait()
    services.job_reap_dead(worker=name)
    logger.info("stopped the job worker")


def watch_parent() -> None:
    """In the embedded worker: stop when the `serve` process that started it is gone.

    Covers `serve` being killed without a chance to stop its child (SIGKILL, a crash), on any OS.
    """
    expected = os.environ.get(PARENT_PID_ENV)
    if not expected:
        return

    def watch() -> None:
        while os.getppid() == int(expected):
            time.sleep(2)
        logger.warning("the serve process is gone: stopping the job worker")
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
