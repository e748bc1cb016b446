"""Where a lone request's time to first token goes: one prompt's prefill measured the ways the
engine and raw mlx-lm run it, on one model directory (as bench_engine_gpu.py builds them).

The engine's lone-request TTFT on the H100 was ~100 ms of prefill against raw mlx-lm's ~30 ms
for the same 182-token prompt (docs/benchmarks.md). The engine runs every model call on a
stream of its own thread; raw mlx-lm runs on the main thread's default stream. This measures
the same forward pass both ways (and through mlx-lm's generate_step) to tell which costs what.

    python3 bench/bench_ttft_gpu.py --model-dir /tmp/bw/models/llama3-8b-bf16 --tokens 182
    # and the engine's own sections, cache off and on, one stream and 32 at once:
    python3 bench/bench_ttft_gpu.py --model-dir ... --engine-streams 32
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _prefill(model: Any, prompt: list[int], stream: Any = None) -> float:
    """Seconds for the prompt through a fresh cache and the first token's argmax, as the
    engine's _prefill_group does."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    started = time.perf_counter()
    cache = make_prompt_cache(model)
    with mx.stream(stream) if stream is not None else contextlib.nullcontext():
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


def engine_sections(model_dir: Path, streams: int, repeats: int, words: int) -> list[str]:
    """Run inference.engine.Engine on the model with its prompt cache off and on, timing the
    engine's own sections (wall time in each method, summed): one stream `repeats` times, then
    `streams` at once. Markdown lines."""
    import collections

    import mlx.core as mx
    from bench_engine_gpu import _messages, _nonces

    import inference.engine as engine_module
    import inference.kvcache as kvcache
    from inference.catalogue import Catalogue, model_id_for_dir
    from inference.engine import Engine, Finished, GenerationRequest
    from inference.schemas import GenerationParams
    from mlxweb.config import Config, ServerConfig

    spent: dict[str, float] = collections.defaultdict(float)
    calls: collections.Counter[str] = collections.Counter()

    def timed(owner: Any, name: str) -> None:
        original = getattr(owner, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            began = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - began
                calls[name] += 1

        setattr(owner, name, wrapper)

    for name in (
        "_admit", "_step", "_place_ready", "_prefill_step", "_prefill_group", "_chunk_start",
        "_chunk_finish", "_board_riders", "_land_riders", "_batch_step", "_solo_step",
        "_join_batch", "_finish", "_sample", "_emit_token",
    ):  # fmt: skip
        timed(engine_module.Engine, name)
    for name in ("insert", "fetch"):
        timed(kvcache.PromptCacheStore, name)
    timed(mx, "eval")

    # The engine's own account of each prefill chunk (rows x tokens, offset, milliseconds).
    chunk_lines: list[str] = []

    class _Chunks(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "chunk of" in record.msg:
                chunk_lines.append(record.getMessage())

    engine_logger = logging.getLogger("inference.engine")
    engine_logger.addHandler(_Chunks())
    engine_logger.setLevel(logging.DEBUG)

    model_id = model_id_for_dir(model_dir.name)
    config = Config(
        server=ServerConfig(default_model=model_id, models_dir=model_dir.parent), models={}
    )
    lines = []
    for entries in (0, 16):
        engine = Engine(
            catalogue=Catalogue(config, model_dir.parent),
            converted_dir=model_dir.parent / ".converted",
            max_loaded_models=1,
            prompt_cache_entries=entries,
        )
        engine.start()
        engine.load(model_id)

        def run(
            n: int, max_tokens: int, engine: Any = engine, entries: int = entries
        ) -> tuple[float, list[Any]]:
            done: dict[str, Any] = {}
            event = threading.Event()
            requests = [
                GenerationRequest(
                    f"{entries}-{nonce}",
                    model_id,
                    _messages(nonce, words),
                    GenerationParams(temperature=0.0, max_tokens=max_tokens),
                )  # fmt: skip
                for nonce in _nonces(n)
            ]

            def emit(e: Any) -> None:
                if isinstance(e, Finished):
                    done[e.request_id] = e
                    if len(done) == n:
                        event.set()

            began = time.perf_counter()
            for request in requests:
                engine.submit(request, emit)
            event.wait(600)
            return time.perf_counter() - began, list(done.values())

        run(1, 16)
        run(streams, 16)
        for label, n, tokens, times in (
            ("1 stream", 1, 32, repeats),
            (f"{streams} streams", streams, 64, 1),
        ):
            spent.clear()
            calls.clear()
            chunk_lines.clear()
            wall, finished = 0.0, []
            for _ in range(times):
                w, f = run(n, tokens)
                wall += w
                finished += f
            ttft = [f.details.get("ttft_ms", {}) for f in finished]
            parts = {
                k: round(statistics.median(t.get(k, 0.0) for t in ttft), 1)
                for k in ("wait", "admit", "prefill")
            }
            sections = ", ".join(
                f"{k} {v * 1000:.0f} ms/{calls[k]}"
                for k, v in sorted(spent.items(), key=lambda kv: -kv[1])
            )
            chunks = statistics.median(f.details.get("prefill_chunks", 0) for f in finished)
            lines.append(
                f"- cache {'on' if entries else 'off'}, {label}: wall {wall:.2f} s, "
                f"ttft parts {parts}, prefill chunks (median) {chunks}; {sections}"
            )
            if n == 1:
                lines += [f"  - {line}" for line in chunk_lines[-6:]]
        engine.stop(timeout=60)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--tokens", type=int, default=182)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--engine-streams", type=int, default=0,
        help="also time the engine's sections, one stream and this many at once (0: not)",
    )  # fmt: skip
    parser.add_argument("--prompt-words", type=int, default=120)
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
    if args.engine_streams:
        print()
        print("The engine's sections (wall time summed per method / calls):")
        for line in engine_sections(
            args.model_dir, args.engine_streams, repeats=5, words=args.prompt_words
        ):
            print(line)


if __name__ == "__main__":
    main()
