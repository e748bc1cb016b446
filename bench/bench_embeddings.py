"""Embedding benchmark: milliseconds per sample at batch 1 and batch 32, through the Engine.

The embedding model (all-MiniLM-L6-v2 unless `--model` names another configured one) is served
by `inference.engine.Engine` called directly, as the inference worker calls it; the HTTP layer
is measured elsewhere. Phases, one after another:

- **batch 1**: `--samples` requests of one text each, sent one after the other;
- **batch 32**: requests of 32 texts each, `--samples` texts in all;
- both again with texts cut at the model's 256 tokens (`--no-long` skips them);
- the same batches run on the model object directly (`SentenceEmbedder.embed`, no engine),
  which shows what the engine's queue and thread hand-over cost;
- with `--st-python PYTHON` (an interpreter that has sentence-transformers and torch; mlxweb
  never installs them), sentence-transformers' `encode` on the same texts, same batch sizes,
  for a ratio on the same machine.

Every phase runs `--repeats` times after one warm-up; the report gives the median and the best.

    .venv/bin/python manage.py fetch_models
    .venv/bin/python bench/bench_embeddings.py --output /tmp/bench-embeddings.md
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mlxweb.launcher import ensure_fast_blas  # noqa: E402

# As manage.py: OpenBLAS for MLX's float32 matmuls on Linux (the encoder is all float32).
ensure_fast_blas(sys.argv)

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from datetime import UTC, datetime  # noqa: E402
from importlib import metadata  # noqa: E402
from typing import Any  # noqa: E402

# Sentences of the length people embed (a search query, a line of a document): 10-30 tokens.
SHORT = [
    "How do I reset my password?",
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar on a crowded street corner.",
    "Quarterly revenue fell sharply after the product recall was announced.",
    "Café naïve façade: unicode text should be embedded like any other sentence.",
    "What is the capital of France, and how many people live there?",
    "def embed(texts): return [model(t) for t in texts]",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen.",
]
LONG = " ".join(SHORT) * 6  # well over 256 tokens: every copy is cut at the model's maximum


def _texts(n: int, long: bool) -> list[str]:
    # Numbered so that no two requests are identical (nothing here caches, but stay honest).
    base = [LONG] if long else SHORT
    return [f"{i}. {base[i % len(base)]}" for i in range(n)]


def _timed(run: Callable[[], Any], repeats: int) -> list[float]:
    run()  # warm-up: the first call compiles and sizes MLX's buffers
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        run()
        times.append(time.perf_counter() - began)
    return times


def _per_sample_ms(times: list[float], samples: int) -> dict[str, float]:
    return {
        "median": statistics.median(times) * 1000 / samples,
        "best": min(times) * 1000 / samples,
    }


def _batches(texts: list[str], size: int) -> list[list[str]]:
    return [texts[i : i + size] for i in range(0, len(texts), size)]


def measure_engine(model_id: str, samples: int, repeats: int, long: bool) -> dict[str, Any]:
    from inference.catalogue import Catalogue
    from inference.engine import Engine
    from mlxweb.config import load_config

    config = load_config()
    catalogue = Catalogue(config, config.server.models_dir)
    engine = Engine(catalogue=catalogue, converted_dir=Path(tempfile.mkdtemp()))
    engine.start()
    try:
        texts = _texts(samples, long)

        def run(size: int) -> Callable[[], None]:
            def go() -> None:
                for batch in _batches(texts, size):
                    result = engine.embed_wait(model_id, batch)
                    if result.kind:
                        raise SystemExit(f"{model_id}: {result.error}")

            return go

        tokens = engine.embed_wait(model_id, texts).prompt_tokens
        return {
            "tokens_per_sample": tokens / samples,
            **{f"batch {n}": _per_sample_ms(_timed(run(n), repeats), samples) for n in (1, 32)},
        }
    finally:
        engine.stop()


def measure_direct(model_dir: Path, samples: int, repeats: int, long: bool) -> dict[str, Any]:
    from inference.embeddings import load_sentence_embedder

    embedder = load_sentence_embedder(model_dir)
    texts = _texts(samples, long)

    def run(size: int) -> Callable[[], None]:
        def go() -> None:
            for batch in _batches(texts, size):
                embedder.embed(batch, batch_size=size)

        return go

    return {f"batch {n}": _per_sample_ms(_timed(run(n), repeats), samples) for n in (1, 32)}


_ST_SCRIPT = """
import json, statistics, sys, time
from sentence_transformers import SentenceTransformer
import torch
model_dir, repeats, texts = sys.argv[1], int(sys.argv[2]), json.loads(sys.stdin.read())
model = SentenceTransformer(model_dir, device="cpu")
out = {"torch": torch.__version__, "threads": torch.get_num_threads()}
for size in (1, 32):
    def go():
        for i in range(0, len(texts), size):
            model.encode(texts[i:i + size], batch_size=size)
    go()
    times = []
    for _ in range(repeats):
        t = time.perf_counter(); go(); times.append(time.perf_counter() - t)
    out[f"batch {size}"] = {"median": statistics.median(times) * 1000 / len(texts),
                            "best": min(times) * 1000 / len(texts)}
