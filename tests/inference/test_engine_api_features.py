"""The engine's API features on the tiny real model: logprobs, penalties, logit bias, raw
prompts, tools in the prompt, and constrained output inside a running batch."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from inference.engine import Engine, Finished, GenerationRequest
from inference.schemas import GenerationParams
from tests.inference import test_engine as base
from tests.inference.test_engine import QUESTION, Recorder, complete

# The engine fixtures of the engine's own tests.
make_engine = base.make_engine
engine = base.engine

pytestmark = pytest.mark.timeout(300)


def _tokens(recorder: Recorder) -> list[dict[str, Any]]:
    return [entry for delta in recorder.deltas for entry in (delta.logprobs or [])]


# --------------------------------------------------------------------------- logprobs


def test_it_streams_a_logprob_for_every_token_with_sorted_top_logprobs(engine: Engine) -> None:
    recorder = complete(engine, max_tokens=12, logprobs=True, top_logprobs=5)
    entries = _tokens(recorder)
    assert len(entries) == recorder.finished.completion_tokens
    # (The detokenizer drops the reply's leading space.)
    joined = b"".join(bytes(e["bytes"]) for e in entries).decode("utf-8", "replace")
    assert joined.strip() == recorder.text.strip()
    for entry in entries:
        top = entry["top_logprobs"]
        assert len(top) == 5
        values = [t["logprob"] for t in top]
        assert values == sorted(values, reverse=True)
        assert all(v <= 0 for v in values)
        # Greedy: the chosen token is the most likely one.
        assert entry["logprob"] == pytest.approx(values[0], abs=1e-5)
        assert entry["token"] == top[0]["token"]
        # Probabilities of the best five never add up to more than one.
        assert sum(2.718281828**v for v in values) <= 1.0 + 1e-4


def test_it_sends_no_logprobs_unless_asked(engine: Engine) -> None:
    recorder = complete(engine, max_tokens=6)
    assert all(d.logprobs is None for d in recorder.deltas)


def test_the_first_logprob_matches_a_direct_computation(
    engine: Engine, tiny_model_dir: Path
) -> None:
    import mlx.core as mx
    from mlx_lm import load

    recorder = complete(engine, max_tokens=2, logprobs=True, top_logprobs=1)
    first = _tokens(recorder)[0]

    model, tokenizer = load(str(tiny_model_dir))[:2]
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True)
    logits = model(mx.array(prompt)[None])[0, -1].astype(mx.float32)
    logprobs = logits - mx.logsumexp(logits)
    token = int(mx.argmax(logprobs).item())  # type: ignore[arg-type]
    assert first["bytes"] == list(tokenizer.decode([token]).encode())
    assert first["logprob"] == pytest.approx(float(logprobs[token].item()), abs=1e-3)


# --------------------------------------------------------------------------- penalties, bias


def test_a_logit_bias_against_the_greedy_token_changes_it(engine: Engine) -> None:
    plain = complete(engine, max_tokens=4, logprobs=True)
    first = _tokens(plain)[0]
    greedy_id = _token_id(engine, first)
    biased = complete(engine, max_tokens=4, logprobs=True, logit_bias={greedy_id: -100})
    assert _tokens(biased)[0]["bytes"] != first["bytes"]


def test_a_logit_bias_for_a_token_forces_it(engine: Engine) -> None:
    target = _token_id_of(engine, " Paris")
    recorder = complete(engine, max_tokens=3, logit_bias={target: 100})
    assert recorder.text.strip() == "Paris Paris Paris"


def test_it_refuses_a_logit_bias_outside_the_vocabulary(engine: Engine) -> None:
    recorder = complete(engine, logit_bias={10_000_000: 5})
    assert recorder.finished.finish_reason == "error"
    assert "logit_bias" in recorder.finished.error


def test_presence_and_frequency_penalties_change_a_repetitive_reply(engine: Engine) -> None:
    plain = complete(engine, max_tokens=40)
    penalized = complete(engine, max_tokens=40, frequency_penalty=2.0, presence_penalty=2.0)
    assert penalized.finished.finish_reason in ("max_tokens", "eos")
    assert penalized.text != plain.text
    # Greedy and penalized is still deterministic.
    again = complete(engine, max_tokens=40, frequency_penalty=2.0, presence_penalty=2.0)
    assert again.text == penalized.text


# --------------------------------------------------------------------------- prompts


def test_it_takes_a_raw_prompt_without_the_chat_template(engine: Engine) -> None:
    templated = complete(engine, max_tokens=4)
    raw = "The capital of France is"
    recorder = Recorder()
    params = GenerationParams(temperature=0.0, max_tokens=4)
    engine.submit(GenerationRequest("raw-1", "tiny", [], params, prompt_text=raw), recorder)
    recorder.wait()
    started = recorder.started
    assert started is not None
    assert started.prompt_tokens < templated.finished.prompt_tokens
    assert recorder.finished.finish_reason in ("max_tokens", "eos")


def test_it_puts_the_tools_into_the_prompt(engine: Engine) -> None:
    tools = [{"name": "get_weather", "description": "The weather", "parameters": {}}]
    plain = complete(engine, max_tokens=1)
    with_tools = complete(engine, max_tokens=1, tools=tools)
    assert with_tools.finished.prompt_tokens > plain.finished.prompt_tokens + 20
    unused = complete(engine, max_tokens=1, tools=tools, tool_choice="none")
    assert unused.finished.prompt_tokens == plain.finished.prompt_tokens


def test_it_renders_tool_calls_and_tool_results_of_earlier_turns(engine: Engine) -> None:
    tools = [{"name": "get_weather", "parameters": {"type": "object"}}]
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"id": "call_1", "name": "get_weather", "arguments": '{"c": 1}'}],
        },
        {"role": "tool", "content": "sunny", "tool_call_id": "call_1"},
    ]
    recorder = complete(engine, messages, max_tokens=2, tools=tools)
    assert recorder.finished.finish_reason in ("max_tokens", "eos")


# --------------------------------------------------------------------------- helpers


def _slot(engine: Engine) -> Any:
    return engine._slots["tiny"]


def _token_id(engine: Engine, entry: dict[str, Any]) -> int:
    tokenizer = _slot(engine).loaded.tokenizer
    ids = tokenizer.encode(bytes(entry["bytes"]).decode(), add_special_tokens=False)
    assert len(ids) == 1, ids
    return int(ids[0])


def _token_id_of(engine: Engine, text: str) -> int:
    complete(engine, max_tokens=1)  # loads the model
    ids = _slot(engine).loaded.tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == 1, ids
    return int(ids[0])


_ = (Callable, Finished, json, jsonschema)


# --------------------------------------------------------------------------- templates with tools


QWEN_LIKE = (
    "{% if tools %}<tools>{% for t in tools %}{{ t.function.name }};{% endfor %}</tools>{% endif %}"
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<call>{{ c.function.name }}:"
    "{{ c.function.arguments | tojson }}</call>{% endfor %}"
    "{% if m.tool_call_id %}[{{ m.tool_call_id }}]{% endif %}{% endfor %}<|assistant|>"
)


def test_a_template_that_renders_tools_gets_them_and_the_calls_as_values(
    tiny_model_dir: Path,
) -> None:
    from mlx_lm import load

    from inference.engine import _template, _template_messages, _template_renders_tools

    tokenizer = load(str(tiny_model_dir))[1]
    assert not _template_renders_tools(tokenizer)  # SmolLM2's ChatML ignores tools
    tokenizer._tokenizer.chat_template = QWEN_LIKE
    assert _template_renders_tools(tokenizer)

    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    stored: list[dict[str, Any]] = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"id": "c1", "name": "get_weather", "arguments": '{"city": "Paris"}'}],
        },
        {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
    ]
    messages = _template_messages(stored, tools=tools, native_tools=True, developer=False)
    assert messages[0]["role"] == "system"
    text = tokenizer.decode(_template(tokenizer, messages, tools))
    assert "<tools>get_weather;</tools>" in text
    assert '<call>get_weather:{"city": "Paris"}</call>' in text
    assert "<|tool|>sunny[c1]" in text


def test_a_template_without_tools_gets_them_in_the_system_message() -> None:
    from inference.engine import _template_messages

    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    stored: list[dict[str, Any]] = [
        {"role": "system", "content": "Be brief."},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "c", "name": "f"}]},
        {"role": "tool", "content": "42", "tool_call_id": "c"},
    ]
    messages = _template_messages(stored, tools=tools, native_tools=False, developer=False)
    assert messages[0]["content"].startswith("Be brief.\n\n")
    assert '"name": "f"' in messages[0]["content"] and "<tools>" in messages[0]["content"]
    assert messages[1] == {
        "role": "assistant",
        "content": '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>',
    }
    assert messages[2] == {"role": "user", "content": "<tool_response>\n42\n</tool_response>"}
