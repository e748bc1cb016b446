"""tool_choice "auto" on the tiny real model: the text stays free, and a call, once the model opens
one, is constrained to the tools' schemas, inside a batch shared with a free request."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from transformers import AutoTokenizer

from inference import constraints
from inference.engine import Engine
from inference.parsing import OutputFormat, parse_output
from inference.schemas import GenerationParams
from tests.inference import test_engine as base
from tests.inference.test_engine import Recorder, ask, complete

make_engine = base.make_engine
engine = base.engine

pytestmark = pytest.mark.timeout(300)

TOOLS: list[dict[str, Any]] = [
    {
        "name": "echo",
        "parameters": {
            "type": "object",
            "properties": {"text": {"type": "string", "maxLength": 8}},
            "required": ["text"],
            "additionalProperties": False,
        },
    },
    {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["UTC", "CET"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
]


def test_auto_builds_a_grammar_and_none_builds_none() -> None:
    assert constraints.grammar_for(GenerationParams(tools=TOOLS)) is not None
    assert constraints.grammar_for(GenerationParams(tools=TOOLS, tool_choice="none")) is None
    # A response format still decides the shape when there is one.
    json_only = GenerationParams(tools=TOOLS, response_format={"type": "json_object"})
    assert constraints.grammar_for(json_only) != constraints.grammar_for(
        GenerationParams(tools=TOOLS)
    )


def test_the_free_text_is_what_the_model_writes_unconstrained(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    constrained = complete(engine, max_tokens=40, tools=TOOLS)
    assert constraints.TOOL_CALL_START not in constrained.text
    with monkeypatch.context() as patch:
        patch.setattr(constraints, "grammar_for", lambda params: None)
        free = complete(engine, max_tokens=40, tools=TOOLS)
    assert constrained.text == free.text
    assert constrained.finished.finish_reason == free.finished.finish_reason


def test_a_started_call_matches_the_tools_in_a_shared_batch(
    engine: Engine, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The random tiny model never opens a call by itself: its grammar processor forces the
    opening's tokens (through the grammar, which must allow them), and from there the model
    chooses, within what the grammar allows."""
    import mlx.core as mx

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    opening = tokenizer.encode(constraints.TOOL_CALL_START + "\n", add_special_tokens=False)

    class Opening(constraints.GrammarProcessor):
        def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
            allowed = super().__call__(tokens, logits)
            if self._calls > len(opening):
                return allowed
            wanted = mx.arange(logits.shape[-1]) == opening[self._calls - 1]
            return mx.where(wanted, allowed, mx.array(-mx.inf, dtype=logits.dtype))

    monkeypatch.setattr(constraints, "GrammarProcessor", Opening)
    free_alone = complete(engine, max_tokens=30)
    log: list[tuple[str, Any]] = []
    free_id, free = ask(engine, max_tokens=30, recorder=Recorder(log))
    call_id, call = ask(engine, max_tokens=160, tools=TOOLS, recorder=Recorder(log))
    free.wait()
    call.wait()
    order = [rid for rid, _ in log]
    assert order.index(call_id) < len(order) - 1 - order[::-1].index(free_id)
    assert free.text == free_alone.text
    assert constraints.TOOL_CALL_START in call.text, call.text
    parsed = parse_output(call.text, OutputFormat(), tools_enabled=True)
    assert parsed.tool_calls, call.text
    schemas = {t["name"]: t["parameters"] for t in TOOLS}
    complete_calls = parsed.tool_calls
    if call.finished.finish_reason == "max_tokens":  # the last of several calls may be cut off
        complete_calls = complete_calls[:-1] or complete_calls
    for each in complete_calls:
        assert each["name"] in schemas, call.text
        jsonschema.validate(json.loads(each["arguments"]), schemas[each["name"]])
