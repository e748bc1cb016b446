"""API benchmark: mlxweb's OpenAI-compatible streaming API against mlx_lm.server, in one run.

Both servers serve the same weights (where our engine serves the model in float32 on the CPU,
`mlx_lm.server` loads a float32 copy written for the run, as in bench_chat.py) and get the same
greedy requests from the same client code: `POST /v1/chat/completions` with `stream: true` and
`stream_options.include_usage` (ours with an API key made by `manage.py api_keys create` in the
bench's own data folder). Measured, one request set at a time (never both servers at once):

1. one stream: TTFT and delivered decode tok/s (prompt caches off: both prefill the whole prompt);
2. 8 and 32 concurrent streams: aggregate tok/s and p95 TTFT (caches off);
3. a 10-turn conversation, TTFT per turn (prompt caches on, their defaults); mlx_lm.server gets
   the very message lists our server got, turn by turn;
4. the per-step cost of a json_schema constraint: over our API (a constrained reply's token gaps
   against a free one's; mlx_lm.server has no `response_format`) and inside a BatchGenerator by
   `bench/bench_constraint.py`, which this script runs as it is and quotes;
5. embeddings over our `/v1/embeddings`: ms per sample at batch 1 and 32 (mlx_lm.server has no
   embeddings; `bench/bench_embeddings.py` measures the engine itself).

Our server runs with its limits raised to the largest concurrency level (streams per key, per
user and in all, requests per minute), as an operator serving that many clients would set them.

    .venv/bin/python manage.py fetch_models
    .venv/bin/python bench/bench_api.py --output /tmp/bench-api.md
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mlxweb.launcher import ensure_fast_blas  # noqa: E402

# Before anything imports mlx: OpenBLAS preloaded, as manage.py does; both servers inherit it.
ensure_fast_blas(sys.argv)

import argparse  # noqa: E402
import collections  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import http.client  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from datetime import UTC, datetime  # noqa: E402
from typing import Any  # noqa: E402

import bench_chat as chat  # noqa: E402
from bench_chat import Batch, BenchError, CpuMonitor, PathResult, Stream  # noqa: E402
from bench_constraint import SCHEMA  # noqa: E402

from inference.catalogue import Catalogue, UnknownModel  # noqa: E402
from inference.loader import converted_path  # noqa: E402
from mlxweb.config import ConfigError, load_config  # noqa: E402

logger = logging.getLogger("bench")

OURS = "mlxweb API"
THEIRS = "mlx_lm.server"
EMBED_TEXTS = (
    "How do I reset my password?",
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar on a crowded street corner.",
    "Quarterly revenue fell sharply after the product recall was announced.",
    "What is the capital of France, and how many people live there?",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen.",
)
MAX_RETRIES = 5
RESETS: collections.Counter[str] = collections.Counter()  # connections reset, per server
_RESETS_LOCK = threading.Lock()
CONSTRAINT_PROMPT = "Describe a famous scientist as JSON, with a long list of tags."

# The targets (ratios ours / mlx_lm.server). "Level" allows run-to-run noise.
TARGET_LEVEL = 0.95  # one stream: decode >= 0.95x, TTFT <= 1 / 0.95x
TARGET_CONSTRAINT = 0.10  # the constraint's cost per step, as a share of a decode step
TARGET_EMBED_MS = 20.0  # per sample (the MLXR target)

# For the duration estimate printed at the start only: an idle 2-core CPU, SmolLM2-135M in
# float32 (docs/benchmarks.md, the chat bench of 2026-11-22).
EST_DECODE_TPS = 14.0
EST_PREFILL_S = 0.45
EST_AGGREGATE_CAP_TPS = 120.0
EST_STARTS_S = 45.0  # two starts of each server, the float32 copy (a smoke run: ~35 s)


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    """bench_chat's settings (model, weights, token counts, repeats, levels) plus this bench's."""

    base: chat.Settings
    constraint_tokens: int
    embed_model: str | None  # None: no embeddings phase
    embed_samples: int
    skip_constraint: bool


def parse_args(argv: Sequence[str]) -> Settings:
    try:
        config = load_config()
    except ConfigError as e:
        raise SystemExit(f"bench_api: bad configuration: {e}") from e
    server = config.server
    parser = argparse.ArgumentParser(
        prog="bench_api.py",
        description="Benchmark mlxweb's OpenAI streaming API against mlx_lm.server.",
    )
    parser.add_argument("--model-id", default=server.default_model, help="a catalogue model id")
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens per reply")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement (medians)")
    parser.add_argument(
        "--concurrency", type=chat._concurrency, default=(1, 8, 32),
        help="concurrent streams, e.g. 1,8,32 (1 is always measured)",
    )  # fmt: skip
    parser.add_argument("--turns", type=int, default=10, help="turns of the conversation")
    parser.add_argument("--turn-max-tokens", type=int, default=16, help="new tokens per turn")
    parser.add_argument(
        "--constraint-tokens", type=int, default=32,
        help="decode steps per run of bench_constraint.py (its --tokens)",
    )  # fmt: skip
    parser.add_argument("--skip-constraint", action="store_true", help="leave out part 4")
    parser.add_argument(
        "--embed-model", default="all-minilm-l6-v2", help="embedding model id ('' skips part 5)"
    )
    parser.add_argument("--embed-samples", type=int, default=32, help="texts per embedding run")
    parser.add_argument("--output", type=Path, help="also write the markdown report here")
    args = parser.parse_args(argv)

    limit = server.limits.max_new_tokens
    if not 2 <= args.max_tokens <= limit:
        parser.error(f"--max-tokens: must be 2..{limit} (limits.max_new_tokens)")
    if not 1 <= args.repeats <= 50:
        parser.error(f"--repeats: must be 1..50, got {args.repeats}")
    if args.concurrency[-1] > 256:
        parser.error("--concurrency: at most 256 streams")
    if not 2 <= args.turns <= 50:
        parser.error(f"--turns: must be 2..50, got {args.turns}")
    if not 1 <= args.turn_max_tokens <= limit:
        parser.error(f"--turn-max-tokens: must be 1..{limit}")
    if not 4 <= args.constraint_tokens <= 512:
        parser.error("--constraint-tokens: must be 4..512")
    if not 1 <= args.embed_samples <= 1024:
        parser.error("--embed-samples: must be 1..1024")
    if args.output is not None and not args.output.resolve().parent.is_dir():
        parser.error(f"--output: folder {args.output.resolve().parent} does not exist")

    models_dir = server.models_dir if server.models_dir.is_absolute() else ROOT / server.models_dir
    catalogue = Catalogue(config, models_dir)
    try:
        spec = catalogue.get(args.model_id)
    except UnknownModel:
        known = ", ".join(s.id for s in catalogue.all())
        parser.error(f"--model-id: unknown model {args.model_id!r} (known: {known})")
    if not spec.is_available:
        parser.error(
            f"--model-id: the weights of {spec.id!r} are not on this machine "
            "(for the default model: .venv/bin/python manage.py fetch_models)"
        )
    embed_model: str | None = args.embed_model or None
    if embed_model is not None:
        try:
            embed_spec = catalogue.get(embed_model)
        except UnknownModel:
            parser.error(f"--embed-model: unknown model {embed_model!r}")
        if not embed_spec.is_available:
            logger.warning("%s is not on this machine: no embeddings phase", embed_model)
            embed_model = None
    var_dir = Path(os.environ.get("MLXWEB_VAR_DIR", "var"))
    converted_dir = (var_dir if var_dir.is_absolute() else ROOT / var_dir) / "converted"
    local = spec.local_path()
    assert local is not None
    model_dir = converted_path(spec, converted_dir) if spec.kind == "gguf" else local
    base = chat.Settings(
        config=config,
        catalogue=catalogue,
        spec=spec,
        model_dir=model_dir,
        converted_dir=converted_dir,
        models_dir=models_dir,
        max_tokens=args.max_tokens,
        repeats=args.repeats,
        levels=tuple(sorted({1, *args.concurrency})),
        turns=args.turns,
        turn_max_tokens=args.turn_max_tokens,
        skip_server=False,
        output=args.output,
        command=shlex.join([os.path.relpath(sys.executable, ROOT), *sys.argv]),
    )
    return Settings(
        base=base,
        constraint_tokens=args.constraint_tokens,
        embed_model=embed_model,
        embed_samples=args.embed_samples,
        skip_constraint=args.skip_constraint,
    )


def estimate_seconds(settings: Settings) -> float:
    """What the run should take on an idle 2-core CPU with the default model (a rough model)."""
    s = settings.base
    per_reply = EST_PREFILL_S + s.max_tokens / EST_DECODE_TPS
    total = EST_STARTS_S + s.repeats * 2 * per_reply  # one stream, both servers
    for level in s.levels:
        if level > 1:
            rate = min(EST_DECODE_TPS * level**0.75, EST_AGGREGATE_CAP_TPS)
            total += s.repeats * 2 * (EST_PREFILL_S * level / 3 + level * s.max_tokens / rate)
    total += s.repeats * 2 * s.turns * (0.35 + s.turn_max_tokens / EST_DECODE_TPS)
    if not settings.skip_constraint:
        total += s.repeats * 2 * per_reply  # over the API, ours only, free and constrained
        total += 10 + s.repeats * 2 * (1 + settings.constraint_tokens / EST_DECODE_TPS)
    if settings.embed_model:
        total += 10 + s.repeats * 2 * settings.embed_samples * 0.03
    return total


# --------------------------------------------------------------------------- the client


def _stream_chat(
    who: str, port: int, body: dict[str, Any], headers: dict[str, str], stream: Stream
) -> None:
    """One streaming POST /v1/chat/completions; fills `stream` (blocking). Both servers get
    their requests from here, so the client's own cost is the same for both.

    A connection the server resets before any text came is tried again, up to MAX_RETRIES
    times, as the openai client does; the TTFT counts from the first try and RESETS[who]
    counts the resets (mlx_lm.server's listening socket has a backlog of 5)."""
    payload = json.dumps(
        {**body, "stream": True, "stream_options": {"include_usage": True}, "temperature": 0.0}
    )
    sent = time.perf_counter()
    for attempt in range(MAX_RETRIES + 1):
        try:
            _stream_once(port, payload, headers, stream)
            break
        except ConnectionError:  # reset, refused, aborted; RemoteDisconnected
            if stream.first is not None or attempt == MAX_RETRIES:
                raise
            with _RESETS_LOCK:
                RESETS[who] += 1
            time.sleep(0.05 * 2**attempt)
    stream.sent = sent


def _stream_once(port: int, payload: str, headers: dict[str, str], stream: Stream) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=chat.REQUEST_TIMEOUT_S)
    try:
        connection.request(
            "POST",
            "/v1/chat/completions",
            body=payload,
            headers={"Content-Type": "application/json", **headers},
        )
        response = connection.getresponse()
        if response.status != 200:
            raise BenchError(f"port {port} answered {response.status}: {response.read()[:500]!r}")
        while line := response.readline():
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if data == b"[DONE]":
                break
            now = time.perf_counter()
            chunk = json.loads(data)
            if "error" in chunk:
                raise BenchError(f"port {port} streamed an error: {chunk['error']}")
            for choice in chunk.get("choices") or []:
                stream.on_text(now, (choice.get("delta") or {}).get("content") or "")
                if choice.get("finish_reason"):
                    stream.finish = chat._normalise_finish(choice["finish_reason"])
            if usage := chunk.get("usage"):
                stream.tokens = int(usage["completion_tokens"])
                stream.prompt_tokens = int(usage["prompt_tokens"])
                details = usage.get("prompt_tokens_details") or {}
                stream.cached_tokens = int(details.get("cached_tokens") or 0)
    finally:
        connection.close()


