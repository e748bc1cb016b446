"""Validating a converted model against its source: agreement, perplexity, size and speed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import pytest

from inference.loader import float32_on_cpu
from inference.testing import build_tiny_model
from inference.weights.convert import ImportResult, import_gguf, parameters
from inference.weights.evaluation import (
    DEFAULT_TEXT,
    ModelRun,
    compare_runs,
    validate_model,
)
from tests.support.gemma3 import GEMMA3_PROMPTS, GEMMA3_TOKENS


def _run(generations: list[list[int]], *, perplexity: float = 10.0, n_tokens: int = 4) -> ModelRun:
    return ModelRun(
        label="run",
        prompts=[f"prompt {i}" for i in range(len(generations))],
        n_tokens=n_tokens,
        text="text",
        prompt_tokens=[[1, 2]] * len(generations),
        generations=generations,
        texts=["..."] * len(generations),
        perplexity=perplexity,
        mean_nll=0.0,
        text_tokens=3,
        decode_tok_s=10.0,
        memory_bytes=100,
        size_bytes=None,
        path=None,
        seconds=1.0,
    )


def _load(path: Path) -> tuple[Any, Any]:
    from mlx_lm import load

    return cast(tuple[Any, Any], load(str(path))[:2])


# --------------------------------------------------------------------------- the measures


def test_it_counts_the_common_prefix_and_the_matching_positions() -> None:
    reference = _run([[5, 6, 7, 8], [5, 6, 7, 8], [5, 6, 2], [9, 2]])
    candidate = _run([[5, 6, 7, 8], [5, 0, 7, 8], [5, 6, 2], [9, 9, 9, 2]], perplexity=12.5)
    report = compare_runs(candidate, reference)
    prefixes = [r.prefix_tokens for r in report.prompts]
    matches = [r.matching_tokens for r in report.prompts]
    # Identical; one token differs; both stop at the same place (the rest counts as agreeing);
    # the candidate goes on where the reference stopped.
    assert prefixes == [4, 1, 4, 1]
    assert matches == [4, 3, 4, 1]
    assert report.prefix_agreement == 10 / 16
    assert report.token_agreement == 12 / 16
    assert report.identical_answers == 2
    assert report.perplexity_ratio == 1.25
    assert report.same_tokenization


def test_it_refuses_runs_on_different_inputs() -> None:
    with pytest.raises(ValueError, match="different prompts"):
        compare_runs(_run([[1]]), _run([[1], [2]]))
    with pytest.raises(ValueError, match="different prompts"):
        compare_runs(_run([[1]], n_tokens=8), _run([[1]]))


def test_a_model_agrees_with_itself(tiny_model_dir: Path) -> None:
    tiny = _load(tiny_model_dir)
    report = validate_model(
        tiny,
        tiny,
        prompts=["Hi", "What is 2+2?"],
        n_tokens=8,
        candidate_path=tiny_model_dir,
        reference_path=tiny_model_dir,
    )
    assert report.token_agreement == report.prefix_agreement == 1.0
    assert report.identical_answers == 2
    assert report.perplexity_ratio == pytest.approx(1.0)
    assert report.text_tokens > 150  # the built-in text, ~200 tokens
    assert report.size_bytes is not None and report.size_bytes > 0
    assert report.size_bytes == report.reference_size_bytes
    assert report.decode_tok_s and report.reference_decode_tok_s
    # Chat models get their prompts through the chat template.
    assert report.prompts[0].candidate_tokens == report.prompts[0].reference_tokens
    data = json.loads(json.dumps(report.to_dict()))
    assert data["prompts"][1]["prompt"] == "What is 2+2?"
    assert report.summary().startswith("candidate vs reference: token agreement 100%")


def test_it_sees_what_quantization_changes(
    tiny_model_dir: Path, smollm2_gguf: Path, tmp_path: Path
) -> None:
    quantized_dir = build_tiny_model(tmp_path / "tiny-2bit", smollm2_gguf, quantize_bits=2)
    report = validate_model(
        _load(quantized_dir),
        _load(tiny_model_dir),
        prompts=["Hi"],
        n_tokens=16,
        text=DEFAULT_TEXT[:300],
    )
    assert report.token_agreement < 1.0
    assert report.perplexity != report.reference_perplexity
    assert report.memory_bytes < report.reference_memory_bytes


# --------------------------------------------------------------------------- Gemma 3 270M


def _load_as_validated(path: Path) -> tuple[Any, Any, int]:
    """A model folder computed as the validate job computes it (float32 on the CPU: the same
    weights, several times faster there than MLX's quantized matmul, and ~30 s less per Gemma
    run), and the bytes its weights took as loaded."""
    model, tokenizer = _load(path)
    loaded_bytes = sum(int(v.nbytes) for _, v in parameters(model))
    float32_on_cpu(model, 2**40, label=path.name)
    return model, tokenizer, loaded_bytes


def test_the_4_bit_gemma3_import_stays_close_to_the_dequantized_gguf(
    gemma3_4bit: ImportResult, gemma3_reference_run: ModelRun
) -> None:
    model, tokenizer, loaded_bytes = _load_as_validated(gemma3_4bit.out_dir)
    report = validate_model(
        (model, tokenizer),
        None,
        candidate_path=gemma3_4bit.out_dir,
        candidate_label="4-bit import",
        reference_run=gemma3_reference_run,
        chat=False,
    )
    print(report.summary())
    assert report.prompts[0].prompt == GEMMA3_PROMPTS[0] and report.n_tokens == GEMMA3_TOKENS
    assert all("Paris" in r.candidate_text and "Paris" in r.reference_text for r in report.prompts)
    assert report.same_tokenization
    assert report.prefix_agreement >= 0.1
    assert report.token_agreement >= 0.3
    assert 1.0 < report.perplexity_ratio < 1.5
    assert report.size_bytes and report.reference_size_bytes
    assert loaded_bytes < report.reference_memory_bytes / 3


def test_the_8_bit_gemma3_import_is_nearly_lossless(
    gemma3_gguf: Path, gemma3_reference_run: ModelRun, tmp_path: Path
) -> None:
    result = import_gguf(gemma3_gguf, tmp_path / "gemma-8bit", bits=8)
    model, tokenizer, _ = _load_as_validated(result.out_dir)
    report = validate_model(
        (model, tokenizer),
        None,
        candidate_path=result.out_dir,
        reference_run=gemma3_reference_run,
        chat=False,
    )
    print(report.summary())
    assert report.prefix_agreement >= 0.5
    assert report.token_agreement >= 0.6
    assert 0.98 < report.perplexity_ratio < 1.02
