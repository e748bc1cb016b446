"""Chat benchmark: mlxweb's streaming path against raw mlx-lm and mlx_lm.server, in one run.

Four ways of generating the same greedy replies from the same weights and the same prompts, run one
after another (never two at once: the machine's cores are the thing being measured):

1. raw mlx-lm `stream_generate` in this process (the floor: no batching, no cache, no web);
2. our `inference.engine.Engine` called directly (submit, timestamps in `emit`);
3. the whole app: `manage.py serve` in a subprocess, a signed-in websocket client per chat;
4. `mlx_lm.server` in a subprocess, OpenAI-style streaming over HTTP.

Single-chat TTFT and decode speed run with every prompt cache off, so all four prefill the whole
prompt; the multi-turn test runs with the caches on (their defaults), because that is what it
measures. The report is markdown: tables per measurement and the issue's targets, met or not.

    .venv/bin/python bench/bench_chat.py --output docs/bench-latest.md
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mlxweb.launcher import ensure_fast_blas  # noqa: E402

# Before anything imports mlx: re-exec with OpenBLAS preloaded, as manage.py does. The server
# and mlx_lm.server subprocesses inherit the environment, so all three use the same BLAS.
ensure_fast_blas(sys.argv)

import argparse  # noqa: E402
import asyncio  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import html  # noqa: E402
import http.client  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import sqlite3  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import urllib.parse  # noqa: E402
import urllib.request  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from datetime import UTC, datetime  # noqa: E402
from importlib import metadata  # noqa: E402
from typing import Any  # noqa: E402

import websockets  # noqa: E402
from servers import FormClient, MlxwebServer, free_port, listening  # noqa: E402

from inference.catalogue import Catalogue, ModelSpec, UnknownModel  # noqa: E402
from inference.loader import converted_path  # noqa: E402
from mlxweb.config import Config, ConfigError, load_config  # noqa: E402

logger = logging.getLogger("bench")

# Prompts that make a small instruct model write on and on, so max_tokens, not EOS, ends a reply.
LONG_PROMPTS = (
    "Write a long, detailed essay about the history of the Roman Empire, from its founding to "
    "its fall. Cover every emperor and every major war in depth.",
    "Write a long, detailed guide to growing vegetables in a home garden, season by season. "
    "Explain soil, watering, pests and harvesting in depth.",
    "Write a long, detailed story about a lighthouse keeper on a remote island who finds a "
    "mysterious map. Describe every day of the adventure.",
    "Write a long, detailed explanation of how computers work, from transistors and logic gates "
    "to operating systems and the internet.",
    "Write a long, detailed essay about the ocean: its currents, its animals, its history of "
    "exploration and the threats it faces today.",
    "Write a long, detailed travel guide to Japan, covering its cities, food, festivals, history "
    "and etiquette in depth.",
    "Write a long, detailed biography of a fictional inventor who changed the world, covering "
    "childhood, inventions, failures and legacy.",
    "Write a long, detailed explanation of the water cycle, weather, climate and seasons, with "
    "examples from every continent.",
)
# Short questions for the multi-turn test: each turn adds a little to a growing history.
QUESTIONS = (
    "In one sentence, what is photosynthesis?",
    "Name three primary colors.",
    "What is the capital of Italy?",
    "In one sentence, why is the sky blue?",
    "What is 12 times 12?",
    "Name a famous painter.",
    "In one sentence, what is gravity?",
    "What language is spoken in Brazil?",
    "Name two planets.",
    "In one sentence, what is a volcano?",
)
REQUEST_TIMEOUT_S = 900.0

# The targets.
TARGET_DECODE_RATIO = 0.95
TARGET_TTFT_OVERHEAD_S = 0.050
TARGET_CONCURRENCY_GAIN = 2.0
TARGET_TURN_RATIO = 1.5

_DELTA_FRAME = re.compile(
    r'<div hx-swap-oob="beforeend:#reply-([0-9a-f-]{36})-text">(.*)</div>', re.DOTALL
)
_REPLY_ID = re.compile(r'id="reply-([0-9a-f-]{36})-text"')
_ERROR_FRAME = re.compile(r'id="socket-error"[^>]*>([^<]+)<')


# --------------------------------------------------------------------------- measurements


@dataclass
class Stream:
    """One reply as a client saw it: when it was asked for, when text came, how it ended."""

    sent: float = 0.0  # time.perf_counter() of the request
    first: float | None = None  # first non-empty text
    last: float | None = None  # last non-empty text
    tokens: int = 0  # completion tokens, as the generator counted them
    finish: str = ""  # "max_tokens", "eos", ... (normalised across the four paths)
    text: str = ""
    prompt_tokens: int = 0
    cached_tokens: int = 0
    phases: dict[str, float] = field(default_factory=dict)  # where the TTFT went (seconds)
    # The engine's own decode speed in the same run, from the server's timestamps (websocket).
    server_decode_tps: float = float("nan")
    arrivals: list[float] = field(default_factory=list)  # every piece of text

    def on_text(self, now: float, text: str) -> None:
        if not text:
            return
        if self.first is None:
            self.first = now
        self.last = now
        self.text += text
        self.arrivals.append(now)

    @property
    def ttft(self) -> float:
        if self.first is None:
            raise BenchError("a reply produced no text")
        return self.first - self.sent

    @property
    def decode_tps(self) -> float:
        """Tokens after the first over the time after the first (the delivered decode speed)."""
        if self.first is None or self.last is None or self.tokens < 2 or self.last <= self.first:
            return float("nan")
        return (self.tokens - 1) / (self.last - self.first)

    @property
    def steady_decode_tps(self) -> float:
        """One over the median gap between pieces of text: what a burst of other load on the
        machine moves least (a piece that carries two tokens only moves the median a little)."""
        gaps = [b - a for a, b in zip(self.arrivals, self.arrivals[1:], strict=False)]
        middle = _median(gaps) if gaps else float("nan")
        return 1 / middle if middle and middle == middle else float("nan")


@dataclass
class Batch:
    """Replies asked for at the same moment (one concurrency level, one repeat)."""

    streams: list[Stream]

    @property
    def aggregate_tps(self) -> float:
        """All completion tokens over the time from the first request to the last text."""
        start = min(s.sent for s in self.streams)
        end = max(s.last or s.sent for s in self.streams)
        return sum(s.tokens for s in self.streams) / (end - start) if end > start else 0.0


@dataclass
class PathResult:
    """Everything measured on one of the four paths."""

    name: str
    single: list[Stream] = field(default_factory=list)
    batches: dict[int, list[Batch]] = field(default_factory=dict)
    turns: list[list[Stream]] = field(default_factory=list)  # per conversation, per turn
    foreign: list[float] = field(default_factory=list)  # others' CPU (cores) per measurement

    def aggregate(self, level: int) -> float:
        batches = self.batches.get(level) or (
            [Batch([s]) for s in self.single] if level == 1 else []
        )
        return _median([b.aggregate_tps for b in batches])

    def ttft(self) -> float:
        return _median([s.ttft for s in self.single])

    def decode(self) -> float:
        return _median([s.decode_tps for s in self.single])

    def steady_decode(self) -> float:
        return _median([s.steady_decode_tps for s in self.single])

    def turn_ttft(self, turn: int) -> float:
        return _median([c[turn - 1].ttft for c in self.turns if len(c) >= turn])


class BenchError(RuntimeError):
    """Something the benchmark needs did not work; the message says what."""


def _median(values: Sequence[float]) -> float:
    clean = [v for v in values if v == v]  # drop NaN
    return statistics.median(clean) if clean else float("nan")


def _normalise_finish(reason: str | None) -> str:
    return {"length": "max_tokens", "stop": "eos"}.get(reason or "", reason or "")


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    """Validated command-line options plus what they resolve to."""

    config: Config
    catalogue: Catalogue
    spec: ModelSpec
    model_dir: Path  # the mlx-lm directory the model is stored in
    converted_dir: Path
    models_dir: Path
    max_tokens: int
    repeats: int
    levels: tuple[int, ...]
    turns: int
    turn_max_tokens: int
    skip_server: bool
    output: Path | None
    command: str
    # Where the engine serves the model in float32 (MLX on the CPU, cpu_float32_max_bytes), a
    # float32 copy of it written for the run, which raw mlx-lm and mlx_lm.server load instead,
    # so that all four paths compute with the same weights.
    float32_dir: Path | None = None

    @property
    def served_dir(self) -> Path:
        """The directory raw mlx-lm and mlx_lm.server load: the weights our engine serves."""
        return self.float32_dir or self.model_dir


def _concurrency(value: str) -> tuple[int, ...]:
    try:
        levels = sorted({int(part) for part in value.split(",") if part.strip()})
    except ValueError:
        levels = []
    if not levels or levels[0] < 1:
        raise argparse.ArgumentTypeError(
            f"{value!r}: expected comma-separated positive integers, e.g. 1,4,8"
        )
    return tuple(levels)


def parse_args(argv: Sequence[str]) -> Settings:
    try:
        config = load_config()
    except ConfigError as e:
        raise SystemExit(f"bench_chat: bad configuration: {e}") from e
    server = config.server
    parser = argparse.ArgumentParser(
        prog="bench_chat.py",
        description="Benchmark mlxweb's chat path against raw mlx-lm and mlx_lm.server.",
    )
    parser.add_argument("--model-id", default=server.default_model, help="a catalogue model id")
    parser.add_argument("--max-tokens", type=int, default=128, help="new tokens per reply")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement (medians)")
    parser.add_argument(
        "--concurrency", type=_concurrency, default=(1, 4, 8), help="concurrent chats, e.g. 1,4,8"
    )
    parser.add_argument("--turns", type=int, default=10, help="turns of the multi-turn test")
    parser.add_argument(
        "--turn-max-tokens", type=int, default=16, help="new tokens per turn of that test"
    )
    parser.add_argument("--skip-server", action="store_true", help="leave out mlx_lm.server")
    parser.add_argument("--output", type=Path, help="also write the markdown report here")
    args = parser.parse_args(argv)

    limit = server.limits.max_new_tokens
    if not 2 <= args.max_tokens <= limit:
        parser.error(
            f"--max-tokens: must be 2..{limit} (limits.max_new_tokens), got {args.max_tokens}"
        )
    if not 1 <= args.repeats <= 50:
        parser.error(f"--repeats: must be 1..50, got {args.repeats}")
    streams = server.limits.max_concurrent_streams
    if args.concurrency[-1] > streams:
        parser.error(
            f"--concurrency: {args.concurrency[-1]} chats exceed limits.max_concurrent_streams "
            f"({streams}); the server would queue the rest"
        )
    if not 2 <= args.turns <= 50:
        parser.error(f"--turns: must be 2..50, got {args.turns}")
    if not 1 <= args.turn_max_tokens <= limit:
        parser.error(f"--turn-max-tokens: must be 1..{limit}, got {args.turn_max_tokens}")
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
    var_dir = Path(os.environ.get("MLXWEB_VAR_DIR", "var"))
    converted_dir = (var_dir if var_dir.is_absolute() else ROOT / var_dir) / "converted"
    local = spec.local_path()
    assert local is not None
    model_dir = converted_path(spec, converted_dir) if spec.kind == "gguf" else local
    command = shlex.join([os.path.relpath(sys.executable, ROOT), *sys.argv])
    return Settings(
        config=config,
        catalogue=catalogue,
        spec=spec,
        model_dir=model_dir,
        converted_dir=converted_dir,
        models_dir=models_dir,
        max_tokens=args.max_tokens,
        repeats=args.repeats,
        levels=args.concurrency,
        turns=args.turns,
        turn_max_tokens=args.turn_max_tokens,
        skip_server=args.skip_server,
        output=args.output,
        command=command,
    )


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _prompts(count: int) -> list[str]:
    return [LONG_PROMPTS[i % len(LONG_PROMPTS)] for i in range(count)]


def _turn_text(conversation: int, turn: int) -> str:
    # A marker per conversation keeps repeats from hitting each other's cached prompts.
    return f"Conversation {conversation}, question {turn}: {QUESTIONS[(turn - 1) % len(QUESTIONS)]}"


# --------------------------------------------------------------------------- foreign CPU load


class CpuMonitor:
    """How much CPU processes outside this benchmark's tree used during a measurement.

    The machine may be shared: this turns "the numbers may be noisy" into a number per
    measurement (cores busy with other work), read from /proc on Linux.
    """

    def __init__(self) -> None:
        self.available = Path("/proc/stat").exists()
        self.hz = os.sysconf("SC_CLK_TCK") if self.available else 100

    def snapshot(self) -> tuple[float, int, int]:
        if not self.available:
            return time.monotonic(), 0, 0
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
        busy = user + nice + system + irq + softirq + steal
        return time.monotonic(), busy, self._tree_jiffies(os.getpid())

    @staticmethod
    def _tree_jiffies(root: int) -> int:
        parents: dict[int, int] = {}
        jiffies: dict[int, int] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            rest = stat[stat.rindex(")") + 2 :].split()
            pid = int(entry.name)
            parents[pid] = int(rest[1])
            jiffies[pid] = int(rest[11]) + int(rest[12])  # utime + stime
        total = 0
        for pid, used in jiffies.items():
            node = pid
            while node > 1 and node != root:
                node = parents.get(node, 0)
            if node == root:
                total += used
        return total

    def foreign_cores(self, start: tuple[float, int, int], end: tuple[float, int, int]) -> float:
        """Average cores that other processes kept busy between two snapshots."""
        elapsed = end[0] - start[0]
        if not self.available or elapsed <= 0:
            return float("nan")
        return max(0.0, ((end[1] - start[1]) - (end[2] - start[2])) / self.hz / elapsed)


# --------------------------------------------------------------------------- the four paths


class RawPath:
    """Raw mlx-lm `stream_generate` in this process: one request at a time, no cache."""

    name = "raw mlx-lm"
    batches = False

    def __init__(self, settings: Settings) -> None:
        # Our loader only adds the GGUF conversion (done once) and a configured chat-template
        # override; the model and tokenizer are mlx_lm.load's.
        from inference.loader import load_model

        spec = settings.spec
        if settings.float32_dir is not None:
            spec = dataclasses.replace(spec, kind="mlx", path=settings.float32_dir)
        self.loaded = load_model(spec, settings.converted_dir)
        self.single(_user("Say hello."), 4)  # warm-up

    def single(self, messages: list[dict[str, str]], max_tokens: int) -> Stream:
        """One greedy reply; templating is inside the TTFT, as it is in the engine."""
        from mlx_lm import stream_generate
        from mlx_lm.sample_utils import greedy_sampler

        stream = Stream(sent=time.perf_counter())
        tokenizer = self.loaded.tokenizer
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        response = None
        for response in stream_generate(
            self.loaded.model, tokenizer, prompt, max_tokens=max_tokens, sampler=greedy_sampler
        ):
            stream.on_text(time.perf_counter(), response.text)
        assert response is not None
        stream.tokens = response.generation_tokens
        stream.prompt_tokens = response.prompt_tokens
        stream.finish = _normalise_finish(response.finish_reason)
        return stream

    def batch(self, prompts: list[str], max_tokens: int) -> Batch:
        raise NotImplementedError("stream_generate serves one request at a time")

    def close(self) -> None:
        pass


def start_engine(settings: Settings, **overrides: Any) -> Any:
    """Our `Engine` in this process on `settings`' catalogue, with server.yaml's limits, batch
    sizes and prompt cache (one model loaded at a time), started; `overrides`: Engine
    arguments that differ (a bench's prompt cache, its KV cache settings)."""
    from inference.engine import Engine

    server = settings.config.server
    arguments: dict[str, Any] = {
        "catalogue": settings.catalogue,
        "converted_dir": settings.converted_dir,
        "max_loaded_models": 1,
        "max_prompt_tokens": server.limits.max_prompt_tokens,
        "max_new_tokens": server.limits.max_new_tokens,
        "prompt_cache_entries": server.prompt_cache.max_entries,
        "prompt_cache_bytes": server.prompt_cache.max_bytes,
        "prefill_batch_size": server.batch.prefill_batch_size,
        "completion_batch_size": server.batch.completion_batch_size,
        "prefill_step_size": server.batch.prefill_step_size,
        "cpu_float32_max_bytes": server.cpu_float32_max_bytes,
    }
    engine = Engine(**{**arguments, **overrides})
    engine.start()
    return engine


class EnginePath:
    """Our `Engine` in this process, its prompt cache off: submit, and timestamps in `emit`."""

    name = "Engine"
    batches = True

    def __init__(self, settings: Settings) -> None:
        self.model_id = settings.spec.id
        # Cold prefill, like raw mlx-lm.
        self.engine = start_engine(settings, prompt_cache_entries=0, prompt_cache_bytes=0)
        self.engine.load(self.model_id)
        self.batch(["Say hello."], 4)  # warm-up

    def single(self, messages: list[dict[str, str]], max_tokens: int) -> Stream:
        (stream,) = self._run([messages], max_tokens).streams
        return stream

    def batch(self, prompts: list[str], max_tokens: int) -> Batch:
        return self._run([_user(p) for p in prompts], max_tokens)

    def _run(self, conversations: list[list[dict[str, str]]], max_tokens: int) -> Batch:
        from inference.engine import Delta, Finished, GenerationRequest, Started
        from inference.schemas import GenerationParams

        params = GenerationParams.model_validate({"temperature": 0.0, "max_tokens": max_tokens})
        lock = threading.Lock()
        done = threading.Event()
        remaining = [len(conversations)]
        errors: list[str] = []

        def emitter(stream: Stream) -> Callable[[Any], None]:
            def emit(event: Any) -> None:  # on the engine thread
                now = time.perf_counter()
                if isinstance(event, Started):
                    stream.prompt_tokens = event.prompt_tokens
                    stream.cached_tokens = event.cached_tokens
                elif isinstance(event, Delta):
                    stream.on_text(now, event.text)
                elif isinstance(event, Finished):
                    stream.tokens = event.completion_tokens
                    stream.finish = event.finish_reason
                    with lock:
                        if event.error:
                            errors.append(event.error)
                        remaining[0] -= 1
                        if remaining[0] == 0:
                            done.set()

            return emit

        streams = []
        for messages in conversations:
            stream = Stream(sent=time.perf_counter())
            streams.append(stream)
            request = GenerationRequest(
                id=uuid.uuid4().hex, model_id=self.model_id, messages=messages, params=params
            )
            self.engine.submit(request, emitter(stream))
        if not done.wait(REQUEST_TIMEOUT_S):
            raise BenchError("the engine did not finish within the timeout")
        if errors:
            raise BenchError(f"the engine failed a request: {errors[0]}")
        return Batch(streams)

    def close(self) -> None:
        self.engine.stop()


class LiveApp:
    """`manage.py serve` on a temporary var dir and SQLite database, with one signed-in user."""

    def __init__(self, settings: Settings, workdir: Path, *, prompt_cache: bool) -> None:
        self.settings = settings
        var = workdir / "var"
        converted = var / "converted"
        converted.mkdir(parents=True)
        if settings.spec.kind == "gguf":
            # Same models dir, same GGUF: the server looks for the same converted name.
            (converted / settings.model_dir.name).symlink_to(settings.model_dir.resolve())
        self.db_path = var / "db.sqlite3"
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "mlxweb.settings",
            "MLXWEB_VAR_DIR": str(var),
            "MLXWEB_DATABASE_URL": f"sqlite:///{self.db_path}",
            "MLXWEB_MODELS_DIR": str(settings.models_dir),
            "MLXWEB_REDIS_URL": "",  # everything in one process, as `scripts/run` serves it
            "MLXWEB_ALLOW_SIGNUP": "true",
            "MLXWEB_SECRET_KEY": "bench-" + uuid.uuid4().hex,
            "MLXWEB_LOG_LEVEL": "WARNING",
            "PYTHONUNBUFFERED": "1",
        }
        if settings.spec.configured:  # only a configured model may be the default
            env["MLXWEB_DEFAULT_MODEL"] = settings.spec.id
        if not prompt_cache:
            env["MLXWEB_PROMPT_CACHE_ENTRIES"] = "0"
        self.site = MlxwebServer(env=env, log_path=workdir / "web.log")
        self.client: FormClient | None = None

    def start(self) -> None:
        try:
            self.site.manage("migrate", "--noinput", "-v0")
            self.site.start()
            self.client = FormClient(self.site.url)
            password = "bench-" + uuid.uuid4().hex
            url = self.client.submit(
                "/signup/", {"username": "bench", "password1": password, "password2": password}
            )
            if "/signup/" in url:
                raise BenchError("sign-up failed")
        except BaseException:
            self.dump_log()
            raise

    def dump_log(self) -> None:
        logger.error("manage.py serve log tail:\n%s", self.site.log_tail())

    def stop(self) -> None:
        self.site.stop()

    def new_conversation(self) -> str:
        assert self.client is not None
        # /c/new/ takes only POST: the CSRF token comes from the page that shows its form.
        page = self.client.page("/")
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page)
        if not token:
            raise BenchError("no CSRF token on the chat page")
        body = urllib.parse.urlencode(
            {"text": "", "model": self.settings.spec.id, "csrfmiddlewaretoken": token.group(1)}
        ).encode()
        request = urllib.request.Request(
            self.site.url + "/c/new/", data=body, headers={"Referer": self.site.url + "/"}
        )
        with self.client.opener.open(request, timeout=30) as response:
            url = response.geturl()
        match = re.search(r"/c/([0-9a-f-]{36})/", url)
        if not match:
            raise BenchError(f"could not open a conversation (ended at {url})")
        return match.group(1)

    def connect(self, code: str) -> Any:
        assert self.client is not None
        return websockets.connect(
            f"ws://127.0.0.1:{self.site.port}/ws/conversations/{code}/",
            additional_headers={"Cookie": self.client.cookie_header(), "Origin": self.site.url},
            max_size=None,
        )

    def generation(self, code: str) -> dict[str, Any]:
        """The reply's Generation row, read straight from the SQLite file."""
        with contextlib.closing(sqlite3.connect(self.db_path, timeout=30)) as db:
            db.row_factory = sqlite3.Row
            row = db.execute(
                "SELECT * FROM inference_generation WHERE code = ?", (uuid.UUID(code).hex,)
            ).fetchone()
        if row is None:
            raise BenchError(f"no Generation row {code}")
        return dict(row)

    def prompts_sent(self) -> list[list[dict[str, str]]]:
        """The messages each generation sent the model, oldest first: each prompt is the path
        from its leaf `inference_promptmessage` up to the root."""
        path = """
            WITH RECURSIVE path(id, parent_id, role, content, depth) AS (
                SELECT id, parent_id, role, content, 0 FROM inference_promptmessage WHERE id = ?
                UNION ALL
                SELECT node.id, node.parent_id, node.role, node.content, path.depth + 1
                FROM inference_promptmessage AS node JOIN path ON node.id = path.parent_id
            )
            SELECT role, content FROM path ORDER BY depth DESC
        """
        with contextlib.closing(sqlite3.connect(self.db_path, timeout=30)) as db:
            leaves = db.execute("SELECT prompt_id FROM inference_generation ORDER BY id")
            return [
                [{"role": role, "content": content} for role, content in db.execute(path, (leaf,))]
                for (leaf,) in leaves.fetchall()
            ]


