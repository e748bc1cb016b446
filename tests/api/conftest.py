"""API test fixtures: keys for the two users, the fake engine and the worker on the test loop."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import ThreadSensitiveContext
from django.conf import settings as django_settings
from django.contrib.auth.models import User
from django.core.cache import cache
from django.test import AsyncClient

from inference.api import services
from inference.services import model_fetch
from tests.chat.conftest import FakeEngine, fake_engine, running_worker  # noqa: F401
from tests.support.live import Site, api_site

DEFAULT_MODEL = "smollm2-135m-instruct"


@pytest.fixture(autouse=True)
def fresh_limits() -> None:
    """Rate-limit counters live in the cache; each test starts with none."""
    cache.clear()


@pytest.fixture
def owner_key(owner: User) -> str:
    return services.api_key_create(user=owner, name="laptop")[1]


@pytest.fixture
def stranger_key(stranger: User) -> str:
    return services.api_key_create(user=stranger, name="theirs")[1]


@pytest.fixture
def admin_key(admin_user: User) -> str:
    return services.api_key_create(user=admin_user, name="ops")[1]


def api_settings(settings: Any, **changes: Any) -> None:
    """Override keys of the config's `api` section for one test."""
    config = settings.MLXWEB_CONFIG
    api = config.server.api.model_copy(update=changes)
    server = config.server.model_copy(update={"api": api})
    settings.MLXWEB_CONFIG = config.model_copy(update={"server": server})


class Api:
    """An async client that sends a bearer key and JSON.

    Each request runs in its own ThreadSensitiveContext, as Django's ASGI handler runs it: the
    sync middleware (WhiteNoise) holds its thread for the whole request, and without a thread
    of its own that would be the one the worker's database calls need.
    """

    def __init__(self, key: str | None) -> None:
        self.client = AsyncClient()
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}

    async def get(self, path: str, **headers: str) -> Any:
        async with ThreadSensitiveContext():
            return await self.client.get(path, headers={**self.headers, **headers})

    async def post(self, path: str, body: Any, **headers: str) -> Any:
        async with ThreadSensitiveContext():
            return await self.client.post(
                path,
                data=json.dumps(body),
                content_type="application/json",
                headers={**self.headers, **headers},
            )

    async def delete(self, path: str, body: Any) -> Any:
        async with ThreadSensitiveContext():
            return await self.client.delete(
                path, data=json.dumps(body), content_type="application/json", headers=self.headers
            )


async def read_stream(response: Any) -> str:
    chunks = []
    async for chunk in response.streaming_content:
        chunks.append(chunk.decode() if isinstance(chunk, bytes) else chunk)
    return "".join(chunks)


def sse_events(text: str) -> list[Any]:
    events = []
    for block in text.split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


@pytest.fixture
def api(owner_key: str) -> Api:
    return Api(owner_key)


@pytest.fixture
async def engine_running(
    fake_engine: FakeEngine,  # noqa: F811
    running_worker: None,  # noqa: F811
) -> AsyncIterator[FakeEngine]:
    yield fake_engine


# --- a live server, shared by every live API test of the session ----------------------------

EMBED_MODEL = "all-minilm-l6-v2"
PASSWORD = "a-long-pass-phrase"


@dataclass
class LiveApi:
    """A running `manage.py serve` with the tiny model, the embedding model and three keys."""

    site: Site
    key: str  # ada's (not staff)
    other_key: str  # bob's
    staff_key: str  # root's

    @property
    def url(self) -> str:
        return self.site.url

    def db(self) -> sqlite3.Connection:
        return sqlite3.connect(self.site.env["MLXWEB_DATABASE_URL"].removeprefix("sqlite:///"))

    def new_key(self, user: str, name: str) -> str:
        return self.site.manage("api_keys", "create", "--user", user, "--name", name).split()[-1]


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    model = django_settings.MLXWEB_CONFIG.models[EMBED_MODEL]
    path = model_fetch(model=model, models_dir=django_settings.MLXWEB_MODELS_DIR)
    assert path is not None
    return path


@pytest.fixture(scope="session")
def live_api(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, minilm_dir: Path
) -> Iterator[LiveApi]:
    site = api_site(
        tmp_path_factory.mktemp("api-site"),
        tiny_model_dir=tiny_model_dir,
        embed_model=EMBED_MODEL,
        embed_dir=minilm_dir,
        users={"ada": False, "bob": False, "root": True},
        password=PASSWORD,
        env={
            "MLXWEB_SECRET_KEY": "api-test",
            # Short replies keep the suite fast; schemathesis and the concurrency test send many.
            "MLXWEB_MAX_NEW_TOKENS": "64",
            "MLXWEB_API_REQUESTS_PER_MINUTE": "100000",
            "MLXWEB_API_MAX_CONCURRENT_STREAMS": "16",
            "MLXWEB_MAX_QUEUED_REPLIES_PER_USER": "32",
        },
    )
    live = LiveApi(site=site, key="", other_key="", staff_key="")
    live.key = live.new_key("ada", "tests")
    live.other_key = live.new_key("bob", "tests")
    live.staff_key = live.new_key("root", "tests")
    site.serve()
    try:
        yield live
    finally:
        site.stop_all()
