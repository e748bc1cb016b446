"""Constrained decoding on the tiny real model: JSON schemas, JSON objects and forced tool calls,
alone and inside batches shared with unconstrained requests."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from inference.constraints import closed, grammar_for
from inference.engine import Engine
from inference.parsing import OutputFormat, parse_output
from inference.schemas import GenerationParams
from tests.inference import test_engine as base
from tests.inference.test_engine import Recorder, ask, complete

# The engine fixtures of the engine's own tests.
make_engine = base.make_engine
engine = base.engine

pytestmark = pytest.mark.timeout(300)

SCHEMAS: list[dict[str, Any]] = [
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"colour": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"}},
        "required": ["colour", "ok"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "tags": {
                "type": "array",
                "items": {"type": "string", "maxLength": 6},
                "minItems": 1,
                "maxItems": 3,
            }
        },
        "required": ["tags"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "point": {
                "type": "object",
                "properties": {
                    "x": {"type": "number", "minimum": -10, "maximum": 10},
                    "y": {"type": "number", "minimum": -10, "maximum": 10},
                },
                "required": ["x", "y"],
                "additionalProperties": False,
            },
            "label": {"type": ["string", "null"], "maxLength": 8},
        },
        "required": ["point", "label"],
        "additionalProperties": False,
    },
    {
        "type": "array",
        "items": {"type": "integer", "minimum": 0, "maximum": 99},
        "minItems": 2,
        "maxItems": 4,
    },
]


def _json_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": schema, "strict": True}


def test_fifty_sampled_replies_against_five_schemas_are_all_valid(engine: Engine) -> None:
    requests = []
    for i, schema in enumerate(SCHEMAS):
        for seed in range(10):
            _, recorder = ask(
                engine,
                temperature=1.0,
                seed=seed * 7 + i,
                max_tokens=200,
                response_format=_json_format(schema),
            )
            requests.append((schema, recorder))
    for schema, recorder in requests:
        recorder.wait(120)
        assert recorder.finished.finish_reason == "eos", (recorder.finished, recorder.text)
        jsonschema.validate(json.loads(recorder.text), schema)


def test_a_json_object_reply_is_an_object(engine: Engine) -> None:
    recorder = complete(engine, max_tokens=200, response_format={"type": "json_object"})
    assert recorder.finished.finish_reason == "eos", recorder.text
    assert isinstance(json.loads(recorder.text), dict)


def test_constrained_and_free_requests_share_a_running_batch(engine: Engine) -> None:
    free_alone = complete(engine, max_tokens=30)
    log: list[tuple[str, Any]] = []
    free_id, free = ask(engine, max_tokens=30, recorder=Recorder(log))
    constrained_id, constrained = ask(
        engine, max_tokens=200, response_format=_json_format(SCHEMAS[1]), recorder=Recorder(log)
    )
    free.wait()
    constrained.wait()
    # Both decoded at the same time, and the free one wrote what it writes alone.
    order = [rid for rid, _ in log]
    assert order.index(constrained_id) < len(order) - 1 - order[::-1].index(free_id)
    assert free.text == free_alone.text
    jsonschema.validate(json.loads(constrained.text), SCHEMAS[1])


def test_a_required_tool_call_names_one_of_the_tools_with_valid_arguments(engine: Engine) -> None:
    tools = [
        {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 10}},
                "required": ["city"],
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
    by_name = {t["name"]: t for t in tools}
    for choice in ("required", "get_time"):
        recorder = complete(engine, max_tokens=120, tools=tools, tool_choice=choice)
        assert recorder.finished.finish_reason == "eos", recorder.text
        parsed = parse_output(recorder.text, OutputFormat(), tools_enabled=True)
        assert len(parsed.tool_calls) == 1, recorder.text
        call = parsed.tool_calls[0]
        assert choice == "required" or call["name"] == choice
        jsonschema.validate(json.loads(call["arguments"]), by_name[call["name"]]["parameters"])
        assert parsed.content == ""


def test_it_builds_no_grammar_for_free_text() -> None:
    assert grammar_for(GenerationParams()) is None
    assert grammar_for(GenerationParams(response_format={"type": "text"})) is None
    assert grammar_for(GenerationParams(tools=[{"name": "f"}], tool_choice="none")) is None


def test_a_schema_that_cannot_compile_fails_only_its_request(engine: Engine) -> None:
    bad = {"type": "json_schema", "json_schema": {"type": "object", "minProperties": "x"}}
    recorder = complete(engine, response_format=bad)
    assert recorder.finished.finish_reason == "error"
    assert "grammar" in recorder.finished.error
    assert complete(engine, max_tokens=3).finished.finish_reason == "max_tokens"


def test_closed_schemas_allow_no_unlisted_keys_unless_they_say_so() -> None:
    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "where": {"type": "object", "properties": {"lat": {"type": "number"}}},
            "extra": {"type": "object", "properties": {}, "additionalProperties": True},
        },
        "anyOf": [{"type": "object", "properties": {"a": {"type": "string"}}}],
    }

    result = closed(schema)

    assert result["additionalProperties"] is False
    assert result["properties"]["where"]["additionalProperties"] is False
    assert result["properties"]["extra"]["additionalProperties"] is True
    assert result["anyOf"][0]["additionalProperties"] is False
    assert "additionalProperties" not in schema  # the request's own schema is left as it was