print(json.dumps(out))
"""


def measure_sentence_transformers(
    python: str, model_dir: Path, samples: int, repeats: int, long: bool
) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "PYTHONPATH")}
    command = [python, "-c", _ST_SCRIPT, str(model_dir), str(repeats)]
    texts = json.dumps(_texts(samples, long))
    done = subprocess.run(command, input=texts, capture_output=True, text=True, env=env, check=True)
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def _row(label: str, results: dict[str, Any]) -> str:
    cells = [
        f"{results[f'batch {n}']['median']:.2f} ms (best {results[f'batch {n}']['best']:.2f})"
        for n in (1, 32)
    ]
    return f"| {label} | {cells[0]} | {cells[1]} |"


def report(args: argparse.Namespace, results: dict[str, dict[str, Any]], seconds: float) -> str:
    import mlx.core as mx

    lines = [
        f"### {args.model} ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {seconds / 60:.1f} minutes)",
        "",
        f"mlx {metadata.version('mlx')} on {mx.default_device()}, {platform.machine()}, "
        f"{os.cpu_count()} cores, OpenBLAS preloaded: "
        f"{os.environ.get('MLXWEB_BLAS_PRELOADED') == '1'}; {args.samples} samples per phase, "
        f"median (best) of {args.repeats} runs after a warm-up.",
        "",
        f"Command: `{' '.join(shlex.quote(a) for a in sys.argv)}`",
        "",
    ]
    for kind in ("short", "long"):
        if f"engine {kind}" not in results:
            continue
        engine = results[f"engine {kind}"]
        lines += [
            f"{'Sentences' if kind == 'short' else 'Long texts'} "
            f"({engine['tokens_per_sample']:.0f} tokens a sample), ms per sample:",
            "",
            "| | batch 1 | batch 32 |",
            "|---|---|---|",
            _row("Engine (ours)", engine),
            _row("model directly (ours, no engine)", results[f"direct {kind}"]),
        ]
        st = results.get(f"st {kind}")
        if st:
            lines.append(
                _row(f"sentence-transformers (torch {st['torch']}, {st['threads']} threads)", st)
            )
        lines.append("")
    short = results["engine short"]
    lines.append(
        f"Target under 20 ms a sample: batch 1 {short['batch 1']['median']:.2f} ms, "
        f"batch 32 {short['batch 32']['median']:.2f} ms (sentences)."
    )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="all-minilm-l6-v2", help="a configured model id")
    parser.add_argument("--samples", type=int, default=64, help="texts per phase")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-long", action="store_true", help="skip the 256-token texts")
    parser.add_argument("--st-python", help="a Python with sentence-transformers, to compare")
    parser.add_argument("--output", type=Path, help="also write the report here")
    args = parser.parse_args()

    from mlxweb.config import load_config

    config = load_config()
    model = config.models.get(args.model)
    if model is None or model.task != "embed" or model.source.path is None:
        raise SystemExit(f"{args.model}: not a configured embedding model with a folder")
    model_dir = config.server.models_dir / model.source.path
    if not (model_dir / "config.json").is_file():
        raise SystemExit(f"{model_dir} is missing: run manage.py fetch_models first")

    began = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    for kind in ("short",) if args.no_long else ("short", "long"):
        long = kind == "long"
        samples = args.samples
        results[f"engine {kind}"] = measure_engine(args.model, samples, args.repeats, long)
        results[f"direct {kind}"] = measure_direct(model_dir, samples, args.repeats, long)
        if args.st_python:
            results[f"st {kind}"] = measure_sentence_transformers(
                args.st_python, model_dir, samples, args.repeats, long
            )
    text = report(args, results, time.perf_counter() - began)
    print(text)
    if args.output:
        args.output.write_text(text)


if __name__ == "__main__":
    main()
