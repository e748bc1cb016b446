"""The engine side by side with raw mlx-lm and `mlx_lm.server`, on real model shapes, on any device.

Absolute times only mean something on the GPU (the project's rule), so this bench builds its
models where it runs: mlx-lm llama models of real shapes with random weights, quantized or not,
saved as mlx-lm directories with SmolLM2's tokenizer. No weights have to travel to the device.
For each model, the same prompt, greedy, a fixed max_tokens, in three systems one after another:

- raw mlx-lm: `stream_generate` for one stream, `BatchGenerator` (with per-request detokenizing)
  for N streams;
- our `inference.engine.Engine`, over a `Catalogue` whose models directory holds the built models;
- `mlx_lm.server` in a subprocess, over its OpenAI streaming API.

Every system gets the same batch settings (decode batch `--decode-batch`, prefill batch
`--prefill-batch`), a warm-up of every measured shape first, and `--repeats` timed runs; the
report gives medians, absolute numbers and the ratios ours/raw and ours/server.

Random weights and EOS: the rows of the output projection (the embedding, when tied) for every
special token of the tokenizer are zeroed, so their logits are exactly 0 while the best of ~49k
random logits is positive: greedy decoding never picks them and every run ends on max_tokens.
Runs still count the tokens they really got and the report flags any that ended early.

Vocabulary of the Llama-3-8B shape: the model keeps the real 128256 rows (embedding and output
projection cost what they cost in the real model), but only SmolLM2's 49152 tokens exist in the
tokenizer, so rows 49152 and up of the output projection are zeroed the same way: no id the
tokenizer cannot decode is ever chosen.

Run `.venv/bin/python bench/bench_engine_gpu.py --help`. On the CPU, `--shapes tiny` checks the
whole path in a minute; `docs/benchmarks.md` has the GPU run, its exact commands and reading.
"""

from __future__ import annotations

import argparse
import gc
import http.client
import json
import logging
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

logger = logging.getLogger("bench_engine_gpu")

DEFAULT_GGUF = ROOT / "var/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
TOKENIZER_VOCAB = 49152  # SmolLM2's tokenizer, the only one that travels

_LLAMA_COMMON: dict[str, Any] = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "rms_norm_eps": 1e-5,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": TOKENIZER_VOCAB,
        "tie_word_embeddings": False,
        "rope_theta": 10000.0,
        "max_position_embeddings": 2048,
    },
    "smollm2-135m": {
        "hidden_size": 576,
        "num_hidden_layers": 30,
        "intermediate_size": 1536,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "vocab_size": TOKENIZER_VOCAB,
        "tie_word_embeddings": True,
        "rope_theta": 100000.0,
        "max_position_embeddings": 8192,
    },
    "llama3-8b": {
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "intermediate_size": 14336,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,  # see the module docstring: rows past 49152 are never chosen
        "tie_word_embeddings": False,
        "rope_theta": 500000.0,
        "max_position_embeddings": 8192,
    },
}
FORMATS = ("q4", "q8", "bf16")
# "engine-nocache" is our engine with its prompt-prefix cache off: it shows what the cache's
# fetch (a deep copy and trim of the nearest cached KV) and insert cost a new conversation.
# "engine-fused" carries prefill chunks in decode passes (inference.fused: the CPU's default).
# "engine-wide" lets one step put WIDE_BATCH_TOKENS through the model (max_batch_tokens; the
# config's default is 2048): N prompts arriving together prefill in fewer steps, as raw's
# BatchGenerator prefills them all before it decodes.
SYSTEMS = (
    "raw", "engine", "engine-nocache", "engine-fused", "engine-wide", "server", "spec-agree",
    "spec-random",
)  # fmt: skip
WIDE_BATCH_TOKENS = 8192
# Speculative decoding (one stream, the engine with and without the model's draft): the draft is
# the model's first DRAFT_LAYERS layers. "spec-random": the built model as it is (random layers
# after those: the draft rarely agrees, the cost side). "spec-agree": a copy whose later layers
# write nothing to the residual stream (their output projections zeroed) but still compute, so
# the draft agrees with it: the gain when acceptance is high.
SPEC_SYSTEMS = ("spec-agree", "spec-random")
DRAFT_LAYERS = 4
DEFAULT_SYSTEMS = ("raw", "engine", "server")
GROUP_SIZE = 64
# Warm-ups: one full-length single stream, and this many tokens for each N-stream shape.
WARMUP_BATCH_TOKENS = 16

USER_TEXT = (
    "Summarise the following notes for a colleague who missed the meeting, keeping every "
    "number and every decision. The team compared three ways of serving a small language "
    "model on one machine: a plain generation loop, a continuous-batching engine and an "
    "HTTP server with an OpenAI-compatible API. They measured time to first token, decode "
    "speed for one stream and aggregate throughput for many concurrent streams. "
)


# --------------------------------------------------------------------------- results


@dataclass
class StreamResult:
    """One request: when it started, got its first token and finished, and how many tokens."""

    ttft_s: float
    decode_s: float  # first token to last token
    tokens: int
    finish: str
    details: dict[str, Any] = field(default_factory=dict)  # the engine's Finished.details

    @property
    def decode_tps(self) -> float:
        return (self.tokens - 1) / self.decode_s if self.tokens > 1 and self.decode_s > 0 else 0.0


