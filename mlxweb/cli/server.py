"""`mlxweb serve` and `mlxweb status`."""

from __future__ import annotations

import argparse
import json
import urllib.error
import urllib.request
from typing import Any

from mlxweb.cli import EXIT_FAILURE, EXIT_OK, CLIError, verb_parser

HEALTH_TIMEOUT_S = 2.0


def add_verbs(verbs: Any) -> None:
    from mlxweb.management.commands.serve import Command as ServeCommand

    # `manage.py serve`'s own options (--host, --port, ...), whatever it grows.
    serve_options = argparse.ArgumentParser(add_help=False)
    ServeCommand().add_arguments(serve_options)
    verb_parser(
        verbs,
        "serve",
        _serve,
        help="migrate, fetch the default model and serve (what ./scripts/run starts)",
        parents=[serve_options],
    )

    status = verb_parser(
        verbs,
        "status",
        _status,
        help="is a server running: its URL, worker, loaded models, streams and library jobs "
        "(exit status 1 when none answers)",
    )
    status.add_argument("--url", help="the server's address (default: from configs/server.yaml)")
    status.add_argument("--target", help="its gRPC target (default: the data folder's socket)")
    status.add_argument("--json", action="store_true", help="one JSON object")


def _serve(args: argparse.Namespace, tokens: list[str]) -> int:
    """`manage.py migrate`, `fetch_models` and `serve TOKENS`: the steps of ./scripts/run after
    the install, in this process."""
    from django.core.management import CommandError, call_command

    try:
        call_command("migrate", interactive=False, verbosity=0)
        call_command("fetch_models")
        call_command("serve", *tokens)
    except CommandError as e:
        raise CLIError(str(e), code=e.returncode) from None
    return EXIT_OK


def server_url(url: str | None = None) -> str:
    """The configured server's address as a client reaches it (a wildcard host is loopback)."""
    if url:
        return url if url.endswith("/") else f"{url}/"
    from django.conf import settings

    server = settings.MLXWEB_CONFIG.server
    host = server.host
    if host in ("", "0.0.0.0", "::", "[::]"):
        host = "127.0.0.1"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{server.port}/"


def http_health(url: str) -> dict[str, Any] | None:
    """The server's `GET /health`, or None when nothing answers there."""
    try:
        with urllib.request.urlopen(f"{url}health", timeout=HEALTH_TIMEOUT_S) as response:
            data = json.loads(response.read())
    except (OSError, ValueError, urllib.error.URLError):
        return None
    return data if isinstance(data, dict) else None


def grpc_health(target: str | None = None) -> tuple[str | None, dict[str, Any] | None]:
    """(the gRPC target, its health) when the gRPC service answers there, else (target, None);
    (None, None) where this version has no gRPC client."""
    try:
        from mlxweb.client import Client, default_target
    except ImportError:
        return None, None
    target = target or default_target()
    try:
        with Client(target) as client:
            if not client.is_serving():
                return target, None
            try:
                return target, client.health()
            except Exception:  # serving, but its details are not readable (an old server)
                return target, {"status": "SERVING"}
    except Exception:
        return target, None


def gather_status(*, url: str | None = None, target: str | None = None) -> dict[str, Any]:
    """What `mlxweb status` reports, as one JSON-able dict."""
    from django.db import DatabaseError

    from inference.cluster import workers as cluster_workers
    from inference.services import WorkerStatus, worker_status
    from mlxweb.cli.library import job_json
    from models_admin import services as library
    from models_admin.models import ModelJob

    address = server_url(url)
    health = http_health(address)
    grpc_target, grpc = grpc_health(target)
    running = health is not None or grpc is not None

    worker: dict[str, Any]
    models: list[dict[str, Any]]
    if health is not None:
        worker = dict(health.get("worker") or {})
        models = [
            {"id": m.get("id"), "bytes": m.get("bytes"), "loaded_at": m.get("loaded_at")}
            for m in health.get("models") or []
        ]
    elif grpc is not None and "worker_alive" in grpc:
        worker = {
            "alive": grpc["worker_alive"],
            "queued": grpc.get("queued", 0),
            "streaming": grpc.get("streaming", 0),
        }
        models = [
            {"id": m.get("model_id"), "bytes": m.get("bytes"), "loaded_at": m.get("loaded_at")}
            for m in grpc.get("loaded") or []
        ]
    else:
        # Nothing answers over the network: the worker's last heartbeat in the database says
        # whether one is alive elsewhere (its own process, with Redis).
        try:
            state = worker_status()
        except DatabaseError:  # not migrated yet: no server has ever run on it
            state = WorkerStatus(alive=False)
        worker = {
            "alive": state.alive,
            "id": state.worker_id,
            "queued": state.queued,
            "streaming": state.streaming,
        }
        models = [
            {"id": m.model_id, "bytes": m.bytes, "loaded_at": m.loaded_at.isoformat()}
            for m in state.loaded
        ]
    try:
        workers = [_worker_json(w) for w in cluster_workers()]
    except DatabaseError:
        workers = []
    try:
        library.job_reap_dead()
        jobs = list(
            ModelJob.objects.filter(state__in=ModelJob.ACTIVE_STATES).order_by("created_at")
        )
    except DatabaseError:
        jobs = []
    return {
        "running": running,
        "url": address if health is not None else None,
        "checked_url": address,
        "grpc": grpc_target if grpc is not None else None,
        "checked_grpc": grpc_target,
        "worker": worker,
        "models": models,
        "workers": workers,
        "jobs": [job_json(job) for job in jobs],
    }


