"""The composer's meter with the worker's exact counts: the probe travels the channel layer
to the worker, which asks its engine; the meter shows what came back, and the next prompt it
asks about is the one the send would build."""

from __future__ import annotations

import asyncio
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth.models import User
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from chat import meter, services
from chat.models import Conversation
from inference import services as inference
from inference import worker as inference_worker
from inference.models import Generation
from inference.schemas import ChatMessage, GenerationParams

MODEL = "smollm2-135m-instruct"


class ProbingEngine:
    """Answers probes from another thread, as the engine thread does."""

    alive = True

    def __init__(self) -> None:
        self.requests: list[Any] = []

    def probe(self, request: Any, reply: Any) -> None:
        self.requests.append(request)
        answer = {
            "loaded": True,
            "prompt_tokens": 40,
            "cached_tokens": 31,
            "cache_source": "disk",
            "trimmed_messages": 0,
        }
        threading.Thread(target=reply, args=(answer,), daemon=True).start()


@pytest.mark.django_db(transaction=True)
async def test_a_probe_goes_to_the_worker_and_back(
    running_worker: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = ProbingEngine()
    monkeypatch.setattr(inference_worker, "_engine", engine)
    answer = await inference.aprompt_probe(
        model_id="tiny",
        messages=[
            ChatMessage(role="system", content="Be brief."),
            ChatMessage(role="user", content="Hi"),
        ],
        params=GenerationParams(temperature=0.0),
    )
    assert answer == {
        "type": "cache.probe_result",
        "loaded": True,
        "prompt_tokens": 40,
        "cached_tokens": 31,
        "cache_source": "disk",
        "trimmed_messages": 0,
    }
    (request,) = engine.requests
    assert request.model_id == "tiny"
    assert request.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    ]


@pytest.mark.django_db(transaction=True)
async def test_a_bad_probe_or_no_engine_gets_an_answer_not_a_crash(
    running_worker: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(inference_worker, "_engine", None)
    answer = await inference.aprompt_probe(
        model_id="tiny",
        messages=[ChatMessage(role="user", content="Hi")],
        params=GenerationParams(),
    )
    assert answer == {"type": "cache.probe_result", "loaded": False}
    layer = inference_worker.get_channel_layer()
    reply = await layer.new_channel()
    await inference_worker._serve_probe(
        {"model_id": "tiny", "messages": "not a list", "reply_channel": reply}
    )
    assert await layer.receive(reply) == {
        "type": "cache.probe_result",
        "error": "messages must be a non-empty list",
    }


@pytest.fixture
def no_worker(monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setattr("inference.services._send", lambda ch, msg: None)


def test_the_meter_shows_the_workers_exact_counts(
    owner: User,
    owner_client: Client,
    models_root: Path,
    no_worker: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    conversation = Conversation.objects.create(
        user=owner, model_id=MODEL, system_prompt="Be brief."
    )
    _, reply = services.message_send(conversation=conversation, text="One")
    generation = reply.generation
    assert generation is not None
    started = timezone.now() - timedelta(seconds=3)
    generation.mark_streaming(
        started_at=started, prompt_tokens=1000, cached_tokens=0, trimmed_messages=0
    )
    generation.finish("eos", text="Uno.", content="Uno.", completion_tokens=150)
    type(generation).objects.filter(pk=generation.pk).update(
        first_token_at=started + timedelta(seconds=1)
    )
    monkeypatch.setattr(
        inference,
        "worker_status",
        lambda: inference.WorkerStatus(
            alive=True,
            loaded=[inference.LoadedModelInfo(model_id=MODEL, bytes=1, loaded_at=timezone.now())],
        ),
    )
    asked: list[list[ChatMessage]] = []

    async def probe(*, model_id: str, messages: list[ChatMessage], params: Any) -> dict[str, Any]:
        asked.append(messages)
        return {
            "type": "cache.probe_result",
            "loaded": True,
            "prompt_tokens": 1190,
            "cached_tokens": 1150,
            "cache_source": "memory",
            "trimmed_messages": 0,
        }

    monkeypatch.setattr(inference, "aprompt_probe", probe)
    response = owner_client.post(
        reverse("chat:meter", args=[conversation.code]), {"text": "Two", "model": MODEL}
    )
    body = response.content.decode()
    assert "1,150 of 1,190 prompt tokens are in the prompt cache; 40 to compute" in body
    # 1,000 tokens in 1 s measured: 40 tokens take 0.04 s.
    assert "first token in about 0.0 s" in body
    assert "Counted by the worker" in body and "estimated" not in body
    (messages,) = asked
    assert [(m.role, m.content) for m in messages] == [
        ("system", "Be brief."),
        ("user", "One"),
        ("assistant", "Uno."),
        ("user", "Two"),
    ]


async def _finished(generation_id: int, timeout: float = 120) -> Generation:
    async with asyncio.timeout(timeout):
        while True:
            generation = await Generation.objects.aget(pk=generation_id)
            if not generation.is_active:
                return generation
            await asyncio.sleep(0.05)


@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(300)
async def test_through_the_real_engine_the_meter_predicts_the_next_turn(
    owner: User, tiny: str, real_engine: None, running_worker: None
) -> None:
    conversation = await Conversation.objects.acreate(
        user=owner, model_id=tiny, system_prompt="You are terse."
    )
    greedy = {"temperature": 0.0, "max_tokens": 8}
    _, reply = await sync_to_async(services.message_send)(
        conversation=conversation, text="Hello there", params=greedy
    )
    assert reply.generation is not None
    first = await _finished(reply.generation.pk)
    assert first.state == "complete", first.error
    await inference_worker.WorkerRuntime.current().write_heartbeat()  # not in up to 5 s
    await conversation.arefresh_from_db()
    reading = await meter.aconversation_meter(conversation, text="And then?")
    assert reading.probed and reading.loaded
    assert reading.used == first.prompt_tokens + first.completion_tokens
    assert reading.cached > 0
    # What the next turn then gets is what the meter said.
    _, second_reply = await sync_to_async(services.message_send)(
        conversation=conversation, text="And then?", params=greedy
    )
    assert second_reply.generation is not None
    second = await _finished(second_reply.generation.pk)
    assert second.prompt_tokens == reading.next_prompt
    assert second.cached_tokens == reading.cached