@dataclass
class BatchResult:
    """N concurrent requests: all their tokens over the time from first submit to last token."""

    streams: list[StreamResult]
    wall_s: float

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.streams)

    @property
    def aggregate_tps(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def median_ttft_s(self) -> float:
        return statistics.median(s.ttft_s for s in self.streams)

    @property
    def early(self) -> int:
        return sum(1 for s in self.streams if s.finish != "length")


@dataclass
class SystemResult:
    """Everything measured for one system on one model."""

    single: list[StreamResult] = field(default_factory=list)
    batches: dict[int, list[BatchResult]] = field(default_factory=dict)
    load_s: float = 0.0
    peak_memory_gb: float = 0.0
    error: str = ""
    skipped: list[str] = field(default_factory=list)
    # Speculative systems: the same target decoded without the draft, one stream.
    plain: list[StreamResult] = field(default_factory=list)

    def ttft_ms(self) -> float | None:
        return statistics.median(r.ttft_s for r in self.single) * 1000 if self.single else None

    def decode_tps(self) -> float | None:
        return statistics.median(r.decode_tps for r in self.single) if self.single else None

    def aggregate_tps(self, n: int) -> float | None:
        runs = self.batches.get(n)
        return statistics.median(r.aggregate_tps for r in runs) if runs else None

    def batch_ttft_ms(self, n: int) -> float | None:
        runs = self.batches.get(n)
        return statistics.median(r.median_ttft_s for r in runs) * 1000 if runs else None

    def early_endings(self) -> int:
        early = sum(1 for r in self.single if r.finish != "length")
        return early + sum(b.early for runs in self.batches.values() for b in runs)


@dataclass
class ModelResult:
    """One built model and its three systems."""

    name: str
    shape: str
    fmt: str
    parameters: int = 0
    size_gb: float = 0.0
    build_s: float = 0.0
    prompt_tokens: int = 0
    logits_check: str = ""
    systems: dict[str, SystemResult] = field(default_factory=dict)


@dataclass
class Settings:
    """The parsed command line, checked."""

    shapes: list[str]
    formats: list[str]
    systems: list[str]
    streams: list[int]
    server_streams: list[int]
    max_tokens: int
    batch_max_tokens: int
    repeats: int
    prompt_words: int
    decode_batch: int
    prefill_batch: int
    work_dir: Path | None
    tokenizer_dir: Path
    output: Path | None
    budget_s: float
    server_start_timeout_s: float
    request_timeout_s: float
    num_draft_tokens: int = 3


class OverBudget(Exception):
    """The run's time budget is spent: what is left is skipped and reported as such."""


# --------------------------------------------------------------------------- prompts


def _messages(nonce: str, words: int) -> list[dict[str, str]]:
    """The bench's conversation; `nonce` leads so no two requests share a cacheable prefix."""
    base = USER_TEXT.split()
    text = " ".join(base[i % len(base)] for i in range(words))
    return [
        {"role": "system", "content": f"[{nonce}] You are a precise assistant."},
        {"role": "user", "content": text},
    ]


def _nonces(count: int) -> list[str]:
    """Random decimal nonces: each digit is one token, so every prompt has the same length.

    (Hex nonces tokenize to 177-182 tokens: each new prompt length can cost a kernel compile
    on CUDA, which showed up as 100 ms outliers in TTFT.)
    """
    return [f"{secrets.randbelow(10**12):012d}" for _ in range(count)]


# --------------------------------------------------------------------------- the models


def ensure_tokenizer(tokenizer_dir: Path) -> Path:
    """SmolLM2's tokenizer as files; built from the GGUF when the folder does not hold them."""
    if (tokenizer_dir / "tokenizer.json").is_file():
        return tokenizer_dir
    if not DEFAULT_GGUF.is_file():
        raise SystemExit(
            f"no tokenizer in {tokenizer_dir} and no {DEFAULT_GGUF} to build one from: "
            "run `.venv/bin/python manage.py fetch_models` first"
        )
    from inference.weights.gguf.tokenizer import read_tokenizer

    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    read_tokenizer(DEFAULT_GGUF).save_pretrained(str(tokenizer_dir))
    logger.info("wrote SmolLM2's tokenizer to %s", tokenizer_dir)
    return tokenizer_dir


def _special_ids(tokenizer_dir: Path) -> list[int]:
    """Ids of every added/special token (EOS among them), read from tokenizer.json."""
    data = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    return sorted({int(t["id"]) for t in data.get("added_tokens", []) if t.get("special", True)})


def build_model(shape: str, fmt: str, tokenizer_dir: Path, out_dir: Path, seed: int = 0) -> int:
    """Write a random-weight llama of `shape` in `fmt` with the tokenizer; return its parameters."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.models.llama import Model, ModelArgs
    from mlx_lm.utils import get_total_parameters, save_config, save_model

    config = dict(_LLAMA_COMMON, **SHAPES[shape])
    mx.random.seed(seed)
    model = Model(ModelArgs.from_dict(config))
    # Cast while still lazy: an 8B model never exists in float32 all at once.
    model.set_dtype(mx.bfloat16)
    mx.eval(model.parameters())

    banned = mx.zeros((config["vocab_size"],), dtype=mx.bool_)
    banned[mx.array(_special_ids(tokenizer_dir))] = True
    if config["vocab_size"] > TOKENIZER_VOCAB:
        banned[TOKENIZER_VOCAB:] = True
    head = model.model.embed_tokens if config["tie_word_embeddings"] else model.lm_head
    head.weight = mx.where(banned[:, None], mx.zeros_like(head.weight), head.weight)
    mx.eval(model.parameters())

    if fmt in ("q4", "q8"):
        bits = 4 if fmt == "q4" else 8
        nn.quantize(model, group_size=GROUP_SIZE, bits=bits)
        config["quantization"] = {"group_size": GROUP_SIZE, "bits": bits, "mode": "affine"}
        mx.eval(model.parameters())
    parameters = int(get_total_parameters(model))

    out_dir.mkdir(parents=True, exist_ok=True)
    save_model(out_dir, model)
    save_config(config, out_dir / "config.json")
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy2(tokenizer_dir / name, out_dir / name)
    del model, head
    gc.collect()
    mx.clear_cache()
    return parameters


def _dir_size_gb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.glob("*.safetensors")) / 1e9


# --------------------------------------------------------------------------- raw mlx-lm


def _peak_gb() -> float:
    import mlx.core as mx

    return float(mx.get_peak_memory()) / 1e9


def _reset_peak() -> None:
    import mlx.core as mx

    mx.reset_peak_memory()


def _free() -> None:
    import mlx.core as mx

    gc.collect()
    mx.clear_cache()


def raw_single(model: Any, tokenizer: Any, max_tokens: int, words: int) -> StreamResult:
    """One stream through `stream_generate`; the chat template is applied inside the clock."""
    from mlx_lm import stream_generate

    started = time.perf_counter()
    prompt = tokenizer.apply_chat_template(
        _messages(_nonces(1)[0], words), add_generation_prompt=True
    )
    first = last = 0.0
    tokens, finish = 0, "none"
    for response in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens):
        now = time.perf_counter()
        if not first:
            first = now
        last = now
        tokens = response.generation_tokens
        if response.finish_reason is not None:
            finish = response.finish_reason
            if finish == "stop":
                tokens -= 1  # the EOS token itself is no part of the reply
    return StreamResult(first - started, last - first, tokens, finish)


def raw_batch(
    model: Any, tokenizer: Any, n: int, max_tokens: int, settings: Settings
) -> BatchResult:
    """N streams through one `BatchGenerator`, each detokenized, as a caller of mlx-lm must."""
    from mlx_lm.generate import BatchGenerator

    generator = BatchGenerator(
        model,
        max_tokens=max_tokens,
        stop_tokens=[[t] for t in sorted(tokenizer.eos_token_ids)],
        completion_batch_size=settings.decode_batch,
        prefill_batch_size=settings.prefill_batch,
    )
    try:
        started = time.perf_counter()
        prompts = [
            list(
                tokenizer.apply_chat_template(
                    _messages(nonce, settings.prompt_words), add_generation_prompt=True
                )
            )
            for nonce in _nonces(n)
        ]
        uids = generator.insert(prompts, max_tokens=[max_tokens] * n)
        state = {
            uid: {
                "first": 0.0,
                "last": 0.0,
                "tokens": 0,
                "finish": "",
                "detok": tokenizer.detokenizer,
            }
            for uid in uids
        }
        remaining = set(uids)
        while remaining:
            _, responses = generator.next()
            now = time.perf_counter()
            for r in responses:
                s = state[r.uid]
                if not s["first"]:
                    s["first"] = now
                s["last"] = now
                if r.finish_reason == "stop":
                    s["detok"].finalize()
                else:
                    s["tokens"] += 1
                    s["detok"].add_token(r.token)
                    if r.finish_reason == "length":
                        s["detok"].finalize()
                _ = s["detok"].last_segment
                if r.finish_reason is not None:
                    s["finish"] = r.finish_reason
                    remaining.discard(r.uid)
        wall = time.perf_counter() - started
    finally:
        generator.close()
    streams = [
        StreamResult(s["first"] - started, s["last"] - s["first"], s["tokens"], s["finish"])
        for s in state.values()
    ]
    return BatchResult(streams, wall)


def _logits_check(model: Any, prompt: list[int]) -> str:
    """Whether random weights give finite logits and a greedy pick the tokenizer can decode."""
    import mlx.core as mx

    logits = model(mx.array(prompt)[None])[0, -1].astype(mx.float32)
    finite = bool(mx.all(mx.isfinite(logits)).item())
    best = cast(int, mx.argmax(logits).item())
    ok = finite and best < TOKENIZER_VOCAB and float(logits[best].item()) > 0
    return (
        f"{'ok' if ok else 'SUSPECT'}: finite={finite}, greedy pick {best}, "
        f"max logit {float(logits[best].item()):.2f}, EOS logit {float(logits[2].item()):.2f}"
    )


def run_raw(
    model_dir: Path, settings: Settings, result: SystemResult, clock: Clock
) -> tuple[int, str]:
    """Measure raw mlx-lm; return the prompt length in tokens and the logits check."""
    from mlx_lm import load

    _free()
    _reset_peak()
    started = time.perf_counter()
    model, tokenizer = load(str(model_dir))[:2]
    result.load_s = time.perf_counter() - started
    prompt = list(
        tokenizer.apply_chat_template(
            _messages("0" * 12, settings.prompt_words), add_generation_prompt=True
        )
    )
    check = _logits_check(model, prompt)
    try:
        clock.check("raw warm-up")
        raw_single(model, tokenizer, settings.max_tokens, settings.prompt_words)
        for _ in range(settings.repeats):
            clock.check("raw single")
            result.single.append(
                raw_single(model, tokenizer, settings.max_tokens, settings.prompt_words)
            )
        for n in settings.streams:
            clock.check(f"raw batch {n}")
            raw_batch(
                model, tokenizer, n, min(WARMUP_BATCH_TOKENS, settings.batch_max_tokens), settings
            )
            runs = result.batches.setdefault(n, [])
            for _ in range(settings.repeats):
                clock.check(f"raw batch {n}")
                runs.append(raw_batch(model, tokenizer, n, settings.batch_max_tokens, settings))
            logger.info("raw   n=%d: %.1f tok/s", n, result.aggregate_tps(n) or 0.0)
    except OverBudget as e:
        result.skipped.append(str(e))
    finally:
        result.peak_memory_gb = _peak_gb()
        del model, tokenizer
        _free()
    return len(prompt), check


# --------------------------------------------------------------------------- our engine


def engine_imports() -> dict[str, Any]:
    """Import what the engine needs and say what else came along (Django, Celery)."""
    import inference.catalogue
    import inference.engine
    import inference.loader
    import inference.schemas  # noqa: F401

    pulled = sorted({m.split(".")[0] for m in sys.modules} & {"django", "celery", "channels"})
    return {"pulled_in": pulled}


class _Collector:
    """Timestamps the engine's events for a set of requests; `done` fires when all finished."""

    def __init__(self, ids: list[str]) -> None:
        self.first: dict[str, float] = {}
        self.first_tokens: dict[str, int] = {}
        self.finished: dict[str, tuple[float, int, str, str]] = {}
        self.details: dict[str, dict[str, Any]] = {}
        self.waiting = set(ids)
        self.done = threading.Event()
        self._lock = threading.Lock()

    def emit(self, event: Any) -> None:
        from inference.engine import Delta, Finished

        now = time.perf_counter()
        with self._lock:
            if isinstance(event, Delta) and event.request_id not in self.first:
                self.first[event.request_id] = now
                self.first_tokens[event.request_id] = event.tokens
            elif isinstance(event, Finished):
                self.finished[event.request_id] = (
                    now,
                    event.completion_tokens,
                    event.finish_reason,
                    event.error,
                )
                self.details[event.request_id] = dict(getattr(event, "details", {}) or {})
                self.waiting.discard(event.request_id)
                if not self.waiting:
                    self.done.set()


def engine_run(
    engine: Any, model_id: str, n: int, max_tokens: int, settings: Settings
) -> BatchResult:
    """N requests submitted back to back; timed from the first submit to the last `Finished`."""
    from inference.engine import GenerationRequest
    from inference.schemas import GenerationParams

    params = GenerationParams(temperature=0.0, max_tokens=max_tokens)
    requests = [
        GenerationRequest(
            id=uuid.uuid4().hex,
            model_id=model_id,
            messages=_messages(nonce, settings.prompt_words),
            params=params,
        )
        for nonce in _nonces(n)
    ]
    collector = _Collector([r.id for r in requests])
    started = time.perf_counter()
    for request in requests:
        engine.submit(request, collector.emit)
    if not collector.done.wait(settings.request_timeout_s):
        raise RuntimeError(f"engine: {len(collector.waiting)} of {n} requests never finished")
    streams = []
    for request in requests:
        end, tokens, reason, error = collector.finished[request.id]
        if reason == "error":
            raise RuntimeError(f"engine: request failed: {error}")
        first = collector.first.get(request.id, end)
        stream = StreamResult(
            first - started,
            end - first,
            tokens,
            _engine_finish(reason),
            collector.details.get(request.id, {}),
        )
        # The first Delta normally carries token 1; if it carried k > 1 (a token that made no
        # text yet), stretch decode_s so that decode_tps is (tokens - k) / (end - first).
        at_first = collector.first_tokens.get(request.id, 1)
        if at_first > 1 and tokens > at_first:
            stream.decode_s = (end - first) * (tokens - 1) / (tokens - at_first)
        streams.append(stream)
    return BatchResult(streams, max(collector.finished[r.id][0] for r in requests) - started)


def _engine_finish(reason: str) -> str:
    return {"max_tokens": "length", "eos": "stop"}.get(reason, reason)


def run_engine(
    model_dir: Path,
    settings: Settings,
    result: SystemResult,
    clock: Clock,
    *,
    prompt_cache: bool = True,
    fuse: bool | None = None,
    max_batch_tokens: int = 2048,
) -> None:
    """Measure `inference.engine.Engine` through a Catalogue over the built models."""
    from inference.catalogue import Catalogue, model_id_for_dir
    from inference.engine import Engine
    from mlxweb.config import Config, ServerConfig

    model_id = model_id_for_dir(model_dir.name)
    config = Config(
        server=ServerConfig(default_model=model_id, models_dir=model_dir.parent), models={}
    )
    catalogue = Catalogue(config, model_dir.parent)
    engine = Engine(
        catalogue=catalogue,
        converted_dir=model_dir.parent / ".converted",
        max_loaded_models=1,
        completion_batch_size=settings.decode_batch,
        prefill_batch_size=settings.prefill_batch,
        max_new_tokens=max(settings.max_tokens, settings.batch_max_tokens),
        prompt_cache_entries=16 if prompt_cache else 0,
        max_batch_tokens=max_batch_tokens,
    )
    engine.fuse_prefill = fuse  # None: the engine's default (fused on the CPU only)
    _free()
    _reset_peak()
    engine.start()
    try:
        started = time.perf_counter()
        engine.load(model_id)
        result.load_s = time.perf_counter() - started
        clock.check("engine warm-up")
        engine_run(engine, model_id, 1, settings.max_tokens, settings)
        for _ in range(settings.repeats):
            clock.check("engine single")
            result.single.append(
                engine_run(engine, model_id, 1, settings.max_tokens, settings).streams[0]
            )
        for n in settings.streams:
            clock.check(f"engine batch {n}")
            engine_run(
                engine, model_id, n, min(WARMUP_BATCH_TOKENS, settings.batch_max_tokens), settings
            )
            runs = result.batches.setdefault(n, [])
            for _ in range(settings.repeats):
                clock.check(f"engine batch {n}")
                runs.append(engine_run(engine, model_id, n, settings.batch_max_tokens, settings))
            logger.info("ours  n=%d: %.1f tok/s", n, result.aggregate_tps(n) or 0.0)
    except OverBudget as e:
        result.skipped.append(str(e))
    finally:
        # Peak memory is process-wide and the engine allocates on its own thread: read it here.
        result.peak_memory_gb = _peak_gb()
        engine.stop(timeout=60)
        _free()


# --------------------------------------------------------------------------- speculative decoding


def _rewrite_layers(src: Path, dest: Path, *, keep: int, truncate: bool) -> None:
    """Copy the model in `src` to `dest`: with only its first `keep` layers (`truncate`), or
    with every later layer's output projections (attention o_proj, MLP down_proj) zeroed, so
    those layers still compute but add nothing to the residual stream."""
    import mlx.core as mx

    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(src, dest)
    config = json.loads((dest / "config.json").read_text())
    if truncate:
        config["num_hidden_layers"] = keep
        (dest / "config.json").write_text(json.dumps(config, indent=2))

    def layer_of(key: str) -> int | None:
        parts = key.split(".")
        return int(parts[2]) if key.startswith("model.layers.") else None

    kept_keys: set[str] = set()
    for file in sorted(dest.glob("*.safetensors")):
        weights = mx.load(str(file))
        assert isinstance(weights, dict)
        out = {}
        for key, value in weights.items():
            layer = layer_of(key)
            if layer is not None and layer >= keep:
                if truncate:
                    continue
                silenced = (".o_proj." in key or ".down_proj." in key) and (
                    key.endswith((".scales", ".biases")) or value.dtype != mx.uint32
                )
                if silenced:
                    value = mx.zeros_like(value)
            out[key] = value
        kept_keys.update(out)
        mx.save_safetensors(str(file), out, metadata={"format": "mlx"})
        del weights, out
        gc.collect()
    index = dest / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {k: v for k, v in data["weight_map"].items() if k in kept_keys}
        index.write_text(json.dumps(data, indent=2))


def run_speculative(
    model_dir: Path, settings: Settings, result: SystemResult, clock: Clock, *, agree: bool
) -> None:
    """One stream through the engine on a target with a draft (its first DRAFT_LAYERS layers):
    `--repeats` runs without the draft (enable_speculative off) and with it, same prompts."""
    from inference.catalogue import Catalogue
    from inference.config import ModelConfig
    from inference.engine import Engine
    from mlxweb.config import Config, ServerConfig

    layers = int(json.loads((model_dir / "config.json").read_text())["num_hidden_layers"])
    keep = min(DRAFT_LAYERS, max(1, layers // 2))
    work = model_dir.parent
    target_id = f"{model_dir.name}-{'agree' if agree else 'random'}"
    draft_id = f"{model_dir.name}-draft"
    target_dir, draft_dir = work / target_id, work / draft_id
    if agree:
        _rewrite_layers(model_dir, target_dir, keep=keep, truncate=False)
    elif not target_dir.exists():
        target_dir.symlink_to(model_dir.resolve(), target_is_directory=True)
    if not draft_dir.exists():
        _rewrite_layers(model_dir, draft_dir, keep=keep, truncate=True)

    def model_config(model_id: str, draft: str | None) -> ModelConfig:
        return ModelConfig.model_validate(
            {
                "id": model_id,
                "name": model_id,
                "source": {"path": model_id},
                "context_length": 8192,
                "draft_model": draft,
                "num_draft_tokens": settings.num_draft_tokens,
            }
        )

    config = Config(
        server=ServerConfig(default_model=target_id, models_dir=work),
        models={
            target_id: model_config(target_id, draft_id),
            draft_id: model_config(draft_id, None),
        },
    )
    try:
        for speculative in (False, True):
            engine = Engine(
                catalogue=Catalogue(config, work),
                converted_dir=work / ".converted",
                max_new_tokens=settings.max_tokens,
                prompt_cache_entries=0,
                enable_speculative=speculative,
            )
            _free()
            _reset_peak()
            engine.start()
            try:
                started = time.perf_counter()
                engine.load(target_id)
                if speculative:
                    result.load_s = time.perf_counter() - started
                clock.check("speculative warm-up")
                engine_run(engine, target_id, 1, settings.max_tokens, settings)
                runs = result.single if speculative else result.plain
                for _ in range(settings.repeats):
                    clock.check("speculative single")
                    runs.append(
                        engine_run(engine, target_id, 1, settings.max_tokens, settings).streams[0]
                    )
            finally:
                if speculative:
                    result.peak_memory_gb = _peak_gb()
                engine.stop(timeout=60)
                _free()
    except OverBudget as e:
        result.skipped.append(str(e))
    finally:
        if agree:
            shutil.rmtree(target_dir, ignore_errors=True)
        elif target_dir.is_symlink():
            target_dir.unlink()


def _spec_rows(model: ModelResult) -> list[str]:
    rows = []
    for key in SPEC_SYSTEMS:
        s = model.systems.get(key)
        if s is None or not s.single:
            continue
        stats = [r.details.get("speculative") or {} for r in s.single]
        rates = [x["acceptance_rate"] for x in stats if "acceptance_rate" in x]
        per_step = [x["tokens_per_step"] for x in stats if "tokens_per_step" in x]
        reported = [x["speedup"] for x in stats if x.get("speedup")]
        plain = statistics.median(r.decode_tps for r in s.plain) if s.plain else None
        spec = s.decode_tps()
        rows.append(
            f"| {key} | {_fmt(statistics.median(rates) if rates else None, 2)} | "
            f"{_fmt(statistics.median(per_step) if per_step else None, 2)} | {_fmt(plain)} | "
            f"{_fmt(spec)} | {_ratio(spec, plain)} | "
            f"{_fmt(statistics.median(reported) if reported else None, 2)} |"
        )
    if not rows:
        return []
    return [
        "",
        f"Speculative decoding, one stream, draft = the first {DRAFT_LAYERS} layers (half of a "
        "smaller model) "
        "(spec-agree: the target's later layers write nothing, so the draft agrees; "
        "spec-random: the model as built, its later layers random):",
        "",
        "| system | acceptance | tokens / step | decode tok/s, no draft | with draft | "
        "speed-up | speed-up the engine reported |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ]


# --------------------------------------------------------------------------- mlx_lm.server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def mlx_lm_server(model_dir: Path, settings: Settings, log_path: Path) -> Iterator[int]:
    """`mlx_lm.server` on `model_dir` in a subprocess, ready for requests; yields its port."""
    port = _free_port()
    command = [
        sys.executable, "-m", "mlx_lm", "server",
        "--model", str(model_dir),
        "--port", str(port),
        "--decode-concurrency", str(settings.decode_batch),
        "--prompt-concurrency", str(settings.prefill_batch),
        "--max-tokens", str(max(settings.max_tokens, settings.batch_max_tokens)),
        "--log-level", "WARNING",
    ]  # fmt: skip
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT))
        try:
            deadline = time.monotonic() + settings.server_start_timeout_s
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"mlx_lm.server exited with {process.returncode}")
                try:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                    conn.request("GET", "/health")
                    if conn.getresponse().status == 200:
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("mlx_lm.server did not answer /health in time")
                time.sleep(0.5)
            yield port
        finally:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def server_request(
    conn: http.client.HTTPConnection,
    max_tokens: int,
    words: int,
    barrier: threading.Barrier | None,
) -> tuple[float, float, float, int, str]:
    """One streaming chat completion; returns (sent, first content, last chunk, tokens, finish)."""
    body = json.dumps(
        {
            "messages": _messages(_nonces(1)[0], words),
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()
    if barrier is not None:
        barrier.wait()
    sent = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"mlx_lm.server answered {response.status}: {response.read()[:200]!r}")
    first = last = 0.0
    tokens, finish = 0, "none"
    while True:
        line = response.readline()
        if not line:
            break
        if not line.startswith(b"data: "):
            continue
        payload = line[6:].strip()
        if payload == b"[DONE]":
            break
        chunk = json.loads(payload)
        now = time.perf_counter()
        for choice in chunk.get("choices") or []:
            if choice.get("delta", {}).get("content"):
                if not first:
                    first = now
                last = now
            if choice.get("finish_reason"):
                finish = choice["finish_reason"]
        if chunk.get("usage"):
            tokens = int(chunk["usage"]["completion_tokens"])
    conn.close()
    return sent, first or last, last, tokens, finish


def server_batch(port: int, n: int, max_tokens: int, settings: Settings) -> BatchResult:
    """N concurrent streaming requests from N threads released together."""
    barrier = threading.Barrier(n + 1)
    # Connect one by one before the start: ThreadingHTTPServer listens with a backlog of 5,
    # and N simultaneous connects overflow it (the kernel then resets some connections).
    conns = []
    for _ in range(n):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=settings.request_timeout_s)
        conn.connect()
        conns.append(conn)
    results: list[tuple[float, float, float, int, str] | BaseException] = [
        RuntimeError("no answer")
    ] * n

    def client(i: int) -> None:
        try:
            results[i] = server_request(conns[i], max_tokens, settings.prompt_words, barrier)
        except BaseException as e:  # reported below, on the main thread
            results[i] = e

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(n)]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join(settings.request_timeout_s)
    streams, ends = [], []
    for item in results:
        if isinstance(item, BaseException):
            raise RuntimeError(f"mlx_lm.server request failed: {item}") from item
        _sent, first, last, tokens, finish = item
        streams.append(StreamResult(first - started, last - first, tokens, finish))
        ends.append(last)
    return BatchResult(streams, max(ends) - started)