def _threaded(request: Callable[[Stream, str], None], prompts: list[str]) -> Batch:
    """All prompts at once, one thread and one connection each."""
    streams = [Stream() for _ in prompts]
    failures: list[BaseException] = []

    def one(stream: Stream, prompt: str) -> None:
        try:
            request(stream, prompt)
        except BaseException as e:
            failures.append(e)

    threads = [
        threading.Thread(target=one, args=(s, p), daemon=True)
        for s, p in zip(streams, prompts, strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise BenchError(f"a request failed: {failures[0]}") from failures[0]
    return Batch(streams)


# --------------------------------------------------------------------------- the two servers


class Theirs(chat.ServerPath):
    """bench_chat's `mlx_lm.server` runner (same flags, float32 copy), with this bench's client."""

    name = THEIRS

    def _request(self, messages: list[dict[str, str]], max_tokens: int, stream: Stream) -> None:
        _stream_chat(
            THEIRS, self.port, {"messages": messages, "max_tokens": max_tokens}, {}, stream
        )

    def batch(self, prompts: list[str], max_tokens: int) -> Batch:
        try:
            return _threaded(lambda s, p: self._request(chat._user(p), max_tokens, s), prompts)
        except BenchError:
            self.dump_log()
            raise


class Ours:
    """`manage.py serve` on its own data folder (bench_chat's LiveApp), a user and an API key."""

    name = OURS
    username = "bench"

    def __init__(self, settings: Settings, workdir: Path, *, prompt_cache: bool) -> None:
        base = settings.base
        self.model = base.spec.id
        self.app = chat.LiveApp(base, workdir, prompt_cache=prompt_cache)
        limits = base.config.server.limits
        streams = str(max(base.levels[-1], limits.max_concurrent_streams))
        self.app.site.env.update(
            {
                "MLXWEB_MAX_CONCURRENT_STREAMS": streams,
                "MLXWEB_MAX_STREAMING_REPLIES_PER_USER": streams,
                "MLXWEB_MAX_QUEUED_REPLIES_PER_USER": streams,
                "MLXWEB_API_MAX_CONCURRENT_STREAMS": streams,
                "MLXWEB_API_REQUESTS_PER_MINUTE": "100000",
            }
        )
        site = self.app.site
        try:
            site.manage("migrate", "--noinput", "-v0")
            site.manage(
                "shell", "-c",
                "from django.contrib.auth import get_user_model; "
                f"get_user_model().objects.create_user({self.username!r})",
            )  # fmt: skip
            self.headers = {"Authorization": f"Bearer {self._create_key()}"}
            site.start()
            self.batch(["Say hello."], 4)  # warm-up and the model load
        except BaseException:
            self.app.dump_log()
            self.close()
            raise

    def _create_key(self) -> str:
        """`manage.py api_keys create`, as the README tells scripts to: the key is the last line."""
        done = subprocess.run(
            [sys.executable, "manage.py", "api_keys", "create", "--user", self.username,
             "--name", "bench"],
            cwd=ROOT, env=self.app.site.env, capture_output=True, text=True, timeout=120,
            check=False,
        )  # fmt: skip
        lines = done.stdout.strip().splitlines()
        if done.returncode != 0 or not lines:
            raise BenchError(f"manage.py api_keys create failed:\n{done.stderr[-2000:]}")
        return lines[-1].strip()

    @property
    def port(self) -> int:
        return self.app.site.port

    def request(
        self, messages: list[dict[str, str]], max_tokens: int, stream: Stream, **extra: Any
    ) -> None:
        body = {"model": self.model, "messages": messages, "max_tokens": max_tokens, **extra}
        _stream_chat(OURS, self.port, body, self.headers, stream)

    def single(self, messages: list[dict[str, str]], max_tokens: int, **extra: Any) -> Stream:
        stream = Stream()
        self.request(messages, max_tokens, stream, **extra)
        return stream

    def batch(self, prompts: list[str], max_tokens: int) -> Batch:
        try:
            return _threaded(lambda s, p: self.request(chat._user(p), max_tokens, s), prompts)
        except BenchError:
            self.app.dump_log()
            raise

    def embed(self, model: str, texts: list[str]) -> float:
        """One POST /v1/embeddings; its wall time in seconds."""
        body = json.dumps({"model": model, "input": texts})
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)
        try:
            began = time.perf_counter()
            connection.request(
                "POST", "/v1/embeddings", body=body,
                headers={"Content-Type": "application/json", **self.headers},
            )  # fmt: skip
            response = connection.getresponse()
            data = response.read()
            elapsed = time.perf_counter() - began
        finally:
            connection.close()
        if response.status != 200:
            raise BenchError(f"/v1/embeddings answered {response.status}: {data[:500]!r}")
        if len(json.loads(data)["data"]) != len(texts):
            raise BenchError("/v1/embeddings returned the wrong number of vectors")
        return elapsed

    def close(self) -> None:
        self.app.stop()


# --------------------------------------------------------------------------- results


@dataclass
class ConstraintResult:
    free: list[Stream] = field(default_factory=list)
    constrained: list[Stream] = field(default_factory=list)
    script_command: str = ""
    script_output: str = ""
    script_error: str = ""

    def api_step(self, streams: list[Stream]) -> float:
        """Median seconds per step: the median gap between pieces of text (robust to a reply
        that ends early, as a closed JSON object does)."""
        return 1 / _steady(streams)

    def script_value(self, label: str, kind: str = "wall") -> float:
        """A number from bench_constraint.py's output (ms), NaN where it is missing."""
        patterns = {
            "free": r"decode step, free\s*: wall ([\d.]+) ms, cpu ([\d.]+) ms",
            "json_schema": r"decode step, json_schema\s*: wall ([\d.]+) ms, cpu ([\d.]+) ms",
            "own": r"constraint's own work in the batch: median ([\d.]+) ms",
            "alone": r"processor alone: median ([\d.]+) ms",
        }
        match = re.search(patterns[label], self.script_output)
        if match is None:
            return float("nan")
        return float(match.group(2 if kind == "cpu" and label in ("free", "json_schema") else 1))


@dataclass
class Results:
    cold: dict[str, PathResult]
    turns: dict[str, PathResult]
    constraint: ConstraintResult
    embed: dict[int, list[float]]  # batch size -> seconds per sample, per repeat


def _steady(streams: list[Stream]) -> float:
    return chat._median([s.steady_decode_tps for s in streams])


def _p95(values: Sequence[float]) -> float:
    """Nearest-rank 95th percentile."""
    clean = sorted(v for v in values if v == v)
    return clean[max(0, math.ceil(0.95 * len(clean)) - 1)] if clean else float("nan")


def _p95_ttft(result: PathResult, level: int) -> float:
    batches = result.batches.get(level) or []
    return chat._median([_p95([s.ttft for s in b.streams]) for b in batches])


# --------------------------------------------------------------------------- the runs


def _measure(monitor: CpuMonitor, result: PathResult, run: Callable[[], Any]) -> Any:
    start = monitor.snapshot()
    value = run()
    result.foreign.append(monitor.foreign_cores(start, monitor.snapshot()))
    return value


def run_cold(
    settings: Settings, workdir: Path, monitor: CpuMonitor
) -> tuple[dict[str, PathResult], ConstraintResult, dict[int, list[float]]]:
    """Parts 1, 2, the API half of 4, and 5: caches off, both servers up, measured in turn."""
    base = settings.base
    constraint = ConstraintResult()
    embed: dict[int, list[float]] = {}
    with contextlib.ExitStack() as stack:
        logger.info("starting our server and mlx_lm.server, prompt caches off")
        ours = Ours(settings, workdir / "cold", prompt_cache=False)
        stack.callback(ours.close)
        theirs = Theirs(base, workdir, prompt_cache_size=0)
        stack.callback(theirs.close)
        paths: list[Any] = [ours, theirs]
        results = {p.name: PathResult(p.name) for p in paths}
        prompt = chat._user(chat.LONG_PROMPTS[0])
        for i in range(base.repeats):
            for path in chat._rotated(paths, i):
                result = results[path.name]
                stream = _measure(
                    monitor, result, functools.partial(path.single, prompt, base.max_tokens)
                )
                result.single.append(stream)
                chat._log_stream(path.name, f"one stream {i + 1}/{base.repeats}", stream, result)
        for level in base.levels:
            if level == 1:
                continue
            for i in range(base.repeats):
                for path in chat._rotated(paths, i):
                    result = results[path.name]
                    run = functools.partial(path.batch, chat._prompts(level), base.max_tokens)
                    batch = _measure(monitor, result, run)
                    result.batches.setdefault(level, []).append(batch)
                    chat._log_batch(path.name, level, i, base.repeats, batch, result)
                    logger.info("  p95 TTFT %.3f s", _p95([s.ttft for s in batch.streams]))
        theirs.close()  # not needed below: parts 4 and 5 are ours only
        if not settings.skip_constraint:
            ask = chat._user(CONSTRAINT_PROMPT)
            form = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
            for i in range(base.repeats):  # interleaved, so drifting load hits both alike
                free = ours.single(ask, base.max_tokens)
                constrained = ours.single(ask, base.max_tokens, response_format=form)
                if constrained.finish == "eos":  # a constrained reply that ended: valid JSON
                    json.loads(constrained.text)
                constraint.free.append(free)
                constraint.constrained.append(constrained)
                logger.info(
                    "constraint %d/%d: free %.2f tok/s (%d tokens), json_schema %.2f tok/s "
                    "(%d tokens, %s)", i + 1, base.repeats, free.steady_decode_tps, free.tokens,
                    constrained.steady_decode_tps, constrained.tokens, constrained.finish,
                )  # fmt: skip
        if settings.embed_model:
            texts = [
                f"{i}. {EMBED_TEXTS[i % len(EMBED_TEXTS)]}" for i in range(settings.embed_samples)
            ]
            ours.embed(settings.embed_model, texts[:2])  # warm-up and the model load
            for i in range(base.repeats):
                for size in sorted({1, min(32, len(texts))}):
                    took = sum(
                        ours.embed(settings.embed_model, texts[k : k + size])
                        for k in range(0, len(texts), size)
                    )
                    embed.setdefault(size, []).append(took / len(texts))
                    logger.info(
                        "embeddings batch %d, %d/%d: %.2f ms a sample",
                        size, i + 1, base.repeats, 1000 * took / len(texts),
                    )  # fmt: skip
    return results, constraint, embed


def run_turns(settings: Settings, workdir: Path, monitor: CpuMonitor) -> dict[str, PathResult]:
    """Part 3: conversations with the prompt caches on, one server at a time. Ours builds each
    history from its own replies; mlx_lm.server then gets the same message lists, turn by turn."""
    base = settings.base
    results: dict[str, PathResult] = {}
    histories: list[list[list[dict[str, str]]]] = []
    ours = Ours(settings, workdir / "turns", prompt_cache=True)
    result = results[OURS] = PathResult(OURS)
    try:
        for i in range(base.repeats):

            def talk(number: int = i + 1) -> list[Stream]:
                messages: list[dict[str, str]] = []
                sent, streams = [], []
                for turn in range(1, base.turns + 1):
                    messages.append({"role": "user", "content": chat._turn_text(number, turn)})
                    sent.append(list(messages))
                    streams.append(ours.single(messages, base.turn_max_tokens))
                    messages.append({"role": "assistant", "content": streams[-1].text})
                histories.append(sent)
                return streams

            streams = _measure(monitor, result, talk)
            for n, stream in enumerate(streams, 1):
                chat._log_stream(OURS, f"conversation {i + 1} turn {n}", stream, result)
            result.turns.append(streams)
    finally:
        ours.close()

    theirs = Theirs(base, workdir, prompt_cache_size=10)  # its default
    result = results[THEIRS] = PathResult(THEIRS)
    try:
        for i, conversation in enumerate(histories):
            replay = functools.partial(_replay, theirs, conversation, base.turn_max_tokens)
            streams = _measure(monitor, result, replay)
            for n, stream in enumerate(streams, 1):
                chat._log_stream(THEIRS, f"conversation {i + 1} turn {n}", stream, result)
            result.turns.append(streams)
    finally:
        theirs.close()
    return results


def _replay(
    path: Theirs, conversation: list[list[dict[str, str]]], max_tokens: int
) -> list[Stream]:
    return [path.single(messages, max_tokens) for messages in conversation]


def run_constraint_script(settings: Settings, constraint: ConstraintResult) -> None:
    """The other half of part 4: bench/bench_constraint.py (commit 2e122ea), run as it is on the
    weights both servers computed with; its output goes into the report."""
    base = settings.base
    command = [
        sys.executable, str(ROOT / "bench" / "bench_constraint.py"), str(base.served_dir),
        "--rounds", str(base.repeats), "--tokens", str(settings.constraint_tokens),
    ]  # fmt: skip
    constraint.script_command = shlex.join(
        [os.path.relpath(command[0], ROOT), os.path.relpath(command[1], ROOT),
         "<the float32 copy>" if base.float32_dir else str(base.served_dir), *command[3:]]
    )  # fmt: skip
    logger.info("running %s", constraint.script_command)
    done = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False
    )
    constraint.script_output = done.stdout.strip()
    if done.returncode != 0:
        constraint.script_error = done.stderr.strip()[-2000:]
        logger.error("bench_constraint.py failed:\n%s", constraint.script_error)


