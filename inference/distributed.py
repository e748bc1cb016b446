"""A model served by a group of processes through MLX's distributed backend (issue 13).

A model too big for one machine is split over several with mlx-lm's own sharding
(`model.shard(group)`: tensor parallelism over MLX's sharded linear layers, for the
architectures mlx-lm supports) and served by processes that MLX's launcher starts
(`mlx.launch --backend ring`, TCP between the members). To the rest of mlxweb the group is one
inference worker: rank 0 runs the usual worker (channel layer, heartbeat, rows) with a
`GroupEngine` in place of the engine, and the other ranks only follow.

Every member runs the same MLX operations in the same order, since each sharded layer ends in
a collective. So rank 0 decides and the others do as told: before each request it broadcasts
what to run (prompt tokens, sampling settings and the seed, so that sampling draws the same
tokens everywhere), and after each token whether to go on (end of text, a stop string, a cancel
or the token limit are rank 0's to see). Requests are served one at a time. While idle, rank 0
sends a ping every `PING_S`, so a follower can tell a dead leader from a quiet one.

When a member dies, the next collective fails on the others ("connection to a peer was lost"),
the reply being written ends as interrupted with its text kept, every member exits, and the
supervisor (`manage.py inference_group`) starts the group again.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inference.catalogue import Catalogue, UnknownModel
from inference.engine import (
    Delta,
    EmbeddingReply,
    EmbeddingResult,
    Emit,
    Finished,
    GenerationRequest,
    Started,
    _partial_stop_length,
    _template,
    _template_knows,
    _template_messages,
)
from inference.parsing import OutputFormat

logger = logging.getLogger(__name__)

# Seconds between rank 0's pings while it has nothing to do, and how long a follower waits for
# a command before it takes the leader for dead.
PING_S = 1.0
FOLLOWER_PATIENCE_S = 30.0
# The exit status of a member whose group broke (the supervisor restarts the group).
EXIT_GROUP_BROKEN = 3


class GroupBroken(RuntimeError):
    """A collective failed: a member of the group is gone."""


@dataclass(frozen=True)
class Member:
    rank: int
    size: int
    pid: int


class GroupLink:
    """The group's collectives: rank 0's commands and per-token decisions, heard by all.

    A broadcast is a sum in which every rank but 0 contributes zeros. Collectives run on the
    CPU stream (the ring backend's), whatever device the model computes on.
    """

    def __init__(self, group: Any) -> None:
        self.group = group
        self.rank = int(group.rank())
        self.size = int(group.size())

    def _sum(self, values: Any) -> Any:
        import mlx.core as mx

        try:
            out = mx.distributed.all_sum(values, group=self.group, stream=mx.cpu)
            mx.eval(out)
        except RuntimeError as e:
            raise GroupBroken(str(e)) from e
        return out

    def broadcast(self, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        """Rank 0's `payload`, on every rank (the others pass None)."""
        import mlx.core as mx
        import numpy as np

        data = json.dumps(payload).encode() if self.rank == 0 else b""
        size = int(self._sum(mx.array([len(data)], dtype=mx.int32)).item())
        if self.rank == 0:
            values = np.frombuffer(data, dtype=np.uint8).astype(np.int32)
        else:
            values = np.zeros(size, dtype=np.int32)
        out = np.array(self._sum(mx.array(values)), dtype=np.uint8)
        return dict(json.loads(out.tobytes().decode()))

    def decide(self, go_on: bool) -> bool:
        """Rank 0's decision after a token (the others pass anything)."""
        import mlx.core as mx

        flag = 1 if (self.rank == 0 and go_on) else 0
        return bool(self._sum(mx.array([flag], dtype=mx.int32)).item())

    def gather_pids(self) -> list[int]:
        """Every member's process id, by rank."""
        import mlx.core as mx

        mine = [0] * self.size
        mine[self.rank] = os.getpid()
        return [int(p) for p in self._sum(mx.array(mine, dtype=mx.int64)).tolist()]


# --------------------------------------------------------------------------- loading


def load_sharded(model_dir: Path, link: GroupLink) -> tuple[Any, Any]:
    """The model of `model_dir` (an mlx-lm folder) with this member's shard of every layer,
    and its tokenizer. Raises ValueError for an architecture mlx-lm cannot shard."""
    import mlx.core as mx
    from mlx_lm.utils import load_model, load_tokenizer

    model, config = load_model(model_dir, lazy=True, strict=False)
    if link.size > 1:
        if not hasattr(model, "shard"):
            raise ValueError(
                f"mlx-lm cannot shard the {config.get('model_type', '?')!r} architecture "
                "over a group"
            )
        model.shard(link.group)
    mx.eval(model.parameters())
    tokenizer = load_tokenizer(model_dir, eos_token_ids=config.get("eos_token_id"))
    # Every member has its weights before any request.
    link.decide(True)
    return model, tokenizer


def model_dir_for(catalogue: Catalogue, model_id: str, converted_dir: Path) -> Path:
    """The mlx-lm folder a group loads for `model_id`: the model's own folder, or the folder
    its GGUF was converted into (the loader converts it once, on rank 0 before the launch)."""
    from inference.loader import converted_path, load_model

    spec = catalogue.get(model_id)
    if spec.path is None:
        raise ValueError(f"model {model_id!r} has no weights on this machine")
    if spec.path.is_dir():
        return spec.path
    target = converted_path(spec, converted_dir)
    if not (target / "config.json").is_file():
        load_model(spec, converted_dir)  # converts the GGUF and keeps the folder
    return target


# --------------------------------------------------------------------------- generation


def _generate(
    model: Any,
    command: dict[str, Any],
    link: GroupLink,
    on_token: Callable[[int, Any], bool] | None,
) -> None:
    """Run one request's generation in step with the group. On rank 0, `on_token` sees each
    token and says whether to go on; its answer is what every member does."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_logits_processors, make_sampler

    sampling = command["sampling"]
    mx.random.seed(int(command["seed"]))
    sampler = make_sampler(
        temp=sampling["temperature"],
        top_p=sampling["top_p"],
        min_p=sampling["min_p"],
        top_k=sampling["top_k"],
    )
    processors = make_logits_processors(
        repetition_penalty=sampling["repetition_penalty"]
        if sampling["repetition_penalty"] != 1.0
        else None,
    )
    steps = generate_step(
        mx.array(command["prompt"]),
        model,
        max_tokens=int(command["max_tokens"]),
        sampler=sampler,
        logits_processors=processors,
    )
    try:
        for token, logprobs in steps:
            go_on = on_token(int(token), logprobs) if on_token is not None else False
            if not link.decide(go_on):
                break
    except RuntimeError as e:
        # The sharded layers' own all-sums run inside the forward pass: a member that died
        # shows there as often as in a decision.
        if _is_link_failure(e):
            raise GroupBroken(str(e)) from e
        raise


def _is_link_failure(error: BaseException) -> bool:
    """Whether an MLX error is the group's transport failing (a member gone)."""
    text = str(error).lower()
    return "[ring]" in text or "peer" in text or "distributed" in text


def follow(link: GroupLink, catalogue: Catalogue, converted_dir: Path) -> int:
    """A member of rank > 0: do what rank 0 says until it says stop or goes silent. Returns the
    exit status."""
    model: Any = None
    patience = threading.Event()

    def watchdog() -> None:
        # A collective waits for every member; if the leader hangs without dying, nothing
        # raises: a follower that hears nothing for this long leaves, so the group restarts.
        while not patience.wait(FOLLOWER_PATIENCE_S):
            logger.error("group member %d: no word from rank 0; leaving", link.rank)
            os._exit(EXIT_GROUP_BROKEN)
        return

    threading.Thread(target=watchdog, name="group-watchdog", daemon=True).start()
    try:
        link.gather_pids()
        while True:
            command = link.broadcast(None)
            patience.set()
            patience.clear()
            op = command.get("op")
            if op == "ping":
                continue
            if op == "stop":
                return 0
            if op == "load":
                model_dir = model_dir_for(catalogue, command["model_id"], converted_dir)
                model, _ = load_sharded(model_dir, link)
            elif op == "generate":
                _generate(model, command, link, None)
    except GroupBroken as e:
        logger.error("group member %d: %s", link.rank, e)
        return EXIT_GROUP_BROKEN


@dataclass
class _Reply:
    """What rank 0 has of the reply being written."""

    tokens: int = 0
    text: str = ""
    sent: int = 0
    reason: str = "max_tokens"


class GroupEngine:
    """Rank 0's engine: the `inference.engine.Engine` surface the worker uses, served by the
    whole group one request at a time. Only the group's own model is served."""

    def __init__(
        self,
        *,
        link: GroupLink,
        catalogue: Catalogue,
        converted_dir: Path,
        model_id: str,
        max_prompt_tokens: int,
        max_new_tokens: int,
        on_broken: Callable[[], None] = lambda: None,
    ) -> None:
        self.link = link
        self.catalogue = catalogue
        self.converted_dir = Path(converted_dir)
        self.model_id = model_id
        self.max_prompt_tokens = max_prompt_tokens
        self.max_new_tokens = max_new_tokens
        self.on_broken = on_broken
        self.members: list[int] = []
        self._inbox: queue.Queue[tuple[GenerationRequest, Emit] | None] = queue.Queue()
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()
        self._alive = False
        self._model: Any = None
        self._tokenizer: Any = None
        self._context_length = 0
        self._loaded: dict[str, Any] | None = None
        self._thread: threading.Thread | None = None

    # -- the Engine surface ------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self._alive

    def start(self) -> None:
        self._alive = True
        self._thread = threading.Thread(target=self._run, name="group-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, request: GenerationRequest, emit: Emit) -> None:
        self._inbox.put((request, emit))

    def cancel(self, request_id: str) -> None:
        with self._lock:
            self._cancelled.add(request_id)

    def load(self, model_id: str) -> None:
        if model_id != self.model_id:
            raise UnknownModel(f"this worker is a group serving only {self.model_id!r}")

    def loaded_models(self) -> list[dict[str, Any]]:
        return [dict(self._loaded)] if self._loaded else []

    def unload_after(self, model_id: str, seconds: float | None) -> float | None:
        return None  # the group keeps its one model for its lifetime

    def memory_status(self) -> dict[str, Any]:
        """This member's share: its shard of the weights (the KV cache lives only while a
        request runs). The budget is this machine's, as the single-process engine counts it."""
        from inference.memory import configured_budget

        used = int(self._loaded["bytes"]) if self._loaded else 0
        budget = configured_budget()
        models = (
            [{"model_id": self.model_id, "weights_bytes": used, "kv_bytes": 0, "bytes": used}]
            if self._loaded
            else []
        )
        return {
            "budget_bytes": budget,
            "used_bytes": used,
            "free_bytes": max(budget - used, 0),
            "models": models,
            "jobs": [],
            "other_bytes": 0,
            "waiting_jobs": [],
        }

    def embed(self, model_id: str, texts: list[str], reply: EmbeddingReply) -> None:
        reply(
            EmbeddingResult(
                [], 0, error="a distributed group serves only text generation", kind="error"
            )
        )

    # -- the thread that owns MLX ------------------------------------------------------------

    def _run(self) -> None:
        try:
            self.members = self.link.gather_pids()
            self._load()
            while True:
                try:
                    item = self._inbox.get(timeout=PING_S)
                except queue.Empty:
                    self.link.broadcast({"op": "ping"})
                    continue
                if item is None:
                    self.link.broadcast({"op": "stop"})
                    return
                self._serve(*item)
        except GroupBroken as e:
            logger.error("the group broke: %s", e)
            self._fail_queued("interrupted", f"a member of the group went away: {e}")
            self._alive = False
            self.on_broken()
        except Exception:
            logger.exception("the group engine failed")
            self._fail_queued("error", "the group engine failed")
            self._alive = False
            self.on_broken()

    def _load(self) -> None:
        started = time.time()
        model_dir = model_dir_for(self.catalogue, self.model_id, self.converted_dir)
        self.link.broadcast({"op": "load", "model_id": self.model_id})
        self._model, self._tokenizer = load_sharded(model_dir, self.link)
        config = json.loads((model_dir / "config.json").read_text())
        self._context_length = int(config.get("max_position_embeddings") or 4096)
        weights = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
        self._loaded = {
            "model_id": self.model_id,
            "bytes": weights // max(self.link.size, 1),
            "loaded_at": started,
            "expires_at": None,
            "group_size": self.link.size,
            "members": self.members,
        }
        logger.info(
            "group of %d serving %s (members %s)", self.link.size, self.model_id, self.members
        )

    def _fail_queued(self, reason: str, error: str) -> None:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                request, emit = item
                emit(Finished(request.id, reason, 0, 0, error=error))

    def _prompt(self, request: GenerationRequest) -> tuple[list[int], int, int]:
        """The templated prompt, the messages trimmed from it, and its token budget."""
        tokenizer = self._tokenizer
        context = self._context_length
        wanted = min(request.params.max_tokens, self.max_new_tokens)
        limit = min(self.max_prompt_tokens, max(context - wanted, context // 4))
        if request.prompt_text is not None:
            prompt = list(tokenizer.encode(request.prompt_text))
            trimmed = 0
        else:
            messages = _template_messages(
                request.messages,
                tools=[],
                native_tools=False,
                developer=_template_knows(tokenizer, "developer"),
            )
            system = messages[:1] if messages and messages[0].get("role") == "system" else []
            turns = messages[len(system) :]
            trimmed = 0
            while True:
                prompt = _template(
                    tokenizer, system + turns, assistant_prefix=request.assistant_prefix
                )
                cut = next(
                    (i for i in range(1, len(turns)) if turns[i].get("role") == "user"), None
                )
                if len(prompt) <= limit or cut is None:
                    break
                turns = turns[cut:]
                trimmed += cut
        if len(prompt) > limit:
            raise ValueError(f"prompt too long: {len(prompt)} tokens, limit {limit}")
        if not prompt:
            raise ValueError("the prompt is empty")
        return prompt, trimmed, max(1, min(wanted, context - len(prompt)))

    def _serve(self, request: GenerationRequest, emit: Emit) -> None:
        params = request.params
        with self._lock:
            cancelled = request.id in self._cancelled
            self._cancelled.discard(request.id)
        if cancelled:
            emit(Finished(request.id, "stopped", 0, 0))
            return
        refusal = ""
        if request.model_id != self.model_id:
            refusal = f"this worker is a group serving only {self.model_id!r}"
        elif params.uses_tools or params.response_format is not None or params.logit_bias:
            refusal = "a distributed group does not serve tools, response formats or logit bias"
        try:
            prompt, trimmed, max_tokens = self._prompt(request) if not refusal else ([], 0, 0)
        except ValueError as e:
            refusal = str(e)
        if refusal:
            emit(Finished(request.id, "error", 0, 0, error=refusal))
            return
        seed = params.seed if params.seed is not None else secrets.randbits(32)
        emit(
            Started(
                request.id,
                prompt_tokens=len(prompt),
                cached_tokens=0,
                trimmed_messages=trimmed,
                output=OutputFormat.for_tokenizer(self._tokenizer),
                provenance={"group_size": self.link.size, "seed": seed},
            )
        )
        tokenizer = self._tokenizer
        detokenizer = tokenizer.detokenizer
        detokenizer.reset()
        stops = tuple(params.stop)
        eos = set(tokenizer.eos_token_ids)
        state = _Reply()

        def on_token(token: int, logprobs: Any) -> bool:
            with self._lock:
                if request.id in self._cancelled:
                    state.reason = "stopped"
                    return False
            if token in eos:
                state.reason = "eos"
                return False
            state.tokens += 1
            detokenizer.add_token(token)
            state.text += detokenizer.last_segment
            text = state.text
            for stop in stops:
                at = text.find(stop)
                if at >= 0:
                    state.text = text[:at]
                    state.reason = "stop_string"
                    self._emit_new(request.id, state, emit, hold=0)
                    return False
            hold = _partial_stop_length(text, stops) if stops else 0
            self._emit_new(request.id, state, emit, hold=hold)
            return state.tokens < max_tokens

        command = {
            "op": "generate",
            "prompt": prompt,
            "max_tokens": max_tokens + 1,  # the last decision stops it, on every member alike
            "seed": seed,
            "sampling": {
                "temperature": params.temperature,
                "top_p": params.top_p,
                "min_p": params.min_p,
                "top_k": params.top_k,
                "repetition_penalty": params.repetition_penalty,
            },
        }
        self.link.broadcast(command)
        try:
            _generate(self._model, command, self.link, on_token)
        except GroupBroken:
            self._finish(request.id, state, emit, "interrupted", prompt, "a member went away")
            raise
        except Exception as e:
            # The members are now out of step (they wait for a decision that never comes):
            # the reply ends with its text, and the group must start again.
            self._finish(request.id, state, emit, "error", prompt, f"the group failed: {e}")
            raise
        if state.reason in ("max_tokens", "eos"):
            detokenizer.finalize()
            state.text += detokenizer.last_segment
        self._finish(request.id, state, emit, state.reason, prompt, "")
        with self._lock:
            self._cancelled.discard(request.id)

    @staticmethod
    def _emit_new(request_id: str, state: _Reply, emit: Emit, *, hold: int) -> None:
        text = state.text
        upto = len(text) - hold
        if upto > state.sent:
            emit(Delta(request_id, text[state.sent : upto], state.tokens))
            state.sent = upto

    def _finish(
        self,
        request_id: str,
        state: _Reply,
        emit: Emit,
        reason: str,
        prompt: list[int],
        error: str,
    ) -> None:
        self._emit_new(request_id, state, emit, hold=0)
        emit(Finished(request_id, reason, len(prompt), state.tokens, error=error))


# --------------------------------------------------------------------------- a member's main


def die_with_parent(sig: int = 15) -> None:
    """On Linux, have the kernel send this process `sig` (SIGTERM) when its parent dies, so a
    group whose supervisor or launcher was killed does not live on serving nobody. Elsewhere
    (macOS) a no-op: there the ring's broken connections end the members."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, sig, 0, 0, 0)


def member_main(model_id: str) -> int:
    """What `mlx.launch` runs on every member (`python -m inference.distributed MODEL`).
    Rank 0 serves as the inference worker until stopped; the others follow. Returns the exit
    status: 0 when stopped, EXIT_GROUP_BROKEN when a member went away."""
    import django

    die_with_parent()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mlxweb.settings")
    django.setup()

    import mlx.core as mx
    from django.conf import settings

    from inference.catalogue import get_catalogue

    group = mx.distributed.init(strict=True)
    link = GroupLink(group)
    catalogue = get_catalogue()
    converted_dir = Path(settings.MLXWEB_CONVERTED_DIR)
    if link.rank != 0:
        return follow(link, catalogue, converted_dir)
    return _lead(link, catalogue, converted_dir, model_id)


def _lead(link: GroupLink, catalogue: Catalogue, converted_dir: Path, model_id: str) -> int:
    import asyncio
    import signal

    from django.conf import settings

    from inference import runner
    from inference import worker as inference_worker

    server = settings.MLXWEB_CONFIG.server
    status = {"code": 0}

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        stopped = asyncio.Event()

        def broken() -> None:
            status["code"] = EXIT_GROUP_BROKEN
            loop.call_soon_threadsafe(stopped.set)

        engine = GroupEngine(
            link=link,
            catalogue=catalogue,
            converted_dir=converted_dir,
            model_id=model_id,
            max_prompt_tokens=server.limits.max_prompt_tokens,
            max_new_tokens=server.limits.max_new_tokens,
            on_broken=broken,
        )
        engine.start()
        inference_worker.use_engine(engine)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopped.set)
        task = runner.start_worker(warm_up=False)
        await stopped.wait()
        task.cancel()
        # The interrupted reply's end is on its way through the runtime: let it land.
        runtime = inference_worker.WorkerRuntime.current()
        for _ in range(50):
            if not runtime.streams:
                break
            await asyncio.sleep(0.1)

    runner.prepare()
    asyncio.run(serve())
    runner.shutdown()
    return status["code"]


if __name__ == "__main__":
    import sys

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if len(sys.argv) != 2:
        sys.exit("usage: python -m inference.distributed MODEL_ID (run by mlx.launch)")
    sys.exit(member_main(sys.argv[1]))