def run_server(
    model_dir: Path, settings: Settings, result: SystemResult, clock: Clock, log_path: Path
) -> None:
    """Measure `mlx_lm.server` over its OpenAI streaming API."""
    _free()
    started = time.perf_counter()
    with mlx_lm_server(model_dir, settings, log_path) as port:
        try:
            # The first request loads nothing (--model is loaded at start) but compiles kernels.
            server_batch(port, 1, settings.max_tokens, settings)
            result.load_s = time.perf_counter() - started
            for _ in range(settings.repeats):
                clock.check("server single")
                result.single.append(
                    server_batch(port, 1, settings.max_tokens, settings).streams[0]
                )
            for n in settings.server_streams:
                clock.check(f"server batch {n}")
                server_batch(port, n, min(WARMUP_BATCH_TOKENS, settings.batch_max_tokens), settings)
                runs = result.batches.setdefault(n, [])
                for _ in range(settings.repeats):
                    clock.check(f"server batch {n}")
                    runs.append(server_batch(port, n, settings.batch_max_tokens, settings))
                logger.info("server n=%d: %.1f tok/s", n, result.aggregate_tps(n) or 0.0)
        except OverBudget as e:
            result.skipped.append(str(e))


# --------------------------------------------------------------------------- the run


class Clock:
    """The run's time budget (0: none)."""

    def __init__(self, budget_s: float) -> None:
        self.started = time.monotonic()
        self.budget_s = budget_s

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def check(self, what: str) -> None:
        if self.budget_s and self.elapsed() > self.budget_s:
            raise OverBudget(f"{what} and after: skipped, {self.budget_s:.0f}s budget spent")