def _db_time(value: str | None) -> float | None:
    if not value:
        return None
    moment = datetime.fromisoformat(value)
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


async def _ws_turn(app: LiveApp, socket: Any, text: str, max_tokens: int) -> Stream:
    """Send one turn and read frames until the reply's final render; fill in the row's counts."""
    payload = {"type": "send", "text": text, "temperature": 0, "max_tokens": max_tokens}
    stream = Stream()
    wall_sent = time.time()
    stream.sent = time.perf_counter()
    await socket.send(json.dumps(payload))
    code: str | None = None
    wall_first: float | None = None
    async with asyncio.timeout(REQUEST_TIMEOUT_S):
        while True:
            frame = str(await socket.recv())
            now = time.perf_counter()
            if delta := _DELTA_FRAME.search(frame):
                code = delta.group(1)
                if stream.first is None:
                    wall_first = time.time()
                stream.on_text(now, html.unescape(delta.group(2)))
            elif error := _ERROR_FRAME.search(frame):
                raise BenchError(f"the server answered with an error: {error.group(1).strip()}")
            elif code is None and (reply := _REPLY_ID.search(frame)):
                code = reply.group(1)
            elif code is not None and 'class="body md"' in frame:
                break
    assert code is not None
    row = app.generation(code)
    stream.tokens = int(row["completion_tokens"])
    stream.prompt_tokens = int(row["prompt_tokens"])
    stream.cached_tokens = int(row["cached_tokens"])
    stream.finish = str(row["finish_reason"])
    if row["state"] == "error":
        raise BenchError(f"reply {code} failed: {row['error']}")
    # Where the TTFT went, on the server's clock (same machine): before the row existed, until
    # the engine accepted the prompt, prefill, and from the engine thread to this client.
    created, started = _db_time(row["created_at"]), _db_time(row["started_at"])
    first_token, finished = _db_time(row["first_token_at"]), _db_time(row["finished_at"])
    if first_token and finished and finished > first_token and stream.tokens > 1:
        stream.server_decode_tps = (stream.tokens - 1) / (finished - first_token)
    if created and started and first_token and wall_first:
        stream.phases = {
            "send -> Generation row created": created - wall_sent,
            "row created -> engine accepted the prompt (Started)": started - created,
            "Started -> first token (prefill, first step)": first_token - started,
            "first token -> client has the delta frame": wall_first - first_token,
        }
    return stream


