"""The engine: one thread that owns MLX and serves every generation with continuous batching.

Since mlx 0.31.2 a stream belongs to the thread that made it, so one dedicated thread loads the
models, holds their KV caches and runs every evaluation. Other threads only put plain values on
its queue (`submit`, `cancel`, `load`, `stop`) and hear back through the `emit` callback of each
request, which the engine thread calls with `Started`, `Delta` and `Finished` events.
Embedding requests (`embed`) are computed on the same thread, a batch of texts at a time
between generation steps, and answered through their `reply` callback.

A model may have a keep-alive (its config's `keep_alive`, else the server's, else changed by
`unload_after`, Ollama's `keep_alive`): once no request for it has run for that long, the
engine thread unloads it and gives its memory back. While the thread waits for work, it waits
no longer than the next such deadline.

Each loaded model has one mlx-lm `BatchGenerator`: a request that arrives while others decode is
inserted into the running batch, so concurrent chats stream at the same time. The engine adds
what the generator leaves to its caller: the chat template, context trimming, the prompt-prefix
cache (so the next turn of a conversation prefills only its new tokens), per-request detokenizing,
text-level stop strings, seeded sampling that still batches, and error isolation (a failing
request, model or batch step ends only the requests it touches).
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import queue
import statistics
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from inference.catalogue import Catalogue, ModelSpec, UnknownModel
from inference.kvcache import KVCacheSettings
from inference.parsing import OutputFormat
from inference.schemas import GenerationParams

if TYPE_CHECKING:
    import mlx.core as mx
    import numpy as np
    from mlx_lm.generate import BatchGenerator

    from inference.embeddings import SentenceEmbedder
    from inference.kvcache import PromptCacheStore
    from inference.loader import LoadedModel
    from inference.memory import LoadPlan, ModelMemory

logger = logging.getLogger(__name__)

# A prompt may always use at least this share of the context, however many new tokens the
# request asks for (it then gets fewer: generation stops at the context's end).
MIN_PROMPT_SHARE = 4
# Enough distinct unseeded samplers for every mix of settings people really use.
MAX_SHARED_SAMPLERS = 256
# Scheduling order of GenerationRequest.priority: lower goes first.
PRIORITY_RANK = {"interactive": 0, "batch": 1}
# However long the decode step took, a prefill chunk may take at least this share of
# target_latency_ms (or of the decode step, when that is longer), so a prompt always moves.
MIN_PREFILL_SHARE = 0.5
# What one prefill step may take while no stream decodes (see _prefill_step).
IDLE_PREFILL_S = 1.0
# A prompt whose rest costs at most this much times what is left of a step's prefill budget
# is prefilled whole in that step: its first token comes a step or more sooner.
FINISH_STRETCH = 1.75
# How much a chunk may grow (before the square root) from one prefill step to the next while
# no stream decodes: 16, so 4x.
IDLE_GROWTH = 16.0
# A prompt's first chunk, before the model's prefill speed is measured: tokens in one step's
# full budget.
INITIAL_CHUNK = 16.0
# Chunks that start before this offset teach the model's starting chunk size (attention makes
# later ones dearer).
SHORT_OFFSET = 256
# Prompts at the same offset prefill together, one forward pass for up to this many (mlx-lm's
# own batched prefill takes 8), each row getting at least MIN_ROW_TOKENS of the step's tokens.
PREFILL_ROWS = 8
MIN_ROW_TOKENS = 16
# On CUDA, prompt chunks are padded to a multiple of this many tokens and kept prompt prefixes are
# reused in multiples of it: each new query length costs a prefill 5-40 ms the first time (kernels
# and graphs built for the shape) and an H100 prefills 32 tokens more in well under a millisecond.
CUDA_SHAPE_GRANULE = 32
# There, a partial chunk of at least this many tokens is cut to a multiple of it (below, to the
# granule times a power of two): Engine._on_ladder.
LADDER_STEP = 256
# On CUDA, a prompt refused a step's partial second pass this many times while prompts that came
# after it took the steps' first passes gets one anyway (Engine._prefill_step).
PASSED_OVER_STEPS = 4
# A draft model catches up on a cached prompt prefix at most this many tokens per step.
DRAFT_CATCH_UP = 256
# A reply with a draft model decodes its first this many tokens without it, on the pipelined
# one-stream path: the plain speed the draft is judged against (the draft catches up after).
# A synchronous plain step measured inside speculation made plain decoding look 1.6x slower
# than it is on an H100 (the engine reported 1.42x where the bench measured 0.90x).
SPEC_PLAIN_TOKENS = 8
# After this many rounds with the draft, a reply whose tokens cost more with it than without
# goes on without it (a draft that rarely agrees, or one that costs near the model's step).
SPEC_JUDGE_ROUNDS = 8


@dataclass(frozen=True)
class GenerationRequest:
    """One generation asked of the engine: plain values only."""

    id: str  # the Generation row's code, as str
    model_id: str
    # {"role", "content"} and, for tool use, "tool_calls" / "tool_call_id" / "name"; system
    # first if any. Empty when `prompt_text` is given.
    messages: list[dict[str, Any]]
    params: GenerationParams
    # A raw prompt (completions): tokenized as it is, without the chat template.
    prompt_text: str | None = None
    # The reply so far, to continue (issue 9): it goes after the template's generation prompt
    # with no end of turn, and the engine writes what follows it (deltas carry only new text).
    assistant_prefix: str = ""
    # The prefix's own token ids when known (the reply's token trace): the prompt takes them
    # instead of tokenizing the text, so the reply goes on exactly where it was, even where the
    # model wrote a word in pieces its tokenizer would not have chosen.
    assistant_prefix_tokens: tuple[int, ...] = ()
    # "interactive" (a person waits) or "batch" (titles, validation, library work): the
    # scheduler admits and prefills interactive requests first.
    priority: str = "interactive"


@dataclass(frozen=True)
class Started:
    """The prompt is accepted and queued for prefill."""

    request_id: str
    prompt_tokens: int
    cached_tokens: int
    trimmed_messages: int
    # How the model marks reasoning and tool calls, for inference.parsing.
    output: OutputFormat = field(default_factory=OutputFormat)
    # What the reply came from (inference.provenance.model_provenance): model, weights,
    # quantization, chat template, library versions. The same dict for every request of a slot.
    provenance: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Delta:
    """New reply text; `tokens` counts the completion tokens so far.

    `logprobs` (only when the request asked) has one entry per token since the previous
    delta: {"token", "bytes", "logprob", "top_logprobs": [{"token", "bytes", "logprob"}]}.
    """

    request_id: str
    text: str
    tokens: int
    logprobs: list[dict[str, Any]] | None = None


@dataclass(frozen=True)
class Finished:
    """The end of a request, always sent exactly once.

    `finish_reason` is "eos", "stop_string", "max_tokens", "stopped" (cancel or engine stop)
    or "error" (with `error` saying why).
    """

    request_id: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    error: str = ""
    # How the reply was computed (for Generation.details): the decode path ("solo", "batch"
    # or both, in the order taken), the prefill chunks, and speculative decoding's drafted and
    # accepted tokens, acceptance rate and measured speed-up when a draft model was used.
    details: dict[str, Any] = field(default_factory=dict)
    # Where the request's KV prefix came from: "memory", "disk" (loaded for it), "warm"
    # (restored when its conversation was opened) or "none".
    prompt_cache: str = "none"


EngineEvent = Started | Delta | Finished
Emit = Callable[[EngineEvent], None]

# Embedding models kept in memory besides the generation models (they are small: tens of MB).
MAX_LOADED_EMBEDDERS = 2
# Texts an embedding model encodes in one step between generation steps.
EMBED_BATCH_SIZE = 32


@dataclass(frozen=True)
class EmbeddingResult:
    """The answer to `Engine.embed`: one vector per text, in order, or an error.

    `kind` says what went wrong: "unknown_model", "not_embedding" (a generation model),
    "unavailable" (weights not on this machine) or "error" (loading or computing failed,
    the engine stopped); "" on success.
    """

    vectors: list[list[float]]
    prompt_tokens: int
    error: str = ""
    kind: str = ""


EmbeddingReply = Callable[[EmbeddingResult], None]


# --------------------------------------------------------------------------- commands


@dataclass(frozen=True)
class _Submit:
    request: GenerationRequest
    emit: Emit
    at: float = field(default_factory=time.perf_counter)  # when it was submitted


@dataclass(frozen=True)
class _Cancel:
    request_id: str


@dataclass
class _Load:
    model_id: str
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


class _Stop:
    pass


@dataclass(frozen=True)
class _Probe:
    """What the next prompt of a conversation would cost: its tokens, the prefix the KV
    caches hold and the turns trimmed (the chat composer asks while the user types)."""

    request: GenerationRequest
    reply: Callable[[dict[str, Any]], None]


@dataclass
class _Warm:
    """Restore a conversation's KV cache from disk before its next turn (inference.kvcache)."""

    model_id: str
    messages: tuple[dict[str, Any], ...]
    done: threading.Event = field(default_factory=threading.Event)
    covered: int = 0  # tokens of the conversation the restored cache covers


@dataclass
class _UnloadAfter:
    model_id: str
    seconds: float | None  # None: keep it loaded
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    expires_at: float | None = None  # epoch seconds, once applied


@dataclass(frozen=True)
class _Embed:
    model_id: str
    texts: tuple[str, ...]
    reply: EmbeddingReply


@dataclass(eq=False)
class _EmbedJob:
    """An embedding request being computed, one batch of texts per engine step."""

    command: _Embed
    embedder: SentenceEmbedder
    encoded: list[list[int]]
    batches: deque[list[int]]
    vectors: np.ndarray


