"""Queue limits, per-key concurrency, CORS and the HTTP counter, through the async client."""

from __future__ import annotations

from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.test import AsyncClient

from inference import services as inference
from inference.schemas import ChatMessage
from tests.api.conftest import DEFAULT_MODEL, Api, api_settings

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(60)]

HELLO = {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "Hi"}]}


def _limits(settings: Any, **changes: Any) -> None:
    config = settings.MLXWEB_CONFIG
    limits = config.server.limits.model_copy(update=changes)
    server = config.server.model_copy(update={"limits": limits})
    settings.MLXWEB_CONFIG = config.model_copy(update={"server": server})


async def test_a_full_queue_answers_503(api: Api, settings, stranger) -> None:  # type: ignore[no-untyped-def]
    _limits(settings, max_queued_replies=1)
    # Someone else's reply waits in the queue (no worker runs here to take it).
    params = await sync_to_async(inference.generation_params)(model_id=DEFAULT_MODEL)
    await sync_to_async(inference.generation_create)(
        model_id=DEFAULT_MODEL,
        messages=[ChatMessage(role="user", content="first")],
        params=params,
        user=stranger,
    )

    response = await api.post("/v1/chat/completions", HELLO)

    assert response.status_code == 503
    assert response["Retry-After"]
    assert response.json()["error"]["type"] == "server_error"


async def test_a_key_past_its_concurrent_generations_gets_429(api: Api, settings) -> None:  # type: ignore[no-untyped-def]
    api_settings(settings, max_concurrent_streams=2)

    response = await api.post("/v1/chat/completions", {**HELLO, "n": 3})

    assert response.status_code == 429
    assert response["Retry-After"] == "1"


async def test_cors_answers_configured_origins_only(api: Api, settings) -> None:  # type: ignore[no-untyped-def]
    api_settings(settings, cors_origins=("https://app.example",))
    client = AsyncClient()

    preflight = await client.options(
        "/v1/chat/completions",
        headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"},
    )
    allowed = await api.get("/v1/models", Origin="https://app.example")
    other = await api.get("/v1/models", Origin="https://evil.example")
    page = await client.get("/login/", headers={"Origin": "https://app.example"})

    assert preflight.status_code == 204
    assert preflight["Access-Control-Allow-Origin"] == "https://app.example"
    assert "Authorization" in preflight["Access-Control-Allow-Headers"]
    assert allowed["Access-Control-Allow-Origin"] == "https://app.example"
    assert "Access-Control-Allow-Origin" not in other
    assert "Access-Control-Allow-Origin" not in page


async def test_ollama_errors_have_ollamas_shape(api: Api) -> None:
    response = await api.post("/api/chat", {"model": "nope", "messages": []})

    assert response.status_code == 404
    assert response.json() == {"error": "model 'nope' not found"}


async def test_ollama_version_needs_no_key() -> None:
    response = await Api(None).get("/api/version")

    assert response.status_code == 200 and response.json()["version"]


async def test_the_openapi_document_is_served(api: Api) -> None:
    response = await Api(None).get("/v1/openapi.json")

    document = response.json()
    assert "/v1/chat/completions" in document["paths"]
    assert document["components"]["securitySchemes"]["ApiKeyAuth"]["scheme"] == "bearer"