async def _ws_batch(app: LiveApp, codes: list[str], texts: list[str], max_tokens: int) -> Batch:
    async with contextlib.AsyncExitStack() as stack:
        sockets = [await stack.enter_async_context(app.connect(code)) for code in codes]
        streams = await asyncio.gather(
            *(_ws_turn(app, s, t, max_tokens) for s, t in zip(sockets, texts, strict=True))
        )
    return Batch(list(streams))


class WebsocketPath:
    """The whole app over its websocket; each chat is a fresh conversation."""

    name = "websocket"
    batches = True

    def __init__(self, settings: Settings, workdir: Path, *, prompt_cache: bool) -> None:
        self.app = LiveApp(settings, workdir, prompt_cache=prompt_cache)
        self.app.start()
        self._warm_up()

    def _warm_up(self) -> None:
        # Also loads the model, and with the cache on leaves the system prompt in it, as any
        # earlier chat does on a running server.
        self.batch(["Say hello."], 4)

    def single(self, messages: list[dict[str, str]], max_tokens: int) -> Stream:
        (message,) = messages  # a new conversation: its prompt is just this message
        (stream,) = self.batch([message["content"]], max_tokens).streams
        return stream

    def batch(self, prompts: list[str], max_tokens: int) -> Batch:
        codes = [self.app.new_conversation() for _ in prompts]
        try:
            return asyncio.run(_ws_batch(self.app, codes, prompts, max_tokens))
        except BaseException:
            self.app.dump_log()
            raise

    def conversation(self, number: int, turns: int, max_tokens: int) -> list[Stream]:
        """Sequential turns of one new conversation on one socket."""

        async def talk() -> list[Stream]:
            streams = []
            async with self.app.connect(self.app.new_conversation()) as socket:
                for turn in range(1, turns + 1):
                    text = _turn_text(number, turn)
                    streams.append(await _ws_turn(self.app, socket, text, max_tokens))
            return streams

        try:
            return asyncio.run(talk())
        except BaseException:
            self.app.dump_log()
            raise

    def close(self) -> None:
        self.app.stop()


