"""What a new prefill shape costs on CUDA: one forward pass of a model directory (as
bench_engine_gpu.py builds them) at lengths and offsets seen for the first time and again, and a
decode step, under whatever MLX environment the command runs with. MLX reads its switches once
per process, so run it once per setting:

    for v in "" MLX_CUDA_USE_CUDNN_SDPA=0 MLX_USE_CUDA_GRAPHS=0; do
        env $v python3 bench/bench_shapes_gpu.py --model-dir /tmp/bw/models/llama3-8b-bf16
    done
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True)
    args = parser.parse_args()

    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache

    model: Any = load(args.model_dir)[0]

    def prefill(length: int, offset: int = 0) -> float:
        cache = make_prompt_cache(model)
        if offset:
            model(mx.array([list(range(10, 10 + offset))]), cache=cache)
            mx.eval([c.state for c in cache])
        began = time.perf_counter()
        logits = model(mx.array([list(range(100, 100 + length))]), cache=cache)
        mx.eval(logits[:, -1, :].argmax(-1))
        return round((time.perf_counter() - began) * 1000, 1)

    def decode(rows: int, steps: int = 30) -> float:
        cache = make_prompt_cache(model)
        model(mx.array([list(range(10, 210))] * rows), cache=cache)
        y = mx.array([[5]] * rows)
        mx.eval([c.state for c in cache])
        times = []
        for _ in range(steps):
            began = time.perf_counter()
            y = model(y, cache=cache)[:, -1, :].argmax(-1)[:, None]
            mx.eval(y)
            times.append((time.perf_counter() - began) * 1000)
        return round(statistics.median(times[5:]), 2)

    prefill(64)
    prefill(64)
    print({k: v for k, v in os.environ.items() if k.startswith("MLX_")} or "MLX defaults")
    print(
        "  new lengths, ms first / again:",
        [(n, prefill(n), prefill(n)) for n in (150, 151, 152, 153)],
    )
    print(
        "  40 tokens at new offsets:",
        [(o, prefill(40, o), prefill(40, o)) for o in (100, 101, 102)],
    )
    print("  512 and 513 tokens:", [(n, prefill(n), prefill(n)) for n in (512, 513)])
    print("  decode step ms, 1 / 32 rows:", decode(1), decode(32))


if __name__ == "__main__":
    main()
