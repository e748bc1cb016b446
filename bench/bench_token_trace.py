"""What the chat's token trace costs (issue 9's token-level fork): decode speed through the
Engine without logprobs and with logprobs + 5 alternatives per token (what a replayable chat
reply asks for), on the default model (SmolLM2-135M, 49,152-token vocabulary) or any model of
the catalogue, one stream and several at once, rounds alternating so that drift hits both.

    .venv/bin/python bench/bench_token_trace.py [--model smollm2-135m-instruct] [--rounds 3]

Also prints the size of the stored trace per token (JSON), for the database's growth.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mlxweb.settings")
    import django

    django.setup()
    from django.conf import settings

    from inference.catalogue import get_catalogue
    from inference.engine import Delta, Engine, Finished, GenerationRequest
    from inference.provenance import trace_entry
    from inference.schemas import GenerationParams

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a catalogue id (default: the default)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument(
        "--micro-only", action="store_true", help="only the per-token CPU time of the trace"
    )
    args = parser.parse_args()

    catalogue = get_catalogue()
    model_id = args.model or catalogue.default_model_id
    server = settings.MLXWEB_CONFIG.server
    engine = Engine(
        catalogue=catalogue,
        converted_dir=settings.MLXWEB_CONVERTED_DIR,
        cpu_float32_max_bytes=server.cpu_float32_max_bytes,
        prompt_cache_entries=0,  # every run prefills: the same work each round
    )
    engine.start()
    engine.load(model_id)
    counter = iter(range(10**9))

    def run(streams: int, traced: bool) -> tuple[float, list[dict[str, Any]]]:
        """Aggregate decode tok/s of `streams` replies at once, and one reply's trace."""
        done = threading.Semaphore(0)
        firsts: list[float] = []
        lasts: list[float] = []
        counts: list[int] = []
        trace: list[dict[str, Any]] = []
        lock = threading.Lock()

        def emit_for(i: int) -> Any:
            first = [0.0]

            def emit(event: Any) -> None:
                if isinstance(event, Delta):
                    if not first[0]:
                        first[0] = time.perf_counter()
                    if i == 0 and event.logprobs:
                        trace.extend(trace_entry(e) for e in event.logprobs)
                elif isinstance(event, Finished):
                    with lock:
                        firsts.append(first[0])
                        lasts.append(time.perf_counter())
                        counts.append(event.completion_tokens)
                    done.release()  # never block the engine thread

            return emit

        params = GenerationParams(
            temperature=0.0,
            max_tokens=args.tokens,
            logprobs=traced,
            top_logprobs=5 if traced else 0,
        )
        for i in range(streams):
            request = GenerationRequest(
                f"bench-{next(counter)}",
                model_id,
                [{"role": "user", "content": f"Write a long story about a lighthouse {i}."}],
                params,
            )
            engine.submit(request, emit_for(i))
        for _ in range(streams):
            if not done.acquire(timeout=600):
                raise SystemExit("a reply did not finish within 10 minutes")
        # Decode only: from the latest first token to the last end, tokens after the first.
        span = max(lasts) - max(firsts)
        tokens = sum(c - 1 for c in counts)
        return tokens / span if span > 0 else 0.0, trace

    micro(engine, model_id)
    if args.micro_only:
        engine.stop()
        return
    print(f"model {model_id}, {args.tokens} tokens per reply, {args.rounds} rounds")
    run(1, False)  # warm-up (first-call compilation, allocator)
    results: dict[tuple[int, bool], list[float]] = {}
    trace: list[dict[str, Any]] = []
    for _ in range(args.rounds):
        for streams in (1, args.streams):
            for traced in (False, True):
                rate, got = run(streams, traced)
                results.setdefault((streams, traced), []).append(rate)
                trace = got or trace
    engine.stop()
    for streams in (1, args.streams):
        plain = statistics.median(results[(streams, False)])
        with_trace = statistics.median(results[(streams, True)])
        print(
            f"{streams} stream(s): {plain:.1f} tok/s plain, {with_trace:.1f} tok/s traced "
            f"({100 * (with_trace - plain) / plain:+.1f}%)"
        )
    if trace:
        size = len(json.dumps(trace))
        print(f"stored trace: {size / len(trace):.0f} bytes per token (JSON, 5 alternatives)")


def micro(engine: Any, model_id: str, n: int = 200) -> None:
    """CPU time of the engine's own logprobs code per token (inference.engine._token_logprobs,
    top 5, on the engine thread's real vocabulary), which other load on a shared machine
    disturbs less than wall time."""
    import queue

    import mlx.core as mx

    from inference import engine as engine_module

    answers: queue.SimpleQueue[str] = queue.SimpleQueue()

    def measure() -> None:
        slot = engine._slots[model_id]
        vocab = engine_module._vocab_size(slot.loaded)
        logits = mx.random.normal((vocab,))
        logprobs = logits - mx.logsumexp(logits)
        mx.eval(logprobs)

        class Response:
            token = 42

        Response.logprobs = logprobs  # type: ignore[attr-defined]
        active = type("A", (), {"slot": slot, "top_logprobs": 5})()
        engine_module._token_logprobs(active, Response)  # fill the piece cache once
        timings = {}
        for k in (0, 5):
            active.top_logprobs = k
            began = time.process_time()
            for _ in range(n):
                engine_module._token_logprobs(active, Response)
            timings[k] = (time.process_time() - began) / n
        answers.put(
            f"vocabulary {vocab}: logprob of the sampled token {1000 * timings[0]:.3f} ms, "
            f"with the top 5 {1000 * timings[5]:.3f} ms of CPU per token"
        )

    # Its own thread and arrays: only the tokenizer is shared with the engine thread.
    thread = threading.Thread(target=measure)
    thread.start()
    thread.join()
    print(answers.get())


if __name__ == "__main__":
    main()