class _EmbedRefused(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class _Pending:
    """A submitted request waiting for its model (and a free model slot)."""

    submit: _Submit
    spec: ModelSpec | None  # None when the model was already loaded at submit time


class _PromptTooLong(Exception):
    def __init__(self, message: str, prompt_tokens: int) -> None:
        super().__init__(message)
        self.prompt_tokens = prompt_tokens


@dataclass(eq=False)
class _Slot:
    """One loaded model with its batch generator and prompt cache."""

    model_id: str
    loaded: LoadedModel
    generator: BatchGenerator
    prompt_cache: PromptCacheStore | None
    stop_tokens: Any  # mlx_lm StopSequences over the EOS ids
    output: OutputFormat = field(default_factory=OutputFormat)
    # Every request of this model, by uid: negative while outside the generator (prefilling
    # or decoding solo), the generator's uid once in its batch.
    active: dict[int, _Active] = field(default_factory=dict)
    eos_ids: frozenset[int] = frozenset()
    # The scheduler (see Engine._step): prompts prefilling in chunks, and the one stream that
    # decodes on its own while nothing else does.
    prefilling: list[_Active] = field(default_factory=list)
    solo: _Active | None = None
    # Speculative decoding: the draft model (same tokenizer) and how many tokens it proposes.
    draft: LoadedModel | None = None
    draft_id: str = ""
    num_draft_tokens: int = 0
    # Measured: the tokens an early chunk of a prompt fits in a step's budget; seconds per token
    # of a plain one-stream step (what speculative decoding is compared with).
    chunk: float = INITIAL_CHUNK
    solo_token_s: float = 0.0
    # Measured for prefill chunks riding decode passes (inference.fused): seconds of a plain
    # batch decode step (the median of the last ones: a step in which a request joins the
    # batch costs a second pass), and what each prompt token adds to a step.
    decode_times: deque[float] = field(default_factory=lambda: deque(maxlen=15))
    decode_s: float = 0.0
    token_s: float = 0.0
    # The same for chunks that start before SHORT_OFFSET: attention makes a token at a long
    # prompt's far end dearer (on a 2-core CPU, ~3 ms near the start against ~9 ms at 1,000).
    early_token_s: float = 0.0
    # Built on first use: llguidance's tokenizer, each token's text and bytes for logprobs,
    # whether the chat template renders tools itself.
    constraint_tokenizer: Any = None
    token_pieces: dict[int, tuple[str, list[int]]] = field(default_factory=dict)
    template_tools: bool | None = None
    # inference.provenance.model_provenance of this model, computed on its first request.
    provenance: dict[str, Any] | None = None


@dataclass
class _ChunkRun:
    """One prefill pass over the next `n` prompt tokens of `rows` (Engine._chunk_start)."""

    rows: list[_Active]
    seqs: list[_Seq]
    pieces: list[list[int]]
    n: int
    offset: int
    tokens: Any  # (rows, n padded)
    cache: list[Any]
    rider: Any = None  # its inference.fused.Rider when it rides a decode pass


@dataclass(eq=False)
class _Active:
    """A request inside a batch generator."""

    request: GenerationRequest
    emit: Emit
    slot: _Slot
    uid: int
    detokenizer: Any
    stop: tuple[str, ...]
    prompt_tokens: int
    started_at: float
    held: str = ""  # text that may be the start of a stop string
    top_logprobs: int = -1  # -1: no logprobs asked for
    logprobs: list[dict[str, Any]] = field(default_factory=list)  # not yet emitted
    tokens: int = 0
    first_token_at: float = 0.0
    last_token_at: float = 0.0
    finished: bool = False
    # Scheduling: "prefill" (its own cache, in slot.prefilling), "solo" (slot.solo), "batch"
    # (in the generator). `seq` holds the cache outside the generator.
    phase: str = "prefill"
    seq: _Seq | None = None
    paths: list[str] = field(default_factory=list)
    batch_tokens: int = 0  # tokens the generator gave since it took the request
    plain: bool = False  # no logits processors, no seed: may move from the batch to solo
    prefill_chunks: int = 0
    prefill_rows: int = 1  # the most prompts it prefilled together with (itself included)
    prefill_fused: int = 0  # chunks that went through a decode step's forward pass
    prefill_ahead: int = 0  # chunks that went through the model just before a decode pass
    # Where the time to the first token went: waiting for admission (its model loading, the
    # engine busy with a step), the template and cache lookup, then its prefill.
    submitted_at: float = 0.0
    admitted_at: float = 0.0
    spec_steps: int = 0  # with and without the draft
    spec_rounds: int = 0  # with it
    spec_drafted: int = 0
    spec_accepted: int = 0
    spec_tokens: int = 0
    spec_s: float = 0.0
    spec_dropped_at: int = 0  # the tokens written when the draft was dropped as a loss
    cache_source: str = "none"  # Finished.prompt_cache: where its KV prefix came from


@dataclass(eq=False)
class _Seq:
    """A request's own KV cache while it is outside the batch generator.

    While its prompt prefills (a chunk at a time between decode steps), `rest` holds the prompt
    tokens still to go through the model. Once the last chunk gave the first token, the request
    is in one of two states: `next` None and `rest == [t]`, where t is emitted but not yet in
    the cache (how it joins the batch: the generator feeds t), or `next` set: the token sampled
    after `fed`, not yet emitted (the solo path computes one token ahead, as mlx-lm's
    generate_step does).
    """

    cache: list[Any]
    fed: list[int]  # the tokens in `cache`
    rest: list[int]
    sampler: Any
    processors: list[Any]
    max_tokens: int
    chunk: float  # prompt tokens that fit a step's full budget, from its last chunk
    prefilled: bool = False
    passed_over: int = 0  # partial passes refused while newer prompts took steps (CUDA)
    next: Any = None  # mx.array of shape (1,)
    next_logprobs: Any = None
    draft_cache: list[Any] | None = None
    draft_lag: list[int] = field(default_factory=list)  # in `cache`, not yet in the draft's


@dataclass(frozen=True)
class _Response:
    """One token decoded outside the generator, shaped like the generator's responses."""

    token: int
    logprobs: Any
    finish_reason: str | None
    prompt_cache: Any = None
    all_tokens: list[int] | None = None


class Engine:
    """Serves generations for the catalogue's models from one MLX-owning thread."""

    def __init__(
        self,
        *,
        catalogue: Catalogue,
        converted_dir: Path,
        max_loaded_models: int = 1,
        max_prompt_tokens: int = 8192,
        max_new_tokens: int = 2048,
        prompt_cache_entries: int = 16,
        prompt_cache_bytes: int = 2**31,
        prefill_batch_size: int = 8,
        completion_batch_size: int = 32,
        prefill_step_size: int = 2048,
        cpu_float32_max_bytes: int = 0,
        keep_alive: float | None = None,
        kv_cache: KVCacheSettings | None = None,
        memory_budget_bytes: int | None = None,
        memory_table: Path | None = None,
        max_batch_tokens: int = 2048,
        target_latency_ms: float = 150.0,
        enable_speculative: bool = True,
    ) -> None:
        self.catalogue = catalogue
        self.converted_dir = Path(converted_dir)
        self.max_loaded_models = max(1, max_loaded_models)
        self.max_prompt_tokens = max_prompt_tokens
        self.max_new_tokens = max_new_tokens
        self.prompt_cache_entries = prompt_cache_entries
        self.prompt_cache_bytes = prompt_cache_bytes
        # KV caches kept between requests: compact, maybe quantized, persisted to disk
        # (inference.kvcache); the entry and byte bounds are the two arguments above.
        from inference.kvcache import disk_store

        self.kv_cache = replace(
            kv_cache or KVCacheSettings(),
            max_entries=prompt_cache_entries,
            max_bytes=prompt_cache_bytes // max(1, max_loaded_models),
        )
        self._kv_disk = disk_store(self.kv_cache) if self.kv_cache.enabled else None
        self.prefill_batch_size = prefill_batch_size
        self.completion_batch_size = completion_batch_size
        self.prefill_step_size = prefill_step_size
        self.cpu_float32_max_bytes = cpu_float32_max_bytes
        # The scheduler: at most this many tokens go through the model in one step (decode
        # rows plus prefill chunk); a step with a prefill chunk aims to take no longer than
        # target_latency_ms, the gap the running streams see between two tokens.
        self.max_batch_tokens = max(1, max_batch_tokens)
        self.target_latency_s = max(0.001, target_latency_ms / 1000.0)
        # Use a model's draft_model (configs/models/) when one stream decodes alone.
        self.enable_speculative = enable_speculative
        # Carry prompt chunks in the decode step's forward pass where the model allows
        # (inference.fused). None: on the CPU only, where a pass's cost is the weights' read and
        # fusing made the scheduler's targets; on an H100 it measured slower (the riders'
        # synchronous finish stalls the decode pipeline). Tests and benchmarks set it.
        self.fuse_prefill: bool | None = None
        # On CUDA: prompt chunks start at max_batch_tokens, take lengths from a ladder and
        # a step runs a second prefill pass only for prompts it finishes (_passes_cost_alike).
        self.gpu_passes = True
        self._uids = 0  # engine-side uids of requests outside a generator: -1, -2, ...
        # Seconds an idle model stays loaded when its config says nothing (None: for good).
        self.keep_alive = _keep_alive_or_none(keep_alive)
        # One budget for the models, their KV caches and (through `memory_table`, shared by the
        # machine's processes) library jobs: inference.memory. None: a share of the device.
        from inference.memory import EngineMemory, ReservationTable, budget_bytes

        self.memory = EngineMemory(
            budget=budget_bytes(memory_budget_bytes),
            table=ReservationTable(memory_table) if memory_table is not None else None,
        )
        self._memory_checked_at = 0.0  # monotonic time the engine thread last published

        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        # Guards _state and every put on the inbox, so that once the thread has drained the
        # inbox on its way out no command can slip in unanswered.
        self._lock = threading.Lock()
        self._state = "new"  # new -> running -> stopped | dead
        self._thread: threading.Thread | None = None

        # Engine-thread state.
        self._slots: OrderedDict[str, _Slot] = OrderedDict()  # least recently used first
        self._pending: deque[_Pending] = deque()
        self._by_id: dict[str, _Active] = {}
        self._samplers: dict[tuple[float, float, float, int], Any] = {}
        self._stream: mx.Stream | None = None
        # Prompt chunks are padded to a multiple of this (CUDA_SHAPE_GRANULE on CUDA, else 1).
        self._granule = 1
        # What is loaded, for status pages: replaced (never mutated) by the engine thread, so
        # any thread may read it.
        self._loaded_info: tuple[dict[str, Any], ...] = ()
        self._embedders: OrderedDict[str, SentenceEmbedder] = OrderedDict()  # LRU first
        self._embed_jobs: deque[_EmbedJob] = deque()
        # Keep-alive of each loaded model (None: kept until evicted; also an `unload_after`
        # waiting for a queued request's model to load) and, for the idle ones, the monotonic
        # time they are unloaded at.
        self._ttl: dict[str, float | None] = {}
        self._deadlines: dict[str, float] = {}

    # ------------------------------------------------------------------ public, any thread

    def start(self) -> None:
        """Start the engine thread (idempotent)."""
        with self._lock:
            if self._state != "new":
                return
            self._state = "running"
            _prefer_mlx_attention()
            self._thread = threading.Thread(target=self._run, name="mlx-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish every request with "stopped", unload the models and join the thread."""
        with self._lock:
            if self._state == "new":
                self._state = "stopped"
            if self._state != "running":
                return
            self._inbox.put(_Stop())
        assert self._thread is not None
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning("engine thread did not stop within %.0fs", timeout)

    def submit(self, request: GenerationRequest, emit: Emit) -> None:
        """Queue a generation; `emit` hears its events from the engine thread.

        Every request gets exactly one `Finished`, and one `Started` before it unless it fails
        first. If the engine is not running, `Finished(error)` is emitted at once from the
        calling thread.
        """
        with self._lock:
            if self._state == "running":
                self._inbox.put(_Submit(request, emit))
                return
            state = self._state
        _safe_emit(emit, Finished(request.id, "error", 0, 0, error=f"engine is {state}"))

    def cancel(self, request_id: str) -> None:
        """Stop a request; it finishes with "stopped", keeping the text already emitted."""
        with self._lock:
            if self._state == "running":
                self._inbox.put(_Cancel(request_id))

    def load(self, model_id: str) -> None:
        """Load a model on the engine thread; block until done; raise what loading raised."""
        command = _Load(model_id)
        with self._lock:
            if self._state != "running":
                raise RuntimeError(f"engine is {self._state}")
            self._inbox.put(command)
        command.done.wait()
        if command.error is not None:
            raise command.error

    def loaded_models(self) -> list[dict[str, Any]]:
        """The models in memory: {"model_id", "bytes", "loaded_at", "expires_at"} each (epoch
        seconds; `expires_at` is None while the model is kept: no keep-alive, or requests for
        it are running)."""
        return [dict(info) for info in self._loaded_info]

    def memory_status(self) -> dict[str, Any]:
        """The memory budget and its use (any thread; as of the engine thread's last look, at
        most about a second old): {"budget_bytes", "used_bytes", "free_bytes", "models":
        [{"model_id", "weights_bytes", "kv_bytes", "bytes"}], "jobs": [{"what", "bytes"}],
        "other_bytes", "waiting_jobs"}. used_bytes is the models' bytes plus the jobs' plus
        what other engines on this machine hold (other_bytes)."""
        return self.memory.status()

    def unload_after(self, model_id: str, seconds: float | None) -> float | None:
        """Ollama's keep_alive: unload `model_id` once it has been idle for `seconds` (0: as
        soon as no request for it runs; None or negative: keep it loaded), counted from now or
        from the end of the requests for it that are running or queued.

        A model that is not loaded is loaded first, unless `seconds` is 0. The setting lasts
        while the model stays loaded; loaded again later, it has its configured keep-alive.
        Blocks until applied (and the model unloaded, if that is due now). Returns when it will
        be unloaded (epoch seconds), None if not planned; raises what loading raised.
        """
        if seconds is not None and not math.isfinite(seconds):
            raise ValueError(f"keep-alive must be a finite number of seconds, not {seconds}")
        command = _UnloadAfter(model_id, _keep_alive_or_none(seconds))
        with self._lock:
            if self._state != "running":
                raise RuntimeError(f"engine is {self._state}")
            self._inbox.put(command)
        command.done.wait()
        if command.error is not None:
            raise command.error
        return command.expires_at

    def embed(self, model_id: str, texts: list[str], reply: EmbeddingReply) -> None:
        """Compute sentence vectors of `texts` with an embedding model; `reply` hears the
        `EmbeddingResult` once, from the engine thread (at once from the calling thread if the
        engine is not running).

        Inputs longer than the model's maximum length are truncated, as sentence-transformers
        does. The texts are computed a batch at a time between generation steps, so a long
        request does not stall the chats that are streaming.
        """
        command = _Embed(model_id, tuple(texts), reply)
        with self._lock:
            if self._state == "running":
                self._inbox.put(command)
                return
            state = self._state
        _safe_reply(reply, EmbeddingResult([], 0, error=f"engine is {state}", kind="error"))

    def probe(self, request: GenerationRequest, reply: Callable[[dict[str, Any]], None]) -> None:
        """Answer `reply` (on the engine thread, between steps) with what `request` would cost
        if sent now: {"loaded": False} when its model is not loaded (nothing is loaded for a
        probe), else {"loaded": True, "prompt_tokens", "cached_tokens", "cache_source",
        "trimmed_messages"} or {"loaded": True, "error"}. Nothing is computed by the model and
        no cache is touched (`PromptCacheStore.peek`)."""
        with self._lock:
            if self._state == "running":
                self._inbox.put(_Probe(request, reply))
                return
        reply({"loaded": False})

    def warm(
        self, model_id: str, messages: list[dict[str, Any]], *, wait: float | None = None
    ) -> int:
        """Get ready for the next turn of a conversation being opened: load its model if no
        other has to go for it, and restore from disk the KV cache that covers most of
        `messages` (the conversation so far, its last reply included) unless memory holds as
        much. Runs on the engine thread between steps; returns at once unless `wait` (seconds)
        is given, then the number of tokens the restored cache covers (0: none restored)."""
        command = _Warm(model_id, tuple(messages))
        with self._lock:
            if self._state != "running":
                return 0
            self._inbox.put(command)
        if wait is None:
            return 0
        command.done.wait(wait)
        return command.covered

    def embed_wait(
        self, model_id: str, texts: list[str], timeout: float = 120.0
    ) -> EmbeddingResult:
        """`embed`, waiting for the result (from any thread but the engine's)."""
        answers: queue.SimpleQueue[EmbeddingResult] = queue.SimpleQueue()
        self.embed(model_id, texts, answers.put)
        try:
            return answers.get(timeout=timeout)
        except queue.Empty:
            return EmbeddingResult([], 0, error=f"no result within {timeout:.0f}s", kind="error")

    @property
    def alive(self) -> bool:
        thread = self._thread
        return self._state == "running" and thread is not None and thread.is_alive()

    # ------------------------------------------------------------------ the engine thread

    def _run(self) -> None:
        import mlx.core as mx

        # The thread's own stream: every model, cache and generator of this engine lives on it.
        self._stream = mx.default_stream(mx.default_device())
        self._granule = CUDA_SHAPE_GRANULE if _on_cuda() else 1
        if self.fuse_prefill is None:
            self.fuse_prefill = mx.default_device() == mx.cpu
        logger.info("engine started")
        try:
            while self._handle_commands(block=not self._busy(), timeout=self._next_expiry_in()):
                self._admit_pending()
                for slot in list(self._slots.values()):
                    if slot.active:
                        self._step(slot)
                self._embed_step()
                self._expire_idle()
        except BaseException as e:
            logger.exception("engine thread died")
            self._shutdown("dead", "error", f"engine crashed: {type(e).__name__}: {e}")
        else:
            self._shutdown("stopped", "stopped", "")
            logger.info("engine stopped")
        finally:
            # MLX does not clean up a thread's streams by itself: without this, the process
            # aborts at exit ("terminate called without an active exception") now and then.
            self._stream = None
            gc.collect()
            mx.clear_streams()

    def _busy(self) -> bool:
        return bool(self._embed_jobs) or any(slot.active for slot in self._slots.values())

    def _handle_commands(self, *, block: bool, timeout: float | None = None) -> bool:
        """Apply queued commands (waiting for one if `block`, up to `timeout` seconds); False
        once told to stop."""
        try:
            command = self._inbox.get(timeout=timeout) if block else self._inbox.get_nowait()
        except queue.Empty:
            return True
        while True:
            if isinstance(command, _Stop):
                return False
            if isinstance(command, _Submit):
                self._on_submit(command)
            elif isinstance(command, _Cancel):
                self._on_cancel(command.request_id)
            elif isinstance(command, _Load):
                self._on_load(command)
            elif isinstance(command, _Embed):
                self._on_embed(command)
            elif isinstance(command, _UnloadAfter):
                self._on_unload_after(command)
            elif isinstance(command, _Warm):
                self._on_warm(command)
            elif isinstance(command, _Probe):
                self._on_probe(command)
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return True

    def _on_submit(self, submit: _Submit) -> None:
        request = submit.request
        if request.id in self._by_id or any(
            p.submit.request.id == request.id for p in self._pending
        ):
            _safe_emit(
                submit.emit, Finished(request.id, "error", 0, 0, error="duplicate request id")
            )
            return
        spec = None
        if request.model_id not in self._slots:
            try:
                spec = self.catalogue.get(request.model_id)
            except UnknownModel as e:
                logger.info("request %s: %s", request.id, e)
                _safe_emit(submit.emit, Finished(request.id, "error", 0, 0, error=str(e)))
                return
            if spec.task != "generate":
                message = f"model {spec.id!r} is an embedding model: it does not generate text"
                _safe_emit(submit.emit, Finished(request.id, "error", 0, 0, error=message))
                return
        # Interactive requests queue ahead of background ones (priority "batch").
        entry = _Pending(submit, spec)
        if request.priority != "batch":
            behind = [p for p in self._pending if p.submit.request.priority == "batch"]
            if behind:
                self._pending.insert(self._pending.index(behind[0]), entry)
                return
        self._pending.append(entry)

    def _on_cancel(self, request_id: str) -> None:
        active = self._by_id.get(request_id)
        if active is not None:
            self._finish(active, "stopped")
            return
        for pending in self._pending:
            if pending.submit.request.id == request_id:
                self._pending.remove(pending)
                _safe_emit(pending.submit.emit, Finished(request_id, "stopped", 0, 0))
                logger.info("request %s: cancelled before it started", request_id)
                return

    def _on_load(self, command: _Load) -> None:
        try:
            if command.model_id in self._slots:
                self._slots.move_to_end(command.model_id)
            elif command.model_id in self._embedders or (
                self.catalogue.get(command.model_id).task == "embed"
            ):
                self._embedder_for(command.model_id)
            elif not self._can_load(self.catalogue.get(command.model_id)):
                raise RuntimeError(
                    f"cannot load {command.model_id!r} now: the loaded models are serving "
                    "requests, or library jobs hold the memory it needs"
                )
            else:
                self._load_slot(self.catalogue.get(command.model_id))
        except Exception as e:
            command.error = e
        finally:
            command.done.set()

    def _on_warm(self, command: _Warm) -> None:
        try:
            slot = self._slots.get(command.model_id)
            if slot is None and len(self._slots) < self.max_loaded_models:
                spec = self.catalogue.get(command.model_id)
                if spec.task == "generate":
                    slot = self._load_slot(spec)
            if slot is None or slot.prompt_cache is None or not command.messages:
                return
            tokenizer = slot.loaded.tokenizer
            messages = _template_messages(
                list(command.messages),
                tools=[],
                native_tools=bool(slot.template_tools),
                developer=_template_knows(tokenizer, "developer"),
            )
            command.covered = slot.prompt_cache.warm(_template(tokenizer, messages))
            if command.covered:
                logger.info("model %s: warmed %d tokens", command.model_id, command.covered)
        except Exception:
            logger.exception("model %s: warming a conversation failed", command.model_id)
        finally:
            command.done.set()

    def _on_probe(self, command: _Probe) -> None:
        answer: dict[str, Any]
        try:
            slot = self._slots.get(command.request.model_id)
            if slot is None:
                answer = {"loaded": False}
            else:
                prompt, trimmed, _ = self._prompt(slot, command.request)
                cached, source = (
                    slot.prompt_cache.peek(prompt) if slot.prompt_cache is not None else (0, "none")
                )
                answer = {
                    "loaded": True,
                    "prompt_tokens": len(prompt),
                    "cached_tokens": cached,
                    "cache_source": source,
                    "trimmed_messages": trimmed,
                }
        except _PromptTooLong as e:
            answer = {"loaded": True, "error": str(e), "prompt_tokens": e.prompt_tokens}
        except Exception as e:
            logger.warning("probe for %s failed: %s", command.request.model_id, _describe(e))
            answer = {"loaded": True, "error": _describe(e)}
        try:
            command.reply(answer)
        except Exception:
            logger.exception("a probe's reply callback raised")

    def _on_unload_after(self, command: _UnloadAfter) -> None:
        model_id, seconds = command.model_id, command.seconds
        try:
            if not self._is_loaded(model_id):
                if self._in_use(model_id):
                    # Queued for a model still to load: it loads with this keep-alive.
                    self._ttl[model_id] = seconds
                    return
                if seconds == 0:
                    return  # not loaded, and not to be kept: nothing to do
                load = _Load(model_id)
                self._on_load(load)
                if load.error is not None:
                    raise load.error
            self._ttl[model_id] = seconds
            # The new keep-alive counts from now (or from the end of the running requests).
            self._deadlines.pop(model_id, None)
            self._set_expiry(model_id, None)
            self._expire_idle()
            command.expires_at = next(
                (i["expires_at"] for i in self._loaded_info if i["model_id"] == model_id), None
            )
            logger.info(
                "model %s: keep-alive %s",
                model_id,
                "forever" if seconds is None else f"{seconds:g}s",
            )
        except Exception as e:
            command.error = e
        finally:
            command.done.set()

    # ------------------------------------------------------------------ keep-alive

    def _is_loaded(self, model_id: str) -> bool:
        return model_id in self._slots or model_id in self._embedders

    def _in_use(self, model_id: str) -> bool:
        """Whether a request for the model is running or waiting in the engine."""
        slot = self._slots.get(model_id)
        return (
            (slot is not None and bool(slot.active))
            or any(p.submit.request.model_id == model_id for p in self._pending)
            or any(job.command.model_id == model_id for job in self._embed_jobs)
        )

    def _default_keep_alive(self, spec: ModelSpec) -> float | None:
        if spec.keep_alive is not None:
            return _keep_alive_or_none(spec.keep_alive)
        return self.keep_alive

    def _set_expiry(self, model_id: str, expires_at: float | None) -> None:
        self._loaded_info = tuple(
            {**info, "expires_at": expires_at} if info["model_id"] == model_id else info
            for info in self._loaded_info
        )

    def _expire_idle(self) -> None:
        """Start the clock of each loaded model that just went idle, stop it for the ones in
        use, and unload those whose keep-alive is over."""
        now = time.monotonic()
        for model_id in (*self._slots, *self._embedders):
            ttl = self._ttl.get(model_id)
            if ttl is None or self._in_use(model_id):
                if self._deadlines.pop(model_id, None) is not None:
                    self._set_expiry(model_id, None)
            elif model_id not in self._deadlines:
                self._deadlines[model_id] = now + ttl
                self._set_expiry(model_id, time.time() + ttl)
        for model_id, deadline in list(self._deadlines.items()):
            if deadline <= now:
                logger.info("model %s: idle past its keep-alive", model_id)
                if model_id in self._slots:
                    self._unload(model_id)
                else:
                    self._unload_embedder(model_id)
        self._memory_tick()

    def _next_expiry_in(self) -> float | None:
        """Seconds until the next idle model is due to unload; None when none is. While models
        are loaded or requests wait, at most ENGINE_REFRESH_S: the memory budget is looked at
        that often (a library job may be waiting for an idle model's memory)."""
        from inference.memory import ENGINE_REFRESH_S

        watch = ENGINE_REFRESH_S if self._pending or self._slots else None
        if not self._deadlines:
            return watch
        due = max(0.0, min(self._deadlines.values()) - time.monotonic())
        return due if watch is None else min(due, watch)

    def _forget_keep_alive(self, model_id: str) -> None:
        self._ttl.pop(model_id, None)
        self._deadlines.pop(model_id, None)

    # ------------------------------------------------------------------ models

    def _can_load(self, spec: ModelSpec | None = None) -> bool:
        """Whether `spec` can load now, unloading idle models as needed (see `_memory_plan`);
        False: wait until running requests or library jobs give memory back. A model that
        could never fit may "load": `_load_slot` then fails it with the reason."""
        from inference.memory import NotEnoughMemory

        if spec is None:
            return len(self._slots) < self.max_loaded_models or any(
                not slot.active for slot in self._slots.values()
            )
        try:
            return not self._memory_plan(spec).wait
        except NotEnoughMemory:
            return True

    def _pending_spec(self, pending: _Pending) -> ModelSpec | None:
        if pending.spec is not None:
            return pending.spec
        try:
            return self.catalogue.get(pending.submit.request.model_id)
        except UnknownModel:
            return None

    def _memory_models(self) -> list[ModelMemory]:
        """What each loaded model takes: its weights, and its KV caches (prompt cache and the
        running batch's)."""
        from inference.memory import ModelMemory, cache_bytes

        models = []
        for info in self._loaded_info:
            slot = self._slots.get(info["model_id"])
            kv = cache_bytes(slot.prompt_cache, slot.generator) if slot is not None else 0
            models.append(ModelMemory(info["model_id"], int(info["bytes"]), kv))
        return models

    def _memory_plan(self, spec: ModelSpec) -> LoadPlan:
        """The idle models (least recently used first) to unload so that `spec` fits both the
        memory budget and `max_loaded_models`, or wait. NotEnoughMemory if it never fits."""
        from inference.loader import weights_bytes
        from inference.memory import LoadPlan

        idle = [mid for mid, slot in self._slots.items() if not slot.active]
        need = self.memory.estimate(spec.id, weights_bytes(spec, self.converted_dir))
        plan = self.memory.plan_load(
            model_id=spec.id, need=need, models=self._memory_models(), idle_lru=idle
        )
        over_cap = len(self._slots) - len(plan.evict) - (self.max_loaded_models - 1)
        if not plan.wait and over_cap > 0:
            more = [mid for mid in idle if mid not in plan.evict][:over_cap]
            if len(more) < over_cap:
                return LoadPlan(wait=True)
            plan.evict.extend(more)
        return plan

    def _publish_memory(self) -> None:
        self._memory_checked_at = time.monotonic()
        self.memory.publish(self._memory_models())

    def _memory_tick(self) -> None:
        """About once a second: keep the KV caches within the budget (trimming the prompt
        caches, least recently used model first), unload idle models that a waiting library
        job needs the room of, and publish what is used."""
        from inference.memory import ENGINE_REFRESH_S

        if time.monotonic() - self._memory_checked_at < ENGINE_REFRESH_S:
            return
        over = -self.memory.room(self._memory_models())
        for slot in self._slots.values():
            cache = slot.prompt_cache
            if over <= 0 or cache is None or not hasattr(cache, "trim_to"):
                continue
            before = int(cache.nbytes)
            cache.trim_to(n_bytes=max(0, before - over))
            over -= before - int(cache.nbytes)
            logger.info("model %s: prompt cache trimmed to fit the memory budget", slot.model_id)
        idle = [mid for mid in self._slots if not self._in_use(mid)]
        for model_id in self.memory.idle_to_unload_for_jobs(self._memory_models(), idle):
            logger.info("model %s: unloaded to make room for a library job", model_id)
            self._unload(model_id)
        self._publish_memory()

    def _load_slot(self, spec: ModelSpec) -> _Slot:
        from mlx_lm.generate import StopSequences

        from inference import metrics
        from inference.loader import load_model, use_float32_on_cpu, weights_bytes
        from inference.memory import NotEnoughMemory, gib

        plan = self._memory_plan(spec)
        if plan.wait:
            raise NotEnoughMemory(
                f"model {spec.id!r} does not fit the memory budget now: the loaded models are "
                "serving requests, or library jobs hold the memory"
            )
        for idle in plan.evict:
            logger.info("model %s: unloaded to make room for %s", idle, spec.id)
            self._unload(idle)
        began = time.perf_counter()
        loaded = load_model(spec, self.converted_dir)
        # Served in float32 on the CPU only if that fits the budget too.
        room = self.memory.room(self._memory_models())
        use_float32_on_cpu(loaded, max(0, min(self.cpu_float32_max_bytes, room)))
        actual = _model_bytes(loaded.model)
        self.memory.remember(spec.id, weights_bytes(spec, self.converted_dir), actual)
        if actual > room:
            # Bigger than its files said: unload more idle models if that makes it fit.
            sizes = {m.model_id: m.weights_bytes + m.kv_bytes for m in self._memory_models()}
            for idle in [mid for mid, slot in self._slots.items() if not slot.active]:
                if actual <= room:
                    break
                room += sizes.get(idle, 0)
                self._unload(idle)
            if actual > self.memory.budget:
                del loaded
                gc.collect()
                raise NotEnoughMemory(
                    f"model {spec.id!r} takes {gib(actual)} loaded, more than the whole "
                    f"memory budget ({gib(self.memory.budget)}; memory_budget_bytes in "
                    "server.yaml)"
                )
            if actual > room:
                logger.warning(
                    "model %s takes %s, %s over the memory budget while the others serve",
                    spec.id,
                    gib(actual),
                    gib(actual - room),
                )
        metrics.model_loaded(spec.id, time.perf_counter() - began)
        prompt_cache = None
        if self.kv_cache.enabled:
            from inference.kvcache import PromptCacheStore, model_cache_key

            settings = self.kv_cache.for_model(spec)
            prompt_cache = PromptCacheStore(
                model_cache_key(loaded, settings), settings, self._kv_disk, align=self._granule
            )
        eos = sorted(loaded.tokenizer.eos_token_ids)
        slot = _Slot(
            model_id=spec.id,
            loaded=loaded,
            generator=self._new_generator(loaded),
            prompt_cache=prompt_cache,
            stop_tokens=StopSequences([(t,) for t in eos]),
            output=OutputFormat.for_tokenizer(loaded.tokenizer),
            eos_ids=frozenset(eos),
        )
        if self._passes_cost_alike():
            slot.chunk = float(self.max_batch_tokens)
        self._load_draft(slot, spec)
        if slot.draft is not None:
            actual += _model_bytes(slot.draft.model)
        self._slots[spec.id] = slot
        self._ttl.setdefault(spec.id, self._default_keep_alive(spec))
        self._loaded_info = (
            *self._loaded_info,
            {
                "model_id": spec.id,
                "bytes": actual,
                "loaded_at": time.time(),
                "expires_at": None,
                # A LoRA adapter's base model (inference.catalogue), else None.
                "base_model": spec.base_id,
            },
        )
        self._publish_memory()
        return slot

    def _new_generator(self, loaded: LoadedModel) -> BatchGenerator:
        from mlx_lm.generate import BatchGenerator

        from inference import fused

        # Prompt chunks ride in its decode passes where the architecture allows (_step).
        model: Any = (
            fused.RidingModel(loaded.model) if fused.fusable(loaded.model) else loaded.model
        )
        return BatchGenerator(
            model,
            max_tokens=self.max_new_tokens,
            completion_batch_size=self.completion_batch_size,
            prefill_batch_size=self.prefill_batch_size,
            prefill_step_size=self.prefill_step_size,
            stream=self._stream,
        )

    def _unload(self, model_id: str) -> None:
        import mlx.core as mx

        slot = self._slots.pop(model_id)
        self._forget_keep_alive(model_id)
        self._loaded_info = tuple(i for i in self._loaded_info if i["model_id"] != model_id)
        if slot.prompt_cache is not None:
            try:
                slot.prompt_cache.persist_all()
            except Exception:
                logger.exception("model %s: could not persist its KV caches", model_id)
        slot.generator.close()
        del slot
        gc.collect()
        mx.clear_cache()
        self._publish_memory()
        logger.info("unloaded model %s", model_id)

    # ------------------------------------------------------------------ admission

    def _admit_pending(self) -> None:
        # First come, first served: a request waiting for a model slot holds back the ones
        # behind it, so a busy model cannot starve a request for another one.
        while self._pending:
            pending = self._pending[0]
            request = pending.submit.request
            slot = self._slots.get(request.model_id)
            if slot is None and not self._can_load(self._pending_spec(pending)):
                return
            self._pending.popleft()
            if slot is None:
                try:
                    spec = pending.spec or self.catalogue.get(request.model_id)
                    slot = self._load_slot(spec)
                except Exception as e:
                    logger.warning(
                        "request %s: cannot load %s: %s", request.id, request.model_id, e
                    )
                    _safe_emit(
                        pending.submit.emit, Finished(request.id, "error", 0, 0, error=str(e))
                    )
                    continue
            self._slots.move_to_end(request.model_id)
            self._admit(slot, pending.submit)

    def _admit(self, slot: _Slot, submit: _Submit) -> None:
        request, params = submit.request, submit.request.params
        admitted_at = time.perf_counter()
        try:
            prompt, trimmed, max_tokens = self._prompt(slot, request)
            processors = self._processors(slot, params)
            cache, rest, cache_source = self._cached_prefix(slot, prompt)
            cached = len(prompt) - len(rest)
            # The prompt prefills in chunks on its own cache between decode steps (_step);
            # it joins the batch, or decodes alone, once its first token is out.
            sampler = self._sampler(params, len(slot.loaded.tokenizer))
            seq = self._new_seq(slot, params, prompt, cached, cache, sampler, processors)
            seq.max_tokens = max_tokens
            plain = not processors and params.seed is None
            self._uids -= 1
            uid = self._uids
        except _PromptTooLong as e:
            logger.info("request %s: %s", request.id, e)
            _safe_emit(submit.emit, Finished(request.id, "error", e.prompt_tokens, 0, str(e)))
            return
        except Exception as e:
            logger.exception("request %s: cannot start", request.id)
            _safe_emit(submit.emit, Finished(request.id, "error", 0, 0, error=_describe(e)))
            return

        detokenizer = slot.loaded.tokenizer.detokenizer
        if request.prompt_text is not None or request.assistant_prefix:
            _keep_leading_space(detokenizer)
        active = _Active(
            request=request,
            emit=submit.emit,
            slot=slot,
            uid=uid,
            detokenizer=detokenizer,
            stop=tuple(params.stop),
            prompt_tokens=len(prompt),
            started_at=time.perf_counter(),
            top_logprobs=params.top_logprobs if params.logprobs else -1,
            cache_source=cache_source,
            seq=seq,
            plain=plain,
            submitted_at=submit.at,
            admitted_at=admitted_at,
        )
        slot.active[uid] = active
        slot.prefilling.append(active)
        self._by_id[request.id] = active
        logger.info(
            "request %s: model=%s prompt=%d cached=%d trimmed=%d max_tokens=%d",
            request.id,
            slot.model_id,
            len(prompt),
            cached,
            trimmed,
            max_tokens,
        )
        output = slot.output
        if output.think_start and _opens_reasoning(slot, prompt, request.assistant_prefix):
            output = replace(output, starts_in_reasoning=True)
        if slot.provenance is None:
            from inference.provenance import model_provenance

            slot.provenance = model_provenance(slot.loaded, self.converted_dir)
        try:
            active.emit(Started(request.id, len(prompt), cached, trimmed, output, slot.provenance))
        except Exception as e:
            logger.exception("request %s: event handler failed", request.id)
            self._finish(active, "error", error=f"event handler failed: {_describe(e)}")

    def _prompt(self, slot: _Slot, request: GenerationRequest) -> tuple[list[int], int, int]:
        """The templated prompt, the number of messages trimmed from it and its max tokens."""
        context = slot.loaded.context_length
        wanted = min(request.params.max_tokens, self.max_new_tokens)
        limit = min(self.max_prompt_tokens, max(context - wanted, context // MIN_PROMPT_SHARE))
        tokenizer = slot.loaded.tokenizer
        if request.prompt_text is not None:
            # A raw completion prompt is the caller's own text: never trimmed.
            prompt = list(tokenizer.encode(request.prompt_text))
            if len(prompt) > limit:
                raise _PromptTooLong(
                    f"prompt too long: {len(prompt)} tokens, limit {limit}", len(prompt)
                )
            if not prompt:
                raise ValueError("the prompt is empty")
            return prompt, 0, max(1, min(wanted, context - len(prompt)))
        params = request.params
        if request.assistant_prefix_tokens and (
            max(request.assistant_prefix_tokens) >= _vocab_size(slot.loaded)
            or min(request.assistant_prefix_tokens) < 0
        ):
            raise ValueError("assistant_prefix_tokens: a token id is not in the vocabulary")
        tools = [t.as_template_tool() for t in params.tools] if params.uses_tools else []
        if tools and slot.template_tools is None:
            slot.template_tools = _template_renders_tools(tokenizer)
        messages = _template_messages(
            request.messages,
            tools=tools,
            native_tools=bool(slot.template_tools),
            developer=_template_knows(tokenizer, "developer"),
        )
        system = messages[:1] if messages and messages[0].get("role") == "system" else []
        turns = messages[len(system) :]
        trimmed = 0
        while True:
            prompt = _template(
                tokenizer,
                system + turns,
                tools if slot.template_tools else None,
                assistant_prefix=request.assistant_prefix,
                assistant_prefix_tokens=request.assistant_prefix_tokens,
            )
            if len(prompt) <= limit:
                break
            # Drop the oldest whole turn: everything before the second user message.
            cut = next((i for i in range(1, len(turns)) if turns[i].get("role") == "user"), None)
            if cut is None:
                raise _PromptTooLong(
                    f"prompt too long: {len(prompt)} tokens, limit {limit}", len(prompt)
                )
            turns = turns[cut:]
            trimmed += cut
        if not prompt:
            raise ValueError("the prompt is empty")
        return prompt, trimmed, max(1, min(wanted, context - len(prompt)))

    def _processors(self, slot: _Slot, params: GenerationParams) -> list[Any]:
        """The request's own logits processors: penalties, logit bias, its grammar."""
        processors: list[Any] = []
        vocab_size = _vocab_size(slot.loaded)
        if params.logit_bias:
            bad = sorted(t for t in params.logit_bias if t >= vocab_size)
            if bad:
                raise ValueError(
                    f"logit_bias: token id {bad[0]} is not in the vocabulary (0..{vocab_size - 1})"
                )
        if params.repetition_penalty != 1.0 or params.logit_bias:
            from mlx_lm.sample_utils import make_logits_processors

            processors += make_logits_processors(
                logit_bias=dict(params.logit_bias) or None,
                repetition_penalty=params.repetition_penalty,
            )
        if params.presence_penalty or params.frequency_penalty:
            processors.append(_OccurrencePenalty(params.presence_penalty, params.frequency_penalty))
        from inference import constraints

        grammar = constraints.grammar_for(params)
        if grammar is not None:
            eos = sorted(slot.loaded.tokenizer.eos_token_ids)
            if slot.constraint_tokenizer is None:
                hf_tokenizer = getattr(slot.loaded.tokenizer, "_tokenizer", None)
                slot.constraint_tokenizer = constraints.constraint_tokenizer(
                    hf_tokenizer, vocab_size=vocab_size, eos_ids=eos
                )
            matcher = constraints.new_matcher(slot.constraint_tokenizer, grammar)
            # Last, so the bias and penalties cannot bring back a token the grammar forbids.
            processors.append(constraints.GrammarProcessor(matcher, vocab_size, eos))
        return processors

    def _cached_prefix(self, slot: _Slot, prompt: list[int]) -> tuple[Any, list[int], str]:
        """A copy of the longest kept KV prefix of `prompt` (in memory or on disk), the tokens
        still to prefill and where the prefix came from (inference.kvcache)."""
        from inference.kvcache import new_cache

        if slot.prompt_cache is not None:
            hit = slot.prompt_cache.fetch(prompt)
            if hit.cache is not None:
                return hit.cache, hit.rest, hit.source
        # Nothing kept: a fresh cache (rotating with max_kv_size; None: the model's own).
        fresh = new_cache(slot.loaded.model, self.kv_cache.for_model(slot.loaded.spec))
        return fresh, prompt, "none"

    def _sampler(self, params: GenerationParams, vocab_size: int) -> Any:
        from mlx_lm.sample_utils import greedy_sampler, make_sampler

        if params.temperature == 0:
            return greedy_sampler
        top_k = params.top_k if 0 < params.top_k < vocab_size else 0
        if params.seed is not None:
            return _seeded_sampler(
                params.temperature, params.top_p, params.min_p, top_k, params.seed
            )
        # Requests with the same settings share one sampler object, so the generator samples
        # their rows in one call instead of one call per row.
        key = (params.temperature, params.top_p, params.min_p, top_k)
        sampler = self._samplers.get(key)
        if sampler is None:
            if len(self._samplers) >= MAX_SHARED_SAMPLERS:
                self._samplers.clear()
            sampler = make_sampler(
                params.temperature, top_p=params.top_p, min_p=params.min_p, top_k=top_k
            )
            self._samplers[key] = sampler
        return sampler

    # ------------------------------------------------------------------ scheduling

    def _new_seq(
        self,
        slot: _Slot,
        params: GenerationParams,
        prompt: list[int],
        cached: int,
        cache: Any,
        sampler: Any,
        processors: list[Any],
    ) -> _Seq:
        """A request's own cache for its chunked prefill, with a draft cache when it may decode
        speculatively (nothing else decodes, no logits processors, no seed)."""
        if cache is None:
            from mlx_lm.models.cache import make_prompt_cache

            cache = make_prompt_cache(slot.loaded.model)
        seq = _Seq(
            cache=cache,
            fed=list(prompt[:cached]),
            rest=list(prompt[cached:]),
            sampler=sampler,
            processors=processors,
            max_tokens=1,
            chunk=slot.chunk,
        )
        if self._may_speculate(slot, params, processors, cache):
            from mlx_lm.models.cache import make_prompt_cache

            assert slot.draft is not None
            seq.draft_cache = make_prompt_cache(slot.draft.model)
            seq.draft_lag = list(seq.fed)
        return seq

    def _may_speculate(
        self, slot: _Slot, params: GenerationParams, processors: list[Any], cache: Any
    ) -> bool:
        from mlx_lm.models.cache import can_trim_prompt_cache

        if slot.draft is None or processors or params.seed is not None:
            # Stateful processors (a grammar) and seeded samplers cannot take back the
            # positions a rejected draft used.
            return False
        others = sum(1 for a in slot.active.values() if a.phase != "prefill")
        return others == 0 and bool(can_trim_prompt_cache(cache))

    def _step(self, slot: _Slot) -> None:
        """One scheduling step of a model: place the requests whose prefill is done, one
        decode step for the streams, then prefill chunks within what is left of
        `target_latency_ms` (and `max_batch_tokens`), shortest prompt of the highest priority
        first, so running streams keep streaming and a short request starts at once.

        One stream alone decodes on its own cache with a generate_step-style loop (with the
        draft model when there is one); with more, they decode in the generator's batch.
        """
        self._place_ready(slot)
        began = time.perf_counter()
        rows = 0
        runs: list[_ChunkRun] = []
        ahead_s = 0.0
        if slot.solo is not None:
            rows = 1
            self._solo_step(slot, slot.solo)
        elif any(a.phase == "batch" for a in slot.active.values()):
            rows = sum(1 for a in slot.active.values() if a.phase == "batch")
            ahead_s, ahead_tokens = self._head_start(slot, rows)
            began = time.perf_counter()
            runs = self._board_riders(slot, rows + ahead_tokens, ahead_s)
            generator = slot.generator
            self._batch_step(slot)
            if runs and slot.generator is not generator:
                # The step failed and its generator was replaced: the riders' caches may hold
                # part of the pass.
                for run in runs:
                    for active in run.rows:
                        self._finish(active, "error", error="prefill failed with its batch step")
                runs = []
        decode_s = time.perf_counter() - began
        if runs:
            self._land_riders(slot, runs)
            elapsed = time.perf_counter() - began
            tokens = sum(run.n * len(run.rows) for run in runs)
            added = max(elapsed - slot.decode_s, 0.0) / tokens
            slot.token_s = 0.7 * slot.token_s + 0.3 * added if slot.token_s else added
            if all(run.offset < SHORT_OFFSET for run in runs):
                early = slot.early_token_s
                slot.early_token_s = 0.7 * early + 0.3 * added if early else added
            logger.debug(
                "step: %d rows decoding, %d prompt tokens riding in %d chunks, %.0f ms "
                "(decode alone %.0f ms, a prompt token %.1f ms)",
                rows,
                tokens,
                len(runs),
                elapsed * 1000,
                slot.decode_s * 1000,
                slot.token_s * 1000,
            )
        elif rows > 1:
            slot.decode_times.append(decode_s)
            slot.decode_s = statistics.median(slot.decode_times)
        if slot.prefilling and not runs and not ahead_s:
            self._prefill_step(slot, decode_s if rows else 0.0, rows)

    def _place_ready(self, slot: _Slot) -> None:
        """Move prefilled requests to decoding: alone on the solo path when nothing else
        decodes, else all into the generator (the solo stream first, without losing a
        token); a batch that shrank to one stream goes back to the solo path."""
        ready = [a for a in slot.prefilling if a.seq is not None and a.seq.prefilled]
        if not ready:
            self._maybe_go_solo(slot)
            return
        for active in ready:
            slot.prefilling.remove(active)
        in_batch = any(a.phase == "batch" for a in slot.active.values())
        if slot.solo is None and not in_batch and len(ready) == 1:
            self._make_solo(slot, ready[0])
            return
        if slot.solo is not None:
            solo, slot.solo = slot.solo, None
            self._settle_solo(slot, solo)
            if not solo.finished:
                ready.insert(0, solo)
        for active in ready:
            self._join_batch(slot, active)

    def _make_solo(self, slot: _Slot, active: _Active) -> None:
        active.phase = "solo"
        slot.solo = active
        if not active.paths or active.paths[-1] != "solo":
            active.paths.append("solo")

    def _settle_solo(self, slot: _Slot, active: _Active) -> None:
        """Emit the token the solo path computed ahead, so the request is in the state the
        generator takes: its last token emitted but not yet in the cache."""
        seq = active.seq
        assert seq is not None
        if seq.next is None:
            return
        y, logprobs = seq.next, seq.next_logprobs
        seq.next = seq.next_logprobs = None
        token = int(y.item())
        seq.rest = [token]
        self._emit_token(active, token, logprobs)

    def _join_batch(self, slot: _Slot, active: _Active) -> None:
        seq = active.seq
        assert seq is not None and seq.next is None and len(seq.rest) == 1
        try:
            (uid,) = slot.generator.insert(
                [list(seq.rest)],
                max_tokens=[max(1, seq.max_tokens - active.tokens)],
                caches=[seq.cache],
                all_tokens=[list(seq.fed)],
                samplers=[seq.sampler],
                logits_processors=[seq.processors],
                stop_sequences=[slot.stop_tokens],
            )
        except Exception as e:
            logger.exception("request %s: cannot join the batch", active.request.id)
            self._finish(active, "error", error=_describe(e))
            return
        slot.active.pop(active.uid, None)
        active.uid = uid
        slot.active[uid] = active
        active.phase = "batch"
        active.seq = None
        active.batch_tokens = 0
        if not active.paths or active.paths[-1] != "batch":
            active.paths.append("batch")

    def _maybe_go_solo(self, slot: _Slot) -> None:
        """A batch of one, with nothing prefilling: the stream leaves the generator for the
        solo path (its cache less its last token, which the solo path feeds again)."""
        from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

        if slot.solo is not None or slot.prefilling:
            return
        rows = [a for a in slot.active.values() if a.phase == "batch"]
        if len(rows) != 1:
            return
        active = rows[0]
        params = active.request.params
        if active.batch_tokens < 1 or not active.plain:
            # The last token goes through the model again: a seeded sampler or a stateful
            # processor (a grammar) would see it twice.
            return
        remaining = self._remaining(active)
        try:
            removed = slot.generator.remove([active.uid], return_prompt_caches=True)
            cache, tokens = removed[active.uid]
            if not tokens or not can_trim_prompt_cache(cache):
                raise ValueError("cache cannot be trimmed")
            trim_prompt_cache(cache, 1)
        except Exception as e:
            logger.exception("request %s: could not leave the batch", active.request.id)
            slot.active.pop(active.uid, None)
            self._finish(active, "error", error=_describe(e), in_batch=False)
            return
        slot.active.pop(active.uid, None)
        self._uids -= 1
        active.uid = self._uids
        slot.active[active.uid] = active
        active.seq = _Seq(
            cache=cache,
            fed=list(tokens[:-1]),
            rest=[tokens[-1]],
            sampler=self._sampler(params, len(slot.loaded.tokenizer)),
            processors=[],
            max_tokens=active.tokens + max(1, remaining),
            chunk=slot.chunk,
            prefilled=True,
        )
        self._make_solo(slot, active)

    def _remaining(self, active: _Active) -> int:
        """Tokens the generator would still give the request (its own max_tokens left)."""
        gen = active.slot.generator._generation_batch
        try:
            i = gen.uids.index(active.uid)
            return int(gen.max_tokens[i] - gen._num_tokens[i])
        except (ValueError, AttributeError, IndexError):
            return 1

    def _batch_step(self, slot: _Slot) -> None:
        import mlx.core as mx

        try:
            _, responses = slot.generator.next()
        except Exception as e:
            # The step is shared: whatever failed (out of memory, a bad request's processor),
            # every request in this batch is lost. Start a fresh generator for the next ones.
            logger.exception("model %s: batch step failed", slot.model_id)
            for failed in [a for a in slot.active.values() if a.phase == "batch"]:
                message = f"generation failed: {_describe(e)}"
                self._finish(failed, "error", error=message, in_batch=False)
            try:
                slot.generator.close()
            finally:
                slot.generator = self._new_generator(slot.loaded)
                mx.clear_cache()
            return
        now = time.perf_counter()
        for response in responses:
            active = slot.active.get(response.uid)
            if active is None:
                continue
            active.batch_tokens += 1
            try:
                self._on_token(active, response, now)
            except Exception as e:
                logger.exception("request %s: failed", active.request.id)
                self._finish(active, "error", error=_describe(e))

    # ------------------------------------------------------------------ prefill in chunks

    def _prefill_step(self, slot: _Slot, decode_s: float, rows: int) -> None:
        """Prefill chunks within this step's budget: what target_latency_ms leaves after the
        decode step (at least MIN_PREFILL_SHARE of it, or of the decode step if longer), and
        max_batch_tokens less the decode rows. Each request's chunk follows its measured
        speed (attention makes later chunks of a long prompt slower)."""
        target = self.target_latency_s
        if rows == 0:
            # Nobody is streaming, so there is no gap to keep small: chunks may take up to
            # IDLE_PREFILL_S (a request that arrives meanwhile waits at most that long). Held
            # to target_latency_ms, a chunk whose forward pass alone costs about that (a loaded
            # CPU) stayed at a few tokens, and a prompt alone prefilled ~10x slower than raw.
            target = max(target, IDLE_PREFILL_S)
        budget = _prefill_budget(target, decode_s)
        tokens_left = max(1, self.max_batch_tokens - rows)
        order = self._prefill_order(slot)
        spent = 0.0
        done: set[int] = set()
        first_started = 0.0  # when the oldest request of the step's first pass came
        for active in order:
            left = budget - spent
            if spent > 0 and (left <= budget * 0.1 or tokens_left <= 0):
                break
            seq = active.seq
            if seq is None or active.finished or id(active) in done:
                continue
            tokens = int(seq.chunk * min(left, budget) / budget)
            tokens = max(1, min(tokens, tokens_left))
            # The prompts at this one's offset go through the model with it, as rows of one
            # batch (a forward pass of 8 short rows costs little more than one on a GPU).
            group = _same_offset(active, order, done)
            group = group[: max(1, min(PREFILL_ROWS, tokens // MIN_ROW_TOKENS))]
            seqs = [a.seq for a in group if a.seq is not None]
            n = max(1, min(tokens // len(group), self.prefill_step_size))
            done.update(id(a) for a in group)
            if (
                spent > 0
                and self._passes_cost_alike()
                and any(n < len(s.rest) for s in seqs)
                and max(s.passed_over for s in seqs) < PASSED_OVER_STEPS
            ):
                # A pass costs nearly the same for 256 tokens as for 1,536 here: a second
                # pass in a step only for prompts it finishes; the rest wait for a step whose
                # first pass is theirs, unless prompts that came after them (shorter ones)
                # kept taking it.
                if min(a.started_at for a in group) < first_started:
                    for s in seqs:
                        s.passed_over += 1
                continue
            for s in seqs:
                s.passed_over = 0
            if not spent:
                first_started = min(a.started_at for a in group)
            rest = min(len(s.rest) for s in seqs)
            n = self._on_ladder(min(n, rest), rest)
            began = time.perf_counter()
            if not self._prefill_or_fail(slot, group, n):
                continue
            elapsed = max(time.perf_counter() - began, 1e-6)
            spent += elapsed
            tokens_left -= n * len(group)
            if not slot.token_s:
                slot.token_s = elapsed / (n * len(group))  # fixed cost included: a start
            # n tokens a row took `elapsed`: move the chunk towards what fits the budget, by
            # the square root of the ratio (one step slowed by something else must not halve
            # it), at most 1.4x either way (a forward pass has a fixed cost, and attention
            # makes tokens dearer as the prompt grows), and one token more whenever it fitted,
            # so a chunk that costs little more than its fixed part still grows.
            # With nobody streaming there is no gap to protect: a chunk far under the budget
            # grows up to 4x (on a GPU the ramp from INITIAL_CHUNK took ~8 chunks, each a shape
            # whose first pass costs a graph build).
            grow = IDLE_GROWTH if rows == 0 else 2.0
            ratio = min(max((n * len(group) * budget / elapsed) / seq.chunk, 0.5), grow)
            chunk = seq.chunk * ratio**0.5
            if elapsed < min(left, budget):
                chunk = max(chunk, seq.chunk + 1.0)
            for s in seqs:
                s.chunk = max(1.0, chunk)
            logger.debug(
                "request %s: chunk of %d x %d at %d in %.0f ms (budget %.0f ms, decode %.0f ms)",
                active.request.id,
                len(group),
                n,
                len(seq.fed) - n,
                elapsed * 1000,
                budget * 1000,
                decode_s * 1000,
            )
            if len(seq.fed) - n < SHORT_OFFSET:
                # Where a new prompt starts: what it learned is where the next one begins.
                slot.chunk = seq.chunk

    def _passes_cost_alike(self) -> bool:
        """Whether a prefill pass costs about the same whatever its length up to
        max_batch_tokens (CUDA, `gpu_passes`). On an H100 (Llama-3-8B shape, bf16) a pass of
        8 rows x 32 tokens took 18-40 ms and one of 8 x 182 took 50: chunks sized by measured
        time per token stayed small, and a step's second, partial pass cost as much as a
        whole one (docs/benchmarks.md)."""
        return self.gpu_passes and self._granule > 1

    def _on_ladder(self, n: int, rest: int) -> int:
        """A chunk of `n` tokens of rows whose shortest `rest` is that long, cut to the shape
        ladder where there is one (CUDA, `gpu_passes`): the whole rest, the granule times a
        power of two up to LADDER_STEP, or a multiple of LADDER_STEP. Lengths that followed
        measured times met shapes never seen before from run to run, and each costs a pass
        several times over the first time; rungs repeat, and so do the offsets they leave."""
        if not self._passes_cost_alike() or n >= rest:
            return n
        if rest <= self._granule:
            return rest
        if n >= LADDER_STEP:
            return n - n % LADDER_STEP
        rung = self._granule
        while rung * 2 <= n:
            rung *= 2
        return rung

    def _riding(self, slot: _Slot) -> bool:
        """Whether prompt chunks ride this model's decode passes (inference.fused) now."""
        from inference import fused

        riding = slot.generator.model
        return isinstance(riding, fused.RidingModel) and bool(self.fuse_prefill and slot.decode_s)

    def _head_start(self, slot: _Slot, rows: int) -> tuple[float, int]:
        """Where prompt chunks ride decode passes: new interactive prompts whose rest fits in
        a step of FINISH_STRETCH times target_latency_ms with the decode pass go through the
        model first, whole, in a pass of their own, so their first token comes before the
        decode pass instead of after it, and in one step. The decoders wait about as long
        either way: on the 2-core CPU a 33-token prompt alone took 150 ms and added 142 to a
        two-row decode pass of 79. Returns the seconds and the prompt tokens spent (a step's
        tokens stay within max_batch_tokens)."""
        if not self._riding(slot):
            return 0.0, 0
        budget = _prefill_budget(self.target_latency_s, slot.decode_s)
        token_s = slot.early_token_s or slot.token_s or budget / INITIAL_CHUNK
        left = self.target_latency_s * FINISH_STRETCH - slot.decode_s
        tokens_left = max(1, self.max_batch_tokens - rows)
        order = self._prefill_order(slot)
        taken: set[int] = set()
        began = time.perf_counter()
        for active in order:
            if PRIORITY_RANK.get(active.request.priority, 1) > 0:
                break  # background work waits for the decode pass, as it waits for a chat
            seq = active.seq
            if seq is None or active.finished or id(active) in taken:
                continue
            rest = len(seq.rest)
            if seq.draft_cache or len(seq.fed) >= SHORT_OFFSET:
                continue
            if rest * token_s > left:
                continue
            group = [
                a
                for a in _same_offset(active, order, taken)
                if a.seq is not None and len(a.seq.rest) == rest
            ][: max(1, min(PREFILL_ROWS, tokens_left // max(1, rest)))]
            if rest * len(group) > tokens_left:
                continue
            taken.update(id(a) for a in group)
            if not self._prefill_or_fail(slot, group, rest):
                continue
            for a in group:
                a.prefill_ahead += 1
            left -= rest * len(group) * token_s
            tokens_left -= rest * len(group)
            if left <= 0 or tokens_left <= 0:
                break
        spent = max(1, self.max_batch_tokens - rows) - tokens_left
        return (time.perf_counter() - began if taken else 0.0), spent

    def _board_riders(self, slot: _Slot, rows: int, spent: float = 0.0) -> list[_ChunkRun]:
        """Prompt chunks for the coming decode pass to carry (inference.fused), within what
        target_latency_ms leaves after the decode step (less `spent`, seconds this step already
        took; `rows` counts the tokens it already has) at the measured cost per prompt token;
        a prompt whose rest fits FINISH_STRETCH times that goes whole (its first token
        sooner). Empty when the model cannot fuse or nothing is measured yet."""
        from inference import fused

        if not self._riding(slot):
            return []
        riding = slot.generator.model
        assert isinstance(riding, fused.RidingModel)
        budget = _prefill_budget(self.target_latency_s, slot.decode_s)
        token_s = slot.token_s or budget / INITIAL_CHUNK
        left, tokens_left = budget - spent, max(1, self.max_batch_tokens - rows)
        runs: list[_ChunkRun] = []
        taken: set[int] = set()
        order = self._prefill_order(slot)
        for active in order:
            seq = active.seq
            if left <= budget * 0.1 or tokens_left <= 0:
                break
            if seq is None or active.finished or id(active) in taken or seq.draft_cache:
                continue
            cost = token_s
            if len(seq.fed) < SHORT_OFFSET and slot.early_token_s:
                cost = slot.early_token_s
            rest = len(seq.rest)
            n = rest if rest * cost <= left * FINISH_STRETCH else int(left / cost)
            group = _same_offset(active, order, taken)
            group = group[: max(1, min(PREFILL_ROWS, tokens_left // max(1, n)))]
            n = max(1, min(n, tokens_left // len(group), self.prefill_step_size))
            n = min([n] + [len(a.seq.rest) for a in group if a.seq is not None])
            taken.update(id(a) for a in group)
            runs.append(self._chunk_start(slot, group, n))
            left -= n * len(group) * cost
            tokens_left -= n * len(group)
        for run in runs:
            run.rider = fused.Rider(run.tokens, run.cache, run.n - 1)
        riding.riders = [run.rider for run in runs]
        return runs

    def _land_riders(self, slot: _Slot, runs: list[_ChunkRun]) -> None:
        """Finish the chunks the decode pass carried (one it did not carry, because the
        generator made no model call, runs on its own)."""
        from inference import fused

        riding = slot.generator.model
        if isinstance(riding, fused.RidingModel):
            riding.riders = []
        for run in runs:
            try:
                with self._on_stream():
                    carried = run.rider.logits if run.rider is not None else None
                    if carried is None:
                        logits = self._own_pass(slot, run)
                    else:
                        logits = carried
                        for active in run.rows:
                            active.prefill_fused += 1
                    self._chunk_finish(slot, run, logits)
            except Exception as e:
                self._fail_prefill(run.rows, e)

    def _prefill_order(self, slot: _Slot) -> list[_Active]:
        """Requests with prompt left to prefill, highest priority and shortest rest first. One
        whose prompt ended earlier in this step (a head start, Engine._head_start) waits in
        slot.prefilling for the next step's _place_ready: it has none left."""
        return sorted(
            (a for a in slot.prefilling if a.seq is None or not a.seq.prefilled),
            key=lambda a: (
                PRIORITY_RANK.get(a.request.priority, 1),
                len(a.seq.rest) if a.seq is not None else 0,
                a.started_at,
            ),
        )

    def _prefill_or_fail(self, slot: _Slot, rows: list[_Active], n: int) -> bool:
        """_prefill_group; if it raises, its requests end with the error. Whether it ran."""
        try:
            self._prefill_group(slot, rows, n)
        except Exception as e:
            self._fail_prefill(rows, e)
            return False
        return True

    def _fail_prefill(self, rows: list[_Active], error: Exception) -> None:
        """A prefill pass raised: its requests end with the error."""
        logger.exception("request %s: prefill failed", rows[0].request.id)
        for failed in rows:
            self._finish(failed, "error", error=f"prefill failed: {_describe(error)}")

    def _prefill_group(self, slot: _Slot, rows: list[_Active], n: int) -> None:
        """Run the next `n` prompt tokens of `rows` (requests whose caches hold the same number
        of tokens) through the model in a pass of their own."""
        began = time.perf_counter()
        with self._on_stream():
            run = self._chunk_start(slot, rows, n)
            self._chunk_finish(slot, run, self._own_pass(slot, run))
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "pass: %d rows x %d tokens (width %d) at offset %d in %.1f ms",
                len(rows),
                n,
                int(run.tokens.shape[1]),
                run.offset,
                (time.perf_counter() - began) * 1000,
            )

    def _own_pass(self, slot: _Slot, run: _ChunkRun) -> Any:
        """`run` through the model in a pass of its own: the logits at its last prompt token,
        (rows, vocab). Only that position goes through the output head where the model allows
        (inference.fused): the model's own call projects every position, a fifth of a short
        prompt's cost for SmolLM2 on the CPU (mlx-lm's generate_step avoids it by feeding the
        last token alone, a second pass)."""
        from inference import fused

        if isinstance(slot.generator.model, fused.RidingModel):
            (logits,) = fused.forward(slot.loaded.model, [(run.tokens, run.cache, run.n - 1)])
            return logits
        return slot.loaded.model(run.tokens, cache=run.cache)[:, run.n - 1, :]

    def _chunk_start(self, slot: _Slot, rows: list[_Active], n: int) -> _ChunkRun:
        """The input of a prefill pass over the next `n` prompt tokens of `rows`: their tokens
        (padded to the shape granule where the cache can be cut back) and the cache the pass
        writes: the request's own for one row, else a batch of the rows' caches."""
        import mlx.core as mx
        from mlx_lm.models.cache import KVCache

        seqs = [a.seq for a in rows if a.seq is not None]
        assert len(seqs) == len(rows)
        offset = len(seqs[0].fed)
        pieces = [s.rest[:n] for s in seqs]
        cache: list[Any]
        if len(seqs) == 1:
            cache = seqs[0].cache
            inputs = [self._padded(pieces[0]) if _plain_caches(cache) else pieces[0]]
        else:
            # The rows' caches are cut at offset + n in _chunk_finish: padding never reaches them.
            cache = []
            for i in range(len(seqs[0].cache)):
                layer = KVCache()
                if offset:
                    # A layer's arrays may be longer than its tokens (grown in steps, or trimmed).
                    own = [s.cache[i] for s in seqs]
                    layer.keys = mx.concatenate([c.keys[..., :offset, :] for c in own], axis=0)
                    layer.values = mx.concatenate([c.values[..., :offset, :] for c in own], axis=0)
                    layer.offset = offset
                cache.append(layer)
            inputs = [self._padded(piece) for piece in pieces]
        return _ChunkRun(rows, seqs, pieces, n, offset, mx.array(inputs, dtype=mx.uint32), cache)

    def _chunk_finish(self, slot: _Slot, run: _ChunkRun, logits: Any) -> None:
        """After the pass (`logits`: each row's at its last prompt token, (rows, vocab)): each
        row's cache back, the draft model fed, and a row whose prompt ended here samples and
        emits its first token. Called inside the engine's stream."""
        import mlx.core as mx
        from mlx_lm.models.cache import KVCache

        n, seqs, offset = run.n, run.seqs, run.offset
        sampled: dict[int, tuple[Any, Any]] = {}
        for j, (seq, piece) in enumerate(zip(seqs, run.pieces, strict=True)):
            if n == len(seq.rest):
                sampled[j] = self._sample(seq, logits[j : j + 1], seq.fed + piece)
        wait: list[Any] = list(sampled.values())
        if len(seqs) == 1:
            seq = seqs[0]
            padding = int(run.tokens.shape[1]) - n
            if padding:
                # The padding's keys and values lie past the cache's offset: overwritten next.
                for layer in seq.cache:
                    layer.offset -= padding
            wait += [c.state for c in seq.cache]
            if seq.draft_cache is not None:
                assert slot.draft is not None
                seq.draft_lag.extend(run.pieces[0])
                m = min(len(seq.draft_lag), n + DRAFT_CATCH_UP)
                feed, seq.draft_lag = seq.draft_lag[:m], seq.draft_lag[m:]
                if feed:
                    slot.draft.model(mx.array([feed], dtype=mx.uint32), cache=seq.draft_cache)
                    wait += [c.state for c in seq.draft_cache]
        else:
            for j, seq in enumerate(seqs):
                own = []
                for layer in run.cache:
                    row = KVCache()
                    row.keys = layer.keys[j : j + 1, :, : offset + n, :]
                    row.values = layer.values[j : j + 1, :, : offset + n, :]
                    row.offset = offset + n
                    own.append(row)
                seq.cache = own
                wait += [(c.keys, c.values) for c in own]
        mx.eval(wait)
        for j, (active, seq, piece) in enumerate(zip(run.rows, seqs, run.pieces, strict=True)):
            active.prefill_chunks += 1
            active.prefill_rows = max(active.prefill_rows, len(seqs))
            seq.fed.extend(piece)
            seq.rest = seq.rest[n:]
            if j in sampled:
                token, logprobs = sampled[j]
                first = int(token.item())
                seq.rest = [first]
                seq.prefilled = True
                self._emit_token(active, first, logprobs)

    def _sample(self, seq: _Seq, logits: Any, context: list[int] | Any) -> tuple[Any, Any]:
        """Sample one token from a (1, vocab) row after the request's processors; `context`
        is every token in the cache, the last one included (mlx-lm's processor contract)."""
        import mlx.core as mx

        if seq.processors:
            tokens = context if isinstance(context, mx.array) else mx.array(context, mx.uint32)
            for processor in seq.processors:
                logits = processor(tokens, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return seq.sampler(logprobs), logprobs[0]

    def _padded(self, piece: list[int]) -> list[int]:
        """`piece` padded (with its last token) to a multiple of the shape granule. Padding goes
        after the prompt's tokens, so under the causal mask no real token attends to it."""
        extra = -len(piece) % self._granule
        return piece + piece[-1:] * extra if extra else piece

    def _on_stream(self) -> Any:
        """The engine thread's stream, as a context (every model call of this engine)."""
        import mlx.core as mx

        assert self._stream is not None
        return mx.stream(self._stream)

    def _emit_token(self, active: _Active, token: int, logprobs: Any) -> None:
        """A token decoded outside the generator, through the same path as its responses."""
        seq = active.seq
        assert seq is not None
        reason = None
        if token in active.slot.eos_ids:
            reason = "stop"
        elif active.tokens + 1 >= seq.max_tokens:
            reason = "length"
        cache = seq.cache if reason is not None else None
        response = _Response(token, logprobs, reason, cache, list(seq.fed) if cache else None)
        try:
            self._on_token(active, response, time.perf_counter())
        except Exception as e:
            logger.exception("request %s: failed", active.request.id)
            self._finish(active, "error", error=_describe(e))

    # ------------------------------------------------------------------ one stream

    def _solo_step(self, slot: _Slot, active: _Active) -> None:
        """One token (or, with a draft model, several) for the model's only stream, on its
        own cache: mlx-lm's generate_step loop, one token computed ahead."""
        import mlx.core as mx

        seq = active.seq
        assert seq is not None
        drafting = seq.draft_cache is not None
        if drafting and seq.next is None and active.tokens >= SPEC_PLAIN_TOKENS:
            self._spec_step(slot, active)
            return
        began = time.perf_counter()
        steady = seq.next is not None  # a token was computed ahead: this step is pipelined
        model = slot.loaded.model
        with self._on_stream():
            if seq.next is None:
                feed = seq.rest.pop()
                logits = model(mx.array([[feed]], dtype=mx.uint32), cache=seq.cache)
                seq.fed.append(feed)
                if drafting:
                    seq.draft_lag.append(feed)
                seq.next, seq.next_logprobs = self._sample(seq, logits[:, -1, :], seq.fed)
            y, logprobs = seq.next, seq.next_logprobs
            # With a draft, nothing is computed ahead of the step that hands over to it.
            ahead = active.tokens + 1 < seq.max_tokens and not (
                drafting and active.tokens + 1 >= SPEC_PLAIN_TOKENS
            )
            if ahead:
                logits = model(y[None], cache=seq.cache)
                context: Any = None
                if seq.processors:
                    context = mx.concatenate([mx.array(seq.fed, mx.uint32), y])
                seq.next, seq.next_logprobs = self._sample(seq, logits[:, -1, :], context)
                mx.async_eval(seq.next, seq.next_logprobs)
            else:
                seq.next = seq.next_logprobs = None
            token = int(y.item())
        if ahead:
            seq.fed.append(token)
            if drafting:
                seq.draft_lag.append(token)
        else:
            seq.rest = [token]
        self._emit_token(active, token, logprobs)
        if steady and ahead:
            # What a token costs on this path, the one speculation is judged against.
            elapsed = time.perf_counter() - began
            slot.solo_token_s = (
                elapsed if not slot.solo_token_s else 0.8 * slot.solo_token_s + 0.2 * elapsed
            )

    def _spec_step(self, slot: _Slot, active: _Active) -> None:
        """Speculative decoding: the draft proposes up to num_draft_tokens greedily, the model
        checks them in one forward pass and keeps the ones it samples itself, then one of its
        own. With a greedy sampler the text is the one plain decoding writes."""
        import mlx.core as mx
        from mlx_lm.models.cache import trim_prompt_cache

        seq = active.seq
        assert seq is not None and seq.draft_cache is not None and slot.draft is not None
        feed = seq.rest.pop()
        k = min(slot.num_draft_tokens, seq.max_tokens - active.tokens - 1)
        began = time.perf_counter()
        with self._on_stream():
            drafts: list[Any] = []
            if k > 0:
                inputs = mx.array([seq.draft_lag + [feed]], dtype=mx.uint32)
                seq.draft_lag = []
                for _ in range(k):
                    logits = slot.draft.model(inputs, cache=seq.draft_cache)
                    d = mx.argmax(logits[:, -1, :], axis=-1).astype(mx.uint32)
                    mx.async_eval(d)
                    drafts.append(d)
                    inputs = d[None]
                verify = mx.concatenate([mx.array([feed], dtype=mx.uint32), *drafts])
            else:
                seq.draft_lag.append(feed)
                verify = mx.array([feed], dtype=mx.uint32)
            logits = slot.loaded.model(verify[None], cache=seq.cache)[0]
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            sampled = seq.sampler(logprobs)
            mx.eval(sampled, *drafts)
            tokens = [int(t) for t in sampled.tolist()]
            proposed = [int(d.item()) for d in drafts]
        accepted = 0
        while accepted < k and tokens[accepted] == proposed[accepted]:
            accepted += 1
        # The model's cache holds feed and k drafts: keep feed and the accepted ones. The
        # draft's holds feed and the first k-1 drafts.
        if k - accepted:
            trim_prompt_cache(seq.cache, k - accepted)
        if k and accepted == k:
            seq.draft_lag = [proposed[-1]]
        elif k - 1 - accepted > 0:
            trim_prompt_cache(seq.draft_cache, k - 1 - accepted)
        seq.fed.extend([feed, *proposed[:accepted]])
        seq.rest = [tokens[accepted]]
        elapsed = time.perf_counter() - began
        emitted = 0
        for i in range(accepted + 1):
            self._emit_token(active, tokens[i], logprobs[i])
            emitted += 1
            if active.finished:
                break
        if k:
            active.spec_rounds += 1
            active.spec_drafted += k
            active.spec_accepted += accepted
            active.spec_tokens += emitted
            active.spec_s += elapsed
        active.spec_steps += 1
        if (
            active.spec_rounds >= SPEC_JUDGE_ROUNDS
            and slot.solo_token_s
            and active.spec_s / active.spec_tokens > slot.solo_token_s
            and not active.finished
        ):
            # The draft loses here: the rest of the reply decodes on the plain path.
            seq.draft_cache = None
            seq.draft_lag = []
            active.spec_dropped_at = active.tokens
            logger.info(
                "request %s: draft dropped after %d rounds (%.1f ms a token with it, %.1f "
                "without)",
                active.request.id,
                active.spec_rounds,
                active.spec_s / active.spec_tokens * 1000,
                slot.solo_token_s * 1000,
            )

    def _details(self, active: _Active) -> dict[str, Any]:
        details: dict[str, Any] = {
            "decode_path": "+".join(active.paths),
            "prefill_chunks": active.prefill_chunks,
            "prefill_rows": active.prefill_rows,
            "prefill_fused": active.prefill_fused,
            "prefill_ahead": active.prefill_ahead,
        }
        if active.first_token_at and active.submitted_at:
            # started_at: when _admit had the prompt and its cache.
            details["ttft_ms"] = {
                "wait": round((active.admitted_at - active.submitted_at) * 1000, 2),
                "admit": round((active.started_at - active.admitted_at) * 1000, 2),
                "prefill": round((active.first_token_at - active.started_at) * 1000, 2),
            }
        if active.spec_drafted:
            slot = active.slot
            per_token = active.spec_s / active.spec_tokens if active.spec_tokens else 0.0
            details["speculative"] = {
                "draft_model": slot.draft_id,
                "num_draft_tokens": slot.num_draft_tokens,
                "drafted": active.spec_drafted,
                "accepted": active.spec_accepted,
                "acceptance_rate": round(active.spec_accepted / active.spec_drafted, 4),
                "tokens_per_step": round(active.spec_tokens / max(1, active.spec_rounds), 3),
                # Against a token of the plain one-stream path of the same model (each reply's
                # first SPEC_PLAIN_TOKENS); None until one was measured.
                "speedup": (
                    round(slot.solo_token_s / per_token, 3)
                    if slot.solo_token_s and per_token
                    else None
                ),
                # The tokens written when the draft was dropped as a loss; None if it was not.
                "dropped_after": active.spec_dropped_at or None,
            }
        return details

    def _load_draft(self, slot: _Slot, spec: ModelSpec) -> None:
        """The model's draft_model (configs/models/<id>.yaml), when enable_speculative is on;
        a draft that cannot load or does not share the tokenizer is logged and left out."""
        if not self.enable_speculative:
            return
        models = getattr(self.catalogue.config, "models", {}) or {}
        config = models.get(spec.id)
        draft_id = getattr(config, "draft_model", None)
        if not draft_id:
            return
        from inference.loader import load_model, use_float32_on_cpu

        try:
            draft = load_model(self.catalogue.get(draft_id), self.converted_dir)
            use_float32_on_cpu(draft, self.cpu_float32_max_bytes)
        except Exception as e:
            logger.warning("model %s: draft model %s not loaded: %s", spec.id, draft_id, e)
            return
        target_tok, draft_tok = slot.loaded.tokenizer, draft.tokenizer
        if sorted(draft_tok.eos_token_ids) != sorted(target_tok.eos_token_ids) or (
            draft_tok.vocab != target_tok.vocab if hasattr(target_tok, "vocab") else False
        ):
            logger.warning(
                "model %s: draft model %s has another tokenizer; not used", spec.id, draft_id
            )
            return
        slot.draft, slot.draft_id = draft, draft_id
        slot.num_draft_tokens = int(getattr(config, "num_draft_tokens", 3))
        logger.info(
            "model %s: speculative decoding with %s (%d draft tokens)",
            spec.id,
            draft_id,
            slot.num_draft_tokens,
        )

    def _on_token(self, active: _Active, response: Any, now: float) -> None:
        active.tokens += 1
        if active.tokens == 1:
            active.first_token_at = now
        active.last_token_at = now
        reason = response.finish_reason
        detokenizer = active.detokenizer
        if active.top_logprobs >= 0 and reason != "stop":
            active.logprobs.append(_token_logprobs(active, response))
        if reason == "stop":
            # An end-of-sequence token: it ends the reply but is no part of its text.
            detokenizer.finalize()
        else:
            detokenizer.add_token(response.token)
            if reason == "length":
                detokenizer.finalize()
        # A finished sequence has already left the batch and hands over its KV cache here.
        cache = (response.prompt_cache, response.all_tokens) if reason is not None else None
        text = detokenizer.last_segment
        if text and self._deliver(active, text):
            self._finish(active, "stop_string", cache=cache)
        elif reason is not None:
            self._finish(active, "eos" if reason == "stop" else "max_tokens", cache=cache)

    def _deliver(self, active: _Active, text: str, *, final: bool = False) -> bool:
        """Emit reply text, cutting at a stop string; True when one was found.

        Text that could be the start of a stop string is held back until the next token shows
        whether it is, so no part of a stop string is ever emitted.
        """
        if not active.stop:
            self._emit_text(active, text)
            return False
        pending = active.held + text
        found = [i for i in (pending.find(s) for s in active.stop) if i >= 0]
        if found:
            cut = min(found)
            active.held = ""
            if cut:
                self._emit_text(active, pending[:cut])
            return True
        keep = 0 if final else _partial_stop_length(pending, active.stop)
        out, active.held = pending[: len(pending) - keep], pending[len(pending) - keep :]
        if out:
            self._emit_text(active, out)
        return False

    def _emit_text(self, active: _Active, text: str) -> None:
        """A Delta with `text` and the logprobs of the tokens read since the last one."""
        logprobs = None
        if active.top_logprobs >= 0:
            logprobs, active.logprobs = active.logprobs, []
        active.emit(Delta(active.request.id, text, active.tokens, logprobs))

    def _finish(
        self,
        active: _Active,
        reason: str,
        *,
        error: str = "",
        cache: tuple[Any, list[int]] | None = None,
        in_batch: bool = True,
    ) -> None:
        """End a request: take it out of its batch, keep its KV cache, emit `Finished`.

        `cache` is the (KV cache, tokens) pair of a sequence the generator already let go;
        `in_batch` is False when the generator itself is being thrown away.
        """
        if active.finished:
            return
        active.finished = True
        slot, request_id = active.slot, active.request.id
        slot.active.pop(active.uid, None)
        self._by_id.pop(request_id, None)
        if active in slot.prefilling:
            slot.prefilling.remove(active)
        if slot.solo is active:
            slot.solo = None
        seq, active.seq = active.seq, None
        if active.phase != "batch":
            in_batch = False
            if cache is None and seq is not None and seq.fed and reason != "error":
                # Its own cache (a prefill cut short, the solo path): keep what it holds.
                cache = (seq.cache, list(seq.fed))
        if cache is None and in_batch:
            keep_cache = slot.prompt_cache is not None and reason != "error"
            try:
                removed = slot.generator.remove([active.uid], return_prompt_caches=keep_cache)
                cache = removed.get(active.uid)
            except Exception:
                logger.exception("request %s: could not leave its batch", request_id)

        if reason in ("stopped", "max_tokens", "eos"):
            # The stop strings never matched, so what was held back is reply text after all.
            try:
                active.detokenizer.finalize()
                tail = active.detokenizer.last_segment
                found = (tail or active.held) and self._deliver(active, tail, final=True)
                if found and reason != "stopped":
                    reason = "stop_string"
            except Exception as e:
                logger.exception("request %s: event handler failed", request_id)
                reason, error = "error", f"event handler failed: {_describe(e)}"

        if cache is not None and cache[0] and cache[1] and slot.prompt_cache is not None:
            prompt_cache, tokens = cache
            try:
                slot.prompt_cache.insert(list(tokens), prompt_cache)
            except Exception:
                logger.exception("request %s: could not keep its prompt cache", request_id)

        if active.logprobs and reason != "error":
            # Logprobs of tokens whose text never came out (held back, cut at a stop string).
            _safe_emit(active.emit, Delta(request_id, "", active.tokens, active.logprobs))
            active.logprobs = []
        _safe_emit(
            active.emit,
            Finished(
                request_id,
                reason,
                active.prompt_tokens,
                active.tokens,
                error=error,
                details=self._details(active),
                prompt_cache=active.cache_source,
            ),
        )
        elapsed = active.last_token_at - active.first_token_at
        rate = (active.tokens - 1) / elapsed if active.tokens > 1 and elapsed > 0 else 0.0
        logger.info(
            "request %s: finished %s%s, %d tokens, %.1f tok/s",
            request_id,
            reason,
            f" ({error})" if error else "",
            active.tokens,
            rate,
        )

    # ------------------------------------------------------------------ embeddings

    def _on_embed(self, command: _Embed) -> None:
        import numpy as np

        try:
            embedder = self._embedder_for(command.model_id)
            encoded = embedder.encode(command.texts)
        except _EmbedRefused as e:
            logger.info("embedding request for %s refused: %s", command.model_id, e)
            _safe_reply(command.reply, EmbeddingResult([], 0, error=str(e), kind=e.kind))
            return
        except Exception as e:
            logger.exception("embedding request for %s failed", command.model_id)
            _safe_reply(command.reply, EmbeddingResult([], 0, error=_describe(e), kind="error"))
            return
        job = _EmbedJob(
            command=command,
            embedder=embedder,
            encoded=encoded,
            batches=deque(embedder.plan(encoded, EMBED_BATCH_SIZE)),
            vectors=np.zeros((len(encoded), embedder.dimension), dtype=np.float32),
        )
        if job.batches:
            self._embed_jobs.append(job)
        else:
            self._embed_done(job)

    def _embedder_for(self, model_id: str) -> SentenceEmbedder:
        """The loaded embedding model `model_id`, loaded now if need be (on this thread)."""
        from inference import metrics
        from inference.loader import ModelLoadError, load_embedder

        embedder = self._embedders.get(model_id)
        if embedder is not None:
            self._embedders.move_to_end(model_id)
            return embedder
        try:
            spec = self.catalogue.get(model_id)
        except UnknownModel as e:
            raise _EmbedRefused("unknown_model", str(e)) from e
        if spec.task != "embed":
            raise _EmbedRefused("not_embedding", f"model {model_id!r} is not an embedding model")
        if not spec.is_available:
            raise _EmbedRefused("unavailable", f"model {model_id!r}: its weights are not here")
        while len(self._embedders) >= MAX_LOADED_EMBEDDERS:
            self._unload_embedder(next(iter(self._embedders)))
        began = time.perf_counter()
        try:
            embedder = load_embedder(spec)
        except ModelLoadError as e:
            raise _EmbedRefused("error", str(e)) from e
        metrics.model_loaded(spec.id, time.perf_counter() - began)
        self._embedders[model_id] = embedder
        self._ttl.setdefault(model_id, self._default_keep_alive(spec))
        info = {
            "model_id": spec.id,
            "bytes": _model_bytes(embedder.model),
            "loaded_at": time.time(),
            "expires_at": None,
        }
        self._loaded_info = (*self._loaded_info, info)
        return embedder

    def _unload_embedder(self, model_id: str) -> None:
        import mlx.core as mx

        # A job still running keeps its own reference: unloading only forgets the model (the
        # keep-alive never unloads one in use).
        del self._embedders[model_id]
        self._forget_keep_alive(model_id)
        self._loaded_info = tuple(i for i in self._loaded_info if i["model_id"] != model_id)
        gc.collect()
        mx.clear_cache()
        logger.info("unloaded embedding model %s", model_id)

    def _embed_step(self) -> None:
        """Compute one batch of the embedding request whose turn it is (round robin)."""
        if not self._embed_jobs:
            return
        job = self._embed_jobs.popleft()
        indices = job.batches.popleft()
        try:
            job.vectors[indices] = job.embedder.run([job.encoded[i] for i in indices])
        except Exception as e:
            logger.exception("embedding request for %s failed", job.command.model_id)
            failed = EmbeddingResult([], 0, error=f"embedding failed: {_describe(e)}", kind="error")
            _safe_reply(job.command.reply, failed)
            return
        if job.batches:
            self._embed_jobs.append(job)
        else:
            self._embed_done(job)

    def _embed_done(self, job: _EmbedJob) -> None:
        tokens = sum(len(ids) for ids in job.encoded)
        _safe_reply(job.command.reply, EmbeddingResult(job.vectors.tolist(), tokens))
        logger.info(
            "embedded %d text(s) with %s: %d tokens", len(job.encoded), job.command.model_id, tokens
        )

    # ------------------------------------------------------------------ shutdown

    def _shutdown(self, state: str, reason: str, error: str) -> None:
        """Answer every request and command still here, then drop the models (on this thread)."""
        import mlx.core as mx

        with self._lock:
            self._state = state
        for slot in list(self._slots.values()):
            for active in list(slot.active.values()):
                active.finished = True
                _safe_emit(
                    active.emit,
                    Finished(
                        active.request.id, reason, active.prompt_tokens, active.tokens, error=error
                    ),
                )
            slot.active.clear()
        self._by_id.clear()
        leftovers: list[Any] = [p.submit for p in self._pending]
        self._pending.clear()
        while True:
            try:
                leftovers.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        leftovers.extend(job.command for job in self._embed_jobs)
        self._embed_jobs.clear()
        for command in leftovers:
            if isinstance(command, _Submit):
                _safe_emit(command.emit, Finished(command.request.id, reason, 0, 0, error=error))
            elif isinstance(command, _Load | _UnloadAfter):
                command.error = RuntimeError(f"engine is {state}")
                command.done.set()
            elif isinstance(command, _Warm):
                command.done.set()
            elif isinstance(command, _Embed):
                stopped = EmbeddingResult([], 0, error=error or f"engine is {state}", kind="error")
                _safe_reply(command.reply, stopped)
        self._embedders.clear()
        try:
            for model_id in list(self._slots):
                self._unload(model_id)
        except Exception:
            logger.exception("could not unload the models")
        self._slots.clear()
        self.memory.withdraw()
        gc.collect()
        mx.clear_cache()


# --------------------------------------------------------------------------- helpers


def _prefill_budget(target: float, decode_s: float) -> float:
    """Seconds of prefill a step may add after a decode step of `decode_s`: what the target
    leaves, and at least MIN_PREFILL_SHARE of the target (or of the decode step, when that is
    longer), so a prompt always moves."""
    return max(target - decode_s, max(target, decode_s) * MIN_PREFILL_SHARE)


def _same_offset(active: _Active, order: list[_Active], taken: set[int]) -> list[_Active]:
    """`active` and, when it may prefill as a row of a batch, the other prompts of `order` not
    yet `taken` whose caches hold as many tokens as its own."""
    seq = active.seq
    if seq is None or not _may_prefill_together(seq):
        return [active]
    return [active] + [
        other
        for other in order
        if other is not active
        and id(other) not in taken
        and not other.finished
        and other.seq is not None
        and len(other.seq.fed) == len(seq.fed)
        and _may_prefill_together(other.seq)
    ]


def _may_prefill_together(seq: _Seq) -> bool:
    """Whether a prompt may prefill as a row of a batch: plain KV caches (no rotating,
    quantized or recurrent layers, whose states do not stack) and no draft to keep in step."""
    return seq.draft_cache is None and _plain_caches(seq.cache)


def _keep_alive_or_none(seconds: float | None) -> float | None:
    """A keep-alive in seconds, None for "keep it loaded" (Ollama writes that as negative)."""
    return None if seconds is None or seconds < 0 else float(seconds)


def _template(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    *,
    assistant_prefix: str = "",
    assistant_prefix_tokens: tuple[int, ...] = (),
) -> list[int]:
    if assistant_prefix_tokens:
        return _template(tokenizer, messages, tools) + list(assistant_prefix_tokens)
    if getattr(tokenizer, "has_chat_template", False):
        kwargs: dict[str, Any] = {"tools": tools} if tools else {}
        if assistant_prefix:
            # A reply to continue: the rendered text with the reply so far after the
            # generation prompt, tokenized as one text (as transformers' continue_final_message
            # does), so the boundary tokenizes as it would have in one piece.
            text = tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False, **kwargs
            )
            return list(tokenizer.encode(str(text) + assistant_prefix, add_special_tokens=False))
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, **kwargs))
    # A base model without a template: a plain transcript it can continue.
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return list(tokenizer.encode(text + assistant_prefix))


_PROBE_TOOL = {
    "type": "function",
    "function": {
        "name": "probe_tool_7f3a",
        "description": "",
        "parameters": {"type": "object", "properties": {}},
    },
}


def _template_renders_tools(tokenizer: Any) -> bool:
    """Whether the chat template shows a `tools=` list to the model (many do not)."""
    if not getattr(tokenizer, "has_chat_template", False):
        return False
    probe = [{"role": "user", "content": "hi"}]
    try:
        with_tools = tokenizer.apply_chat_template(
            probe, tools=[_PROBE_TOOL], add_generation_prompt=True, tokenize=False
        )
    except Exception:
        return False
    return "probe_tool_7f3a" in str(with_tools)


def _template_knows(tokenizer: Any, role: str) -> bool:
    template = getattr(tokenizer, "chat_template", None)
    return isinstance(template, str) and (f"'{role}'" in template or f'"{role}"' in template)


# For templates that do not render tools: the Hermes / Qwen convention, which
# inference.parsing reads back and the forced-call grammar writes.
TOOLS_PROMPT = (
    "You may call one or more functions to assist with the user query. The functions are "
    "described in JSON inside <tools></tools>:\n<tools>\n{tools}\n</tools>\n"
    "To call a function, answer with a JSON object holding its name and arguments inside "
    '<tool_call></tool_call> tags:\n<tool_call>\n{{"name": <function-name>, "arguments": '
    "<args-json-object>}}\n</tool_call>"
)


def _template_messages(
    messages: list[dict[str, Any]],
    *,
    tools: list[dict[str, Any]],
    native_tools: bool,
    developer: bool,
) -> list[dict[str, Any]]:
    """Stored messages in the form the chat template takes.

    Assistant tool calls become OpenAI-shaped `tool_calls` (arguments as a value, as templates
    expect) and tool results `tool` messages when the template renders tools; otherwise both
    are written out in the Hermes convention and the tools go into the system message.
    """
    out: list[dict[str, Any]] = []
    for message in messages:
        role = message.get("role", "user")
        content = message.get("content", "")
        if role == "developer" and not developer:
            role = "system"
        calls = message.get("tool_calls") or []
        if role == "assistant" and calls:
            if native_tools:
                out.append(
                    {
                        "role": "assistant",
                        "content": content,
                        "tool_calls": [
                            {
                                "id": call["id"],
                                "type": "function",
                                "function": {
                                    "name": call["name"],
                                    "arguments": _json_value(call.get("arguments", "{}")),
                                },
                            }
                            for call in calls
                        ],
                    }
                )
            else:
                written = "".join(
                    "<tool_call>\n"
                    + json.dumps(
                        {"name": c["name"], "arguments": _json_value(c.get("arguments", "{}"))}
                    )
                    + "\n</tool_call>"
                    for c in calls
                )
                out.append({"role": "assistant", "content": (content + "\n" + written).strip()})
        elif role == "tool":
            if native_tools:
                entry = {"role": "tool", "content": content}
                for key in ("tool_call_id", "name"):
                    if message.get(key):
                        entry[key] = message[key]
                out.append(entry)
            else:
                text = f"<tool_response>\n{content}\n</tool_response>"
                out.append({"role": "user", "content": text})
        else:
            out.append({"role": role, "content": content})
    if tools and not native_tools:
        listed = "\n".join(json.dumps(t) for t in tools)
        prompt = TOOLS_PROMPT.format(tools=listed)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + prompt}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def _json_value(text: Any) -> Any:
    if not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


class _OccurrencePenalty:
    """OpenAI's presence and frequency penalties over the tokens generated so far.

    mlx-lm's own penalties look at the last 20 tokens of the context, prompt included; OpenAI's
    count every token of the reply and none of the prompt. The first call sees the prompt
    (ending with its last token), so what comes after that length is the reply.
    """

    def __init__(self, presence: float, frequency: float) -> None:
        self.presence = presence
        self.frequency = frequency
        self.prompt_length: int | None = None

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        import mlx.core as mx

        if self.prompt_length is None:
            self.prompt_length = int(tokens.shape[0])
            return logits
        reply = tokens[self.prompt_length :]
        counts = mx.zeros((logits.shape[-1],), dtype=logits.dtype).at[reply].add(1)
        penalty = counts * self.frequency + (counts > 0).astype(logits.dtype) * self.presence
        return logits - penalty[None, :]


def _keep_leading_space(detokenizer: Any) -> None:
    """mlx-lm's detokenizers drop the space a reply starts with (right for a chat answer); a
    raw completion continues its prompt, where " Paris" after "The capital is" needs it."""
    if hasattr(detokenizer, "trim_space"):  # SentencePiece
        detokenizer.trim_space = False
    elif hasattr(detokenizer, "_maybe_trim_space"):  # byte-level BPE
        detokenizer._maybe_trim_space = lambda text: text


def _vocab_size(loaded: LoadedModel) -> int:
    """The width of the model's logits (may exceed the tokenizer's vocabulary)."""
    args = getattr(loaded.model, "args", None)
    size = getattr(args, "vocab_size", None)
    return int(size) if size else len(loaded.tokenizer)


def _model_bytes(model: Any) -> int:
    from mlx.utils import tree_flatten

    leaves: Any = tree_flatten(model.parameters())
    return sum(int(value.nbytes) for _, value in leaves)


def _opens_reasoning(slot: _Slot, prompt: list[int], assistant_prefix: str = "") -> bool:
    """Whether the templated prompt ends inside an open reasoning block (`<think>` added by
    the template), so the reply starts as reasoning.

    A continued reply is judged before its prefix: the worker feeds the prefix to its own
    splitter, which must start where the template left the reply."""
    start, end = slot.output.think_start, slot.output.think_end
    if assistant_prefix:
        text = str(slot.loaded.tokenizer.decode(prompt))
        if text.endswith(assistant_prefix):
            text = text[: len(text) - len(assistant_prefix)]
        tail = text[-200:]
    else:
        tail = str(slot.loaded.tokenizer.decode(prompt[-8:]))
    return start in tail and tail.rfind(start) > tail.rfind(end)


def _bytes_to_unicode() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, reversed: each token character to its byte."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


_BYTE_DECODER = _bytes_to_unicode()


def _token_piece(slot: _Slot, token: int) -> tuple[str, list[int]]:
    """A token's own text and bytes (a token may hold part of a UTF-8 character)."""
    piece = slot.token_pieces.get(token)
    if piece is None:
        tokenizer = slot.loaded.tokenizer
        name = tokenizer.convert_ids_to_tokens(token)
        if isinstance(name, str) and name and all(c in _BYTE_DECODER for c in name):
            data = bytes(_BYTE_DECODER[c] for c in name)
        else:
            data = str(tokenizer.decode([token])).encode()
        piece = (data.decode("utf-8", errors="replace"), list(data))
        slot.token_pieces[token] = piece
    return piece


def _token_logprobs(active: _Active, response: Any) -> dict[str, Any]:
    """The sampled token's logprob and, when asked, the most likely tokens' (best first)."""
    import mlx.core as mx
    import numpy as np

    slot, token = active.slot, int(response.token)
    logprobs = response.logprobs
    text, data = _token_piece(slot, token)
    entry: dict[str, Any] = {
        "token": text,
        "bytes": data,
        "logprob": float(logprobs[token].item()),
        "top_logprobs": [],
        # Token ids, for the token trace (inference.provenance); the APIs leave them out.
        "id": token,
        "top_ids": [],
    }
    k = active.top_logprobs
    if k > 0:
        values = np.asarray(logprobs.astype(mx.float32))
        best = np.argpartition(-values, k - 1)[:k]
        best = best[np.argsort(-values[best], kind="stable")]
        for t in best.tolist():
            t_text, t_data = _token_piece(slot, t)
            entry["top_logprobs"].append(
                {"token": t_text, "bytes": t_data, "logprob": float(values[t])}
            )
            entry["top_ids"].append(t)
    return entry


def _partial_stop_length(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that begins some stop string."""
    longest = min(len(text), max(len(s) for s in stops) - 1)
    for n in range(longest, 0, -1):
        tail = text[-n:]
        if any(s.startswith(tail) for s in stops):
            return n
    return 0


def _seeded_sampler(temp: float, top_p: float, min_p: float, top_k: int, seed: int) -> Any:
    """A sampler with its own random key, split every step: same seed, same prompt, same text.

    mlx-lm's own seeding sets the process-wide random state, which is why its generator cannot
    batch seeded requests; a key per request can share a batch with anything.
    """
    import mlx.core as mx
    from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

    filters: list[Callable[[mx.array], mx.array]] = []
    if 0 < top_p < 1.0:
        filters.append(lambda x: apply_top_p(x, top_p))
    if min_p != 0.0:
        filters.append(lambda x: apply_min_p(x, min_p))
    if top_k > 0:
        filters.append(lambda x: apply_top_k(x, top_k))
    inverse_temp = 1.0 / temp
    key = [mx.random.key(seed)]

    def sample(logprobs: mx.array) -> mx.array:
        key[0], step_key = mx.random.split(key[0])
        for apply in filters:
            logprobs = apply(logprobs)
        return mx.random.categorical(logprobs * inverse_temp, key=step_key)

    return sample


def _safe_reply(reply: EmbeddingReply, result: EmbeddingResult) -> None:
    try:
        reply(result)
    except Exception:
        logger.exception("embedding reply handler failed")


def _on_cuda() -> bool:
    import mlx.core as mx

    return (
        mx.default_device() == mx.gpu and bool(getattr(mx, "cuda", None)) and mx.cuda.is_available()
    )


def _plain_caches(cache: list[Any]) -> bool:
    """Whether every layer is mlx-lm's plain KVCache (cut back by moving its offset)."""
    from mlx_lm.models.cache import KVCache

    return all(type(layer) is KVCache for layer in cache)


def _prefer_mlx_attention() -> None:
    """On CUDA, MLX's attention uses cuDNN, which builds a graph for each new pair of query and
    key lengths the first time it meets one: 60-110 ms on an H100, paid by every prompt of a new
    length or at a new cached offset (a lone request's TTFT 73-110 ms against 15 ms once the
    shape was seen; docs/benchmarks.md). MLX's own attention kernels have no such cost and run a
    warm prefill within a few milliseconds of cuDNN's, so they are used unless the environment
    says otherwise. MLX reads the variable once, at the process's first attention call."""
    os.environ.setdefault("MLX_CUDA_USE_CUDNN_SDPA", "0")


def _safe_emit(emit: Emit, event: EngineEvent) -> None:
    try:
        emit(event)
    except Exception:
        logger.exception("event handler failed on %s", type(event).__name__)


def _describe(error: BaseException) -> str:
    return str(error) or type(error).__name__
