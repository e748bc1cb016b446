"""Many inference workers behind Redis (issue 13): routing by model, stop to the right worker,
failover of a killed worker's reply onto another, a third worker starting, and 32 chats over two
web processes and two workers.

Everything is real: two `manage.py serve` and two (then three) `manage.py inference_worker`
subprocesses on the PostgreSQL and Redis on loopback, websocket clients talking to daphne. The
tiny model is served under two ids, "tiny" (preloaded by worker A) and "tiny2" (worker B).
Heartbeats every 1.5 s, so a worker is declared dead 4.5 s after its last one.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import websockets

from tests.support.live import Browserless, Site, free_port, wait_for_port
from tests.support.scaleout import registered_workers, scaled_site
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.scaleout, pytest.mark.timeout(600)]

PASSWORD = "a-long-pass-phrase"
FINAL = 'class="body md"'  # the final render of a reply


@dataclass
class Cluster:
    site: Site
    db_url: str
    ports: list[int]  # the two web processes

    def rows(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.db_url) as conn:
            return conn.execute(sql, args).fetchall()

    def worker_of(self, model_id: str) -> str:
        """The id of the live worker that lists `model_id` as loaded."""
        for beat in registered_workers():
            if any(entry.get("model_id") == model_id for entry in beat.loaded):
                return beat.worker_id
        return ""

    def process_of(self, worker_id: str) -> str:
        """The name of the site's process that is the worker `worker_id` (its id holds its pid:
        host-pid-random)."""
        for name, process in self.site.processes.items():
            if f"-{process.pid}-" in worker_id:
                return name
        raise AssertionError(f"no process of the site is worker {worker_id}")

    def generation(self, code: str) -> dict[str, Any]:
        [(state, text, worker_id, details, tokens)] = self.rows(
            "SELECT state, text, worker_id, details, completion_tokens "
            "FROM inference_generation WHERE code = %s",
            code,
        )
        return {
            "state": state,
            "text": text,
            "worker_id": worker_id,
            "details": details or {},
            "tokens": tokens,
        }

    def reply_code(self, conversation: str) -> str:
        """The generation code of the conversation's latest assistant message."""
        rows = self.rows(
            "SELECT g.code FROM chat_message m JOIN chat_conversation c ON m.conversation_id = c.id"
            " JOIN inference_generation g ON m.generation_id = g.id"
            " WHERE c.code = %s AND m.role = 'assistant' ORDER BY m.id DESC LIMIT 1",
            conversation,
        )
        return str(rows[0][0]) if rows else ""

    def message_code(self, conversation: str) -> str:
        """The code of the conversation's latest assistant message (what the stop names)."""
        [(code,)] = self.rows(
            "SELECT m.code FROM chat_message m JOIN chat_conversation c"
            " ON m.conversation_id = c.id WHERE c.code = %s AND m.role = 'assistant'"
            " ORDER BY m.id DESC LIMIT 1",
            conversation,
        )
        return str(code)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Cluster]:
    tmp_path = tmp_path_factory.mktemp("workers")
    with scaled_site(tmp_path, tiny_model_dir) as (site, db_url):
        models, configs = Path(site.env["MLXWEB_MODELS_DIR"]), Path(site.env["MLXWEB_CONFIG_DIR"])
        shutil.copytree(models / "tiny", models / "tiny2")
        spec = (configs / "models" / "tiny.yaml").read_text()
        (configs / "models" / "tiny2.yaml").write_text(
            spec.replace("name: tiny", "name: tiny2").replace("path: tiny", "path: tiny2")
        )
        site.env["MLXWEB_HEARTBEAT_S"] = "1.5"
        site.env["MLXWEB_ALLOW_SIGNUP"] = "1"  # several users
        site.start("worker-a", "inference_worker", "--preload", "tiny")
        site.start("worker-b", "inference_worker", "--preload", "tiny2")
        site.serve()
        second = free_port()
        wait_for_port(second, site.start("web2", "serve", "--port", str(second)))
        made = Cluster(site, db_url, [site.port, second])
        wait_until(
            lambda: made.worker_of("tiny") and made.worker_of("tiny2"),
            timeout=120,
            what="both workers to load their model",
        )
        yield made


