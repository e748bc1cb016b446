"""Speculative decoding on the tiny real model, with a layer-truncated copy as its draft:
greedy text identical to decoding without the draft, acceptance recorded per reply."""

from __future__ import annotations

import itertools
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from inference.catalogue import Catalogue
from inference.config import ModelConfig
from inference.engine import Engine, GenerationRequest
from inference.schemas import GenerationParams
from mlxweb.config import Config, ServerConfig
from tests.support.engine import Recorder

pytestmark = pytest.mark.timeout(120)

_ids = itertools.count()
PROMPTS = [
    [{"role": "user", "content": "Tell me a story."}],
    [{"role": "user", "content": "What is the capital of France?"}],
]


def truncated_copy(source: Path, dest: Path, layers: int) -> Path:
    """The model in `source` with only its first `layers` layers: a draft that shares its
    tokenizer, embeddings and head."""
    import mlx.core as mx

    shutil.copytree(source, dest)
    config = json.loads((dest / "config.json").read_text())
    config["num_hidden_layers"] = layers
    (dest / "config.json").write_text(json.dumps(config))
    for file in dest.glob("*.safetensors"):
        weights = mx.load(str(file))
        assert isinstance(weights, dict)
        kept = {
            k: v
            for k, v in weights.items()
            if not k.startswith("model.layers.") or int(k.split(".")[2]) < layers
        }
        mx.save_safetensors(str(file), kept, metadata={"format": "mlx"})
    return dest


@pytest.fixture(scope="module")
def models_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("speculative")
    shutil.copytree(tiny_model_dir, root / "tiny")
    truncated_copy(tiny_model_dir, root / "tiny-draft", layers=1)
    return root


def _config(draft: bool, num_draft_tokens: int = 3) -> Config:
    server = ServerConfig.model_validate({"default_model": "tiny"})
    tiny: dict[str, Any] = {
        "id": "tiny",
        "name": "Tiny",
        "source": {"path": "tiny"},
        "context_length": 2048,
    }
    if draft:
        tiny |= {"draft_model": "tiny-draft", "num_draft_tokens": num_draft_tokens}
    models = {
        "tiny": ModelConfig.model_validate(tiny),
        "tiny-draft": ModelConfig.model_validate(
            {
                "id": "tiny-draft",
                "name": "Draft",
                "source": {"path": "tiny-draft"},
                "context_length": 2048,
            }
        ),
    }
    return Config(server=server, models=models)


@pytest.fixture
def make_engine(models_dir: Path, tmp_path: Path) -> Iterator[Callable[..., Engine]]:
    engines: list[Engine] = []

    def make(*, draft: bool = True, num_draft_tokens: int = 3, **options: Any) -> Engine:
        catalogue = Catalogue(_config(draft, num_draft_tokens), models_dir)
        options.setdefault("prompt_cache_entries", 0)
        engine = Engine(catalogue=catalogue, converted_dir=tmp_path / "converted", **options)
        engine.start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.stop()


def run(engine: Engine, messages: list[dict[str, Any]], **params: Any) -> Recorder:
    params = {"temperature": 0.0, "max_tokens": 48} | params
    request = GenerationRequest(
        f"spec-{next(_ids)}", "tiny", messages, GenerationParams.model_validate(params)
    )
    recorder = Recorder()
    engine.submit(request, recorder)
    return recorder.wait()


@pytest.mark.parametrize("num_draft_tokens", [1, 4])
def test_greedy_text_is_the_same_with_and_without_the_draft(
    make_engine: Callable[..., Engine], num_draft_tokens: int
) -> None:
    plain = make_engine(draft=False)
    speculative = make_engine(num_draft_tokens=num_draft_tokens)
    for messages in PROMPTS:
        expected = run(plain, messages)
        got = run(speculative, messages)
        assert got.text == expected.text
        assert got.finished.completion_tokens == expected.finished.completion_tokens
        assert got.finished.finish_reason == expected.finished.finish_reason
        assert "speculative" not in expected.finished.details
        stats = got.finished.details["speculative"]
        assert stats["draft_model"] == "tiny-draft"
        assert stats["num_draft_tokens"] == num_draft_tokens
        assert stats["drafted"] > 0 and 0 <= stats["accepted"] <= stats["drafted"]
        assert stats["acceptance_rate"] == round(stats["accepted"] / stats["drafted"], 4)
        assert stats["tokens_per_step"] >= 1


