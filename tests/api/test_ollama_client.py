"""The official `ollama` client against the live server."""

from __future__ import annotations

import json

import jsonschema
import ollama
import pytest

from tests.api.conftest import EMBED_MODEL, LiveApi
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def client(live_api: LiveApi) -> ollama.Client:
    return ollama.Client(host=live_api.url, headers={"Authorization": f"Bearer {live_api.key}"})


def test_chat_streamed_and_not_gives_the_same_text(client: ollama.Client) -> None:
    messages = [{"role": "user", "content": "Say hello"}]
    answer = client.chat(model="tiny", messages=messages, options={"temperature": 0})
    parts = list(
        client.chat(model="tiny", messages=messages, options={"temperature": 0}, stream=True)
    )

    assert answer.message.content
    assert "".join(p.message.content or "" for p in parts) == answer.message.content
    final = parts[-1]
    assert final.done and final.done_reason in {"stop", "length"}
    assert final.eval_count == answer.eval_count and (answer.eval_count or 0) > 0
    assert (answer.prompt_eval_count or 0) > 0
    assert (answer.total_duration or 0) >= (answer.eval_duration or 0) > 0


def test_num_predict_bounds_the_reply(client: ollama.Client) -> None:
    answer = client.generate(model="tiny", prompt="Count", options={"num_predict": 3})

    assert answer.eval_count == 3 and answer.done_reason == "length"


def test_generate_streams_and_takes_raw_prompts(client: ollama.Client) -> None:
    parts = list(client.generate(model="tiny", prompt="Once upon", raw=True, stream=True))

    assert "".join(p.response or "" for p in parts)
    assert parts[-1].done


def test_format_takes_a_schema(client: ollama.Client) -> None:
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    answer = client.chat(
        model="tiny", messages=[{"role": "user", "content": "JSON"}], format=schema
    )

    jsonschema.validate(json.loads(answer.message.content or ""), schema)


def test_models_tags_show_ps_and_version(client: ollama.Client) -> None:
    client.generate(model="tiny", prompt="warm up", options={"num_predict": 1})

    assert {m.model for m in client.list().models} >= {"tiny", EMBED_MODEL}
    assert "completion" in (client.show("tiny").capabilities or [])
    # The worker reports what it has loaded with its heartbeat, every few seconds.
    wait_until(
        lambda: "tiny" in {m.model for m in client.ps().models},
        timeout=20,
        interval=0.5,
        what="/api/ps to list the loaded model",
    )
    with pytest.raises(ollama.ResponseError) as missing:
        client.show("no-such-model")
    assert missing.value.status_code == 404


def test_embed(client: ollama.Client) -> None:
    result = client.embed(model=EMBED_MODEL, input=["a cat", "a dog"])

    assert [len(v) for v in result.embeddings] == [384, 384]


def test_a_key_is_needed(live_api: LiveApi) -> None:
    with pytest.raises(ollama.ResponseError) as refused:
        ollama.Client(host=live_api.url).chat(model="tiny", messages=[])
    assert refused.value.status_code == 401


def test_keep_alive_is_accepted(client: ollama.Client) -> None:
    answer = client.generate(
        model="tiny", prompt="hi", keep_alive="10m", options={"num_predict": 1}
    )

    assert answer.done
