"""Warm-on-open benchmark: turn 1 vs turn 20 of a long conversation after a restart.

A conversation of 19 turns is served by our engine (18 earlier turns as history, the 19th
generated), then the engine stops: what it keeps in memory is written to disk, as at a server
shutdown (`kv_persistence`, inference.kvcache). Then, one restart at a time, each of these is
asked for a new conversation's turn 1 and for the long conversation's turn 20 (greedy, same
message lists), the model already loaded:

- **warm on open**: a new engine on the same folder; the conversation is opened first
  (`Engine.warm`, what the chat page asks the worker for), then the turns are sent;
- **disk at request**: a new engine on the same folder, no open: turn 20 finds the file itself;
- **cold**: a new engine without persisted caches: turn 20 prefills its whole prompt;
- **mlx_lm.server**: restarted (it keeps nothing across restarts) on the same weights.

TTFT is measured from the request to the first text, in this process for the engines and over
HTTP streaming for mlx_lm.server. Each restart of a warm mode starts from a copy of the folder as
the 19th turn left it. Where the engine serves float32 (MLX on the CPU), mlx_lm.server loads the
float32 copy bench_chat.py writes, so both compute with the same weights.

    .venv/bin/python manage.py fetch_models
    .venv/bin/python bench/bench_warm.py --output /tmp/bench-warm.md
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mlxweb.launcher import ensure_fast_blas  # noqa: E402

# Before anything imports mlx: OpenBLAS preloaded, as manage.py does; mlx_lm.server inherits it.
ensure_fast_blas(sys.argv)

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

import bench_chat as chat  # noqa: E402
from bench_chat import BenchError, Stream  # noqa: E402

logger = logging.getLogger("bench")

TURNS = 20
QUESTIONS = chat.QUESTIONS + (
    "In one sentence, what is a glacier?",
    "Name a musical instrument with strings.",
    "What is the largest ocean?",
    "In one sentence, what is electricity?",
    "Name a bird that cannot fly.",
    "What is the boiling point of water in Celsius?",
    "In one sentence, what is a rainbow?",
    "Name a country in Africa.",
    "What do bees make?",
    "In one sentence, what is an eclipse?",
)
# The earlier turns' answers (about 30 tokens each): written out, not generated, so the setup
# costs one prefill. With the questions and the template, turn 20's prompt is ~1,000 tokens.
ANSWERS = tuple(
    f"Here is a short answer to question {i + 1}: "
    + chat.LONG_PROMPTS[i % len(chat.LONG_PROMPTS)].split(",")[0].replace("Write", "I would write")
    + ", if you want more."
    for i in range(TURNS)
)
MODES = ("warm on open", "disk at request", "cold", "mlx_lm.server")


@dataclass
class ModeResult:
    name: str
    turn1: list[Stream] = field(default_factory=list)
    turn20: list[Stream] = field(default_factory=list)
    ready_s: list[float] = field(default_factory=list)  # open -> restored (warm on open)
    sources: list[str] = field(default_factory=list)  # where turn 20's prefix came from

    def median(self, values: Sequence[float]) -> float:
        return statistics.median(values) if values else float("nan")


def history(turns: int) -> list[dict[str, str]]:
    """The first `turns` exchanges, written out."""
    messages: list[dict[str, str]] = []
    for i in range(turns):
        messages.append({"role": "user", "content": QUESTIONS[i]})
        messages.append({"role": "assistant", "content": ANSWERS[i]})
    return messages


class EngineRun(chat.EnginePath):
    """Our engine with its prompt cache on, persisting to `folder` (None: not at all)."""

    name = "Engine"

    def __init__(self, settings: chat.Settings, folder: Path | None) -> None:
        from inference.kvcache import KVCacheSettings

        server = settings.config.server
        self.model_id = settings.spec.id
        self.sources: list[str] = []
        kv = KVCacheSettings(
            kv_bits=server.prompt_cache.kv_bits,
            kv_group_size=server.prompt_cache.kv_group_size,
            max_kv_size=server.prompt_cache.max_kv_size,
            persist_dir=folder,
            persist_max_bytes=server.kv_persistence.max_bytes,
        )
        self.engine = chat.start_engine(settings, kv_cache=kv)

    def reply(self, messages: list[dict[str, str]], max_tokens: int) -> tuple[Stream, str]:
        """One greedy reply and where its KV prefix came from (Finished.prompt_cache)."""
        from inference.engine import Delta, Finished, GenerationRequest, Started
        from inference.schemas import GenerationParams

        params = GenerationParams.model_validate({"temperature": 0.0, "max_tokens": max_tokens})
        stream = Stream()
        ended: list[Finished] = []
        done = threading.Event()

        def emit(event: Any) -> None:  # on the engine thread
            if isinstance(event, Started):
                stream.prompt_tokens = event.prompt_tokens
                stream.cached_tokens = event.cached_tokens
            elif isinstance(event, Delta):
                stream.on_text(time.perf_counter(), event.text)
            elif isinstance(event, Finished):
                stream.tokens = event.completion_tokens
                stream.finish = event.finish_reason
                ended.append(event)
                done.set()

        request = GenerationRequest(
            id=uuid.uuid4().hex, model_id=self.model_id, messages=messages, params=params
        )
        stream.sent = time.perf_counter()
        self.engine.submit(request, emit)
        if not done.wait(chat.REQUEST_TIMEOUT_S):
            raise BenchError("the engine did not finish within the timeout")
        if ended[0].error:
            raise BenchError(f"the engine failed a request: {ended[0].error}")
        return stream, ended[0].prompt_cache


def _copy(source: Path, target: Path) -> Path:
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target)
    return target


def run(settings: chat.Settings, args: argparse.Namespace, workdir: Path) -> dict[str, ModeResult]:
    turn1 = [{"role": "user", "content": QUESTIONS[0]}]
    earlier = history(TURNS - 2)
    snapshot = workdir / "kv-after-turn-19"
    logger.info("serving turn 19 (%d earlier turns) to leave its cache on disk", TURNS - 2)
    first = EngineRun(settings, snapshot)
    try:
        first.engine.load(settings.spec.id)
        turn19 = [*earlier, {"role": "user", "content": QUESTIONS[TURNS - 2]}]
        answer, _ = first.reply(turn19, args.reply_tokens)
    finally:
        first.close()  # a shutdown: the caches in memory go to disk
    opened = [*turn19, {"role": "assistant", "content": answer.text}]
    turn20 = [*opened, {"role": "user", "content": QUESTIONS[TURNS - 1]}]

    results = {mode: ModeResult(mode) for mode in MODES if mode not in args.skip}
    for repeat in range(args.repeats):
        for mode in chat._rotated(list(results), repeat):
            result = results[mode]
            logger.info("repeat %d/%d: %s", repeat + 1, args.repeats, mode)
            if mode == "mlx_lm.server":
                server = chat.ServerPath(settings, workdir, prompt_cache_size=10)
                try:
                    result.turn1.append(server.single(turn1, args.turn_tokens))
                    result.turn20.append(server.single(turn20, args.turn_tokens))
                finally:
                    server.close()
                continue
            folder = None
            if mode != "cold":
                folder = _copy(snapshot, workdir / f"kv-{repeat}-{mode.replace(' ', '-')}")
            engine = EngineRun(settings, folder)
            try:
                if mode == "warm on open":
                    began = time.perf_counter()
                    covered = engine.engine.warm(settings.spec.id, opened, wait=600)
                    result.ready_s.append(time.perf_counter() - began)
                    if not covered:
                        raise BenchError("opening the conversation restored nothing")
                else:
                    engine.engine.load(settings.spec.id)
                stream, _ = engine.reply(turn1, args.turn_tokens)
                result.turn1.append(stream)
                stream, source = engine.reply(turn20, args.turn_tokens)
                result.turn20.append(stream)
                result.sources.append(source)
            finally:
                engine.close()
    return results


def render(
    settings: chat.Settings, args: argparse.Namespace, results: dict[str, ModeResult], took: float
) -> str:
    lines = [
        "## Warm on open: turn 1 vs turn 20 after a restart",
        "",
        *chat._machine(settings),
        f"- {TURNS}-turn conversation, greedy, {args.turn_tokens} new tokens a turn; "
        f"median of {args.repeats} restart(s) per mode; run took {took:.0f} s",
        f"- command: `{' '.join(sys.argv)}`",
        "",
        "| after a restart | turn 1 TTFT | turn 20 TTFT | turn 20 prompt / cached tokens "
        "| turn 20 prefix from | open -> ready |",
        "|---|---|---|---|---|---|",
    ]
    for result in results.values():
        t1 = result.median([s.ttft for s in result.turn1])
        t20 = result.median([s.ttft for s in result.turn20])
        last = result.turn20[-1] if result.turn20 else Stream()
        cached = f"{last.prompt_tokens} / {last.cached_tokens}"
        source = ", ".join(sorted(set(result.sources))) or "its own cache (empty)"
        ready = f"{result.median(result.ready_s):.2f} s" if result.ready_s else "-"
        lines.append(
            f"| {result.name} | {t1 * 1000:.0f} ms | {t20 * 1000:.0f} ms | {cached} | {source} "
            f"| {ready} |"
        )
    warm, cold = results.get("warm on open"), results.get("cold")
    if warm and cold and warm.turn20 and cold.turn20:
        ratio = cold.median([s.ttft for s in cold.turn20]) / warm.median(
            [s.ttft for s in warm.turn20]
        )
        lines += ["", f"- turn 20 TTFT, cold / warm on open: {ratio:.1f}x"]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr
    )
    for noisy in ("inference", "mlx_lm", "transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-id", default=None, help="a catalogue model id (default model)")
    parser.add_argument("--repeats", type=int, default=1, help="restarts per mode (1..5)")
    parser.add_argument("--turn-tokens", type=int, default=8, help="new tokens a turn (1..64)")
    parser.add_argument("--reply-tokens", type=int, default=48, help="turn 19's reply (1..256)")
    parser.add_argument("--skip", action="append", default=[], choices=MODES, help="leave out")
    parser.add_argument("--output", type=Path, default=None, help="also write the report here")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if not 1 <= args.repeats <= 5:
        parser.error("--repeats: 1..5")
    if not 1 <= args.turn_tokens <= 64:
        parser.error("--turn-tokens: 1..64")
    if not 1 <= args.reply_tokens <= 256:
        parser.error("--reply-tokens: 1..256")
    if args.output is not None and not args.output.resolve().parent.is_dir():
        parser.error(f"--output: folder {args.output.resolve().parent} does not exist")
    chat_args = ["--model-id", args.model_id] if args.model_id else []
    settings = chat.parse_args(chat_args)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mlxweb-bench-warm-") as tmp:
        if "mlx_lm.server" not in args.skip:
            float32_dir = chat.write_float32_copy(settings, Path(tmp))
            if float32_dir is not None:
                settings = dataclasses.replace(settings, float32_dir=float32_dir)
        results = run(settings, args, Path(tmp))
    report = render(settings, args, results, time.perf_counter() - started)
    print(report)
    if args.output is not None:
        args.output.write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
