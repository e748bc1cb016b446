"""Many inference workers (issue 13): aggregate tok/s and TTFT with one and with two workers on
the same machine and the same load, and the failover time (kill -9 of a reply's worker to the
first token of its continuation on the user's socket).

Everything is the real deployment on loopback: a PostgreSQL database of its own, Redis (db 13),
`manage.py serve` and one or two `manage.py inference_worker` processes, each preloading the
default model; websocket clients send the chats as the page does. Greedy, the same prompts.

    .venv/bin/python bench/bench_workers.py [--chats 8] [--max-tokens 64] [--heartbeat 1.5]

On a machine with few cores the workers share them: two workers cannot be faster than one that
already uses every core (the engine batches the chats); the ratio says what a second worker
costs or gains here, not on a machine per worker.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mlxweb.launcher import ensure_fast_blas  # noqa: E402

ensure_fast_blas(sys.argv)

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from datetime import UTC, datetime, timedelta  # noqa: E402
from typing import Any  # noqa: E402

import psycopg  # noqa: E402
import redis  # noqa: E402
import websockets  # noqa: E402
from servers import FormClient, MlxwebServer, stop  # noqa: E402

from inference.registry import RedisRegistry  # noqa: E402

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_URL = "redis://127.0.0.1:6379/13"
PASSWORD = "a-long-pass-phrase"
FINAL = 'class="body md"'


class Deployment:
    """A web process and workers on a database of their own."""

    def __init__(self, folder: Path, db_url: str, heartbeat: float) -> None:
        self.folder, self.db_url = folder, db_url
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("MLXWEB_")},
            "DJANGO_SETTINGS_MODULE": "mlxweb.settings",
            "MLXWEB_VAR_DIR": str(folder / "var"),
            "MLXWEB_MODELS_DIR": str(ROOT / "var" / "models"),
            "MLXWEB_DATABASE_URL": db_url,
            "MLXWEB_REDIS_URL": REDIS_URL,
            "MLXWEB_SECRET_KEY": "bench-workers",
            "MLXWEB_ALLOW_SIGNUP": "1",
            "MLXWEB_HEARTBEAT_S": str(heartbeat),
            "PYTHONUNBUFFERED": "1",
        }
        self.web = MlxwebServer(self.env, folder / "web.log")
        self.workers: dict[str, subprocess.Popen[bytes]] = {}

    def start_worker(self, name: str) -> None:
        with (self.folder / f"{name}.log").open("ab") as log:
            self.workers[name] = subprocess.Popen(
                [sys.executable, "manage.py", "inference_worker"], cwd=ROOT, env=self.env,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

    def rows(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.db_url) as conn:
            return conn.execute(sql, args).fetchall()

    def wait_workers(self, count: int, timeout: float = 180) -> list[str]:
        """The ids of `count` live workers that have the model loaded."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            recent = datetime.now(UTC) - timedelta(seconds=10)
            beats = RedisRegistry(REDIS_URL, ttl_s=60).beats()
            ids = [b.worker_id for b in beats if b.loaded and b.updated_at > recent]
            if len(ids) >= count:
                return ids
            time.sleep(0.2)
        raise RuntimeError(f"{count} workers did not load the model within {timeout} s")

    def stop_all(self) -> None:
        for process in self.workers.values():
            stop(process)
        self.web.stop()


def sign_up(url: str, name: str) -> FormClient:
    client = FormClient(url)
    fields = {"username": name, "password1": PASSWORD, "password2": PASSWORD}
    client.submit("/signup/", fields)
    return client


def new_chat(client: FormClient) -> str:
    url = client.submit("/c/new/", {"text": ""}, form_on="/")
    match = re.search(r"/c/([0-9a-f-]{36})/", url)
    if match is None:
        raise RuntimeError(f"no conversation made: {url}")
    return match.group(1)


async def one_chat(port: int, client: FormClient, code: str, text: str, max_tokens: int) -> float:
    """Send one turn; the seconds to its first token (the final render is awaited)."""
    async with websockets.connect(
        f"ws://127.0.0.1:{port}/ws/conversations/{code}/",
        additional_headers={"Cookie": client.cookie_header(), "Origin": f"http://127.0.0.1:{port}"},
    ) as socket:
        sent = time.monotonic()
        await socket.send(json.dumps({"type": "send", "text": text, "max_tokens": max_tokens}))
        first = 0.0
        async with asyncio.timeout(600):
            while True:
                frame = str(await socket.recv())
                if not first and "beforeend:#reply-" in frame:
                    first = time.monotonic() - sent
                if FINAL in frame:
                    return first


