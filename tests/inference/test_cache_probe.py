"""The engine's cache probe (the chat composer's exact numbers): on the tiny real model it
counts the next prompt, the prefix its KV caches hold and the turns it trims exactly as the
engine then does when the prompt is sent, and it loads nothing."""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from inference.catalogue import Catalogue
from inference.engine import Engine, GenerationRequest
from inference.schemas import GenerationParams
from mlxweb.config import Config, ServerConfig
from tests.inference.test_engine import QUESTION, Recorder

pytestmark = pytest.mark.timeout(120)

GREEDY = GenerationParams.model_validate({"temperature": 0.0, "max_tokens": 12})


@pytest.fixture
def make_engine(tiny_model_dir: Path, tmp_path: Path) -> Iterator[Callable[..., Engine]]:
    engines: list[Engine] = []

    def make(**options: Any) -> Engine:
        server = ServerConfig.model_validate({"default_model": "tiny"})
        catalogue = Catalogue(Config(server=server, models={}), tiny_model_dir.parent)
        engine = Engine(catalogue=catalogue, converted_dir=tmp_path / "converted", **options)
        engine.start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.stop()


def _probe(engine: Engine, messages: list[dict[str, Any]]) -> dict[str, Any]:
    answers: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
    engine.probe(GenerationRequest("probe", "tiny", messages, GREEDY), answers.put)
    return answers.get(timeout=60)


def _send(engine: Engine, request_id: str, messages: list[dict[str, Any]]) -> Recorder:
    recorder = Recorder()
    engine.submit(GenerationRequest(request_id, "tiny", messages, GREEDY), recorder)
    return recorder.wait()


def test_it_predicts_the_cached_prefix_of_the_next_turn_exactly(
    make_engine: Callable[..., Engine],
) -> None:
    engine = make_engine()
    assert _probe(engine, QUESTION) == {"loaded": False}  # a probe loads nothing
    first = _send(engine, "first", QUESTION)
    following = [
        *QUESTION,
        {"role": "assistant", "content": first.text},
        {"role": "user", "content": "And of Germany?"},
    ]
    predicted = _probe(engine, following)
    second = _send(engine, "second", following)
    started = second.started
    assert started is not None
    assert predicted["loaded"] is True and predicted["cache_source"] == "memory"
    assert predicted["prompt_tokens"] == started.prompt_tokens
    assert predicted["cached_tokens"] == started.cached_tokens > 0
    assert predicted["trimmed_messages"] == started.trimmed_messages == 0


def test_it_predicts_what_the_next_turn_trims(make_engine: Callable[..., Engine]) -> None:
    engine = make_engine(max_prompt_tokens=96)
    _send(engine, "warm-up", QUESTION)  # loads the model
    long_turns: list[dict[str, Any]] = []
    for i in range(6):
        long_turns.append({"role": "user", "content": f"Question {i}: tell me about rivers."})
        long_turns.append({"role": "assistant", "content": f"Answer {i}: rivers flow to seas."})
    conversation = [*long_turns, {"role": "user", "content": "And lakes?"}]
    predicted = _probe(engine, conversation)
    started = _send(engine, "long", conversation).started
    assert started is not None and started.trimmed_messages > 0
    assert predicted["trimmed_messages"] == started.trimmed_messages
    assert predicted["prompt_tokens"] == started.prompt_tokens


def test_a_stopped_engine_answers_not_loaded(make_engine: Callable[..., Engine]) -> None:
    engine = make_engine()
    engine.stop()
    assert _probe(engine, QUESTION) == {"loaded": False}
