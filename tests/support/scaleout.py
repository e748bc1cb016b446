"""A scaled-out site for tests: a PostgreSQL database of its own and the Redis channel layer on
loopback, the tiny model in its models folder, and `manage.py` subprocesses against them."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
import redis
import websockets

from inference.registry import Beat, RedisRegistry
from tests.support.live import Browserless, Site, write_configs

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_URL = "redis://127.0.0.1:6379/14"


def registered_workers(url: str = REDIS_URL) -> list[Beat]:
    """The workers registered in the scaled site's Redis (inference.registry), by id."""
    return RedisRegistry(url, ttl_s=60).beats()


def forget_workers(url: str = REDIS_URL) -> None:
    """Empty the site's worker registry (as if every worker had been declared dead)."""
    client = redis.Redis.from_url(url)
    client.delete(RedisRegistry.IDS, *client.keys(f"{RedisRegistry.KEY_PREFIX}*"))


@contextmanager
def scaled_site(tmp_path: Path, tiny_model_dir: Path) -> Iterator[tuple[Site, str]]:
    """(the site, its database URL), migrated; every process it started is stopped and the
    database dropped at the end."""
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
        **{k: v for k, v in os.environ.items() if not k.startswith("MLXWEB_")},
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


def sign_up_and_open_chat(site: Site) -> tuple[Browserless, str]:
    client = Browserless(site.url)
    password = "a-long-pass-phrase"
    client.post("/signup/", {"username": "ada", "password1": password, "password2": password})
    url, _ = client.post("/c/new/", {"text": "", "model": "tiny"}, form_page="/")
    match = re.search(r"/c/([0-9a-f-]{36})/", url)
    assert match, url
    return client, match.group(1)


async def chat(
    site: Site, client: Browserless, code: str, text: str, until: str, **fields: str
) -> list[str]:
    """Send `text` (with the composer's other `fields`) over the conversation's socket; the
    frames received until one holds `until`."""
    frames: list[str] = []
    async with websockets.connect(
        f"ws://127.0.0.1:{site.port}/ws/conversations/{code}/",
        additional_headers={"Cookie": client.cookie_header(), "Origin": site.url},
    ) as socket:
        await socket.send(json.dumps({"type": "send", "text": text, **fields}))
        async with asyncio.timeout(120):
            while until not in "".join(frames):
                frames.append(str(await socket.recv()))
    return frames


def generation_rows(db_url: str) -> list[tuple[str, str, int]]:
    with psycopg.connect(db_url) as conn:
        return conn.execute(
            "SELECT state, text, completion_tokens FROM inference_generation ORDER BY id"
        ).fetchall()