class ServerPath:
    """`mlx_lm.server` on the same model directory, over its OpenAI streaming API."""

    name = "mlx_lm.server"
    batches = True

    def __init__(self, settings: Settings, workdir: Path, *, prompt_cache_size: int) -> None:
        batch = settings.config.server.batch
        self.port = free_port()
        command = [
            str(Path(sys.executable).parent / "mlx_lm.server"),
            "--model", str(settings.served_dir),
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--prompt-cache-size", str(prompt_cache_size),
            "--decode-concurrency", str(batch.completion_batch_size),
            "--prompt-concurrency", str(batch.prefill_batch_size),
            "--prefill-step-size", str(batch.prefill_step_size),
            "--log-level", "WARNING",
        ]  # fmt: skip
        if settings.spec.chat_template:
            command += ["--chat-template", settings.spec.chat_template]
        self.log_path = workdir / f"mlx_lm-server-{self.port}.log"
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            listening(self.port, self.process, timeout=120)
            self.batch(["Say hello."], 4)  # warm-up (and the model load)
        except BaseException:
            self.dump_log()
            self.close()
            raise

    def dump_log(self) -> None:
        logger.error(
            "mlx_lm.server log tail:\n%s", self.log_path.read_text(errors="replace")[-3000:]
        )

    def single(self, messages: list[dict[str, str]], max_tokens: int) -> Stream:
        stream = Stream()
        self._request(messages, max_tokens, stream)
        return stream

    def batch(self, prompts: list[str], max_tokens: int) -> Batch:
        streams = [Stream() for _ in prompts]
        failures: list[BaseException] = []

        def one(stream: Stream, prompt: str) -> None:
            try:
                self._request(_user(prompt), max_tokens, stream)
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
            raise BenchError(f"mlx_lm.server request failed: {failures[0]}") from failures[0]
        return Batch(streams)

    def _request(self, messages: list[dict[str, str]], max_tokens: int, stream: Stream) -> None:
        """One streaming /v1/chat/completions request; fills `stream` (blocking)."""
        body = json.dumps(
            {
                "messages": messages,
                "temperature": 0.0,
                "max_tokens": max_tokens,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        )
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=REQUEST_TIMEOUT_S)
        try:
            stream.sent = time.perf_counter()
            connection.request(
                "POST",
                "/v1/chat/completions",
                body=body,
                headers={"Content-Type": "application/json"},
            )
            response = connection.getresponse()
            if response.status != 200:
                raise BenchError(
                    f"mlx_lm.server answered {response.status}: {response.read()[:500]!r}"
                )
            while line := response.readline():
                if not line.startswith(b"data: "):
                    continue
                data = line[6:].strip()
                if data == b"[DONE]":
                    break
                now = time.perf_counter()
                chunk = json.loads(data)
                for choice in chunk.get("choices") or []:
                    stream.on_text(now, (choice.get("delta") or {}).get("content") or "")
                    if choice.get("finish_reason"):
                        stream.finish = _normalise_finish(choice["finish_reason"])
                if usage := chunk.get("usage"):
                    stream.tokens = int(usage["completion_tokens"])
                    stream.prompt_tokens = int(usage["prompt_tokens"])
                    details = usage.get("prompt_tokens_details") or {}
                    stream.cached_tokens = int(details.get("cached_tokens") or 0)
        finally:
            connection.close()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# --------------------------------------------------------------------------- the runs