def sign_up(cluster: Cluster, name: str) -> Browserless:
    client = Browserless(cluster.site.url)
    client.post("/signup/", {"username": name, "password1": PASSWORD, "password2": PASSWORD})
    return client


def new_chat(client: Browserless, model: str) -> str:
    url, _ = client.post("/c/new/", {"text": "", "model": model}, form_page="/")
    match = re.search(r"/c/([0-9a-f-]{36})/", url)
    assert match, url
    return match.group(1)


class Chat:
    """One conversation's socket on one web process."""

    def __init__(self, port: int, client: Browserless, code: str) -> None:
        self.port, self.client, self.code = port, client, code
        self.frames: list[str] = []

    async def __aenter__(self) -> Chat:
        self.socket = await websockets.connect(
            f"ws://127.0.0.1:{self.port}/ws/conversations/{self.code}/",
            additional_headers={
                "Cookie": self.client.cookie_header(),
                "Origin": f"http://127.0.0.1:{self.port}",
            },
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.socket.close()

    async def send(self, **frame: Any) -> None:
        await self.socket.send(json.dumps(frame))

    async def until(self, text: str, timeout: float = 120) -> None:
        """Read frames until one holds `text` (counting those already read)."""
        async with asyncio.timeout(timeout):
            while not any(text in f for f in self.frames):
                self.frames.append(str(await self.socket.recv()))


def test_replies_go_to_the_worker_holding_their_model_and_stop_reaches_it(cluster) -> None:
    client = sign_up(cluster, "ada")
    chats = {model: new_chat(client, model) for model in ("tiny", "tiny2")}
    holders = {model: cluster.worker_of(model) for model in chats}
    assert holders["tiny"] != holders["tiny2"]

    async def talk() -> None:
        for model, code in chats.items():
            async with Chat(cluster.ports[0], client, code) as chat:
                await chat.send(type="send", text=f"Hello {model}")
                await chat.until(FINAL)
                reply = cluster.reply_code(code)
                assert cluster.generation(reply)["worker_id"] == holders[model]
                assert cluster.generation(reply)["state"] == "complete"
                # A long reply, stopped mid-way: the stop must reach this reply's worker.
                chat.frames.clear()
                await chat.send(type="send", text="Go on and on", max_tokens=2000)
                await chat.until("beforeend:#reply-")
                reply = cluster.reply_code(code)
                await chat.send(type="stop", reply=cluster.message_code(code))
                await asyncio.to_thread(
                    wait_until,
                    lambda: cluster.generation(reply)["state"] != "streaming",  # noqa: B023
                    timeout=30,
                    what="the stop to land",
                )
                row = cluster.generation(reply)
                assert (row["state"], row["worker_id"]) == ("stopped", holders[model])
                assert 0 < row["tokens"] < 2000

    asyncio.run(talk())


def test_32_chats_over_two_web_processes_and_two_workers_all_complete_once(cluster) -> None:
    clients = [sign_up(cluster, f"user{i}") for i in range(4)]
    # 8 each: the per-user queue limit is 8; half on each model, so both workers serve.
    conversations = [
        (client, new_chat(client, "tiny" if i % 2 else "tiny2"))
        for client in clients
        for i in range(8)
    ]

    async def one(index: int, client: Browserless, code: str) -> None:
        async with Chat(cluster.ports[index % 2], client, code) as chat:
            await chat.send(type="send", text=f"Say something about the number {index}")
            await chat.until(FINAL, timeout=240)

    async def everyone() -> None:
        await asyncio.gather(*(one(i, c, code) for i, (c, code) in enumerate(conversations)))

    asyncio.run(everyone())
    codes = [code for _, code in conversations]
    rows = cluster.rows(
        "SELECT c.code, m.role, g.state, g.text, g.worker_id FROM chat_message m"
        " JOIN chat_conversation c ON m.conversation_id = c.id"
        " LEFT JOIN inference_generation g ON m.generation_id = g.id"
        " WHERE c.code = ANY(%s) AND m.role = 'assistant'",
        codes,
    )
    assert sorted(str(row[0]) for row in rows) == sorted(codes), "one reply per chat"
    assert all(row[2] == "complete" and row[3] for row in rows)
    # Both workers served (a worker may come to hold both models: the replies are counted by
    # the worker that wrote them).
    assert {cluster.process_of(row[4]) for row in rows} == {"worker-a", "worker-b"}
    groups = [f"conversation.{code.replace('-', '')}" for code in codes]
    [(replies,)] = cluster.rows(
        "SELECT count(*) FROM inference_generation WHERE notify_group = ANY(%s)", groups
    )
    assert replies == 32, "no reply generated twice"


def test_a_killed_workers_reply_goes_on_elsewhere_and_a_new_worker_interrupts_nothing(
    cluster,
) -> None:
    site = cluster.site
    client = sign_up(cluster, "bob")
    doomed_chat = new_chat(client, "tiny")
    # Which worker writes which reply is read from the replies; the one writing the first is
    # killed. After the earlier tests either worker may hold both models, and a reply goes to a
    # worker holding its model with room before an idle one that would have to load it: the
    # second reply's model is one the other worker holds (and the first's does not, if there is
    # one), so it lands there. Fixed models put both on one worker in a CI run.
    doomed_worker = survivor = other_chat = ""
    ended_before = cluster.rows(
        "SELECT code, state, text FROM inference_generation"
        " WHERE state NOT IN ('queued', 'streaming')"
    )

    def model_for_the_other_worker(busy: str) -> str:
        beats = {b.worker_id: {str(e["model_id"]) for e in b.loaded} for b in registered_workers()}
        theirs: set[str] = set().union(*(models for w, models in beats.items() if w != busy))
        return sorted(theirs - beats.get(busy, set()) or theirs)[0]

    async def kill_mid_reply() -> tuple[str, str, float, float]:
        nonlocal doomed_worker, survivor, other_chat
        async with Chat(cluster.ports[0], client, doomed_chat) as doomed:
            await doomed.send(type="send", text="Go on and on", max_tokens=2000)
            await doomed.until("beforeend:#reply-")
            old = cluster.reply_code(doomed_chat)
            doomed_worker = cluster.generation(old)["worker_id"]
            model = model_for_the_other_worker(doomed_worker)
            other_chat = await asyncio.to_thread(new_chat, client, model)
            async with Chat(cluster.ports[1], client, other_chat) as other:
                await other.send(type="send", text="Tell me a long story", max_tokens=2000)
                await other.until("beforeend:#reply-")
                survivor = cluster.generation(cluster.reply_code(other_chat))["worker_id"]
                return await fail_over(doomed, other, old)

    async def fail_over(doomed: Chat, other: Chat, old: str) -> tuple[str, str, float, float]:
        assert doomed_worker and survivor and doomed_worker != survivor, "one reply each"
        await asyncio.to_thread(
            wait_until,
            lambda: cluster.generation(old)["text"],
            timeout=30,
            what="the reply's first flush",
        )
        killed_at = time.monotonic()
        site.stop(cluster.process_of(doomed_worker), signal.SIGKILL)
        # The page hears that the reply goes on, then the continuation's tokens.
        new = await asyncio.to_thread(
            wait_until,
            lambda: cluster.generation(old)["details"].get("resumed_by"),
            timeout=60,
            what="the failover",
        )
        await doomed.until(f"beforeend:#reply-{new}", timeout=60)
        continued_at = time.monotonic()
        await doomed.send(type="stop", reply=cluster.message_code(doomed_chat))
        await other.send(type="stop", reply=cluster.message_code(other_chat))
        return old, new, killed_at, continued_at

    old, new, killed_at, continued_at = asyncio.run(kill_mid_reply())
    lost, resumed = cluster.generation(old), cluster.generation(new)
    assert lost["state"] == "interrupted" and lost["text"], "marked, its text kept"
    assert resumed["details"]["resumed_from"] == old
    assert resumed["worker_id"] == survivor
    assert cluster.reply_code(doomed_chat) == new, "the message shows the continuation"
    wait_until(
        lambda: (
            cluster.generation(new)["state"] != "queued"
            and cluster.generation(new)["state"] != "streaming"
        ),
        timeout=30,
        what="the continuation to stop",
    )
    resumed = cluster.generation(new)
    assert resumed["text"].startswith(lost["text"]) and len(resumed["text"]) > len(lost["text"])
    # The other worker's reply went on untouched, and so did everything that had ended.
    other_reply = cluster.generation(cluster.reply_code(other_chat))
    assert (
        other_reply["state"] in ("stopped", "complete")
        and "resumed_by" not in (other_reply["details"])
    )
    for code, state, text in ended_before:
        assert cluster.generation(str(code))["state"] == state
        assert cluster.generation(str(code))["text"] == text
    assert continued_at - killed_at < 30, "failover within the dead-after time and a load"

    # A third worker starts while a reply streams on B: it interrupts nothing that is alive.
    async def third_worker_starts() -> str:
        async with Chat(cluster.ports[1], client, other_chat) as chat:
            await chat.send(type="send", text="One more long story", max_tokens=2000)
            await chat.until("beforeend:#reply-")
            reply = cluster.reply_code(other_chat)
            site.start("worker-c", "inference_worker", "--no-warm-up")

            # Its start (runner.prepare) and two heartbeats, each followed by a look for dead
            # workers, have passed once its row has been written twice.
            def third() -> list[Any]:
                return [
                    b.updated_at
                    for b in registered_workers()
                    if b.worker_id not in (survivor, doomed_worker)
                ]

            first = await asyncio.to_thread(
                wait_until, third, timeout=60, what="the third worker's heartbeat"
            )
            await asyncio.to_thread(
                wait_until,
                lambda: [t for t in third() if t > first[0]],
                timeout=30,
                what="the third worker's second heartbeat",
            )
            assert cluster.generation(reply)["state"] in ("streaming", "complete")
            if cluster.generation(reply)["state"] == "streaming":
                await chat.send(type="stop", reply=cluster.message_code(other_chat))
            return reply

    reply = asyncio.run(third_worker_starts())
    wait_until(
        lambda: cluster.generation(reply)["state"] in ("stopped", "complete"),
        timeout=30,
        what="the reply to end",
    )
    assert "resumed_by" not in cluster.generation(reply)["details"]
    assert cluster.generation(reply)["worker_id"] == survivor


def test_sigterm_hands_a_workers_replies_to_another_and_it_exits(cluster) -> None:
    """Runs after the failover test: the worker that survived it and C are alive."""
    site = cluster.site
    client = sign_up(cluster, "cy")
    code = new_chat(client, "tiny2")

    async def drain_mid_reply() -> tuple[str, str, str]:
        async with Chat(cluster.ports[0], client, code) as chat:
            await chat.send(type="send", text="Go on and on", max_tokens=2000)
            await chat.until("beforeend:#reply-")
            old = cluster.reply_code(code)
            draining = cluster.generation(old)["worker_id"]
            assert site.stop(cluster.process_of(draining), signal.SIGTERM) == 0  # drained, exited
            new = cluster.generation(old)["details"]["resumed_by"]
            await chat.until(f"beforeend:#reply-{new}", timeout=60)
            await chat.send(type="stop", reply=cluster.message_code(code))
            return old, new, draining

    old, new, draining = asyncio.run(drain_mid_reply())
    handed, taken = cluster.generation(old), cluster.generation(new)
    assert handed["state"] == "interrupted" and handed["text"]
    assert taken["worker_id"] not in ("", draining)
    assert taken["details"]["resumed_from"] == old
    wait_until(
        lambda: cluster.generation(new)["state"] in ("stopped", "complete"),
        timeout=30,
        what="the continuation to end",
    )
    assert cluster.generation(new)["text"].startswith(handed["text"])
