"""POST /v1/chat/completions through the worker with the fake engine (fast, no model)."""

from __future__ import annotations

import asyncio

import pytest

from inference.models import Generation
from tests.api.conftest import DEFAULT_MODEL, Api, read_stream, sse_events

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(60)]

HELLO = {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "Hi"}]}


async def test_it_answers_a_chat_completion(api: Api, engine_running, owner) -> None:
    response = await api.post("/v1/chat/completions", HELLO)

    assert response.status_code == 200, response.content
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {
        "role": "assistant",
        "content": "Hello there, friend.",
        "reasoning_content": None,
        "tool_calls": None,
    }
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == 5
    assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    generation = await Generation.objects.aget()
    assert generation.user_id == owner.pk
    assert body["id"] == f"chatcmpl-{generation.code.hex}"


async def test_it_streams_chunks_then_usage_then_done(api: Api, engine_running) -> None:
    body = {**HELLO, "stream": True, "stream_options": {"include_usage": True}}
    response = await api.post("/v1/chat/completions", body)

    assert response.status_code == 200
    assert response["Content-Type"] == "text/event-stream"
    events = sse_events(await read_stream(response))
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "Hello there, friend."
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finish[-1] == "stop"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 5


async def test_it_runs_n_choices(api: Api, engine_running) -> None:
    response = await api.post("/v1/chat/completions", {**HELLO, "n": 3})

    assert response.status_code == 200
    choices = response.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    assert {c["message"]["content"] for c in choices} == {"Hello there, friend."}
    assert await Generation.objects.acount() == 3


async def test_it_refuses_too_many_choices(api: Api) -> None:
    response = await api.post("/v1/chat/completions", {**HELLO, "n": 99})

    assert response.status_code == 400
    assert response.json()["error"]["param"] == "n"


async def test_it_names_a_bad_parameter(api: Api) -> None:
    response = await api.post("/v1/chat/completions", {**HELLO, "temperature": 7})

    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "temperature"
    assert error["type"] == "invalid_request_error"
    assert "temperature" in error["message"]


async def test_it_names_a_missing_parameter(api: Api) -> None:
    response = await api.post("/v1/chat/completions", {"model": DEFAULT_MODEL})

    assert response.status_code == 400
    assert response.json()["error"]["param"] == "messages"


async def test_it_names_max_completion_tokens(api: Api) -> None:
    response = await api.post("/v1/chat/completions", {**HELLO, "max_completion_tokens": 0})

    assert response.status_code == 400
    assert response.json()["error"]["param"] == "max_completion_tokens"


async def test_it_answers_404_for_an_unknown_model(api: Api) -> None:
    response = await api.post("/v1/chat/completions", {**HELLO, "model": "nope"})

    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"


async def test_it_refuses_a_request_without_a_key() -> None:
    response = await Api(None).post("/v1/chat/completions", HELLO)

    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"


async def test_it_refuses_the_wrong_method(api: Api) -> None:
    response = await api.get("/v1/chat/completions")

    assert response.status_code == 405


async def test_it_stops_the_generation_when_the_client_goes_away(api: Api, engine_running) -> None:
    engine_running.pause_after = 1
    response = await api.post("/v1/chat/completions", {**HELLO, "stream": True})
    first_word = asyncio.Event()

    async def consume() -> None:
        async for chunk in response.streaming_content:
            if b"Hello" in chunk:
                first_word.set()

    # What Django's ASGI handler does when the client disconnects: cancel the response task,
    # here while it waits for the next word.
    task = asyncio.create_task(consume())
    await asyncio.wait_for(first_word.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    engine_running.gate.set()

    generation = await Generation.objects.aget()
    for _ in range(200):
        await generation.arefresh_from_db()
        if not generation.is_active:
            break
        await asyncio.sleep(0.05)
    assert generation.state == Generation.State.STOPPED
