"""Scaled out: PostgreSQL, the Redis channel layer, and the inference worker in its own process.

Everything here is real: `manage.py serve` and `manage.py inference_worker` run as subprocesses
against the PostgreSQL and Redis on loopback, and a websocket client talks to daphne.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis
import websockets

from tests.support.live import Browserless, Site, write_configs
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.scaleout, pytest.mark.timeout(300)]

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_URL = "redis://127.0.0.1:6379/14"


@pytest.fixture
def scaled_site(tmp_path: Path, tiny_model_dir: Path) -> Iterator[tuple[Site, str]]:
    try:
        redis.Redis.from_url(REDIS_URL).flushdb()
    except redis.ConnectionError as e:
        pytest.fail(f"the scale-out tests need Redis on 127.0.0.1:6379 ({e})")
    name = f"mlxweb_scaleout_{uuid.uuid4().hex[:8]}"
    try:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as e:
        pytest.fail(f"the scale-out tests need PostgreSQL on 127.0.0.1:5432 ({e})")
    db_url = f"postgres://postgres@127.0.0.1:5432/{name}"

    models = tmp_path / "models"
    shutil.copytree(tiny_model_dir, models / "tiny")
    configs = write_configs(tmp_path / "configs", model_id="tiny", model_dir="tiny")
    env = {
        **{k: v for k, v in __import__("os").environ.items() if not k.startswith("MLXWEB_")},
        "DJANGO_SETTINGS_MODULE": "mlxweb.settings",
        "MLXWEB_CONFIG_DIR": str(configs),
        "MLXWEB_MODELS_DIR": str(models),
        "MLXWEB_VAR_DIR": str(tmp_path / "var"),
        "MLXWEB_DATABASE_URL": db_url,
        "MLXWEB_REDIS_URL": REDIS_URL,
        "MLXWEB_SECRET_KEY": "scale-out-test",
        "PYTHONUNBUFFERED": "1",
    }
    site = Site(env=env, log_dir=tmp_path)
    site.manage("migrate", "--noinput", "-v0")
    try:
        yield site, db_url
    finally:
        site.stop_all()
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _sign_up_and_open_chat(site: Site) -> tuple[Browserless, str]:
    client = Browserless(site.url)
    password = "a-long-pass-phrase"
    client.post("/signup/", {"username": "ada", "password1": password, "password2": password})
    url, _ = client.post("/c/new/", {"text": "", "model": "tiny"}, form_page="/")
    match = re.search(r"/c/([0-9a-f-]{36})/", url)
    assert match, url
    return client, match.group(1)


async def _chat(site: Site, client: Browserless, code: str, text: str, until: str) -> list[str]:
    frames: list[str] = []
    async with websockets.connect(
        f"ws://127.0.0.1:{site.port}/ws/conversations/{code}/",
        additional_headers={"Cookie": client.cookie_header(), "Origin": site.url},
    ) as socket:
        await socket.send(json.dumps({"type": "send", "text": text}))
        async with asyncio.timeout(120):
            while until not in "".join(frames):
                frames.append(str(await socket.recv()))
    return frames


def _generation_rows(db_url: str) -> list[tuple[str, str, int]]:
    with psycopg.connect(db_url) as conn:
        return conn.execute(
            "SELECT state, text, completion_tokens FROM inference_generation ORDER BY id"
        ).fetchall()


def test_it_streams_through_redis_from_a_separate_worker(scaled_site) -> None:
    site, db_url = scaled_site
    site.start("worker", "inference_worker")
    site.serve()
    client, code = _sign_up_and_open_chat(site)

    frames = asyncio.run(_chat(site, client, code, "Hello over Redis", 'class="body md"'))

    assert any("beforeend:#reply-" in f for f in frames), "no token deltas arrived"
    [(state, text, tokens)] = _generation_rows(db_url)
    assert state == "complete"
    assert tokens > 0 and text
    assert "inference worker" in site.log("worker")


def test_it_marks_a_reply_interrupted_when_its_worker_dies(scaled_site) -> None:
    site, db_url = scaled_site
    site.start("worker", "inference_worker")
    site.serve()
    client, code = _sign_up_and_open_chat(site)

    async def start_reply_then_kill_worker() -> None:
        async with websockets.connect(
            f"ws://127.0.0.1:{site.port}/ws/conversations/{code}/",
            additional_headers={"Cookie": client.cookie_header(), "Origin": site.url},
        ) as socket:
            await socket.send(
                json.dumps({"type": "send", "text": "Go on and on", "max_tokens": "2000"})
            )
            async with asyncio.timeout(60):
                while "beforeend:#reply-" not in str(await socket.recv()):
                    pass
            # Killed once the worker has flushed some of the text to the row.
            await asyncio.to_thread(
                wait_until,
                lambda: _generation_rows(db_url)[0][1],
                timeout=60,
                interval=0.05,
                what="the reply's first flush",
            )
            site.stop("worker", signal.SIGKILL)

    asyncio.run(start_reply_then_kill_worker())
    [(state, text, _)] = _generation_rows(db_url)
    assert state == "streaming"  # nobody is left to say otherwise...
    flushed = text

    site.start("worker", "inference_worker", "--no-warm-up")  # ...until a worker starts
    wait_until(
        lambda: _generation_rows(db_url)[0][0] != "streaming",
        timeout=60,
        interval=0.1,
        what="the new worker to mark the reply",
    )
    [(state, text, _)] = _generation_rows(db_url)
    assert state == "interrupted"
    assert text == flushed and text, "the text written before the crash was kept"


def test_it_keeps_the_text_when_the_worker_is_stopped(scaled_site) -> None:
    site, db_url = scaled_site
    site.start("worker", "inference_worker")
    site.serve()
    client, code = _sign_up_and_open_chat(site)

    async def start_reply_then_stop_worker() -> None:
        async with websockets.connect(
            f"ws://127.0.0.1:{site.port}/ws/conversations/{code}/",
            additional_headers={"Cookie": client.cookie_header(), "Origin": site.url},
        ) as socket:
            await socket.send(
                json.dumps({"type": "send", "text": "Keep going", "max_tokens": "2000"})
            )
            async with asyncio.timeout(60):
                while "beforeend:#reply-" not in str(await socket.recv()):
                    pass
            assert site.stop("worker", signal.SIGTERM) == 0

    asyncio.run(start_reply_then_stop_worker())
    [(state, text, tokens)] = _generation_rows(db_url)
    assert state == "interrupted"
    assert text and tokens > 0
