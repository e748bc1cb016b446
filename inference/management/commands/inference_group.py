"""`manage.py inference_group MODEL`: one model served by a group of processes through MLX's
distributed backend, as one inference worker (issue 13; `inference.distributed`).

It starts the members with MLX's own launcher (`mlx.launch --backend ring`), here or on the
hosts given, and starts the whole group again when a member goes away. SIGTERM stops it: the
reply being written keeps its text and ends as interrupted.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from inference.catalogue import UnknownModel, get_catalogue
from inference.distributed import die_with_parent, model_dir_for

logger = logging.getLogger(__name__)

ROOT = Path(settings.BASE_DIR)
# A group that ran this long before it broke starts again at once; sooner, after a pause that
# doubles each time (up to MAX_BACKOFF_S), so a member that cannot start does not spin.
HEALTHY_S = 60.0
MAX_BACKOFF_S = 30.0
# How long the group has to end its reply and exit when stopped, before it is killed.
STOP_S = 20.0


def launcher() -> str:
    """MLX's launcher, from the environment this Python runs in."""
    beside = Path(sys.executable).with_name("mlx.launch")
    found = str(beside) if beside.is_file() else shutil.which("mlx.launch")
    if not found:
        raise CommandError("mlx.launch was not found: install mlx (it ships the launcher)")
    return found


class Command(BaseCommand):
    help = "Serve one model with a group of processes (MLX distributed, ring backend)."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("model", help="the model id (configs/models/), served by the group")
        parser.add_argument("--size", type=int, default=2, help="members on each host (default: 2)")
        parser.add_argument(
            "--hosts",
            default="127.0.0.1",
            help="comma-separated hosts for the ring (default: 127.0.0.1); every host needs "
            "this project at the same path and passwordless ssh from here",
        )
        parser.add_argument(
            "--hostfile",
            type=Path,
            help="a hostfile of MLX's (mlx.distributed_config writes one for a Thunderbolt "
            "ring) instead of --hosts",
        )
        parser.add_argument(
            "--port", type=int, default=32323, help="the ring's first TCP port (default: 32323)"
        )
        parser.add_argument(
            "--once", action="store_true", help="do not start the group again when it breaks"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if not settings.REDIS_URL:
            raise CommandError(
                "no redis_url is configured: a group is an inference worker of its own, which "
                "needs the Redis channel layer. Set MLXWEB_REDIS_URL."
            )
        size = options["size"]
        if not 1 <= size <= 64:
            raise CommandError(f"--size must be between 1 and 64, not {size}")
        if not 1024 <= options["port"] <= 65000:
            raise CommandError(f"--port must be between 1024 and 65000, not {options['port']}")
        hosts = [h.strip() for h in options["hosts"].split(",") if h.strip()]
        if not hosts:
            raise CommandError("--hosts names no host")
        hostfile = options["hostfile"]
        if hostfile is not None and not hostfile.is_file():
            raise CommandError(f"--hostfile {hostfile}: no such file")
        where = ["--hostfile", str(hostfile)] if hostfile else ["--hosts", ",".join(hosts)]
        model_id = options["model"]
        try:
            # A GGUF is converted here, once, before the members load the folder.
            model_dir_for(get_catalogue(), model_id, Path(settings.MLXWEB_CONVERTED_DIR))
        except (UnknownModel, ValueError) as e:
            raise CommandError(str(e)) from e
        command = [
            launcher(),
            "--backend", "ring",
            *where,
            "-n", str(size),
            "--starting-port", str(options["port"]),
            "--cwd", str(ROOT),
            "--python", sys.executable,
            "-m", "inference.distributed", model_id,
        ]  # fmt: skip
        self._supervise(command, once=options["once"])

    def _supervise(self, command: list[str], *, once: bool) -> None:
        stopping = False
        process: subprocess.Popen[bytes] | None = None

        def stop(signum: int, frame: Any) -> None:
            nonlocal stopping
            stopping = True
            if process is not None and process.poll() is None:
                # Rank 0 ends its reply as interrupted and the launcher stops the rest.
                os.killpg(process.pid, signal.SIGTERM)

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        backoff = 1.0
        while not stopping:
            began = time.monotonic()
            logger.info("starting the group: %s", " ".join(command))
            # Killed, this command takes the launcher with it (and the launcher its members).
            process = subprocess.Popen(
                command, cwd=ROOT, start_new_session=True, preexec_fn=die_with_parent
            )
            status = process.wait()
            if stopping or once:
                break
            ran = time.monotonic() - began
            backoff = 1.0 if ran > HEALTHY_S else min(backoff * 2, MAX_BACKOFF_S)
            logger.warning(
                "the group ended (status %s after %.0f s); starting it again in %.0f s",
                status,
                ran,
                backoff,
            )
            deadline = time.monotonic() + backoff
            while not stopping and time.monotonic() < deadline:
                time.sleep(0.1)
        if process is not None and process.poll() is None:
            # The members share the launcher's process group: whatever is left goes with it.
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(STOP_S)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        logger.info("inference group stopped")
