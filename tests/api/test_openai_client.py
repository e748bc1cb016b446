"""The official `openai` client against a live server: the tiny model, the embedding model."""

from __future__ import annotations

import json
import math
from typing import Any

import jsonschema
import openai
import pytest

from tests.api.conftest import EMBED_MODEL, LiveApi

pytestmark = [pytest.mark.timeout(300)]

# Typed loosely: the client's TypedDict parameters are not what these tests are about.
HELLO: Any = [{"role": "user", "content": "Say hello"}]


@pytest.fixture(scope="module")
def client(live_api: LiveApi) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live_api.url}/v1", api_key=live_api.key, max_retries=0)


def test_it_answers_and_streams_the_same_text(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(model="tiny", messages=HELLO, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=HELLO,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )

    text = answer.choices[0].message.content
    assert text
    assert answer.choices[0].finish_reason in {"stop", "length"}
    assert answer.usage is not None and answer.usage.completion_tokens > 0
    assert answer.usage.prompt_tokens_details is not None
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == answer.usage.completion_tokens


def test_the_second_turn_reads_the_prompt_cache(client: openai.OpenAI) -> None:
    history: Any = [{"role": "system", "content": "You are terse. " * 20}, *HELLO]
    first = client.chat.completions.create(model="tiny", messages=history, temperature=0)
    history += [
        {"role": "assistant", "content": first.choices[0].message.content or ""},
        {"role": "user", "content": "Again"},
    ]
    second = client.chat.completions.create(model="tiny", messages=history, temperature=0)

    assert second.usage is not None and second.usage.prompt_tokens_details is not None
    assert (second.usage.prompt_tokens_details.cached_tokens or 0) > 0


def test_it_gives_logprobs_streamed_and_not(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model="tiny", messages=HELLO, temperature=0, logprobs=True, top_logprobs=2, max_tokens=6
    )
    chunks: Any = list(
        client.chat.completions.create(
            model="tiny",
            messages=HELLO,
            temperature=0,
            logprobs=True,
            top_logprobs=2,
            max_tokens=6,
            stream=True,
        )
    )

    logprobs = answer.choices[0].logprobs
    assert logprobs is not None and logprobs.content
    assert all(len(item.top_logprobs) == 2 and item.logprob <= 0 for item in logprobs.content)
    # Greedy: the chosen token is the most likely one.
    assert all(item.token == item.top_logprobs[0].token for item in logprobs.content)
    streamed = [
        item.token
        for c in chunks
        if c.choices and c.choices[0].logprobs is not None
        for item in c.choices[0].logprobs.content or []
    ]
    assert streamed == [item.token for item in logprobs.content]


SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "n": {"type": "integer", "minimum": 0, "maximum": 9},
        "color": {"enum": ["red", "green"]},
    },
    "required": ["ok", "n", "color"],
    "additionalProperties": False,
}


def test_json_schema_output_validates(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "A JSON object please"}],
        max_tokens=24,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True},
        },
    )

    jsonschema.validate(json.loads(answer.choices[0].message.content or ""), SCHEMA)


WEATHER: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Paris", "Oslo"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


def test_a_tool_call_round_trip(client: openai.OpenAI) -> None:
    messages: Any = [{"role": "user", "content": "Weather in Paris?"}]
    answer = client.chat.completions.create(
        model="tiny",
        messages=messages,
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=64,
    )

    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls or []
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    assert json.loads(call.function.arguments)["city"] in {"Paris", "Oslo"}  # type: ignore[union-attr]

    messages += [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'},
    ]
    follow_up = client.chat.completions.create(
        model="tiny",
        messages=messages,
        tools=[WEATHER],
        tool_choice="none",
        max_tokens=8,
    )
    assert follow_up.choices[0].message.content


def test_completions_take_a_raw_prompt(client: openai.OpenAI) -> None:
    answer = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=5)
    streamed = list(
        client.completions.create(
            model="tiny", prompt="Once upon a time", max_tokens=5, stream=True
        )
    )

    assert answer.choices[0].text
    assert "".join(c.choices[0].text for c in streamed if c.choices) == answer.choices[0].text


def test_embeddings(client: openai.OpenAI) -> None:
    result = client.embeddings.create(model=EMBED_MODEL, input=["a cat", "a dog"])
    plain = client.embeddings.create(model=EMBED_MODEL, input="a cat", encoding_format="float")

    assert [len(item.embedding) for item in result.data] == [384, 384]
    assert math.isclose(sum(x * x for x in result.data[0].embedding), 1.0, rel_tol=1e-3)
    assert plain.data[0].embedding == pytest.approx(result.data[0].embedding, abs=1e-5)
    assert result.usage.prompt_tokens > 0


def test_models_say_what_they_do(client: openai.OpenAI) -> None:
    models = {m.id: m for m in client.models.list()}

    assert models["tiny"].task == "generate"  # type: ignore[attr-defined]
    assert models[EMBED_MODEL].task == "embed"  # type: ignore[attr-defined]
    assert client.models.retrieve("tiny").id == "tiny"


def test_errors_have_openais_shape_and_status(live_api: LiveApi, client: openai.OpenAI) -> None:
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{live_api.url}/v1", api_key="nope", max_retries=0).models.list()
    revoked = live_api.new_key("ada", "short-lived")
    live_api.site.manage("api_keys", "revoke", revoked)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{live_api.url}/v1", api_key=revoked, max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=HELLO)
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="tiny", messages=HELLO, top_p=3)
    assert bad.value.param == "top_p"  # type: ignore[attr-defined]
    with pytest.raises(openai.BadRequestError) as wrong_kind:
        client.chat.completions.create(model=EMBED_MODEL, messages=HELLO)
    assert wrong_kind.value.status_code == 400
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="tiny", input="text")


def test_a_big_body_with_a_key_is_allowed_and_without_refused(
    live_api: LiveApi, client: openai.OpenAI
) -> None:
    text = "word " * 20_000  # 100 KB: over the anonymous limit, under the signed-in one
    answer = client.embeddings.create(model=EMBED_MODEL, input=text[:90_000])
    assert len(answer.data) == 1
    anonymous = openai.OpenAI(base_url=f"{live_api.url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.APIStatusError) as refused:
        anonymous.embeddings.create(model=EMBED_MODEL, input=text)
    assert refused.value.status_code == 413
