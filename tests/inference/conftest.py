"""Inference test fixtures. The shared ones live in tests/conftest.py (smollm2_gguf,
tiny_model_dir, gemma3_gguf), used by the chat, models_admin and browser tests too; these are
the Gemma 3 270M import and its reference, built once per session for the GGUF and validation
tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from inference.evaluation import DEFAULT_TEXT, ModelRun, gguf_reference, measure_model
from inference.gguf import ImportResult, import_gguf

# Gemma 3 270M is a base model: it continues text. Both prompts make it (and its 4-bit import)
# say "Paris" within a few tokens.
GEMMA3_PROMPTS = [
    "The Eiffel Tower is located in the city of",
    "Question: What is the capital of France?\nAnswer:",
]
# Small enough to keep the session's Gemma runs near a minute on a 2-core CPU, where MLX's
# quantized matmul (and the 262k-token output layer) makes Gemma 270M decode ~3 tok/s.
GEMMA3_TOKENS = 16
GEMMA3_TEXT = DEFAULT_TEXT[: DEFAULT_TEXT.index(" Most of the mills")]


@pytest.fixture(scope="session")
def gemma3_4bit(gemma3_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> ImportResult:
    """The Q4_K_M GGUF imported at 4 bits (group size 64): the default import."""
    return import_gguf(gemma3_gguf, tmp_path_factory.mktemp("gemma3") / "gemma-3-270m", bits=4)


@pytest.fixture(scope="session")
def gemma3_reference(gemma3_gguf: Path) -> tuple[Any, Any]:
    """The dequantized GGUF reference: every tensor of the file as float32."""
    return gguf_reference(gemma3_gguf)


@pytest.fixture(scope="session")
def gemma3_reference_run(gemma3_reference: tuple[Any, Any], gemma3_gguf: Path) -> ModelRun:
    """The reference's greedy answers and perplexity, measured once for every candidate."""
    return measure_model(
        *gemma3_reference,
        label="dequantized GGUF",
        prompts=GEMMA3_PROMPTS,
        n_tokens=GEMMA3_TOKENS,
        text=GEMMA3_TEXT,
        chat=False,
        path=gemma3_gguf,
    )