def _rotated(paths: list[Any], turn: int) -> list[Any]:
    # Each repeat starts with another path, so slow drift (thermal, other load) spreads evenly.
    k = turn % len(paths)
    return paths[k:] + paths[:k]


def run_cold(settings: Settings, workdir: Path, monitor: CpuMonitor) -> dict[str, PathResult]:
    """Single chats and concurrent chats on every path, caches off, interleaved repeat by repeat.

    All paths stay up for the whole phase (idle while another measures), so every repeat of
    every path sees the same machine, whatever else it is doing at the time.
    """
    with contextlib.ExitStack() as stack:
        paths: list[Any] = []
        logger.info(
            "starting raw mlx-lm, the Engine, manage.py serve%s",
            "" if settings.skip_server else " and mlx_lm.server",
        )
        paths.append(RawPath(settings))  # first: it also converts a GGUF model once
        for factory in (
            lambda: EnginePath(settings),
            lambda: WebsocketPath(settings, workdir / "cold", prompt_cache=False),
            None
            if settings.skip_server
            else (lambda: ServerPath(settings, workdir, prompt_cache_size=0)),
        ):
            if factory is not None:
                path = factory()
                stack.callback(path.close)
                paths.append(path)
        results = {p.name: PathResult(p.name) for p in paths}

        for i in range(settings.repeats):
            for path in _rotated(paths, i):
                start = monitor.snapshot()
                stream = path.single(_user(LONG_PROMPTS[0]), settings.max_tokens)
                result = results[path.name]
                result.foreign.append(monitor.foreign_cores(start, monitor.snapshot()))
                result.single.append(stream)
                _log_stream(path.name, f"single {i + 1}/{settings.repeats}", stream, result)
        batching = [p for p in paths if p.batches]
        for level in settings.levels:
            if level == 1:
                continue  # the single runs are the one-chat level
            for i in range(settings.repeats):
                for path in _rotated(batching, i):
                    start = monitor.snapshot()
                    batch = path.batch(_prompts(level), settings.max_tokens)
                    result = results[path.name]
                    result.foreign.append(monitor.foreign_cores(start, monitor.snapshot()))
                    result.batches.setdefault(level, []).append(batch)
                    _log_batch(path.name, level, i, settings.repeats, batch, result)
    return results


