"""The GGUF export against a real peer: llama.cpp (llama-cpp-python) loads the files we write,
tokenizes as we do, computes the same logits and answers with the same greedy tokens.

SmolLM2 is the session's import of the default model (`smollm2_import`, Q4_1 blocks kept), as
the library holds it; its exports are made once for this module. Gemma 3 is the session's 4-bit
import of Gemma 3 270M.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
import pytest

from inference.weights.export import export_gguf
from tests.support.gguf_imports import SessionImport
from tests.support.hf_model import SENTENCES, tiny_hf_model_files

logger = logging.getLogger(__name__)

PARIS = "What is the capital of France? Answer briefly."
# The validation prompts and four more: greedy answers that hit a near-tie between two tokens
# diverge from there on, so a share over few prompts moves in big steps.
PROMPTS = (
    PARIS,
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue.",
    "List three prime numbers greater than 10.",
    "What is 12 times 12?",
    "Name three colours of the rainbow.",
    "Translate 'good morning' into French.",
    "Who wrote Romeo and Juliet?",
)
N_TOKENS = 16


def _llama(path: Path, **options: Any) -> llama_cpp.Llama:
    return llama_cpp.Llama(
        model_path=str(path), n_ctx=512, verbose=False, seed=0, n_threads=2, **options
    )


@pytest.fixture(scope="module")
def smollm2_exports(
    smollm2_import: SessionImport, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """The session's SmolLM2 import exported as Q8_0 and F16 (about 10 s each)."""
    folder = tmp_path_factory.mktemp("smollm2-exports")
    return {
        file_type: export_gguf(
            smollm2_import.out_dir, folder / f"smollm2-{file_type}.gguf", file_type=file_type
        ).path
        for file_type in ("q8_0", "f16")
    }


@pytest.fixture(scope="module")
def smollm2_llama_cpp(
    smollm2_exports: dict[str, Path], smollm2_import: SessionImport
) -> Iterator[dict[str, llama_cpp.Llama]]:
    """llama.cpp on the two exports, and on the GGUF the source was imported from ("source"):
    the same weights as ours, which shows how far llama.cpp's own arithmetic (it quantizes
    activations for its quantized matmuls) moves greedy answers from MLX's."""
    paths = {**smollm2_exports, "source": smollm2_import.source}
    models = {name: _llama(path, logits_all=True) for name, path in paths.items()}
    yield models
    for llm in models.values():
        llm.close()


@pytest.fixture(scope="module")
def smollm2_ours(smollm2_import: SessionImport) -> tuple[Any, Any]:
    """mlx-lm's model and tokenizer of the exports' source folder, in float32 as the engine
    serves a model this size on a CPU."""
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.utils import dequantize_model

    model, tokenizer = load(str(smollm2_import.out_dir))[:2]
    dequantize_model(model)
    model.set_dtype(mx.float32)
    return model, tokenizer


@pytest.fixture(scope="module")
def smollm2_greedy(smollm2_ours: tuple[Any, Any]) -> dict[str, tuple[list[int], list[int]]]:
    """Each prompt's chat-templated tokens and our greedy answer to it."""
    model, tokenizer = smollm2_ours
    answers = {}
    for prompt in PROMPTS:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True
        )
        answers[prompt] = (ids, _greedy_mlx(model, tokenizer, ids, N_TOKENS))
    return answers


def _greedy_mlx(model: Any, tokenizer: Any, prompt: list[int], n: int) -> list[int]:
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    tokens: list[int] = []
    for token, _ in generate_step(mx.array(prompt), model, max_tokens=n):
        if int(token) in tokenizer.eos_token_ids:
            break
        tokens.append(int(token))
    return tokens


def _greedy_llama_cpp(llm: llama_cpp.Llama, prompt: list[int], n: int) -> list[int]:
    tokens: list[int] = []
    eos = llm.token_eos()
    for token in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        if token == eos or len(tokens) == n:
            break
        tokens.append(token)
    return tokens


def _agreement(ours: list[int], theirs: list[int], n: int) -> float:
    """The share of the first `n` positions holding the same token (an answer that ended is
    padded with an end marker, so two answers ending at the same place agree there)."""
    a = (ours + [-1] * n)[:n]
    b = (theirs + [-1] * n)[:n]
    return sum(x == y for x, y in zip(a, b, strict=True)) / n


def _forced_agreement(llm: llama_cpp.Llama, prompt: list[int], ours: list[int]) -> float:
    """The share of our answer's tokens that llama.cpp also ranks first, given the prompt and
    our answer so far: agreement without one divergence deciding the rest."""
    if not ours:
        return 1.0
    llm.reset()
    llm.eval(prompt + ours)
    scores = np.array(llm.scores[len(prompt) - 1 : len(prompt) - 1 + len(ours)])
    return float((scores.argmax(axis=-1) == np.array(ours)).mean())


def _shares(
    llm: llama_cpp.Llama, greedy: dict[str, tuple[list[int], list[int]]]
) -> tuple[float, float]:
    free, forced = [], []
    for ids, ours in greedy.values():
        free.append(_agreement(ours, _greedy_llama_cpp(llm, ids, N_TOKENS), N_TOKENS))
        forced.append(_forced_agreement(llm, ids, ours))
    return sum(free) / len(free), sum(forced) / len(forced)


