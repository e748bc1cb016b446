"""How close a converted or imported model is to its source: the model's quality card.

`validate_model` runs a candidate (an imported GGUF, a quantized conversion) and its reference
(the source's weights, dequantized to float32) on the same inputs and compares:

- **greedy tokens**: each model answers the same chat-templated prompts greedily, up to
  `n_tokens` tokens. For each prompt, a sequence that stops early (end of sequence) is padded
  with an end marker, so two answers that stop at the same place agree on the padding.
  `prefix_agreement` is the length of the common prefix over `n_tokens` (1.0: identical
  answers; 0.25: the first quarter matched, then they diverged), and `token_agreement` is the
  share of the `n_tokens` positions where both hold the same token. Both are averaged over the
  prompts. Position-wise agreement after a divergence compares different continuations, so it
  is high only for answers that re-converge; the prefix is the stricter measure.
- **perplexity** of each on a short English text (~200 tokens, one forward pass):
  exp(mean negative log-likelihood of each token given the ones before it).
- **size** on disk (when the paths are given) and in memory, and **decode speed** (tok/s of the
  greedy answers, after the first token).

`gguf_reference` and `hf_reference` build the reference for the two kinds of source.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    import mlx.nn as nn

logger = logging.getLogger(__name__)

DEFAULT_PROMPTS = (
    "What is the capital of France? Answer briefly.",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue.",
    "List three prime numbers greater than 10.",
)

# Plain English, written for this purpose (no licence strings attached); ~200 tokens with the
# usual tokenizers.
DEFAULT_TEXT = (
    "The river starts as a thin stream high in the mountains, where the snow melts slowly "
    "through the spring. As it flows down the valley, other streams join it, and by the time it "
    "reaches the first town it is wide enough for small boats. For centuries, people built mills "
    "along its banks to grind grain and to saw wood. Most of the mills are gone today, but the "
    "old stone walls remain, covered in moss. In summer, children swim in the shallow pools near "
    "the bridge while their parents sit in the shade and talk. Farther south, the river slows "
    "down and spreads across a broad plain. Farmers use its water to grow wheat, corn and "
    "vegetables, and the rich soil left behind by the spring floods keeps the fields fertile. "
    "Near the coast, the river splits into many channels that wind through marshes full of "
    "birds. Finally it reaches the sea, where the fresh water mixes with the salt water and the "
    "long journey from the mountains comes to an end."
)

# Marks the positions after a sequence's end; never a real token id.
_ENDED = -1


@dataclass
class PromptResult:
    """One prompt's greedy answers from both models and how far they agree."""

    prompt: str
    candidate_text: str
    reference_text: str
    candidate_tokens: list[int]
    reference_tokens: list[int]
    prefix_tokens: int  # identical tokens from the start, padding included
    matching_tokens: int  # identical positions out of n_tokens


@dataclass
class ModelRun:
    """What one model did on the validation inputs; reusable against several candidates."""

    label: str
    prompts: list[str]
    n_tokens: int
    text: str
    prompt_tokens: list[list[int]]
    generations: list[list[int]]
    texts: list[str]
    perplexity: float
    mean_nll: float
    text_tokens: int
    decode_tok_s: float | None
    memory_bytes: int
    size_bytes: int | None
    path: str | None
    seconds: float


@dataclass
class ValidationReport:
    """A candidate compared with its reference: the model's quality card."""

    candidate: str
    reference: str
    n_tokens: int
    prompts: list[PromptResult]
    prefix_agreement: float  # mean over prompts of common-prefix length / n_tokens
    token_agreement: float  # mean over prompts of matching positions / n_tokens
    identical_answers: int  # prompts where both answers are the same
    perplexity: float
    reference_perplexity: float
    perplexity_ratio: float  # candidate / reference; 1.0 is no loss
    text_tokens: int
    same_tokenization: bool  # both tokenizers gave the same ids for every input
    size_bytes: int | None
    reference_size_bytes: int | None
    memory_bytes: int
    reference_memory_bytes: int
    decode_tok_s: float | None
    reference_decode_tok_s: float | None
    seconds: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types only (what a job stores as its result)."""
        return asdict(self)

    def summary(self) -> str:
        """One line for logs and the model card."""
        n = len(self.prompts)
        size = ""
        if self.size_bytes is not None and self.reference_size_bytes is not None:
            size = f"; size {_mb(self.size_bytes)} vs {_mb(self.reference_size_bytes)}"
        speed = ""
        if self.decode_tok_s is not None and self.reference_decode_tok_s is not None:
            speed = f"; decode {self.decode_tok_s:.1f} vs {self.reference_decode_tok_s:.1f} tok/s"
        return (
            f"{self.candidate} vs {self.reference}: token agreement "
            f"{self.token_agreement:.0%} (common prefix {self.prefix_agreement:.0%}, "
            f"{self.identical_answers}/{n} identical) over {n}x{self.n_tokens} greedy tokens; "
            f"perplexity {self.perplexity:.2f} vs {self.reference_perplexity:.2f} "
            f"({self.perplexity_ratio - 1:+.1%}){size}{speed}"
        )


def _mb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def path_size(path: Path) -> int:
    """Bytes on disk of a file, or of the files directly in a model directory."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def _memory_bytes(model: nn.Module) -> int:
    from inference.weights.convert import parameters

    return sum(int(v.nbytes) for _, v in parameters(model))


