"""The API's generation features through the real worker and engine, on the tiny model: what
the group hears, what the row records, the queue limit, the worker's status and metrics."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from prometheus_client import REGISTRY

from inference import services
from inference import worker as inference_worker
from inference.models import Generation, PromptMessage
from inference.schemas import ChatMessage, GenerationParams
from tests.support.worker import in_process_worker

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(300)]

WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12}},
        "required": ["city"],
        "additionalProperties": False,
    },
}


@pytest.fixture
async def worker(tiny: str) -> AsyncIterator[None]:
    async with in_process_worker():
        yield


def _limits(settings: Any, **changes: Any) -> None:
    config = settings.MLXWEB_CONFIG
    limits = config.server.limits.model_copy(update=changes)
    server = config.server.model_copy(update={"limits": limits})
    settings.MLXWEB_CONFIG = config.model_copy(update={"server": server})


async def _generate(
    text: str = "What is the weather in Paris?",
    prompt_text: str | None = None,
    model_id: str = "tiny",
    **params: Any,
) -> tuple[Generation, list[dict[str, Any]]]:
    """Create a generation, collect its group's messages until done, return the row."""
    layer = get_channel_layer()
    assert layer is not None
    channel = await layer.new_channel()
    group = f"test-{channel.rsplit('!', 1)[-1]}"
    await layer.group_add(group, channel)
    messages = [] if prompt_text is not None else [ChatMessage(role="user", content=text)]
    generation = await sync_to_async(services.generation_create)(
        model_id=model_id,
        messages=messages,
        params=GenerationParams.model_validate({"temperature": 0.0, **params}),
        notify_group=group,
        prompt_text=prompt_text,
    )
    heard = []
    async with asyncio.timeout(240):
        while True:
            message = await layer.receive(channel)
            heard.append(message)
            if message["type"] == "generation.done":
                break
    return await Generation.objects.aget(pk=generation.pk), heard


def _deltas(heard: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m for m in heard if m["type"] == "generation.delta"]


async def test_a_forced_tool_call_is_recorded_as_a_call_and_never_streamed(worker) -> None:
    row, heard = await _generate(max_tokens=120, tools=[WEATHER], tool_choice="get_weather")
    assert row.finish_reason == Generation.FinishReason.TOOL_CALLS
    assert row.state == Generation.State.COMPLETE
    [call] = row.tool_calls
    assert call["name"] == "get_weather"
    jsonschema.validate(json.loads(call["arguments"]), WEATHER["parameters"])
    assert row.content == ""
    assert "<tool_call>" in row.text
    assert not any("tool_call" in m["text"] for m in _deltas(heard))


async def test_the_tool_result_goes_back_in_the_next_turn(worker) -> None:
    first, _ = await _generate(max_tokens=120, tools=[WEATHER], tool_choice="required")
    [call] = first.tool_calls
    messages = [ChatMessage(role="tool", content='{"sky": "clear"}', tool_call_id=call["id"])]
    second = await sync_to_async(services.generation_create)(
        model_id="tiny",
        messages=messages,
        params=GenerationParams(temperature=0.0, max_tokens=4, tools=[WEATHER]),
        previous=first,
    )
    prompt = await sync_to_async(second.prompt_messages)()
    assert [m["role"] for m in prompt] == ["user", "assistant", "tool"]
    assert prompt[1]["tool_calls"] == first.tool_calls
    assert prompt[2]["tool_call_id"] == call["id"]


async def test_a_json_schema_reply_validates(worker) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 10}, "rain": {"type": "boolean"}},
        "required": ["city", "rain"],
        "additionalProperties": False,
    }
    row, heard = await _generate(
        max_tokens=100, response_format={"type": "json_schema", "json_schema": schema}
    )
    assert row.finish_reason == "eos"
    jsonschema.validate(json.loads(row.content), schema)
    assert all(m["channel"] == "content" for m in _deltas(heard))


async def test_deltas_carry_logprobs_when_asked(worker) -> None:
    row, heard = await _generate(max_tokens=8, logprobs=True, top_logprobs=3)
    entries = [e for m in _deltas(heard) for e in m["logprobs"]]
    assert len(entries) == row.completion_tokens
    assert all(len(e["top_logprobs"]) == 3 for e in entries)
    plain, heard = await _generate(max_tokens=4)
    assert not any("logprobs" in m for m in _deltas(heard))


async def test_a_raw_prompt_is_stored_as_one_raw_message_and_generated(worker) -> None:
    row, _ = await _generate(prompt_text="Once upon a time", max_tokens=5)
    assert row.state == Generation.State.COMPLETE
    assert await sync_to_async(row.prompt_messages)() == [
        {"role": PromptMessage.Role.RAW, "content": "Once upon a time"}
    ]
    assert row.text