def device_facts() -> dict[str, Any]:
    """The device MLX runs on and the versions in use."""
    import mlx.core as mx

    facts: dict[str, Any] = {"device": str(mx.default_device()), "python": sys.version.split()[0]}
    from importlib.metadata import PackageNotFoundError, version

    for package in ("mlx", "mlx-cuda-13", "mlx-cpu", "mlx-lm", "transformers", "pydantic"):
        with suppress(PackageNotFoundError):
            facts[package] = version(package)
    try:
        info = mx.device_info()
        facts["device_name"] = str(info.get("device_name", ""))
        facts["memory_gb"] = round(float(info.get("memory_size", 0)) / 2**30, 1)
    except Exception:  # older MLX or a backend without it: the name is only for the report
        pass
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                 "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20, check=False,
            )  # fmt: skip
            facts["nvidia_smi"] = out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return facts


def run(
    settings: Settings, write: Callable[[list[ModelResult], dict[str, Any]], None]
) -> tuple[list[ModelResult], dict[str, Any]]:
    """Build each model and measure each system on it; `write` is called after every phase."""
    clock = Clock(settings.budget_s)
    facts = device_facts()
    facts["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    if any(s.startswith("engine") for s in settings.systems):
        facts["engine_imports"] = engine_imports()
    tokenizer_dir = ensure_tokenizer(settings.tokenizer_dir)
    results: list[ModelResult] = []
    work = settings.work_dir or Path(tempfile.mkdtemp(prefix="bench-engine-gpu-"))
    models_dir = work / "models"
    models_dir.mkdir(parents=True, exist_ok=True)
    try:
        for shape in settings.shapes:
            for fmt in settings.formats:
                name = f"{shape}-{fmt}"
                model = ModelResult(name=name, shape=shape, fmt=fmt)
                results.append(model)
                # One model in the catalogue's directory at a time: the others are not needed.
                for old in models_dir.iterdir():
                    shutil.rmtree(old, ignore_errors=True)
                model_dir = models_dir / name
                try:
                    clock.check(f"{name}")
                except OverBudget as e:
                    model.systems["raw"] = SystemResult(skipped=[str(e)])
                    continue
                started = time.perf_counter()
                model.parameters = build_model(shape, fmt, tokenizer_dir, model_dir)
                model.build_s = time.perf_counter() - started
                model.size_gb = _dir_size_gb(model_dir)
                logger.info("built %s: %.2f GB in %.1fs", name, model.size_gb, model.build_s)
                for system in settings.systems:
                    outcome = model.systems.setdefault(system, SystemResult())
                    logger.info("%s: %s", name, system)
                    try:
                        clock.check(f"{name} {system}")
                        if system == "raw":
                            model.prompt_tokens, model.logits_check = run_raw(
                                model_dir, settings, outcome, clock
                            )
                        elif system in SPEC_SYSTEMS:
                            run_speculative(
                                model_dir,
                                settings,
                                outcome,
                                clock,
                                agree=system == "spec-agree",
                            )
                        elif system.startswith("engine"):
                            run_engine(
                                model_dir,
                                settings,
                                outcome,
                                clock,
                                prompt_cache=system != "engine-nocache",
                                fuse=True if system == "engine-fused" else None,
                                max_batch_tokens=(
                                    WIDE_BATCH_TOKENS if system == "engine-wide" else 2048
                                ),
                            )
                        else:
                            run_server(
                                model_dir, settings, outcome, clock, work / f"server-{name}.log"
                            )
                    except OverBudget as e:
                        outcome.skipped.append(str(e))
                    except Exception as e:
                        logger.exception("%s %s failed", name, system)
                        outcome.error = f"{type(e).__name__}: {e}"
                        log = work / f"server-{name}.log"
                        if system == "server" and log.is_file():
                            outcome.error += " | log: " + log.read_text(errors="replace")[-800:]
                    write(results, facts)
    finally:
        facts["elapsed_s"] = round(clock.elapsed(), 1)
        if settings.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    return results, facts


# --------------------------------------------------------------------------- the report


def _fmt(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def _ratio(ours: float | None, other: float | None) -> str:
    if ours is None or other is None or other == 0:
        return "—"
    return f"{ours / other:.2f}"


def render(results: list[ModelResult], facts: dict[str, Any], settings: Settings) -> str:
    """The markdown report: setup, one table per model, ratios, early endings, skips, errors."""
    lines = [
        "### Setup",
        "",
        f"- device: {facts.get('device')} {facts.get('device_name', '')}".rstrip()
        + (f" ({facts['nvidia_smi']})" if facts.get("nvidia_smi") else ""),
        "- versions: "
        + ", ".join(
            f"{k} {facts[k]}"
            for k in ("python", "mlx", "mlx-cuda-13", "mlx-cpu", "mlx-lm", "transformers")
            if k in facts
        ),
        f"- command: `{facts.get('command', '')}`",
        f"- greedy; 1 stream: max_tokens {settings.max_tokens}; N streams: max_tokens "
        f"{settings.batch_max_tokens} each; prompt: system + {settings.prompt_words}-word user "
        "message, a unique nonce first in every request (no prompt-cache hits); "
        f"decode batch {settings.decode_batch}, prefill batch {settings.prefill_batch} "
        "in all three; "
        f"medians of {settings.repeats} runs after a warm-up (a full-length single stream, "
        f"{WARMUP_BATCH_TOKENS} tokens of each N)",
        "- TTFT: request to first token (raw: chat template + prefill; engine: submit to first "
        "`Delta`; server: HTTP request to first content chunk). Decode: (tokens - 1) / (first to "
        "last token). Aggregate: all tokens / (first submit to last token).",
    ]
    imports = facts.get("engine_imports")
    if imports:
        lines.append(
            f"- engine imports pulled in: {', '.join(imports['pulled_in']) or 'nothing else'}"
        )
    lines.append(f"- elapsed: {facts.get('elapsed_s', '…')} s")
    lines.append("")
    for model in results:
        n_values = sorted({n for s in model.systems.values() for n in s.batches})
        lines += [
            f"### {model.name}",
            "",
            f"{model.parameters / 1e6:,.0f}M parameters, {model.size_gb:.2f} GB of weights, "
            f"prompt {model.prompt_tokens} tokens, built in {model.build_s:.0f} s. "
            f"Random-weight logits: {model.logits_check or 'not checked'}.",
            "",
            "| system | load s | peak GB | TTFT ms | decode tok/s (1 stream) | "
            + " | ".join(f"aggregate tok/s, {n}" for n in n_values)
            + " | "
            + " | ".join(f"TTFT ms, {n}" for n in n_values)
            + " |",
            "|---" * (5 + 2 * len(n_values)) + "|",
        ]
        labels = {
            "raw": "raw mlx-lm",
            "engine": "mlxweb Engine",
            "engine-nocache": "mlxweb Engine, no prompt cache",
            "engine-fused": "mlxweb Engine, chunks fused",
            "engine-wide": f"mlxweb Engine, max_batch_tokens {WIDE_BATCH_TOKENS}",
            "server": "mlx_lm.server",
            "spec-agree": "mlxweb Engine + draft (agreeing)",
            "spec-random": "mlxweb Engine + draft (random)",
        }
        for key in SYSTEMS:
            s = model.systems.get(key)
            if s is None or key in SPEC_SYSTEMS:
                continue
            peak = _fmt(s.peak_memory_gb, 2) if key != "server" else "—"
            lines.append(
                f"| {labels[key]} | {_fmt(s.load_s)} | {peak} | {_fmt(s.ttft_ms())} | "
                f"{_fmt(s.decode_tps())} | "
                + " | ".join(_fmt(s.aggregate_tps(n)) for n in n_values)
                + " | "
                + " | ".join(_fmt(s.batch_ttft_ms(n)) for n in n_values)
                + " |"
            )
        ours = model.systems.get("engine")
        for key in ("raw", "server"):
            other = model.systems.get(key)
            if ours is None or other is None:
                continue
            lines.append(
                f"| ours / {labels[key]} | | | {_ratio(ours.ttft_ms(), other.ttft_ms())} | "
                f"{_ratio(ours.decode_tps(), other.decode_tps())} | "
                + " | ".join(
                    _ratio(ours.aggregate_tps(n), other.aggregate_tps(n)) for n in n_values
                )
                + " | "
                + " | ".join(
                    _ratio(ours.batch_ttft_ms(n), other.batch_ttft_ms(n)) for n in n_values
                )
                + " |"
            )
        lines += _spec_rows(model)
        lines.append("")
        for key in SYSTEMS:
            s = model.systems.get(key)
            if s is None:
                continue
            parts = _ttft_parts(s)
            if parts:
                lines.append(f"- {labels[key]}: {parts}")
            if s.early_endings():
                lines.append(
                    f"- {labels[key]}: {s.early_endings()} request(s) ended before "
                    "max_tokens (counted as they are)"
                )
            for skip in s.skipped:
                lines.append(f"- {labels[key]}: {skip}")
            if s.error:
                lines.append(f"- {labels[key]}: ERROR {s.error}")
        lines.append("")
    return "\n".join(lines)


def _ttft_parts(s: SystemResult) -> str:
    """Where the engine's time to first token went (medians of its Finished.details): alone,
    and at each N the prompts' prefill rows."""
    alone = [r.details["ttft_ms"] for r in s.single if "ttft_ms" in r.details]
    said = []
    if alone:
        said.append(
            "TTFT alone = "
            + " + ".join(
                f"{part} {statistics.median(t[part] for t in alone):.1f}"
                for part in ("wait", "admit", "prefill")
            )
            + " ms (wait, template and cache lookup, prefill in "
            + f"{statistics.median(r.details.get('prefill_chunks', 0) for r in s.single):.0f}"
            + " chunks)"
        )
    for n, runs in sorted(s.batches.items()):
        streams = [x for run in runs for x in run.streams if "ttft_ms" in x.details]
        if streams:
            said.append(
                f"at {n}: prefill rows median "
                f"{statistics.median(x.details.get('prefill_rows', 1) for x in streams):.0f}, "
                f"wait {statistics.median(x.details['ttft_ms']['wait'] for x in streams):.0f} ms, "
                f"prefill {statistics.median(x.details['ttft_ms']['prefill'] for x in streams):.0f}"
                " ms"
            )
    return "; ".join(said)


def _to_json(results: list[ModelResult], facts: dict[str, Any]) -> str:
    def system(s: SystemResult) -> dict[str, Any]:
        return {
            "single": [asdict(r) for r in s.single],
            "batches": {
                str(n): [
                    {"wall_s": b.wall_s, "streams": [asdict(x) for x in b.streams]} for b in runs
                ]
                for n, runs in s.batches.items()
            },
            "load_s": s.load_s,
            "peak_memory_gb": s.peak_memory_gb,
            "error": s.error,
            "skipped": s.skipped,
        }

    return json.dumps(
        {
            "facts": facts,
            "models": [
                {
                    "name": m.name,
                    "parameters": m.parameters,
                    "size_gb": m.size_gb,
                    "build_s": m.build_s,
                    "prompt_tokens": m.prompt_tokens,
                    "logits_check": m.logits_check,
                    "systems": {k: system(v) for k, v in m.systems.items()},
                }
                for m in results
            ],
        },
        indent=1,
    )


# --------------------------------------------------------------------------- command line


def _positive_list(value: str) -> list[int]:
    try:
        numbers = [int(v) for v in value.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of integers: {value!r}"
        ) from e
    if not numbers or any(n < 1 or n > 1024 for n in numbers):
        raise argparse.ArgumentTypeError("each value must be 1..1024")
    return numbers


def _choices_list(allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(value: str) -> list[str]:
        items = [v.strip() for v in value.split(",") if v.strip()]
        unknown = [v for v in items if v not in allowed]
        if not items or unknown:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(allowed)} (got {value!r})")
        return list(dict.fromkeys(items))

    return parse


def _bounded(low: int, high: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"not an integer: {value!r}") from e
        if not low <= number <= high:
            raise argparse.ArgumentTypeError(f"must be {low}..{high}")
        return number

    return parse


def parse_args(argv: list[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(
        description="Engine vs raw mlx-lm vs mlx_lm.server on random-weight models of real shapes.",
    )
    parser.add_argument(
        "--shapes",
        type=_choices_list(tuple(SHAPES)),
        default=["smollm2-135m", "llama3-8b"],
        help=f"comma-separated, of {', '.join(SHAPES)} (default: smollm2-135m,llama3-8b)",
    )
    parser.add_argument(
        "--formats",
        type=_choices_list(FORMATS),
        default=["q4"],
        help="weights: q4 / q8 (affine, group 64) or bf16 (default: q4)",
    )
    parser.add_argument(
        "--systems",
        type=_choices_list(SYSTEMS),
        default=list(DEFAULT_SYSTEMS),
        help=f"which to measure, of {', '.join(SYSTEMS)} (default: raw,engine,server)",
    )
    parser.add_argument(
        "--streams",
        type=_positive_list,
        default=[8, 32, 64],
        help="concurrent streams for raw and engine (default: 8,32,64)",
    )
    parser.add_argument(
        "--server-streams",
        type=_positive_list,
        default=[8, 32],
        help="concurrent requests for mlx_lm.server (default: 8,32)",
    )
    parser.add_argument(
        "--max-tokens",
        type=_bounded(2, 4096),
        default=128,
        help="tokens of a one-stream run (default: 128)",
    )
    parser.add_argument(
        "--batch-max-tokens",
        type=_bounded(2, 4096),
        default=64,
        help="tokens of each stream of an N-stream run (default: 64)",
    )
    parser.add_argument(
        "--repeats", type=_bounded(1, 20), default=3, help="timed runs of each (default: 3)"
    )
    parser.add_argument(
        "--prompt-words",
        type=_bounded(1, 4000),
        default=120,
        help="words in the user message (default: 120)",
    )
    parser.add_argument(
        "--num-draft-tokens",
        type=_bounded(1, 16),
        default=3,
        help="draft tokens per step of the spec-agree / spec-random systems (default: 3)",
    )
    parser.add_argument(
        "--decode-batch",
        type=_bounded(1, 1024),
        default=64,
        help="completion batch size, the same in all three systems (default: 64)",
    )
    parser.add_argument(
        "--prefill-batch",
        type=_bounded(1, 256),
        default=8,
        help="prefill batch size, the same in all three systems (default: 8)",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="where models are built (default: a temporary directory, removed)",
    )
    parser.add_argument(
        "--tokenizer-dir",
        type=Path,
        default=ROOT / ".bench/tokenizer",
        help="SmolLM2's tokenizer files; built from the GGUF if missing "
        "(default: .bench/tokenizer)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="write the markdown report here (and FILE.json with every run)",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=0.0,
        help="skip what would start after this many seconds (default: 0, none)",
    )
    parser.add_argument("--server-start-timeout-s", type=float, default=600.0)
    parser.add_argument("--request-timeout-s", type=float, default=600.0)
    args = parser.parse_args(argv)
    if args.budget_s < 0:
        parser.error("--budget-s must be >= 0")
    if args.decode_batch < max(args.streams):
        logger.warning(
            "--decode-batch %d < %d streams: the rest queue", args.decode_batch, max(args.streams)
        )
    if args.output is not None and not args.output.parent.is_dir():
        parser.error(f"--output: no directory {args.output.parent}")
    return Settings(
        shapes=args.shapes,
        formats=args.formats,
        systems=args.systems,
        streams=args.streams,
        server_streams=args.server_streams,
        max_tokens=args.max_tokens,
        batch_max_tokens=args.batch_max_tokens,
        repeats=args.repeats,
        prompt_words=args.prompt_words,
        decode_batch=args.decode_batch,
        prefill_batch=args.prefill_batch,
        work_dir=args.work_dir,
        tokenizer_dir=args.tokenizer_dir,
        output=args.output,
        budget_s=args.budget_s,
        server_start_timeout_s=args.server_start_timeout_s,
        request_timeout_s=args.request_timeout_s,
        num_draft_tokens=args.num_draft_tokens,
    )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    # The engine logs one line per request: too many for a bench.
    logging.getLogger("inference").setLevel(logging.WARNING)
    settings = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    def write(results: list[ModelResult], facts: dict[str, Any]) -> None:
        if settings.output is None:
            return
        settings.output.write_text(render(results, facts, settings) + "\n")
        settings.output.with_suffix(".json").write_text(_to_json(results, facts))

    results, facts = run(settings, write)
    write(results, facts)
    sys.stdout.write(render(results, facts, settings) + "\n")
    return 1 if any(s.error for m in results for s in m.systems.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
