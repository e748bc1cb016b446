"""inference.fused: one forward pass over segments at different offsets gives what the model's
own calls give, on the tiny real model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest
from mlx_lm import load
from mlx_lm.models.cache import make_prompt_cache

from inference import fused


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> Any:
    return load(str(tiny_model_dir))[0]


def _cache(model: Any, tokens: list[list[int]]) -> list[Any]:
    cache = make_prompt_cache(model)
    model(mx.array(tokens), cache=cache)
    mx.eval([c.state for c in cache])
    return cache


def test_one_pass_over_segments_gives_each_model_call(model: Any) -> None:
    assert fused.fusable(model)
    decode = mx.array([[5], [6]])
    chunk = mx.array([[9, 10, 11, 12, 13]])
    own = [_cache(model, [[7] * 20, [8] * 20]), _cache(model, [[3] * 33])]
    shared = [_cache(model, [[7] * 20, [8] * 20]), _cache(model, [[3] * 33])]
    expected = [model(decode, cache=own[0])[:, -1, :], model(chunk, cache=own[1])[:, 2, :]]
    got = fused.forward(model, [(decode, shared[0], -1), (chunk, shared[1], 2)])
    for want, have in zip(expected, got, strict=True):
        assert want.shape == have.shape
        assert mx.allclose(want, have, atol=1e-4).item()
    for mine, theirs in zip(own, shared, strict=True):
        for a, b in zip(mine, theirs, strict=True):
            assert a.offset == b.offset
            assert mx.allclose(a.state[0], b.state[0], atol=1e-5).item()


def test_a_prompts_own_pass_gives_the_models_logits_at_one_position(model: Any) -> None:
    # The engine's prefill passes: only the picked position goes through the output head.
    rows = mx.array([[9, 10, 11, 12, 13], [3, 4, 5, 6, 7]])
    own, shared = _cache(model, [[2] * 8] * 2), _cache(model, [[2] * 8] * 2)
    want = model(rows, cache=own)[:, 3, :]
    (have,) = fused.forward(model, [(rows, shared, 3)])
    assert have.shape == want.shape == (2, model.args.vocab_size)
    assert mx.allclose(want, have, atol=1e-4).item()
    for a, b in zip(own, shared, strict=True):
        assert a.offset == b.offset == 13
        assert mx.allclose(a.state[1], b.state[1], atol=1e-5).item()


def test_the_riding_model_carries_its_riders_once(model: Any) -> None:
    riding = fused.RidingModel(model)
    assert riding.layers is model.layers  # everything else is the model's
    decode_cache = _cache(model, [[7] * 10])
    rider = fused.Rider(mx.array([[4, 5, 6]]), _cache(model, [[2] * 12]), position=-1)
    riding.riders = [rider]
    out = riding(mx.array([[5]]), cache=decode_cache)
    assert out.shape == (1, 1, model.args.vocab_size) and rider.logits is not None
    carried = rider.logits
    riding(mx.array([[6]]), cache=decode_cache)  # the rider already rode: a plain call
    assert rider.logits is carried and rider.cache[0].offset == 15


def test_only_plain_transformer_blocks_fuse() -> None:
    class Args:
        model_type = "gemma3_text"

    class Other:
        args = Args()

    assert not fused.fusable(Other())
    assert not fused.fusable(object())