# --------------------------------------------------------------------------- report


def _fmt(value: float, digits: int = 2, unit: str = "") -> str:
    return chat._fmt(value, digits, unit)


def _ratio(ours: float, theirs: float) -> float:
    return ours / theirs if theirs and theirs == theirs and ours == ours else float("nan")


def _verdict(value: float, test: Callable[[float], bool]) -> str:
    return chat._verdict(chat._ok(value, test))


def render_report(settings: Settings, results: Results, elapsed: float) -> str:
    base = settings.base
    ours, theirs = results.cold[OURS], results.cold[THEIRS]
    t_ours, t_theirs = results.turns[OURS], results.turns[THEIRS]
    n = base.turns
    prompt_tokens = ours.single[0].prompt_tokens if ours.single else 0
    lines = [
        "# mlxweb API benchmark: ours vs mlx_lm.server",
        "",
        f"Command: `{base.command}` (took {elapsed / 60:.1f} min, "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC)",
        "",
        *chat._machine(base)[:3],
        "- weights computed with: "
        + (
            "float32, dequantized at load (`cpu_float32_max_bytes`) by our engine; mlx_lm.server "
            "loads a float32 copy of the same weights written for the run"
            if base.float32_dir is not None
            else "as stored, by both"
        ),
        f"- both over `POST /v1/chat/completions`, `stream: true`, greedy (temperature 0), the "
        f"same client code; {base.max_tokens} new tokens a reply, a {prompt_tokens}-token prompt "
        f"(chat template included); the median of {base.repeats} run(s). One stream and "
        "concurrency: prompt caches off, both servers up at once and measured in turn, repeat "
        f"by repeat. Our server's stream limits raised to {max(base.levels)} (per key, per "
        "user, in all).",
        "- ratios are ours / mlx_lm.server: above 1 is better for tok/s, below 1 for TTFT.",
        "",
        "## One stream",
        "",
        "| | mlxweb API (ours) | mlx_lm.server | ours / mlx_lm.server |",
        "|---|---|---|---|",
        f"| TTFT | {_fmt(ours.ttft(), 3, ' s')} | {_fmt(theirs.ttft(), 3, ' s')} | "
        f"{_fmt(_ratio(ours.ttft(), theirs.ttft()), 3, 'x')} |",
        f"| decode tok/s | {_fmt(ours.decode())} | {_fmt(theirs.decode())} | "
        f"{_fmt(_ratio(ours.decode(), theirs.decode()), 3, 'x')} |",
        f"| decode tok/s, 1 / median token gap | {_fmt(ours.steady_decode())} | "
        f"{_fmt(theirs.steady_decode())} | "
        f"{_fmt(_ratio(ours.steady_decode(), theirs.steady_decode()), 3, 'x')} |",
        f"| prompt / cached tokens | {chat._counts(ours)} | {chat._counts(theirs)} | |",
        f"| same text | {chat._same_text(ours, theirs)} | - | |",
        "",
        "## Concurrent streams",
        "",
        "Aggregate: all completion tokens over the time from the first request to the last "
        "token. p95 TTFT: nearest-rank over the streams of one run, median over the runs.",
        "",
        "| streams | aggregate tok/s, ours | mlx_lm.server | ratio | p95 TTFT, ours | "
        "mlx_lm.server | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for level in base.levels:
        a, b = ours.aggregate(level), theirs.aggregate(level)
        if level == 1:
            pa, pb = ours.ttft(), theirs.ttft()
        else:
            pa, pb = _p95_ttft(ours, level), _p95_ttft(theirs, level)
        lines.append(
            f"| {level} | {_fmt(a)} | {_fmt(b)} | {_fmt(_ratio(a, b), 3, 'x')} | "
            f"{_fmt(pa, 3, ' s')} | {_fmt(pb, 3, ' s')} | {_fmt(_ratio(pa, pb), 3, 'x')} |"
        )
    lines += [
        "",
        f"## Conversation: TTFT per turn ({n} turns)",
        "",
        f"{base.repeats} conversations of {n} sequential turns, {base.turn_max_tokens} new tokens "
        "each, prompt caches on (their defaults: ours `prompt_cache.max_entries`, mlx_lm.server "
        "`--prompt-cache-size 10`); one request warmed each server first. mlx_lm.server gets the "
        "message lists our server got (our replies as the history), turn by turn.",
        "",
        "| turn | TTFT, ours | mlx_lm.server | ratio | prompt / cached tokens, ours | "
        "mlx_lm.server |",
        "|---|---|---|---|---|---|",
    ]
    later = []
    for turn in range(1, n + 1):
        a, b = t_ours.turn_ttft(turn), t_theirs.turn_ttft(turn)
        if turn > 1:
            later.append(_ratio(a, b))
        lines.append(
            f"| {turn} | {_fmt(a, 3, ' s')} | {_fmt(b, 3, ' s')} | {_fmt(_ratio(a, b), 3, 'x')} "
            f"| {chat._turn_counts(t_ours, turn)} | {chat._turn_counts(t_theirs, turn)} |"
        )
    later_ratio = chat._median(later)
    lines += [
        "",
        f"Turn {n} / turn 1: ours {_fmt(chat._turn_ratio(t_ours, n), 2, 'x')}, mlx_lm.server "
        f"{_fmt(chat._turn_ratio(t_theirs, n), 2, 'x')}; turns 2-{n}, median of ours / "
        f"mlx_lm.server: {_fmt(later_ratio, 3, 'x')}.",
        "",
    ]
    c = results.constraint
    api_overhead = float("nan")
    script_overhead = script_own = script_cpu = float("nan")
    if not settings.skip_constraint:
        free_step, json_step = c.api_step(c.free), c.api_step(c.constrained)
        api_overhead = json_step / free_step - 1
        free_ms, json_ms = c.script_value("free"), c.script_value("json_schema")
        script_overhead = json_ms / free_ms - 1
        script_own = c.script_value("own") / free_ms
        free_cpu, json_cpu = c.script_value("free", "cpu"), c.script_value("json_schema", "cpu")
        script_cpu = json_cpu / free_cpu - 1
        lines += [
            "## json_schema constraint: cost per decode step (ours)",
            "",
            "mlx_lm.server has no `response_format`, so this is ours against our own free "
            "decode step. Over the API: the same prompt free and with a json_schema "
            f"(`bench_constraint.SCHEMA`), {base.max_tokens} tokens at most, interleaved; a step "
            "is the median gap between streamed pieces of text.",
            "",
            "| | free | json_schema | cost per step |",
            "|---|---|---|---|",
            f"| over the API: ms per step | {_fmt(1000 * free_step, 1)} | "
            f"{_fmt(1000 * json_step, 1)} | {_fmt(100 * api_overhead, 1, '%')} |",
            f"| `bench_constraint.py`, in a BatchGenerator: wall ms per step | {_fmt(free_ms, 1)} "
            f"| {_fmt(json_ms, 1)} | {_fmt(100 * script_overhead, 1, '%')} |",
            f"| `bench_constraint.py`, CPU ms per step (less moved by other load) | "
            f"{_fmt(free_cpu, 1)} | {_fmt(json_cpu, 1)} | {_fmt(100 * script_cpu, 1, '%')} |",
            f"| `bench_constraint.py`, the constraint's own work | - | "
            f"{_fmt(c.script_value('own'), 3)} ms | {_fmt(100 * script_own, 1, '%')} |",
            "",
            "Replies (tokens, finish): free "
            + ", ".join(f"{s.tokens} ({s.finish})" for s in c.free)
            + "; json_schema "
            + ", ".join(f"{s.tokens} ({s.finish})" for s in c.constrained)
            + ".",
            "",
            f"`{c.script_command}` (bench/bench_constraint.py, commit 2e122ea) said:",
            "",
            "```",
            c.script_output or "(nothing)",
            *([f"FAILED: {c.script_error}"] if c.script_error else []),
            "```",
            "",
        ]
    embed_ms = {size: 1000 * chat._median(v) for size, v in results.embed.items()}
    if embed_ms:
        lines += [
            f"## Embeddings over our API ({settings.embed_model})",
            "",
            f"`POST /v1/embeddings`, {settings.embed_samples} short sentences per run, one "
            "request after another; mlx_lm.server serves no embeddings. The engine alone and "
            "sentence-transformers on the same texts: `bench/bench_embeddings.py`.",
            "",
            "| batch | ms per sample (median) | best run |",
            "|---|---|---|",
            *(
                f"| {size} | {_fmt(ms)} | {_fmt(1000 * min(results.embed[size]))} |"
                for size, ms in sorted(embed_ms.items())
            ),
            "",
        ]
    one_decode = _ratio(ours.steady_decode(), theirs.steady_decode())
    one_ttft = _ratio(ours.ttft(), theirs.ttft())
    rows = [
        f"| one stream: decode >= {TARGET_LEVEL}x (1 / median token gap) | "
        f"{_fmt(one_decode, 3, 'x')} | {_verdict(one_decode, lambda v: v >= TARGET_LEVEL)} |",
        f"| one stream: TTFT <= {1 / TARGET_LEVEL:.3f}x | {_fmt(one_ttft, 3, 'x')} | "
        f"{_verdict(one_ttft, lambda v: v <= 1 / TARGET_LEVEL)} |",
    ]
    for level in base.levels:
        if level == 1:
            continue
        agg = _ratio(ours.aggregate(level), theirs.aggregate(level))
        p95 = _ratio(_p95_ttft(ours, level), _p95_ttft(theirs, level))
        rows += [
            f"| {level} streams: aggregate tok/s > 1x | {_fmt(agg, 3, 'x')} | "
            f"{_verdict(agg, lambda v: v > 1)} |",
            f"| {level} streams: p95 TTFT < 1x | {_fmt(p95, 3, 'x')} | "
            f"{_verdict(p95, lambda v: v < 1)} |",
        ]
    rows.append(
        f"| turns 2-{n}: TTFT < 1x (median over the turns) | {_fmt(later_ratio, 3, 'x')} | "
        f"{_verdict(later_ratio, lambda v: v < 1)} |"
    )
    if not settings.skip_constraint:
        rows += [
            f"| json_schema: < {TARGET_CONSTRAINT:.0%} of a decode step (bench_constraint.py, "
            f"in-batch wall) | {_fmt(100 * script_overhead, 1, '%')} | "
            f"{_verdict(script_overhead, lambda v: v < TARGET_CONSTRAINT)} |",
            f"| json_schema: < {TARGET_CONSTRAINT:.0%} of a decode step (bench_constraint.py, "
            f"in-batch CPU time) | {_fmt(100 * script_cpu, 1, '%')} | "
            f"{_verdict(script_cpu, lambda v: v < TARGET_CONSTRAINT)} |",
            f"| json_schema: < {TARGET_CONSTRAINT:.0%} of a decode step (over the API) | "
            f"{_fmt(100 * api_overhead, 1, '%')} | "
            f"{_verdict(api_overhead, lambda v: v < TARGET_CONSTRAINT)} |",
        ]
    rows += [
        f"| embeddings, batch {size}: < {TARGET_EMBED_MS:.0f} ms a sample | {_fmt(ms)} ms | "
        f"{_verdict(ms, lambda v: v < TARGET_EMBED_MS)} |"
        for size, ms in sorted(embed_ms.items())
    ]
    lines += [
        "## Targets (issue 8)",
        "",
        "| target | measured | verdict |",
        "|---|---|---|",
        *rows,
        "",
        "## Notes",
        "",
        *chat._early_endings([ours, theirs], base),
        "- connections reset before any text and tried again by the client (TTFT counts from "
        "the first try): " + "; ".join(f"{name} {RESETS[name]}" for name in (OURS, THEIRS)) + ".",
        *chat._foreign_notes(
            [*results.cold.values(), *results.turns.values()],
            [*results.cold, *(f"{k} (turns)" for k in results.turns)],
        ),
        "",
        "## Every run",
        "",
        "| server | TTFT (s) | decode tok/s |",
        "|---|---|---|",
        *(
            f"| {r.name} | {', '.join(_fmt(s.ttft, 3) for s in r.single)} | "
            f"{', '.join(_fmt(s.decode_tps) for s in r.single)} |"
            for r in results.cold.values()
        ),
        "",
        "| server | streams | aggregate tok/s per run | p95 TTFT (s) per run |",
        "|---|---|---|---|",
        *(
            f"| {r.name} | {level} | {', '.join(_fmt(b.aggregate_tps) for b in batches)} | "
            f"{', '.join(_fmt(_p95([s.ttft for s in b.streams]), 3) for b in batches)} |"
            for r in results.cold.values()
            for level, batches in sorted(r.batches.items())
        ),
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr
    )
    for noisy in ("inference", "mlx_lm", "transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    settings = parse_args(sys.argv[1:] if argv is None else argv)
    estimate = estimate_seconds(settings)
    logger.info(
        "expected duration: about %.1f min on an idle 2-core CPU (%s; a loaded machine takes "
        "longer)", estimate / 60, settings.base.spec.id,
    )  # fmt: skip
    started = time.perf_counter()
    monitor = CpuMonitor()
    with tempfile.TemporaryDirectory(prefix="mlxweb-bench-api-") as tmp:
        workdir = Path(tmp)
        float32_dir = chat.write_float32_copy(settings.base, workdir)
        if float32_dir is not None:
            logger.info("our engine serves float32 weights: mlx_lm.server loads a float32 copy")
            settings = dataclasses.replace(
                settings, base=dataclasses.replace(settings.base, float32_dir=float32_dir)
            )
        logger.info("part 1-2 (and 4-5 over our API): prompt caches off")
        cold, constraint, embed = run_cold(settings, workdir, monitor)
        logger.info("part 3: conversations, prompt caches on")
        turns = run_turns(settings, workdir, monitor)
        if not settings.skip_constraint:
            run_constraint_script(settings, constraint)
    results = Results(cold=cold, turns=turns, constraint=constraint, embed=embed)
    report = render_report(settings, results, time.perf_counter() - started)
    print(report)
    if settings.base.output is not None:
        settings.base.output.write_text(report)
        logger.info("report written to %s", settings.base.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