def run_turns(settings: Settings, workdir: Path, monitor: CpuMonitor) -> dict[str, PathResult]:
    """Multi-turn conversations, prompt caches on (their defaults), one path at a time.

    Turn 1 and turn N are compared within a path, so these need no interleaving. Raw mlx-lm
    prefills the app's turn-1 and turn-N prompts without a cache; mlx_lm.server gets the app's
    message lists turn by turn, as an OpenAI client sends them.
    """
    results: dict[str, PathResult] = {}
    ws = WebsocketPath(settings, workdir / "turns", prompt_cache=True)
    result = results[ws.name] = PathResult(ws.name)
    try:
        for i in range(settings.repeats):
            start = monitor.snapshot()
            streams = ws.conversation(i + 1, settings.turns, settings.turn_max_tokens)
            result.foreign.append(monitor.foreign_cores(start, monitor.snapshot()))
            for n, stream in enumerate(streams, 1):
                _log_stream(ws.name, f"conversation {i + 1} turn {n}", stream, result)
            result.turns.append(streams)
        sent = ws.app.prompts_sent()[1:]  # without the warm-up
    finally:
        ws.close()
    histories = [
        sent[i * settings.turns : (i + 1) * settings.turns] for i in range(settings.repeats)
    ]

    raw = RawPath(settings)
    result = results[raw.name] = PathResult(raw.name)
    first, last = histories[0][0], histories[0][-1]
    for i in range(settings.repeats):
        start = monitor.snapshot()
        one = raw.single(first, settings.turn_max_tokens)
        final = raw.single(last, settings.turn_max_tokens)
        result.foreign.append(monitor.foreign_cores(start, monitor.snapshot()))
        _log_stream(raw.name, f"turn 1, {i + 1}/{settings.repeats}", one, result)
        _log_stream(raw.name, f"turn {settings.turns}, {i + 1}/{settings.repeats}", final, result)
        # Only turns 1 and N are measured here; the padding puts turn N at its place.
        result.turns.append([one] + [Stream()] * (settings.turns - 2) + [final])
    del raw

    if not settings.skip_server:
        server = ServerPath(settings, workdir, prompt_cache_size=10)  # its default
        result = results[server.name] = PathResult(server.name)
        try:
            for i, conversation in enumerate(histories):
                start = monitor.snapshot()
                streams = [server.single(m, settings.turn_max_tokens) for m in conversation]
                result.foreign.append(monitor.foreign_cores(start, monitor.snapshot()))
                for n, stream in enumerate(streams, 1):
                    _log_stream(server.name, f"conversation {i + 1} turn {n}", stream, result)
                result.turns.append(streams)
        finally:
            server.close()
    return results


# --------------------------------------------------------------------------- progress


def _log_stream(path: str, what: str, stream: Stream, result: PathResult) -> None:
    logger.info(
        "%s %s: ttft %.3f s, %.2f tok/s, %d tokens (%s), prompt %d, cached %d; "
        "others' CPU %.2f cores",
        path,
        what,
        stream.ttft,
        stream.decode_tps,
        stream.tokens,
        stream.finish,
        stream.prompt_tokens,
        stream.cached_tokens,
        result.foreign[-1] if result.foreign else float("nan"),
    )


def _log_batch(
    path: str, level: int, i: int, repeats: int, batch: Batch, result: PathResult
) -> None:
    logger.info(
        "%s %d chats %d/%d: %.2f tok/s aggregate, tokens %s; others' CPU %.2f cores",
        path,
        level,
        i + 1,
        repeats,
        batch.aggregate_tps,
        [s.tokens for s in batch.streams],
        result.foreign[-1] if result.foreign else float("nan"),
    )


# --------------------------------------------------------------------------- report


def _fmt(value: float, digits: int = 2, unit: str = "") -> str:
    return "n/a" if value != value else f"{value:.{digits}f}{unit}"


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**met**" if ok else "**not met**")


def _machine(settings: Settings) -> list[str]:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    preload = os.environ.get("LD_PRELOAD", "")
    blas = (
        f"OpenBLAS preloaded (`{preload}`)"
        if "openblas" in preload
        else "reference BLAS of the mlx wheel (OpenBLAS not preloaded)"
    )
    import mlx.core as mx

    quantization = "unknown"
    with contextlib.suppress(OSError, ValueError, AttributeError):
        config = json.loads((settings.model_dir / "config.json").read_text())
        q = config.get("quantization") or config.get("quantization_config") or {}
        # Per-layer entries (a GGUF keeps its embeddings at 8 bits) reduce to the set of widths.
        bits = {v["bits"] for v in q.values() if isinstance(v, dict)} | (
            {q["bits"]} if "bits" in q else set()
        )
        quantization = (
            f"{'/'.join(str(b) for b in sorted(bits))}-bit, group {q.get('group_size')}"
            if bits
            else f"none (dense {config.get('torch_dtype', '')})"
        )
    return [
        f"- machine: {platform.machine()}, {os.cpu_count()} cores ({cpu}), "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}",
        f"- mlx {metadata.version('mlx')} on `{mx.default_device()}`, mlx-lm "
        f"{metadata.version('mlx-lm')}; BLAS: {blas}",
        f"- model: `{settings.spec.id}` from `{os.path.relpath(settings.model_dir, ROOT)}` "
        f"(quantization: {quantization})",
        "- weights computed with: "
        + (
            "float32, dequantized at load (`cpu_float32_max_bytes`) by our engine and app; raw "
            "mlx-lm and mlx_lm.server load a float32 copy written for the run"
            if settings.float32_dir is not None
            else "as stored, by all four"
        ),
    ]


def _early_endings(results: list[PathResult], settings: Settings) -> list[str]:
    notes = []
    for result in results:
        streams = result.single + [
            s for bs in result.batches.values() for b in bs for s in b.streams
        ]
        early = [s for s in streams if s.tokens < settings.max_tokens or s.finish != "max_tokens"]
        if early:
            detail = ", ".join(f"{s.tokens} tokens ({s.finish})" for s in early[:6])
            notes.append(
                f"- {result.name}: {len(early)} of {len(streams)} replies ended before "
                f"max_tokens: {detail}"
            )
    return notes or [f"- every long reply ran to max_tokens ({settings.max_tokens} tokens)."]


