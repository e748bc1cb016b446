"""What quantized and rotating KV caches cost in quality, on the default model.

Quantized (`kv_bits`): the engine quantizes the caches it keeps between turns (memory and disk)
and dequantizes them when the next turn reuses them (inference.kvcache). So, per prompt: the
conversation so far is prefilled once into a full-precision cache; that cache is kept as the
engine keeps it (full, 8-bit, 4-bit), brought back, and the last user message plus a greedy reply
are computed on top of it. Rotating (`max_kv_size`): the whole prompt is prefilled into a rotating
cache of that many tokens (its first 4 and the latest), then the reply.

Against the full cache, for each variant:
- greedy agreement: the share of the full-cache reply's tokens the variant reproduces before
  the first difference (free running);
- teacher-forced top-1 agreement and mean / max |logprob difference| of the full reply's tokens
  (the variant fed the full reply's tokens, so one early difference does not hide the rest);
- the cache's bytes: the kept prefix (full or quantized), or the rotating cache after the reply
  (at most `max_kv_size` tokens, whatever the prompt's length).

    .venv/bin/python bench/bench_kv_quality.py --output /tmp/bench-kv-quality.md
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mlxweb.launcher import ensure_fast_blas  # noqa: E402

ensure_fast_blas(sys.argv)

import argparse  # noqa: E402
import logging  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

import bench_chat as chat  # noqa: E402
from bench_warm import QUESTIONS, history  # noqa: E402

logger = logging.getLogger("bench")

KV_BITS = (8, 4)
PREFILL_STEP = 512


@dataclass
class Variant:
    name: str
    agreement: list[float] = field(default_factory=list)
    top1: list[float] = field(default_factory=list)
    mean_dlogprob: list[float] = field(default_factory=list)
    max_dlogprob: list[float] = field(default_factory=list)
    kept_bytes: list[int] = field(default_factory=list)


def _prefill(model: Any, cache: list[Any], tokens: list[int]) -> Any:
    """Feed `tokens` (in steps, as the engine prefills); the logits after the last."""
    import mlx.core as mx

    logits = None
    for start in range(0, len(tokens), PREFILL_STEP):
        logits = model(mx.array(tokens[start : start + PREFILL_STEP])[None], cache=cache)
        mx.eval([c.state for c in cache])
    assert logits is not None
    return logits[:, -1, :]


def _decode(
    model: Any, cache: list[Any], logits: Any, steps: int, forced: list[int] | None = None
) -> tuple[list[int], list[float]]:
    """Greedy steps from `logits`: the model's own choice at each step, and the logprob of the
    token fed next (`forced`'s when given, else its own choice)."""
    import mlx.core as mx

    chosen: list[int] = []
    logprobs: list[float] = []
    for i in range(steps):
        lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        best: Any = mx.argmax(lp, axis=-1).item()
        token = int(best)
        fed = forced[i] if forced is not None else token
        chosen.append(token)
        logprobs.append(float(lp[0, fed].item()))
        logits = model(mx.array([[fed]]), cache=cache)[:, -1, :]
    return chosen, logprobs


def _reply_on(model: Any, kept: list[Any], tail: list[int], n: int) -> tuple[Any, Any]:
    """A greedy reply of `n` tokens after `tail` on a copy of a kept cache, and a second copy
    with `tail` fed (for a teacher-forced run) with its logits."""
    from inference.kvcache import for_use

    free_cache = for_use(kept)
    free = _decode(model, free_cache, _prefill(model, free_cache, tail), n)
    forced_cache = for_use(kept)
    logits = _prefill(model, forced_cache, tail)
    return free, (forced_cache, logits)


def _agreement(a: list[int], b: list[int]) -> float:
    same = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
    return same / len(a)


def _record(variant: Variant, full: tuple[list[int], list[float]], free: list[int], forced: Any):
    tokens, logprobs = full
    chosen, variant_logprobs = forced
    diffs = [abs(x - y) for x, y in zip(logprobs, variant_logprobs, strict=True)]
    variant.agreement.append(_agreement(tokens, free))
    variant.top1.append(sum(x == y for x, y in zip(tokens, chosen, strict=True)) / len(tokens))
    variant.mean_dlogprob.append(statistics.fmean(diffs))
    variant.max_dlogprob.append(max(diffs))


def measure(loaded: Any, args: argparse.Namespace) -> dict[str, Variant]:
    from mlx_lm.models.cache import KVCache, RotatingKVCache, make_prompt_cache

    from inference.kvcache import KVCacheSettings, compact

    model, tokenizer = loaded.model, loaded.tokenizer
    variants = {"full": Variant("full cache")}
    for bits in KV_BITS:
        variants[f"q{bits}"] = Variant(f"kv_bits {bits} (group {args.group_size})")
    for size in args.max_kv_size:
        variants[f"rot{size}"] = Variant(f"max_kv_size {size}")

    for turns in args.turns:
        messages = [*history(turns), {"role": "user", "content": QUESTIONS[turns]}]
        prompt = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        before = list(tokenizer.apply_chat_template(history(turns), add_generation_prompt=False))
        split = next(
            (i for i, (a, b) in enumerate(zip(before, prompt, strict=False)) if a != b),
            min(len(before), len(prompt)),
        )
        logger.info("%d earlier turns: %d prompt tokens, %d kept", turns, len(prompt), split)
        began = time.perf_counter()

        prefix: list[Any] = make_prompt_cache(model)
        _prefill(model, prefix, prompt[:split])
        full_settings = KVCacheSettings()

        kept_full = compact(prefix, full_settings)
        (full_tokens, full_logprobs), _ = _reply_on(model, kept_full, prompt[split:], args.n)
        full = (full_tokens, full_logprobs)
        variants["full"].agreement.append(1.0)
        variants["full"].top1.append(1.0)
        variants["full"].mean_dlogprob.append(0.0)
        variants["full"].max_dlogprob.append(0.0)
        variants["full"].kept_bytes.append(sum(c.nbytes for c in kept_full))

        for bits in KV_BITS:
            settings = KVCacheSettings(kv_bits=bits, kv_group_size=args.group_size)
            kept = compact(prefix, settings)
            (free_tokens, _), (cache, logits) = _reply_on(model, kept, prompt[split:], args.n)
            forced = _decode(model, cache, logits, args.n, forced=full_tokens)
            variant = variants[f"q{bits}"]
            _record(variant, full, free_tokens, forced)
            variant.kept_bytes.append(sum(c.nbytes for c in kept))

        for size in args.max_kv_size:
            variant = variants[f"rot{size}"]
            if not all(type(c) is KVCache for c in make_prompt_cache(model)):
                continue
            rotating = [RotatingKVCache(max_size=size, keep=4) for _ in model.layers]
            logits = _prefill(model, rotating, prompt)
            free_tokens, _ = _decode(model, rotating, logits, args.n)
            rotating = [RotatingKVCache(max_size=size, keep=4) for _ in model.layers]
            logits = _prefill(model, rotating, prompt)
            forced = _decode(model, rotating, logits, args.n, forced=full_tokens)
            _record(variant, full, free_tokens, forced)
            variant.kept_bytes.append(sum(c.nbytes for c in rotating))
        logger.info("  done in %.0f s", time.perf_counter() - began)
    return variants


def render(settings: Any, args: argparse.Namespace, variants: dict[str, Variant], took: float,
           prompt_sizes: str, weights: str) -> str:  # fmt: skip
    lines = [
        "## Quantized and rotating KV caches: quality against the full cache",
        "",
        *[line for line in chat._machine(settings) if "weights computed" not in line],
        f"- weights computed with: {weights}",
        f"- {len(args.turns)} conversations ({prompt_sizes}), {args.n} greedy tokens each; "
        f"run took {took:.0f} s",
        f"- command: `{' '.join(sys.argv)}`",
        "",
        "| cache | greedy agreement (mean, min) | teacher-forced top-1 | mean abs dlogprob "
        "| max abs dlogprob | cache bytes (mean) |",
        "|---|---|---|---|---|---|",
    ]
    for variant in variants.values():
        if not variant.agreement:
            continue
        lines.append(
            f"| {variant.name} | {statistics.fmean(variant.agreement):.2f}, "
            f"{min(variant.agreement):.2f} | {statistics.fmean(variant.top1):.2f} | "
            f"{statistics.fmean(variant.mean_dlogprob):.4f} | {max(variant.max_dlogprob):.3f} | "
            f"{statistics.fmean(variant.kept_bytes) / 2**20:.1f} MiB |"
        )
    return "\n".join(lines) + "\n"


def _ints(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in value.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {value}") from None


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr
    )
    for noisy in ("inference", "mlx_lm", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-id", default=None, help="a catalogue model id (default model)")
    parser.add_argument("--turns", type=_ints, default=(6, 12),
                        help="earlier turns of each conversation (1..19)")  # fmt: skip
    parser.add_argument("--n", type=int, default=24, help="greedy tokens a reply (1..256)")
    parser.add_argument("--group-size", type=int, default=64, choices=(32, 64, 128))
    parser.add_argument("--max-kv-size", type=_ints, default=(128, 256),
                        help="rotating cache sizes to try (64..)")  # fmt: skip
    parser.add_argument("--output", type=Path, default=None, help="also write the report here")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if not args.turns or not all(1 <= t <= len(QUESTIONS) - 1 for t in args.turns):
        parser.error(f"--turns: each 1..{len(QUESTIONS) - 1}")
    if not 1 <= args.n <= 256:
        parser.error("--n: 1..256")
    if not all(size >= 64 for size in args.max_kv_size):
        parser.error("--max-kv-size: each at least 64")
    settings = chat.parse_args(["--model-id", args.model_id] if args.model_id else [])

    from inference.loader import load_model, use_float32_on_cpu

    started = time.perf_counter()
    loaded = load_model(settings.spec, settings.converted_dir)
    weights = "as stored"
    if use_float32_on_cpu(loaded, settings.config.server.cpu_float32_max_bytes):
        weights = "float32, dequantized at load as the engine serves it on the CPU"
    variants = measure(loaded, args)
    sizes = ", ".join(
        str(len(loaded.tokenizer.apply_chat_template(
            [*history(t), {"role": "user", "content": QUESTIONS[t]}], add_generation_prompt=True
        )))
        for t in args.turns
    ) + " prompt tokens"  # fmt: skip
    report = render(settings, args, variants, time.perf_counter() - started, sizes, weights)
    print(report)
    if args.output is not None:
        args.output.write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