def test_the_draft_itself_is_always_accepted(make_engine: Callable[..., Engine]) -> None:
    # A draft that is the model itself proposes exactly what the model writes.
    engine = make_engine()
    slot_ready = run(engine, PROMPTS[0], max_tokens=4)
    assert slot_ready.finished.finish_reason == "max_tokens"
    slot = engine._slots["tiny"]
    slot.draft = slot.loaded
    got = run(engine, PROMPTS[1], max_tokens=40)
    stats = got.finished.details["speculative"]
    assert stats["accepted"] == stats["drafted"] and stats["acceptance_rate"] == 1.0
    assert stats["tokens_per_step"] > 2


def test_a_draft_that_loses_is_dropped_and_the_text_stays(
    make_engine: Callable[..., Engine],
) -> None:
    plain = make_engine(draft=False)
    engine = make_engine(num_draft_tokens=4)
    run(engine, PROMPTS[0], max_tokens=4)  # loads the model and its draft
    # The draft's logits negated: it proposes the token it rates least, never what the model
    # writes, and each round costs its 4 passes and a verify pass for one token.
    draft = engine._slots["tiny"].draft
    assert draft is not None
    import mlx.core as mx

    draft.model.model.norm.weight = -draft.model.model.norm.weight
    mx.eval(draft.model.model.norm.weight)  # here, not lazily in the engine's thread
    expected = run(plain, PROMPTS[1], max_tokens=48)
    got = run(engine, PROMPTS[1], max_tokens=48)
    assert got.text == expected.text
    assert got.finished.completion_tokens == expected.finished.completion_tokens
    stats = got.finished.details["speculative"]
    assert stats["acceptance_rate"] < 0.2
    # The first SPEC_PLAIN_TOKENS tokens decode without the draft (its baseline), then
    # SPEC_JUDGE_ROUNDS rounds with it: it was dropped there, and the rest went without it.
    assert stats["dropped_after"] == 8 + 8 + stats["accepted"]
    assert stats["drafted"] == 8 * 4 and stats["speedup"] < 1


def test_it_stops_exactly_at_max_tokens_and_samples(make_engine: Callable[..., Engine]) -> None:
    engine = make_engine(num_draft_tokens=4)
    for max_tokens in (1, 2, 5, 13):
        got = run(engine, PROMPTS[0], max_tokens=max_tokens)
        assert got.finished.finish_reason in ("max_tokens", "eos")
        if got.finished.finish_reason == "max_tokens":
            assert got.finished.completion_tokens == max_tokens
    sampled = run(engine, PROMPTS[1], temperature=0.9, top_p=0.95, max_tokens=30)
    assert sampled.finished.completion_tokens >= 1
    assert "speculative" in sampled.finished.details
    # A seeded request decodes without the draft (its sampler cannot take back positions).
    seeded = run(engine, PROMPTS[1], temperature=0.9, seed=7, max_tokens=20)
    assert "speculative" not in seeded.finished.details


def test_it_decodes_without_a_draft_when_speculation_is_off(
    make_engine: Callable[..., Engine],
) -> None:
    engine = make_engine(enable_speculative=False)
    got = run(engine, PROMPTS[0])
    assert "speculative" not in got.finished.details
    assert engine._slots["tiny"].draft is None


def test_a_model_cannot_draft_for_itself() -> None:
    with pytest.raises(ValidationError, match="another model"):
        ModelConfig.model_validate(
            {
                "id": "tiny",
                "name": "Tiny",
                "source": {"path": "tiny"},
                "context_length": 2048,
                "draft_model": "tiny",
            }
        )
    with pytest.raises(ValidationError):
        ModelConfig.model_validate(
            {
                "id": "tiny",
                "name": "Tiny",
                "source": {"path": "tiny"},
                "context_length": 2048,
                "draft_model": "other",
                "num_draft_tokens": 0,
            }
        )
