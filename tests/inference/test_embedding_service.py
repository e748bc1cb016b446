"""`inference.services.embed` / `aembed`: through the in-memory channel layer to the inference
worker, whose engine thread computes the vectors with the real all-MiniLM-L6-v2."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings as django_settings
from prometheus_client import REGISTRY

from inference import services
from inference.catalogue import ModelUnavailable, UnknownModel
from inference.schemas import ChatMessage, GenerationParams
from tests.inference.conftest import MINILM_ID
from tests.support.worker import in_process_worker

pytestmark = pytest.mark.timeout(120)

REFERENCE = json.loads(Path(__file__).with_name("minilm_reference.json").read_text())


@pytest.fixture
async def running_worker(minilm_models_root: Path, transactional_db: None) -> AsyncIterator[None]:
    """The inference worker on this test's event loop, with a fresh engine on its catalogue
    (and the database, where it writes its heartbeat)."""
    async with in_process_worker():
        yield


def _served() -> float:
    value = REGISTRY.get_sample_value("mlxweb_embedding_requests_total", {"model": MINILM_ID})
    return value or 0.0


async def test_it_embeds_through_the_worker(running_worker: None) -> None:
    items = REFERENCE["items"]
    before = _served()

    result = await services.aembed(model_id=MINILM_ID, texts=[item["text"] for item in items])

    assert result.model_id == MINILM_ID
    assert result.prompt_tokens == sum(item["tokens"] for item in items)
    for item, vector in zip(items, result.vectors, strict=True):
        v, r = np.asarray(vector), np.asarray(item["vector"])
        assert float(v @ r / (np.linalg.norm(v) * np.linalg.norm(r))) >= 0.999
    assert _served() == before + 1


async def test_the_sync_service_waits_for_the_worker(running_worker: None) -> None:
    # From a thread of the server's loop, as a synchronous view calls it (Django gives each
    # request its own thread-sensitive context; the worker's own database calls use the shared
    # one, which this thread must not hold while it waits).
    embed = sync_to_async(services.embed, thread_sensitive=False)
    result = await embed(model_id=MINILM_ID, texts=["Hi", "there"])
    assert len(result.vectors) == 2 and result.prompt_tokens == 3 + 3


async def test_it_refuses_a_malformed_request_put_on_the_channel(running_worker: None) -> None:
    layer = get_channel_layer()
    assert layer is not None
    reply = await layer.new_channel()
    await layer.send(
        django_settings.INFERENCE_CHANNEL,
        {"type": "embedding.request", "model_id": MINILM_ID, "texts": "x", "reply_channel": reply},
    )
    answer = await asyncio.wait_for(layer.receive(reply), 30)
    assert answer["type"] == "embedding.error" and answer["kind"] == "invalid"


async def test_the_engine_refusal_comes_back_as_the_service_error(running_worker: None) -> None:
    # Past the service's own checks (as if the model vanished): the worker's kind is mapped.
    layer = get_channel_layer()
    assert layer is not None
    reply = await layer.new_channel()
    await layer.send(
        django_settings.INFERENCE_CHANNEL,
        {"type": "embedding.request", "model_id": "nope", "texts": ["x"], "reply_channel": reply},
    )
    answer = await asyncio.wait_for(layer.receive(reply), 30)
    assert (answer["type"], answer["kind"]) == ("embedding.error", "unknown_model")


@pytest.mark.parametrize(
    ("model_id", "texts", "error"),
    [
        ("no-such-model", ["x"], UnknownModel),
        ("smollm2-135m-instruct", ["x"], services.NotAnEmbeddingModel),
        (MINILM_ID, ["x"] * 257, services.EmbeddingInputTooLarge),
        (MINILM_ID, ["x" * 100_001], services.EmbeddingInputTooLarge),
        (MINILM_ID, [], ValueError),
    ],
)
def test_it_refuses_requests_before_they_reach_the_worker(
    minilm_models_root: Path, model_id: str, texts: list[str], error: type[Exception]
) -> None:
    with pytest.raises(error):
        services.embed(model_id=model_id, texts=texts)


def test_it_says_when_the_embedding_model_is_not_on_this_machine(models_root: Path) -> None:
    with pytest.raises(ModelUnavailable, match="not on this machine"):
        services.embed(model_id=MINILM_ID, texts=["x"])


def test_the_catalogue_lists_models_by_task(minilm_models_root: Path) -> None:
    assert [s.id for s in services.model_list(task="embed")] == [MINILM_ID]
    assert MINILM_ID not in {s.id for s in services.model_list(task="generate")}


def test_a_generation_with_an_embedding_model_is_refused(minilm_models_root: Path, db) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(services.NotAGenerationModel, match="embedding model"):
        services.generation_create(
            model_id=MINILM_ID,
            messages=[ChatMessage(role="user", content="hi")],
            params=GenerationParams(),
        )