async def test_worker_status_and_metrics_move_after_a_generation(worker) -> None:
    def sample(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    before = sample("mlxweb_generation_requests_total", model="tiny", finish_reason="max_tokens")
    tokens_before = sample("mlxweb_completion_tokens_total", model="tiny")
    ttft_before = sample("mlxweb_ttft_seconds_count", model="tiny")
    row, _ = await _generate(max_tokens=6)
    assert row.finish_reason == "max_tokens"
    after = sample("mlxweb_generation_requests_total", model="tiny", finish_reason="max_tokens")
    assert after == before + 1
    assert sample("mlxweb_completion_tokens_total", model="tiny") == tokens_before + 6
    assert sample("mlxweb_ttft_seconds_count", model="tiny") == ttft_before + 1
    assert sample("mlxweb_prompt_tokens_total", model="tiny") >= row.prompt_tokens
    assert sample("mlxweb_model_loads_total", model="tiny") >= 1

    runtime = inference_worker.WorkerRuntime.current()
    await runtime.write_heartbeat()
    status = await sync_to_async(services.worker_status)()
    assert status.alive
    assert status.worker_id == inference_worker.WORKER_ID
    assert [m.model_id for m in status.loaded] == ["tiny"]
    assert status.loaded[0].bytes > 0
    assert (status.queued, status.streaming) == (0, 0)


def test_worker_status_says_dead_without_a_recent_heartbeat(db) -> None:
    from datetime import timedelta

    from django.utils import timezone

    from inference.models import WorkerHeartbeat

    assert services.worker_status().alive is False
    WorkerHeartbeat.objects.create(
        worker_id="gone", updated_at=timezone.now() - timedelta(seconds=60)
    )
    status = services.worker_status()
    assert (status.alive, status.worker_id) == (False, "gone")


def test_it_refuses_a_reply_when_the_queue_is_full(tiny: str, settings) -> None:
    _limits(settings, max_queued_replies=2)
    params = GenerationParams(max_tokens=4)
    for _ in range(2):  # no worker: they stay queued
        services.generation_create(
            model_id="tiny", messages=[ChatMessage(role="user", content="hi")], params=params
        )
    with pytest.raises(services.GenerationQueueFull, match="limit is 2"):
        services.generation_create(
            model_id="tiny", messages=[ChatMessage(role="user", content="hi")], params=params
        )
    assert Generation.objects.count() == 2


def test_a_raw_prompt_takes_no_messages(tiny: str) -> None:
    with pytest.raises(ValueError, match="raw"):
        services.generation_create(
            model_id="tiny",
            messages=[ChatMessage(role="user", content="hi")],
            params=GenerationParams(),
            prompt_text="hello",
        )


# --------------------------------------------------------------------------- the default model

DEFAULT = "smollm2-135m-instruct"


@pytest.fixture
async def default_worker(smollm2_models_root: Path) -> AsyncIterator[None]:
    async with in_process_worker():
        yield


@pytest.mark.slow
async def test_the_default_model_calls_the_forced_tool_with_the_city(default_worker) -> None:
    row, _ = await _generate(
        "What is the weather like in Paris today?",
        model_id=DEFAULT,
        max_tokens=60,
        tools=[WEATHER],
        tool_choice="required",
    )
    assert row.finish_reason == Generation.FinishReason.TOOL_CALLS, row.text
    [call] = row.tool_calls
    arguments = json.loads(call["arguments"])
    jsonschema.validate(arguments, WEATHER["parameters"])
    assert "Paris" in arguments["city"]
    assert set(arguments) == {"city"}  # no made-up keys


@pytest.mark.slow
async def test_the_default_model_answers_in_the_schema(default_worker) -> None:
    schema = {
        "type": "object",
        "properties": {
            "country": {"type": "string", "maxLength": 20},
            "capital": {"type": "string", "maxLength": 20},
        },
        "required": ["country", "capital"],
        "additionalProperties": False,
    }
    row, _ = await _generate(
        "What is the capital of France? Answer in JSON.",
        model_id=DEFAULT,
        max_tokens=60,
        response_format={"type": "json_schema", "json_schema": schema},
    )
    assert row.finish_reason == "eos", row.text
    answer = json.loads(row.content)
    jsonschema.validate(answer, schema)
    assert "Paris" in answer["capital"]


@pytest.mark.slow
async def test_a_raw_completion_keeps_the_space_that_continues_the_prompt(default_worker) -> None:
    row, heard = await _generate(
        prompt_text="The capital of France is", model_id=DEFAULT, max_tokens=6
    )
    assert row.text.startswith(" "), row.text
    assert "".join(m["text"] for m in _deltas(heard)) == row.text
