"""The engine against raw mlx-lm in pairs in one process: one stream's decode against
`stream_generate`, or N streams' aggregate against `BatchGenerator` (`--streams N`).

`bench_engine_gpu.py` measures raw mlx-lm and the engine in separate processes, one after the
other; on an H100 raw's own one-stream decode moved between 121 and 161 tok/s from one such
process to the next, so a ratio of two separate medians says little. Here one process builds (or
reuses) one model, loads it twice (once for raw mlx-lm, once through the engine's catalogue) and
alternates: raw, engine, raw, engine... Each pair's ratio is taken within the pair; the report
gives every pair and their median.

MLX reads its CUDA attention switch once per process, so `--cudnn-sdpa` sets it for both systems
before MLX loads (the engine's own default is 0; see inference/engine.py). With one stream,
decode alone is compared: one token a step, on the model's only stream (the engine's solo
path). With N, N prompts arrive together and the aggregate is all their tokens over the time
from the first submit to the last token (as bench_engine_gpu.py measures it); the pairs
alternate which system goes first.

    python3 bench/bench_decode_gpu.py --shape llama3-8b --format bf16 --pairs 7 --max-tokens 512
    python3 bench/bench_decode_gpu.py --shape llama3-8b --format bf16 --pairs 7 --max-tokens 64 \
        --streams 32
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

logger = logging.getLogger("bench_decode_gpu")


class StepClock:
    """Calls and seconds of timed methods, by method and by whether the engine's thread made
    them (raw mlx-lm runs on the main thread): where each system's wall time goes."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = defaultdict(int)
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, cls: Any, name: str) -> None:
        original = getattr(cls, name)
        clock = self

        def timed(*args: Any, **kwargs: Any) -> Any:
            began = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                who = "raw" if threading.current_thread() is threading.main_thread() else "engine"
                key = f"{who} {cls.__name__}.{name}"
                clock.calls[key] += 1
                clock.seconds[key] += time.perf_counter() - began

        setattr(cls, name, timed)

    def take(self) -> dict[str, tuple[int, float]]:
        taken = {k: (self.calls[k], self.seconds[k]) for k in sorted(self.calls)}
        self.calls.clear()
        self.seconds.clear()
        return taken


