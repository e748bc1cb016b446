"""Ollama's `keep_alive` on /api/chat, /api/generate and /api/embed, through the real worker
and engine on the tiny model; `/api/ps` and `/health` say when a model expires."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.test import AsyncClient

from inference import services
from tests.api.conftest import Api
from tests.support.worker import in_process_worker

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(120)]


@pytest.fixture
async def worker(tiny: str) -> AsyncIterator[None]:
    async with in_process_worker():
        yield


async def _ps(api: Api) -> dict[str, dict[str, Any]]:
    response = await api.get("/api/ps")
    assert response.status_code == 200
    return {model["model"]: model for model in response.json()["models"]}


async def _wait_unloaded(api: Api, model: str, timeout: float = 30) -> None:
    """Until /api/ps no longer lists `model` (the heartbeat is written every few seconds)."""
    async with asyncio.timeout(timeout):
        while model in await _ps(api):
            await asyncio.sleep(0.2)


async def test_a_request_without_a_prompt_loads_the_model_until_it_expires(
    worker: None, api: Api
) -> None:
    before = datetime.now(UTC)

    response = await api.post("/api/generate", {"model": "tiny", "keep_alive": "10m"})

    assert response.status_code == 200
    assert response.json()["done_reason"] == "load"
    expires = datetime.fromisoformat((await _ps(api))["tiny"]["expires_at"])
    assert before + timedelta(minutes=10) <= expires <= datetime.now(UTC) + timedelta(minutes=10)
    health = await AsyncClient().get("/health")
    [model] = health.json()["models"]
    assert model["id"] == "tiny"
    # JSON dates there are to the millisecond.
    assert abs(datetime.fromisoformat(model["expires_at"]) - expires) < timedelta(milliseconds=1)


async def test_keep_alive_zero_without_messages_unloads_the_model(worker: None, api: Api) -> None:
    await api.post("/api/chat", {"model": "tiny", "messages": [], "keep_alive": -1})
    assert (await _ps(api))["tiny"]["expires_at"] == "0001-01-01T00:00:00Z"  # kept

    response = await api.post("/api/chat", {"model": "tiny", "messages": [], "keep_alive": 0})

    assert response.status_code == 200
    body = response.json()
    assert body["done"] and body["done_reason"] == "unload"
    assert "tiny" not in await _ps(api)


async def test_keep_alive_zero_unloads_the_model_after_the_reply(worker: None, api: Api) -> None:
    response = await api.post(
        "/api/generate",
        {
            "model": "tiny",
            "prompt": "Hi",
            "stream": False,
            "keep_alive": 0,
            "options": {"num_predict": 4},
        },
    )

    assert response.status_code == 200 and response.json()["eval_count"] > 0
    await _wait_unloaded(api, "tiny")
    status = await sync_to_async(services.worker_status)()
    assert "tiny" not in {model.model_id for model in status.loaded}


async def test_a_request_with_a_keep_alive_sets_when_the_model_expires(
    worker: None, api: Api
) -> None:
    response = await api.post(
        "/api/chat",
        {
            "model": "tiny",
            "messages": [{"role": "user", "content": "Hi"}],
            "stream": False,
            "keep_alive": "1h",
            "options": {"num_predict": 2},
        },
    )
    assert response.status_code == 200

    async with asyncio.timeout(30):  # the model's clock starts once the reply is done
        while (await _ps(api)).get("tiny", {}).get("expires_at", "0001").startswith("0001"):
            await asyncio.sleep(0.2)
    expires = datetime.fromisoformat((await _ps(api))["tiny"]["expires_at"])
    assert timedelta(minutes=59) < expires - datetime.now(UTC) <= timedelta(hours=1)


@pytest.mark.parametrize("value", ["soon", "5 minutes", "1e999"])
async def test_a_keep_alive_that_is_not_a_duration_is_a_400(
    worker: None, api: Api, value: str
) -> None:
    response = await api.post("/api/generate", {"model": "tiny", "keep_alive": value})

    assert response.status_code == 400
    assert "keep_alive" in response.json()["error"]


async def test_an_unknown_model_is_a_404(worker: None, api: Api) -> None:
    response = await api.post("/api/generate", {"model": "nope", "keep_alive": 0})

    assert response.status_code == 404