def load(
    site: Deployment, clients: list[FormClient], chats: int, max_tokens: int
) -> dict[str, float]:
    """`chats` chats at once; aggregate tok/s over the wall time, TTFT median and p90."""
    codes = [(clients[i % len(clients)], new_chat(clients[i % len(clients)])) for i in range(chats)]
    prompts = [f"Write a short story about a lighthouse keeper number {i}." for i in range(chats)]

    async def everyone() -> list[float]:
        return await asyncio.gather(
            *(
                one_chat(site.web.port, c, code, p, max_tokens)
                for (c, code), p in zip(codes, prompts, strict=True)
            )
        )

    started = time.monotonic()
    ttfts = asyncio.run(everyone())
    wall = time.monotonic() - started
    groups = [f"conversation.{code.replace('-', '')}" for _, code in codes]
    [(tokens, workers)] = site.rows(
        "SELECT sum(completion_tokens), count(DISTINCT worker_id) FROM inference_generation"
        " WHERE notify_group = ANY(%s)",
        groups,
    )
    ttfts.sort()
    return {
        "tok_s": int(tokens) / wall,
        "tokens": int(tokens),
        "wall_s": wall,
        "ttft_median_ms": statistics.median(ttfts) * 1000,
        "ttft_p90_ms": ttfts[int(0.9 * (len(ttfts) - 1))] * 1000,
        "workers_used": int(workers),
    }


def failover(site: Deployment, client: FormClient, names: dict[str, str]) -> dict[str, float]:
    """Kill -9 the worker of a long reply once it streams; seconds to the continuation's first
    token on the socket."""
    code = new_chat(client)
    port = site.web.port

    async def run() -> dict[str, float]:
        async with websockets.connect(
            f"ws://127.0.0.1:{port}/ws/conversations/{code}/",
            additional_headers={"Cookie": client.cookie_header(), "Origin": site.web.url},
        ) as socket:
            await socket.send(
                json.dumps({"type": "send", "text": "Go on and on", "max_tokens": 1500})
            )
            frames: list[str] = []
            async with asyncio.timeout(120):
                while not any("beforeend:#reply-" in f for f in frames):
                    frames.append(str(await socket.recv()))
                while True:  # the text flushed to the row: what the continuation starts from
                    [(gen, worker, text)] = site.rows(
                        "SELECT g.code, g.worker_id, g.text FROM chat_message m"
                        " JOIN chat_conversation c ON m.conversation_id = c.id"
                        " JOIN inference_generation g ON m.generation_id = g.id"
                        " WHERE c.code = %s AND m.role = 'assistant'",
                        code,
                    )
                    if text:
                        break
                    await asyncio.sleep(0.05)
            victim = names[str(worker)]
            killed = time.monotonic()
            os.killpg(site.workers[victim].pid, signal.SIGKILL)
            async with asyncio.timeout(120):
                while True:
                    rows = site.rows(
                        "SELECT details->>'resumed_by' FROM inference_generation WHERE code = %s",
                        gen,
                    )
                    if rows and rows[0][0]:
                        new = rows[0][0]
                        break
                    await asyncio.sleep(0.05)
                declared = time.monotonic() - killed
                while not any(f"beforeend:#reply-{new}" in f for f in frames):
                    frames.append(str(await socket.recv()))
            return {
                "declared_dead_s": declared,
                "first_continued_token_s": time.monotonic() - killed,
            }

    return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chats", type=int, default=8, help="chats at once (default 8)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per reply (default 64)")
    parser.add_argument("--heartbeat", type=float, default=1.5, help="MLXWEB_HEARTBEAT_S (1.5)")
    args = parser.parse_args()
    if not 1 <= args.chats <= 64 or not 1 <= args.max_tokens <= 2000:
        parser.error("--chats must be 1-64 and --max-tokens 1-2000")

    redis.Redis.from_url(REDIS_URL).flushdb()
    name = f"mlxweb_bench_workers_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    folder = Path(tempfile.mkdtemp(prefix="bench-workers-"))
    site = Deployment(folder, f"postgres://postgres@127.0.0.1:5432/{name}", args.heartbeat)
    results: dict[str, Any] = {
        "cores": os.cpu_count(),
        "chats": args.chats,
        "max_tokens": args.max_tokens,
    }
    try:
        site.web.manage("migrate", "--noinput", "-v0")
        site.web.start()
        clients = [sign_up(site.web.url, f"user{i}") for i in range(max(1, args.chats // 4))]
        site.start_worker("w1")
        [first] = site.wait_workers(1)
        load(site, clients, 2, 8)  # warm-up: compile, caches
        results["one_worker"] = load(site, clients, args.chats, args.max_tokens)
        site.start_worker("w2")
        ids = site.wait_workers(2)
        load(site, clients, 2, 8)
        results["two_workers"] = load(site, clients, args.chats, args.max_tokens)
        results["ratio_tok_s"] = results["two_workers"]["tok_s"] / results["one_worker"]["tok_s"]
        names = {first: "w1", next(i for i in ids if i != first): "w2"}
        results["failover"] = failover(site, clients[0], names)
        results["heartbeat_s"] = args.heartbeat
    finally:
        site.stop_all()
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