class PassLog(logging.Handler):
    """The engine's prefill passes (its DEBUG "pass:" lines) while started, by label."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self._engine_log = logging.getLogger("inference.engine")

    def start(self, label: str) -> None:
        self.lines.append(f"{label}:")
        self._engine_log.addHandler(self)
        self._engine_log.setLevel(logging.DEBUG)

    def stop(self) -> None:
        self._engine_log.removeHandler(self)
        self._engine_log.setLevel(logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("pass:"):
            self.lines.append(f"  {record.relativeCreated / 1000:.3f}s {message}")

    def render(self) -> str:
        if not self.lines:
            return ""
        return "\nThe engine's prefill passes\n\n" + "\n".join(self.lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama3-8b")
    parser.add_argument("--format", default="bf16", choices=("bf16", "q8", "q4"))
    parser.add_argument("--pairs", type=int, default=7)
    parser.add_argument("--streams", type=int, default=1)
    parser.add_argument("--max-batch-tokens", type=int, default=2048, help="the engine's")
    parser.add_argument(
        "--generator-stream",
        choices=("engine", "mlx-lm"),
        default="engine",
        help="the stream of the engine's BatchGenerator: the engine thread's default stream (as "
        "shipped) or mlx-lm's generation_stream, as raw uses (an experiment)",
    )
    parser.add_argument(
        "--gpu-passes",
        choices=("on", "off"),
        default="on",
        help="the engine's gpu_passes (as shipped: on): prompt chunks start at max_batch_tokens, "
        "take lengths from a ladder, and a step's second pass only finishes prompts; off: "
        "chunks as measured times make them, as on the CPU",
    )
    parser.add_argument(
        "--trace",
        type=int,
        default=0,
        help="log the engine's prefill passes (rows, tokens, offset, ms) of the first N pairs",
    )
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--prompt-words", type=int, default=120)
    parser.add_argument("--cudnn-sdpa", choices=("0", "1"), default="0")
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--tokenizer-dir", type=Path, default=ROOT / ".bench/tokenizer")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.pairs < 1 or args.max_tokens < 2 or args.streams < 1:
        parser.error("--pairs and --streams must be >= 1 and --max-tokens >= 2")
    os.environ["MLX_CUDA_USE_CUDNN_SDPA"] = args.cudnn_sdpa
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("inference").setLevel(logging.WARNING)

    import bench_engine_gpu as bench
    from mlx_lm import load

    from inference.catalogue import Catalogue, model_id_for_dir
    from inference.engine import Engine
    from mlxweb.config import Config, ServerConfig

    settings = bench.parse_args(
        [
            "--shapes", args.shape, "--formats", args.format, "--streams", str(args.streams),
            "--max-tokens", str(args.max_tokens), "--batch-max-tokens", str(args.max_tokens),
            "--prompt-words", str(args.prompt_words),
        ]
    )  # fmt: skip
    tokenizer_dir = bench.ensure_tokenizer(args.tokenizer_dir)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench-decode-gpu-"))
    model_dir = work / "models" / f"{args.shape}-{args.format}"
    if not (model_dir / "config.json").is_file():
        model_dir.parent.mkdir(parents=True, exist_ok=True)
        bench.build_model(args.shape, args.format, tokenizer_dir, model_dir)
    model, tokenizer = load(str(model_dir))[:2]
    model_id = model_id_for_dir(model_dir.name)
    config = Config(
        server=ServerConfig(default_model=model_id, models_dir=model_dir.parent), models={}
    )
    engine = Engine(
        catalogue=Catalogue(config, model_dir.parent),
        converted_dir=model_dir.parent / ".converted",
        max_loaded_models=1,
        completion_batch_size=settings.decode_batch,
        prefill_batch_size=settings.prefill_batch,
        max_new_tokens=args.max_tokens,
        max_batch_tokens=args.max_batch_tokens,
    )
    engine.gpu_passes = args.gpu_passes == "on"
    from mlx_lm.generate import BatchGenerator, PromptProcessingBatch

    if args.generator_stream == "mlx-lm":
        _generators_on_mlx_lm_stream(Engine)
    clock = StepClock()
    clock.wrap(BatchGenerator, "next")
    clock.wrap(PromptProcessingBatch, "prompt")
    passes = PassLog()
    for method in ("_step", "_batch_step", "_prefill_step", "_solo_step", "_place_ready"):
        clock.wrap(Engine, method)
    engine.start()
    rows: list[tuple[float, float, float, float]] = []
    steps: list[dict[str, tuple[int, float]]] = []
    try:
        engine.load(model_id)
        n = args.streams

        def run_raw() -> tuple[float, float]:
            if n == 1:
                one = bench.raw_single(model, tokenizer, args.max_tokens, args.prompt_words)
                _full("raw", [one])
                return one.decode_tps, one.ttft_s
            batch = bench.raw_batch(model, tokenizer, n, args.max_tokens, settings)
            _full("raw", batch.streams)
            return batch.aggregate_tps, batch.median_ttft_s

        def run_ours() -> tuple[float, float]:
            batch = bench.engine_run(engine, model_id, n, args.max_tokens, settings)
            _full("engine", batch.streams)
            if n == 1:
                return batch.streams[0].decode_tps, batch.streams[0].ttft_s
            return batch.aggregate_tps, batch.median_ttft_s

        # warm-ups: every shape either system meets
        run_raw()
        run_ours()
        clock.take()
        for i in range(args.pairs):
            if i < args.trace:
                passes.start(f"pair {i + 1}")
            if i % 2 == 0:
                (raw, raw_ttft), (ours, our_ttft) = run_raw(), run_ours()
            else:
                (ours, our_ttft), (raw, raw_ttft) = run_ours(), run_raw()
            passes.stop()
            rows.append((raw, ours, raw_ttft, our_ttft))
            steps.append(clock.take())
            logger.info(
                "pair %d: raw %.1f tok/s, engine %.1f (%.3fx)", i + 1, raw, ours, ours / raw
            )
    finally:
        engine.stop(timeout=60)
    report = render(args, rows) + render_steps(steps) + passes.render()
    sys.stdout.write(report)
    if args.output is not None:
        args.output.write_text(report)
    return 0


def _generators_on_mlx_lm_stream(engine_class: Any) -> None:
    """Make the engine's BatchGenerators run on mlx-lm's own generation_stream."""
    from mlx_lm.generate import generation_stream

    original = engine_class._new_generator

    def on_generation_stream(self: Any, loaded: Any) -> Any:
        generator = original(self, loaded)
        generator._stream = generation_stream
        return generator

    engine_class._new_generator = on_generation_stream


def _full(name: str, streams: list[Any]) -> None:
    for run in streams:
        if run.finish != "length":
            raise RuntimeError(f"{name} ended early ({run.finish}, {run.tokens} tokens)")


def render(args: argparse.Namespace, rows: list[tuple[float, float, float, float]]) -> str:
    import mlx.core as mx

    what = "One stream" if args.streams == 1 else f"{args.streams} streams (aggregate tok/s)"
    lines = [
        f"{what}, {args.shape} {args.format}, {args.max_tokens} tokens, greedy, "
        f"MLX_CUDA_USE_CUDNN_SDPA={args.cudnn_sdpa}, engine max_batch_tokens "
        f"{args.max_batch_tokens}, gpu_passes {args.gpu_passes}, device {mx.default_device()}, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        "| pair | raw tok/s | engine tok/s | engine / raw | raw TTFT ms | engine TTFT ms |",
        "|---|---|---|---|---|---|",
    ]
    for i, (raw, ours, raw_ttft, our_ttft) in enumerate(rows, 1):
        lines.append(
            f"| {i} | {raw:.1f} | {ours:.1f} | {ours / raw:.3f} | "
            f"{raw_ttft * 1000:.1f} | {our_ttft * 1000:.1f} |"
        )
    ratios = [ours / raw for raw, ours, _, _ in rows]
    lines += [
        "",
        f"median engine / raw: {statistics.median(ratios):.3f} "
        f"(min {min(ratios):.3f}, max {max(ratios):.3f}); raw median "
        f"{statistics.median(r[0] for r in rows):.1f} tok/s, engine median "
        f"{statistics.median(r[1] for r in rows):.1f}",
        "",
    ]
    return "\n".join(lines)


def render_steps(steps: list[dict[str, tuple[int, float]]]) -> str:
    """Per pair, mean calls and milliseconds of each timed method (both systems' runs)."""
    keys = sorted({k for pair in steps for k in pair})
    if not keys:
        return ""
    lines = [
        "Where the time went, per run (means over the pairs): calls, total ms, ms per call",
        "",
        "| method | calls | total ms | ms per call |",
        "|---|---|---|---|",
    ]
    for key in keys:
        calls = statistics.mean(pair.get(key, (0, 0.0))[0] for pair in steps)
        total = statistics.mean(pair.get(key, (0, 0.0))[1] for pair in steps) * 1000
        lines.append(f"| {key} | {calls:.0f} | {total:.0f} | {total / calls if calls else 0:.2f} |")
    return "\n".join(lines + [""])


if __name__ == "__main__":
    sys.exit(main())