def _prompt_ids(tokenizer: Any, prompt: str, chat: bool | None) -> list[int]:
    if chat is None:
        chat = bool(getattr(tokenizer, "has_chat_template", False))
    if chat:
        messages = [{"role": "user", "content": prompt}]
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    # A model without a chat template (a base model) continues the text instead.
    return list(tokenizer.encode(prompt))


def _greedy(model: nn.Module, tokenizer: Any, prompt: list[int], n_tokens: int) -> tuple:
    """Greedy tokens (stopping at end of sequence), and the decode time after the first."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    tokens: list[int] = []
    first_at = None
    eos = set(tokenizer.eos_token_ids)
    for token, _ in generate_step(mx.array(prompt), model, max_tokens=n_tokens):
        tokens.append(int(token))
        if first_at is None:
            first_at = time.perf_counter()
        if int(token) in eos:
            break
    decode_seconds = time.perf_counter() - first_at if first_at is not None else 0.0
    return tokens, decode_seconds


def perplexity(model: nn.Module, ids: list[int]) -> tuple[float, float]:
    """(perplexity, mean negative log-likelihood) of `ids`, in one forward pass."""
    import mlx.core as mx

    logits = model(mx.array([ids]))[0, :-1].astype(mx.float32)
    targets = mx.array(ids[1:])
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    nll = -mx.take_along_axis(logprobs, targets[:, None], axis=-1).squeeze(-1)
    mean = float(cast(float, nll.mean().item()))
    return math.exp(mean), mean


def measure_model(
    model: nn.Module,
    tokenizer: Any,
    *,
    label: str = "model",
    prompts: list[str] | None = None,
    n_tokens: int = 32,
    text: str | None = None,
    path: Path | None = None,
    chat: bool | None = None,
) -> ModelRun:
    """Run one model on the validation inputs (greedy answers, perplexity, speed, size)."""
    started = time.perf_counter()
    prompts = list(prompts if prompts is not None else DEFAULT_PROMPTS)
    text = text if text is not None else DEFAULT_TEXT
    if n_tokens < 1:
        raise ValueError("n_tokens must be at least 1")
    prompt_tokens = [_prompt_ids(tokenizer, p, chat) for p in prompts]
    generations, texts = [], []
    decoded = decode_seconds = 0.0
    for ids in prompt_tokens:
        tokens, seconds = _greedy(model, tokenizer, ids, n_tokens)
        generations.append(tokens)
        texts.append(tokenizer.decode([t for t in tokens if t not in tokenizer.eos_token_ids]))
        decoded += max(len(tokens) - 1, 0)
        decode_seconds += seconds
    text_ids = list(tokenizer.encode(text))
    text_perplexity, mean_nll = perplexity(model, text_ids)
    run = ModelRun(
        label=label,
        prompts=prompts,
        n_tokens=n_tokens,
        text=text,
        prompt_tokens=prompt_tokens,
        generations=generations,
        texts=texts,
        perplexity=text_perplexity,
        mean_nll=mean_nll,
        text_tokens=len(text_ids),
        decode_tok_s=decoded / decode_seconds if decode_seconds > 0 else None,
        memory_bytes=_memory_bytes(model),
        size_bytes=path_size(path) if path is not None else None,
        path=str(path) if path is not None else None,
        seconds=time.perf_counter() - started,
    )
    logger.info(
        "measured %s: perplexity %.2f, %s tok/s in %.1fs",
        label,
        text_perplexity,
        f"{run.decode_tok_s:.1f}" if run.decode_tok_s else "-",
        run.seconds,
    )
    return run


def _padded(tokens: list[int], n: int) -> list[int]:
    return (tokens + [_ENDED] * n)[:n]


def compare_runs(candidate: ModelRun, reference: ModelRun) -> ValidationReport:
    """The report for two runs on the same inputs (see the module docstring for the measures)."""
    if candidate.prompts != reference.prompts or candidate.n_tokens != reference.n_tokens:
        raise ValueError("the two runs used different prompts or token counts")
    if candidate.text != reference.text:
        raise ValueError("the two runs used different perplexity texts")
    n = reference.n_tokens
    results = []
    for i, prompt in enumerate(reference.prompts):
        cand, ref = _padded(candidate.generations[i], n), _padded(reference.generations[i], n)
        prefix = next((j for j in range(n) if cand[j] != ref[j]), n)
        results.append(
            PromptResult(
                prompt=prompt,
                candidate_text=candidate.texts[i],
                reference_text=reference.texts[i],
                candidate_tokens=candidate.generations[i],
                reference_tokens=reference.generations[i],
                prefix_tokens=prefix,
                matching_tokens=sum(a == b for a, b in zip(cand, ref, strict=True)),
            )
        )
    count = max(len(results), 1)
    same_tokenization = (
        candidate.prompt_tokens == reference.prompt_tokens
        and candidate.text_tokens == reference.text_tokens
    )
    notes = []
    if not same_tokenization:
        notes.append("the two tokenizers encode the inputs differently")
    return ValidationReport(
        candidate=candidate.label,
        reference=reference.label,
        n_tokens=n,
        prompts=results,
        prefix_agreement=sum(r.prefix_tokens for r in results) / (count * n),
        token_agreement=sum(r.matching_tokens for r in results) / (count * n),
        identical_answers=sum(r.prefix_tokens == n for r in results),
        perplexity=candidate.perplexity,
        reference_perplexity=reference.perplexity,
        perplexity_ratio=candidate.perplexity / reference.perplexity,
        text_tokens=reference.text_tokens,
        same_tokenization=same_tokenization,
        size_bytes=candidate.size_bytes,
        reference_size_bytes=reference.size_bytes,
        memory_bytes=candidate.memory_bytes,
        reference_memory_bytes=reference.memory_bytes,
        decode_tok_s=candidate.decode_tok_s,
        reference_decode_tok_s=reference.decode_tok_s,
        seconds=candidate.seconds + reference.seconds,
        notes=notes,
    )


def validate_model(
    candidate: tuple[nn.Module, Any],
    reference: tuple[nn.Module, Any] | None,
    *,
    prompts: list[str] | None = None,
    n_tokens: int = 32,
    text: str | None = None,
    candidate_path: Path | None = None,
    reference_path: Path | None = None,
    candidate_label: str = "candidate",
    reference_label: str = "reference",
    reference_run: ModelRun | None = None,
    chat: bool | None = None,
) -> ValidationReport:
    """Compare a candidate (model, tokenizer) with its reference on the same greedy prompts.

    `prompts` defaults to `DEFAULT_PROMPTS` (each is sent as a user message through the chat
    template, or as plain text to a model without one), `text` to `DEFAULT_TEXT` for the
    perplexity. The paths, when given, are measured for the size on disk. A `reference_run` from
    `measure_model` skips running the reference again (`reference` may then be None); its
    prompts, token count and text are the ones used.
    """
    if reference_run is None and reference is None:
        raise ValueError("give the reference model or a reference_run")
    ref_run = reference_run or measure_model(
        *cast(tuple[Any, Any], reference),
        label=reference_label,
        prompts=prompts,
        n_tokens=n_tokens,
        text=text,
        path=reference_path,
        chat=chat,
    )
    cand_run = measure_model(
        *candidate,
        label=candidate_label,
        prompts=ref_run.prompts,
        n_tokens=ref_run.n_tokens,
        text=ref_run.text,
        path=candidate_path,
        chat=chat,
    )
    report = compare_runs(cand_run, ref_run)
    logger.info("validation: %s", report.summary())
    return report


def gguf_reference(path: Path) -> tuple[nn.Module, Any]:
    """The dequantized GGUF reference: every tensor of the file as float32, in memory."""
    from inference.weights.convert import build_model, read_gguf

    return build_model(read_gguf(Path(path), dequantize=True))


def hf_reference(path: Path) -> tuple[nn.Module, Any]:
    """A Hugging Face safetensors model directory, loaded as it is by mlx-lm (never downloads)."""
    from mlx_lm import load

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {path}")
    model, tokenizer = load(str(path))[:2]
    return model, tokenizer
