"""Where a lone request's time to first token goes: one prompt's prefill measured the ways the
engine and raw mlx-lm run it, on one model directory (as bench_engine_gpu.py builds them).

The engine's lone-request TTFT on the H100 was ~100 ms of prefill against raw mlx-lm's ~30 ms
for the same 182-token prompt (docs/benchmarks.md). The engine runs every model call on a
stream of its own thread; raw mlx-lm runs on the main thread's default stream. This measures
the same forward pass both ways (and through mlx-lm's generate_step) to tell which costs what.

    python3 bench/bench_ttft_gpu.py --model-dir /tmp/bw/models/llama3-8b-bf16 --tokens 182
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _prefill(model: Any, prompt: list[int], stream: Any = None) -> float:
    """Seconds for the prompt through a fresh cache and the first token's argmax, as the
    engine's _prefill_chunk does."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    started = time.perf_counter()
    cache = make_prompt_cache(model)
    if stream is None:
        logits = model(mx.array([prompt], dtype=mx.uint32), cache=cache)
        token = mx.argmax(logits[:, -1, :], axis=-1)
        mx.eval([c.state[:2] for c in cache] + [token])
    else:
        with mx.stream(stream):
            logits = model(mx.array([prompt], dtype=mx.uint32), cache=cache)
            token = mx.argmax(logits[:, -1, :], axis=-1)
            mx.eval([c.state[:2] for c in cache] + [token])
    token.item()
    return time.perf_counter() - started


def _generate_step(model: Any, prompt: list[int]) -> float:
    """Seconds to mlx-lm's generate_step's first token (raw stream_generate's prefill)."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    started = time.perf_counter()
    for token, _ in generate_step(mx.array(prompt, dtype=mx.uint32), model, max_tokens=1):
        int(token)
        break
    return time.perf_counter() - started


def _in_thread(work: Callable[[], list[float]]) -> list[float]:
    out: list[float] = []
    thread = threading.Thread(target=lambda: out.extend(work()))
    thread.start()
    thread.join()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--tokens", type=int, default=182)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    import mlx.core as mx
    from mlx_lm import load

    model = load(str(args.model_dir))[0]
    prompt = [(i * 7919) % 30000 + 10 for i in range(args.tokens)]

    def times(run: Callable[[], float]) -> list[float]:
        for _ in range(3):
            run()
        return [run() for _ in range(args.repeats)]

    def thread_stream() -> list[float]:
        # As the engine thread: its own default stream, every call inside mx.stream(it).
        stream = mx.default_stream(mx.default_device())
        return times(lambda: _prefill(model, prompt, stream))

    def thread_new_stream() -> list[float]:
        stream = mx.new_stream(mx.default_device())
        return times(lambda: _prefill(model, prompt, stream))

    rows = {
        "main thread, default stream": times(lambda: _prefill(model, prompt)),
        "mlx-lm generate_step (main thread)": times(lambda: _generate_step(model, prompt)),
        "own thread, its default stream (the engine)": _in_thread(thread_stream),
        "own thread, a new stream": _in_thread(thread_new_stream),
        "own thread, no stream context": _in_thread(lambda: times(lambda: _prefill(model, prompt))),
    }
    print(f"prefill of {args.tokens} tokens, {args.model_dir.name}, {mx.default_device()}")
    print("| how | median ms | min ms |")
    print("|---|---|---|")
    for name, values in rows.items():
        ms = [v * 1000 for v in values]
        print(f"| {name} | {statistics.median(ms):.1f} | {min(ms):.1f} |")


if __name__ == "__main__":
    main()