def test_llama_cpp_answers_the_paris_question_from_the_q8_0_export(
    smollm2_llama_cpp: dict[str, llama_cpp.Llama],
) -> None:
    llm = smollm2_llama_cpp["q8_0"]
    llm.reset()

    reply = llm.create_chat_completion(
        messages=[{"role": "user", "content": PARIS}], temperature=0.0, top_k=1, max_tokens=32
    )

    text = reply["choices"][0]["message"]["content"]  # type: ignore[index]
    logger.info("llama.cpp (Q8_0 export): %r", text)
    assert text is not None and "Paris" in text


@pytest.mark.parametrize("file_type", ["q8_0", "f16"])
def test_llama_cpp_tokenizes_the_chat_template_as_we_do(
    smollm2_llama_cpp: dict[str, llama_cpp.Llama], smollm2_ours: tuple[Any, Any], file_type: str
) -> None:
    _, tokenizer = smollm2_ours
    llm = smollm2_llama_cpp[file_type]
    for prompt in PROMPTS:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        theirs = llm.tokenize(text.encode(), add_bos=True, special=True)
        assert theirs == tokenizer.encode(text, add_special_tokens=True), prompt


def test_llama_cpp_s_greedy_tokens_agree_with_ours(
    smollm2_llama_cpp: dict[str, llama_cpp.Llama],
    smollm2_greedy: dict[str, tuple[list[int], list[int]]],
) -> None:
    shares = {name: _shares(llm, smollm2_greedy) for name, llm in smollm2_llama_cpp.items()}

    print(f"\nllama.cpp vs mlx-lm, {len(PROMPTS)} prompts, the first {N_TOKENS} greedy tokens:")
    for name, (free, forced) in shares.items():
        print(f"  {name}: identical {free:.3f}, ranked first given our prefix {forced:.3f}")
    # F16 holds the source's weights as they are: llama.cpp answers as we do.
    assert shares["f16"][0] >= 0.9 and shares["f16"][1] >= 0.95
    # Q8_0 rounds them once more, and llama.cpp's quantized matmuls round the activations:
    # given our answer so far, it ranks our token first as often as on the source GGUF itself.
    assert shares["q8_0"][1] >= 0.9
    assert shares["q8_0"][1] >= shares["source"][1] - 0.02
    # Answers that reach a near-tie part ways from there, and which ones do depends on the
    # build's arithmetic: on one build (AMD EPYC, no AVX-512) two of the eight answers parted
    # ways early, 0.78 against the source's 0.95, with both ranked-first shares at 0.96. A
    # broken export agrees on next to nothing.
    assert shares["q8_0"][0] >= 0.6


def test_llama_cpp_computes_the_logits_mlx_computes_on_a_tiny_export(tmp_path: Path) -> None:
    """A float model exported as F16 (its weights are float16 already): llama.cpp's logits are
    MLX's, up to float32 rounding. Wrong Q/K rows or hyperparameters would not be close."""
    import mlx.core as mx
    from mlx_lm import load

    source = tmp_path / "tiny-hf"
    source.mkdir()
    for name, data in tiny_hf_model_files().items():
        (source / name).write_bytes(data)
    path = export_gguf(source, tmp_path / "tiny.gguf", file_type="f16").path
    model, tokenizer = load(str(source))[:2]
    ids = tokenizer.encode(" ".join(SENTENCES))
    llm = _llama(path, logits_all=True)
    try:
        llm.eval(ids)
        theirs = np.array(llm.scores[: len(ids)])
    finally:
        llm.close()

    ours = np.array(model(mx.array([ids])).astype(mx.float32)[0])
    np.testing.assert_allclose(theirs, ours, atol=2e-3 * float(np.abs(ours).max()))


@pytest.fixture(scope="module")
def gemma3_export(gemma3_import: SessionImport, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's 4-bit Gemma 3 270M import exported as Q8_0 (about 30 s)."""
    folder = tmp_path_factory.mktemp("gemma3-export")
    return export_gguf(gemma3_import.out_dir, folder / "gemma3-Q8_0.gguf", file_type="q8_0").path


@pytest.mark.slow
def test_llama_cpp_loads_the_gemma3_export_and_writes_what_we_write(
    gemma3_export: Path, gemma3_import: SessionImport
) -> None:
    from mlx_lm import load

    model, tokenizer = load(str(gemma3_import.out_dir))[:2]
    ids = tokenizer.encode("The capital of France is")
    ours = _greedy_mlx(model, tokenizer, ids, N_TOKENS)
    llm = _llama(gemma3_export, logits_all=True)
    try:
        # SentencePiece-style: the scores the export derives from the merges split text as
        # the merges do.
        for text in (*SENTENCES, "  two spaces, tabs\tand\nnewlines; ünïcödé 日本語 🙂"):
            theirs = llm.tokenize(text.encode(), add_bos=True, special=False)
            assert theirs == tokenizer.encode(text), text
        theirs = _greedy_llama_cpp(llm, ids, N_TOKENS)
        forced = _forced_agreement(llm, ids, ours)
    finally:
        llm.close()
    share = _agreement(ours, theirs, N_TOKENS)
    print(f"\nGemma 3 Q8_0, llama.cpp: {tokenizer.decode(theirs)!r}")
    print(f"Gemma 3, mlx-lm: {tokenizer.decode(ours)!r} ({share:.3f} identical, {forced:.3f})")
    assert len(theirs) == N_TOKENS and tokenizer.decode(theirs).strip()
    # A batch of tokens and one token at a time take different kernels in llama.cpp: a
    # near-tie may rank differently between the two.
    assert forced >= 0.85
    assert share >= 0.5