def _worker_json(worker: Any) -> dict[str, Any]:
    """One registered inference worker (inference.cluster.WorkerInfo) for `mlxweb status`."""
    state = "draining" if worker.draining else "alive" if worker.alive else "not answering"
    return {
        "id": worker.worker_id,
        "state": state,
        "models": list(worker.models),
        "used_bytes": worker.used_bytes,
        "budget_bytes": worker.budget_bytes,
        "active": worker.active,
        "queued": worker.queued,
        "streaming": worker.streaming,
        "updated_at": worker.updated_at.isoformat(),
    }


def _status(args: argparse.Namespace, tokens: list[str]) -> int:
    status = gather_status(url=args.url, target=args.target)
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        _print_status(status)
    return EXIT_OK if status["running"] else EXIT_FAILURE


def _print_status(status: dict[str, Any]) -> None:
    from rich.markup import escape
    from rich.table import Table

    from mlxweb.cli.output import console, size

    out = console()
    if status["running"]:
        where = [f"[bold]{status['url']}[/]"] if status["url"] else []
        if status["grpc"]:
            where.append(f"gRPC {escape(status['grpc'])}")
        out.print(f"[green]mlxweb is serving[/] at {', '.join(where)}")
    else:
        grpc = f" nor gRPC at {escape(status['checked_grpc'])}" if status["checked_grpc"] else ""
        out.print(f"[red]No mlxweb server answers[/] at {status['checked_url']}{grpc}")
    worker = status["worker"]
    alive = worker.get("alive")
    label = "[green]alive[/]" if alive else "[red]not running[/]" if alive is False else "unknown"
    ident = f" ({escape(str(worker['id']))})" if worker.get("id") else ""
    out.print(
        f"Inference worker: {label}{ident}, {worker.get('queued', 0)} queued, "
        f"{worker.get('streaming', 0)} streaming"
    )
    if status["models"]:
        table = Table(box=None, header_style="bold", pad_edge=False, title_justify="left")
        table.add_column("loaded model")
        table.add_column("memory", justify="right")
        table.add_column("since")
        for model in status["models"]:
            table.add_row(
                escape(str(model["id"])),
                size(model["bytes"] or 0),
                escape(str(model["loaded_at"] or "")),
            )
        out.print(table)
    else:
        out.print("No model loaded.")
    if len(status.get("workers") or []) > 1 or any(
        w["state"] != "alive" for w in status.get("workers") or []
    ):
        table = Table(box=None, header_style="bold", pad_edge=False)
        for column in ("inference worker", "state", "models", "memory", "replies"):
            table.add_column(column)
        for w in status["workers"]:
            table.add_row(
                escape(w["id"]),
                escape(w["state"]),
                escape(", ".join(w["models"]) or "-"),
                f"{size(w['used_bytes'])} of {size(w['budget_bytes'])}",
                f"{w['streaming']} streaming, {w['queued']} waiting",
            )
        out.print(table)
    if status["jobs"]:
        table = Table(box=None, header_style="bold", pad_edge=False)
        for column in ("library job", "state", "done", "step"):
            table.add_column(column)
        for job in status["jobs"]:
            done = f"{job['percent']:.0f}%" if job["percent"] is not None else ""
            table.add_row(escape(job["title"]), job["state"], done, escape(job["step"]))
        out.print(table)
    else:
        out.print("No library job running.")