def render_report(
    settings: Settings,
    cold: dict[str, PathResult],
    turns: dict[str, PathResult],
    elapsed: float,
) -> str:
    none = PathResult("-")
    raw, engine, ws = cold[RawPath.name], cold[EnginePath.name], cold[WebsocketPath.name]
    server = cold.get(ServerPath.name)
    srv = server or none
    ws_turns, raw_turns = turns[WebsocketPath.name], turns[RawPath.name]
    srv_turns = turns.get(ServerPath.name, none)
    n = settings.turns
    prompt_tokens = raw.single[0].prompt_tokens if raw.single else 0
    # Load on the machine moves every run's speed; within one run, delivered vs engine-side
    # isolates what the worker, channel layer, consumer and socket cost.
    ws_server = _median([s.server_decode_tps for s in ws.single])
    delivery = [s.decode_tps / s.server_decode_tps for s in ws.single]
    lines = [
        "# mlxweb chat benchmark",
        "",
        f"Command: `{settings.command}` (took {elapsed / 60:.1f} min, "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC)",
        "",
        *_machine(settings),
        f"- greedy (temperature 0), {settings.max_tokens} new tokens per long reply, a "
        f"{prompt_tokens}-token prompt (chat template included); medians of {settings.repeats} "
        "runs. Single-chat and concurrency runs: every prompt cache off (cold prefill), all "
        "paths up at once and measured in turn, one at a time, repeat by repeat.",
        "",
        "## One chat",
        "",
        "| | websocket (ours, end to end) | Engine (ours, direct) | raw mlx-lm "
        "`stream_generate` | mlx_lm.server |",
        "|---|---|---|---|---|",
        f"| TTFT | {_fmt(ws.ttft(), 3, ' s')} | {_fmt(engine.ttft(), 3, ' s')} | "
        f"{_fmt(raw.ttft(), 3, ' s')} | {_fmt(srv.ttft(), 3, ' s')} |",
        f"| decode tok/s | {_fmt(ws.decode())} | {_fmt(engine.decode())} | {_fmt(raw.decode())} | "
        f"{_fmt(srv.decode())} |",
        f"| decode tok/s, 1 / median token gap | {_fmt(ws.steady_decode())} | "
        f"{_fmt(engine.steady_decode())} | {_fmt(raw.steady_decode())} | "
        f"{_fmt(srv.steady_decode())} |",
        f"| decode vs raw | {_fmt(ws.decode() / raw.decode(), 3, 'x')} | "
        f"{_fmt(engine.decode() / raw.decode(), 3, 'x')} | 1x | "
        f"{_fmt(srv.decode() / raw.decode(), 3, 'x')} |",
        f"| TTFT minus raw | {_fmt((ws.ttft() - raw.ttft()) * 1000, 0, ' ms')} | "
        f"{_fmt((engine.ttft() - raw.ttft()) * 1000, 0, ' ms')} | 0 | "
        f"{_fmt((srv.ttft() - raw.ttft()) * 1000, 0, ' ms')} |",
        f"| prompt / cached tokens | {_counts(ws)} | {_counts(engine)} | {_counts(raw)} | "
        f"{_counts(srv)} |",
        f"| engine-side decode tok/s, same runs (Generation row) | {_fmt(ws_server)} | - | - | - |",
        f"| delivered / engine-side, same runs | {_fmt(_median(delivery), 3, 'x')} | - | - | - |",
        f"| same text as raw | {_same_text(ws, raw)} | {_same_text(engine, raw)} | - | "
        f"{_same_text(srv, raw)} |",
        "",
    ]
    breakdown = _phase_medians(ws.single)
    if breakdown:
        lines += [
            "Where the websocket TTFT goes (medians; server timestamps from the Generation row, "
            "same clock):",
            "",
            "| step | time |",
            "|---|---|",
            *(f"| {step} | {_fmt(value * 1000, 1, ' ms')} |" for step, value in breakdown.items()),
            "",
            "Outside the engine's own prefill (every step but the third; the second includes "
            "the engine's chat templating, which raw mlx-lm's TTFT has too): "
            f"{_fmt(_outside_engine(ws.single) * 1000, 1, ' ms')} (median over the runs).",
            "",
        ]
    lines += [
        "## Concurrent chats: aggregate tok/s",
        "",
        "All completion tokens over the time from the first request to the last token. Raw "
        "`stream_generate` serves one request at a time, so it has no column.",
        "",
        "| chats | websocket (ours) | Engine (ours) | mlx_lm.server |",
        "|---|---|---|---|",
    ]
    levels = sorted({1, *settings.levels})
    for level in levels:
        lines.append(
            f"| {level} | {_agg(ws, level)} | {_agg(engine, level)} | {_agg(srv, level)} |"
        )
    lines += [
        "",
        f"## Multi-turn: turn 1 vs turn {n}",
        "",
        f"{settings.repeats} conversations of {n} sequential turns, {settings.turn_max_tokens} new "
        "tokens each, prompt caches on (their defaults); one chat ran before them, so every turn 1 "
        "finds the system prompt cached, as on a running server. Raw mlx-lm prefills the same "
        "turn-1 and turn-N prompts without a cache; mlx_lm.server gets the same message lists, "
        "turn by turn.",
        "",
        "| | websocket (ours) | raw mlx-lm (no cache) | mlx_lm.server (its cache) |",
        "|---|---|---|---|",
        f"| turn 1 TTFT | {_fmt(ws_turns.turn_ttft(1), 3, ' s')} | "
        f"{_fmt(raw_turns.turn_ttft(1), 3, ' s')} | {_fmt(srv_turns.turn_ttft(1), 3, ' s')} |",
        f"| turn {n} TTFT | {_fmt(ws_turns.turn_ttft(n), 3, ' s')} | "
        f"{_fmt(raw_turns.turn_ttft(n), 3, ' s')} | {_fmt(srv_turns.turn_ttft(n), 3, ' s')} |",
        f"| turn {n} / turn 1 | {_fmt(_turn_ratio(ws_turns, n), 2, 'x')} | "
        f"{_fmt(_turn_ratio(raw_turns, n), 2, 'x')} | {_fmt(_turn_ratio(srv_turns, n), 2, 'x')} |",
        f"| turn 1 prompt / cached tokens | {_turn_counts(ws_turns, 1)} | "
        f"{_turn_counts(raw_turns, 1)} | {_turn_counts(srv_turns, 1)} |",
        f"| turn {n} prompt / cached tokens | {_turn_counts(ws_turns, n)} | "
        f"{_turn_counts(raw_turns, n)} | {_turn_counts(srv_turns, n)} |",
        "",
        "Every turn over the websocket (TTFT in s, median over the conversations): "
        + ", ".join(f"{t}: {_fmt(ws_turns.turn_ttft(t), 2)}" for t in range(1, n + 1)),
        "",
    ]
    decode_ratio = ws.decode() / raw.decode()
    overhead = ws.ttft() - raw.ttft()
    gain = ws.aggregate(4) / ws.aggregate(1) if 4 in levels else float("nan")
    turn_ratio = _turn_ratio(ws_turns, n)
    steady_ratio = ws.steady_decode() / raw.steady_decode()
    outside = _outside_engine(ws.single)
    lines += [
        "## Targets (ours = the websocket path)",
        "",
        "The first verdict compares medians of separate runs, as the targets are worded. "
        "Where other load on the machine moves single runs by more than the margin, the second "
        "uses a measure that load moves less: token gaps instead of whole-run averages, and "
        "the server's own timestamps instead of a difference of two TTFTs.",
        "",
        "| target | measured | verdict | less load-sensitive measure | verdict |",
        "|---|---|---|---|---|",
        f"| delivered decode >= {TARGET_DECODE_RATIO}x raw | {_fmt(decode_ratio, 3, 'x')} | "
        f"{_verdict(_ok(decode_ratio, lambda v: v >= TARGET_DECODE_RATIO))} | "
        f"1 / median token gap: {_fmt(steady_ratio, 3, 'x')} | "
        f"{_verdict(_ok(steady_ratio, lambda v: v >= TARGET_DECODE_RATIO))} |",
        f"| TTFT overhead (websocket TTFT minus raw TTFT) <= "
        f"{TARGET_TTFT_OVERHEAD_S * 1000:.0f} ms | {_fmt(overhead * 1000, 0, ' ms')} | "
        f"{_verdict(_ok(overhead, lambda v: v <= TARGET_TTFT_OVERHEAD_S))} | "
        f"time outside the engine: {_fmt(outside * 1000, 1, ' ms')} | "
        f"{_verdict(_ok(outside, lambda v: v <= TARGET_TTFT_OVERHEAD_S))} |",
        f"| 4 chats aggregate >= {TARGET_CONCURRENCY_GAIN}x one chat | {_fmt(gain, 2, 'x')} | "
        f"{_verdict(_ok(gain, lambda v: v >= TARGET_CONCURRENCY_GAIN))} | - | |",
        f"| turn-{n} TTFT <= {TARGET_TURN_RATIO}x turn 1 | {_fmt(turn_ratio, 2, 'x')} | "
        f"{_verdict(_ok(turn_ratio, lambda v: v <= TARGET_TURN_RATIO))} | - | |",
        "",
        "For reference, the same ratios elsewhere: Engine decode "
        f"{_fmt(engine.decode() / raw.decode(), 3, 'x')} raw, Engine TTFT "
        f"{_fmt((engine.ttft() - raw.ttft()) * 1000, 0, ' ms')} over raw, Engine 4-chat gain "
        f"{_fmt(_gain(engine, levels), 2, 'x')}, mlx_lm.server 4-chat gain "
        f"{_fmt(_gain(srv, levels), 2, 'x')}.",
        "",
        "## Notes",
        "",
        *_early_endings([r for r in (raw, engine, ws, server) if r is not None], settings),
    ]
    if server is None:
        lines.append("- mlx_lm.server was skipped (--skip-server).")
    lines += _foreign_notes(
        [*cold.values(), *turns.values()], [*cold, *(f"{k} (turns)" for k in turns)]
    )
    lines += [
        "",
        "## Every run",
        "",
        "| path | TTFT (s) | decode tok/s |",
        "|---|---|---|",
        *(
            f"| {r.name} | {', '.join(_fmt(s.ttft, 3) for s in r.single)} | "
            f"{', '.join(_fmt(s.decode_tps) for s in r.single)} |"
            for r in cold.values()
        ),
        "",
        "| path | chats | aggregate tok/s per repeat |",
        "|---|---|---|",
        *(
            f"| {r.name} | {level} | {', '.join(_fmt(b.aggregate_tps) for b in batches)} |"
            for r in cold.values()
            for level, batches in sorted(r.batches.items())
        ),
    ]
    return "\n".join(lines) + "\n"


