"""How the tests run Gemma 3 270M: prompts and sizes shared by the session's Gemma fixtures
(tests/conftest.py) and the tests that use them."""

from __future__ import annotations

from inference.weights.evaluation import DEFAULT_TEXT

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
