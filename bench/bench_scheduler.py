"""Scheduler benchmark (issue 10): does one long prompt freeze everyone else?

On the CPU with the default model, our `Engine` called directly (timestamps taken in `emit`, on
the engine thread), greedy, prompt cache off so every prompt prefills in full:

1. idle: a short chat ("Say hi.") alone, its time to first token (TTFT), `--repeats` times;
2. undisturbed: two chats decoding, the gap between their deltas for `--window` seconds;
3. disturbed: the same two chats while a `--long-tokens` prompt arrives and prefills; their
   gaps during the prefill, and short chats during it, one at a time
   (the next `--short-every` seconds after the last one's answer), each one's TTFT.

Targets: p99 gap during the prefill at most 3x the undisturbed median; the short chats' TTFT
under 2x idle. A chat that ends is replaced by a new one at once (its gap to the new chat's
first token is a TTFT, not counted). The report is markdown.

    .venv/bin/python bench/bench_scheduler.py --output /tmp/scheduler.md
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
import itertools  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

from inference.catalogue import Catalogue, UnknownModel  # noqa: E402
from inference.engine import (  # noqa: E402
    Delta,
    Engine,
    EngineEvent,
    Finished,
    GenerationRequest,
)
from inference.loader import converted_path  # noqa: E402
from inference.schemas import GenerationParams  # noqa: E402
from mlxweb.config import ConfigError, load_config  # noqa: E402

SHORT = [{"role": "user", "content": "Say hi."}]
CHAT = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}]
PARAGRAPH = (
    "The committee met on a grey morning to review the harbour accounts, line by line, "
    "and every entry raised another question about tides, cargo, wages and repairs. "
)
_ids = itertools.count()


@dataclass
class Stream:
    """One request's timestamps (engine thread, perf_counter)."""

    request_id: str
    submitted: float
    deltas: list[float] = field(default_factory=list)
    finished: Finished | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def __call__(self, event: EngineEvent) -> None:
        now = time.perf_counter()
        if isinstance(event, Delta) and event.text:
            self.deltas.append(now)
        elif isinstance(event, Finished):
            self.finished = event
            if event.finish_reason != "error" and not self.deltas:
                self.deltas.append(now)  # a one-token reply whose token had no text
            self.done.set()

    @property
    def ttft(self) -> float:
        return self.deltas[0] - self.submitted


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        config = load_config()
        server = config.server
        models_dir = (
            server.models_dir if server.models_dir.is_absolute() else ROOT / server.models_dir
        )
        self.catalogue = Catalogue(config, models_dir)
        self.spec = self.catalogue.get(args.model_id)
        var_dir = Path(os.environ.get("MLXWEB_VAR_DIR", "var"))
        self.converted_dir = (var_dir if var_dir.is_absolute() else ROOT / var_dir) / "converted"
        self.target_ms = args.target_latency_ms or server.scheduler.target_latency_ms
        self.engine = Engine(
            catalogue=self.catalogue,
            converted_dir=self.converted_dir,
            max_prompt_tokens=server.limits.max_prompt_tokens,
            max_new_tokens=server.limits.max_new_tokens,
            prompt_cache_entries=0,
            prompt_cache_bytes=0,
            completion_batch_size=server.batch.completion_batch_size,
            prefill_step_size=server.batch.prefill_step_size,
            cpu_float32_max_bytes=server.cpu_float32_max_bytes,
            max_batch_tokens=server.scheduler.max_batch_tokens,
            target_latency_ms=self.target_ms,
            enable_speculative=False,
        )
        self.args = args

    def submit(self, messages: list[dict[str, str]], max_tokens: int) -> Stream:
        params = GenerationParams.model_validate({"temperature": 0.0, "max_tokens": max_tokens})
        request = GenerationRequest(f"bench-{next(_ids)}", self.spec.id, messages, params)
        stream = Stream(request.id, time.perf_counter())
        self.engine.submit(request, stream)
        return stream

    def cancel_all(self, streams: list[Stream]) -> None:
        for stream in streams:
            if not stream.done.is_set():
                self.engine.cancel(stream.request_id)
        for stream in streams:
            stream.done.wait(60)

    def long_prompt(self) -> list[dict[str, str]]:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(converted_path(self.spec, self.converted_dir))
        # The chat template adds about 35 tokens around the message.
        repeats = 1
        while len(tokenizer.encode(PARAGRAPH * (repeats + 1))) <= self.args.long_tokens - 35:
            repeats += 1
        text = PARAGRAPH * repeats
        return [{"role": "user", "content": "Summarize the minutes.\n\n" + text}]

    # ---------------------------------------------------------------- measurements

    def idle_ttft(self) -> list[float]:
        out = []
        for _ in range(self.args.repeats):
            stream = self.submit(SHORT, 1)
            stream.done.wait(120)
            out.append(stream.ttft)
        return out

    def chats(self, seconds: float, during: Any = None) -> tuple[list[float], Any]:
        """Two chats decoding for `seconds` (or while `during` runs); their delta gaps."""
        slots = [self.submit(CHAT, 2000), self.submit(CHAT, 2000)]
        done: list[Stream] = []
        deadline = time.monotonic() + 120
        while not all(len(s.deltas) >= 3 for s in slots):
            assert time.monotonic() < deadline, "the chats did not start"
            time.sleep(0.01)
        began = time.perf_counter()
        result = None
        if during is not None:
            holder: dict[str, Any] = {}
            thread = threading.Thread(target=lambda: holder.setdefault("r", during()))
            thread.start()
        while True:
            for i, stream in enumerate(slots):
                if stream.done.is_set():
                    done.append(stream)
                    slots[i] = self.submit(CHAT, 2000)
            if during is None and time.perf_counter() - began >= seconds:
                break
            if during is not None and not thread.is_alive():
                result = holder.get("r")
                break
            time.sleep(0.01)
        ended = time.perf_counter()
        self.cancel_all(slots)
        gaps = []
        for stream in done + slots:
            times = [t for t in stream.deltas if began <= t <= ended]
            gaps += [b - a for a, b in itertools.pairwise(times)]
        return gaps, result

    def long_with_shorts(self) -> dict[str, Any]:
        long = self.submit(self.long_prompt(), 1)
        shorts: list[Stream] = []
        began = time.perf_counter()
        next_short: float | None = began + self.args.short_every / 2
        while not long.done.is_set():
            # One short chat at a time: the next one `short_every` seconds after the last
            # one's answer (a person sending a message, not a queue filling up).
            if shorts and shorts[-1].done.is_set() and next_short is None:
                next_short = time.perf_counter() + self.args.short_every
            if next_short is not None and time.perf_counter() >= next_short:
                shorts.append(self.submit(SHORT, 1))
                next_short = None
            time.sleep(0.01)
        for short in shorts:
            short.done.wait(120)
        assert long.finished is not None
        return {
            "prefill_s": long.deltas[0] - long.submitted,
            "prompt_tokens": long.finished.prompt_tokens,
            "chunks": long.finished.details.get("prefill_chunks"),
            "short_ttft": [s.ttft for s in shorts if s.deltas and s.deltas[0] < long.deltas[0]],
        }

    def run(self) -> str:
        self.engine.start()
        self.engine.load(self.spec.id)
        self.submit(SHORT, 4).done.wait(120)  # warm-up
        idle = self.idle_ttft()
        calm, _ = self.chats(self.args.window)
        busy, long = self.chats(0, during=self.long_with_shorts)
        self.engine.stop()
        return self.report(idle, calm, busy, long)

    def report(
        self, idle: list[float], calm: list[float], busy: list[float], long: dict[str, Any]
    ) -> str:
        def ms(x: float) -> str:
            return f"{x * 1000:.0f} ms"

        def p(values: list[float], q: float) -> float:
            ordered = sorted(values)
            return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

        calm_median = statistics.median(calm)
        busy_p50, busy_p99 = p(busy, 0.5), p(busy, 0.99)
        idle_median = statistics.median(idle)
        shorts = long["short_ttft"]
        short_median = statistics.median(shorts) if shorts else float("nan")
        gap_ok = busy_p99 <= 3 * calm_median
        ttft_ok = bool(shorts) and max(shorts) < 2 * idle_median
        lines = [
            f"Model `{self.spec.id}`, target_latency_ms {self.target_ms:g}, "
            f"long prompt {long['prompt_tokens']} tokens prefilled in {long['prefill_s']:.1f} s "
            f"({long['chunks']} chunks) while two chats decoded.",
            "",
            "| measurement | samples | p50 | p99 / max |",
            "|---|---|---|---|",
            f"| chat gap, undisturbed | {len(calm)} | {ms(calm_median)} | {ms(p(calm, 0.99))} |",
            f"| chat gap, during the long prefill | {len(busy)} | {ms(busy_p50)} | "
            f"{ms(busy_p99)} |",
            f"| short chat TTFT, idle | {len(idle)} | {ms(idle_median)} | {ms(max(idle))} |",
            f"| short chat TTFT, during the long prefill | {len(shorts)} | "
            f"{ms(short_median) if shorts else '-'} | {ms(max(shorts)) if shorts else '-'} |",
            "",
            f"- p99 gap during the prefill / undisturbed median: "
            f"{busy_p99 / calm_median:.2f}x (target <= 3x): {'met' if gap_ok else 'NOT met'}",
            f"- short chat TTFT during the prefill / idle median: worst "
            f"{(max(shorts) / idle_median) if shorts else float('nan'):.2f}x, median "
            f"{short_median / idle_median:.2f}x (target < 2x): {'met' if ttft_ok else 'NOT met'}",
            "",
            f"Command: `{self.args.command}`",
        ]
        return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    try:
        config = load_config()
    except ConfigError as e:
        raise SystemExit(f"bench_scheduler: bad configuration: {e}") from e
    parser = argparse.ArgumentParser(prog="bench_scheduler.py", description=__doc__.split("\n")[0])
    parser.add_argument("--model-id", default=config.server.default_model)
    parser.add_argument("--long-tokens", type=int, default=4000, help="the long prompt's size")
    parser.add_argument("--window", type=float, default=8.0, help="seconds of undisturbed chat")
    parser.add_argument("--repeats", type=int, default=5, help="idle TTFT runs")
    parser.add_argument(
        "--short-every",
        type=float,
        default=4.0,
        help="seconds from a short chat's answer to the next one",
    )
    parser.add_argument(
        "--target-latency-ms", type=float, default=None, help="default: server.yaml's"
    )
    parser.add_argument("--output", type=Path, help="also write the markdown report here")
    args = parser.parse_args(argv)
    if not 100 <= args.long_tokens <= config.server.limits.max_prompt_tokens:
        parser.error("--long-tokens: 100..limits.max_prompt_tokens")
    if not 1 <= args.window <= 120 or not 1 <= args.repeats <= 50:
        parser.error("--window: 1..120 s; --repeats: 1..50")
    if not 0.5 <= args.short_every <= 60:
        parser.error("--short-every: 0.5..60 s")
    if args.target_latency_ms is not None and not 5 <= args.target_latency_ms <= 60_000:
        parser.error("--target-latency-ms: 5..60000")
    models_dir = config.server.models_dir
    catalogue = Catalogue(config, models_dir if models_dir.is_absolute() else ROOT / models_dir)
    try:
        spec = catalogue.get(args.model_id)
    except UnknownModel:
        parser.error(f"--model-id: unknown model {args.model_id!r}")
    if not spec.is_available:
        parser.error(f"--model-id: the weights of {spec.id!r} are not on this machine")
    args.command = shlex.join(
        [os.path.relpath(sys.executable, ROOT), "bench/bench_scheduler.py", *argv]
    )
    return args


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO if os.environ.get("BENCH_VERBOSE") else logging.WARNING)
    args = parse_args(sys.argv[1:] if argv is None else argv)
    report = Bench(args).run()
    print(report)
    if args.output is not None:
        args.output.write_text(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