def _outside_engine(streams: list[Stream]) -> float:
    key = "Started -> first token (prefill, first step)"
    return _median([sum(v for k, v in s.phases.items() if k != key) for s in streams if s.phases])


def _foreign_notes(results: list[PathResult], labels: list[str]) -> list[str]:
    parts = []
    for label, result in zip(labels, results, strict=True):
        values = [v for v in result.foreign if v == v]
        if values:
            parts.append(f"{label} median {_median(values):.2f}, max {max(values):.2f}")
    if not parts:
        return []
    return [
        "- CPU used by processes outside this benchmark during its measurements (cores; the "
        "machine has " + str(os.cpu_count()) + "): " + "; ".join(parts) + "."
    ]


def _ok(value: float, test: Callable[[float], bool]) -> bool | None:
    return None if value != value else test(value)


def _gain(result: PathResult, levels: list[int]) -> float:
    return result.aggregate(4) / result.aggregate(1) if 4 in levels else float("nan")


def _agg(result: PathResult, level: int) -> str:
    value = result.aggregate(level)
    base = result.aggregate(1)
    if value != value:
        return "n/a"
    return f"{value:.2f} ({value / base:.2f}x)" if level != 1 and base == base else f"{value:.2f}"


def _counts(result: PathResult) -> str:
    if not result.single:
        return "n/a"
    s = result.single[0]
    return f"{s.prompt_tokens} / {s.cached_tokens}"


def _turn_counts(result: PathResult, turn: int) -> str:
    streams = [c[turn - 1] for c in result.turns if len(c) >= turn]
    if not streams:
        return "n/a"
    return f"{streams[0].prompt_tokens} / {streams[0].cached_tokens}"


def _turn_ratio(result: PathResult, turn: int) -> float:
    return result.turn_ttft(turn) / result.turn_ttft(1) if result.turns else float("nan")


def _same_text(result: PathResult, raw: PathResult) -> str:
    if not result.single or not raw.single:
        return "n/a"
    return "yes" if result.single[0].text == raw.single[0].text else "no"


def _phase_medians(streams: list[Stream]) -> dict[str, float]:
    keys = list(streams[0].phases) if streams else []
    return {k: _median([s.phases[k] for s in streams if k in s.phases]) for k in keys}


# --------------------------------------------------------------------------- main


def write_float32_copy(settings: Settings, workdir: Path) -> Path | None:
    """The float32 weights the engine will serve (see `Settings.float32_dir`), or None."""
    from mlx_lm.utils import save_config, save_model

    from inference.loader import load_model, use_float32_on_cpu

    loaded = load_model(settings.spec, settings.converted_dir)  # converts a GGUF model once
    if not use_float32_on_cpu(loaded, settings.config.server.cpu_float32_max_bytes):
        return None
    target = workdir / "float32-model"
    config = json.loads((settings.model_dir / "config.json").read_text())
    for key in ("quantization", "quantization_config"):
        config.pop(key, None)
    config["torch_dtype"] = "float32"
    save_model(target, loaded.model)
    save_config(config, target / "config.json")
    loaded.tokenizer.save_pretrained(target)
    return target


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr
    )
    for noisy in ("inference", "mlx_lm", "transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    settings = parse_args(sys.argv[1:] if argv is None else argv)
    started = time.perf_counter()
    monitor = CpuMonitor()
    logger.info("model %s, directory %s", settings.spec.id, settings.model_dir)
    with tempfile.TemporaryDirectory(prefix="mlxweb-bench-") as tmp:
        float32_dir = write_float32_copy(settings, Path(tmp))
        if float32_dir is not None:
            logger.info(
                "the engine serves float32 weights: raw mlx-lm and mlx_lm.server load a copy"
            )
            settings = dataclasses.replace(settings, float32_dir=float32_dir)
        logger.info("part 1/2: one chat and concurrent chats, prompt caches off")
        cold = run_cold(settings, Path(tmp), monitor)
        logger.info("part 2/2: multi-turn conversations, prompt caches on")
        turns = run_turns(settings, Path(tmp), monitor)
    report = render_report(settings, cold, turns, time.perf_counter() - started)
    print(report)
    if settings.output is not None:
        settings.output.write_text(report)
        logger.info("report written to %s", settings.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
