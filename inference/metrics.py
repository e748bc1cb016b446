"""Prometheus metrics of generation, in prometheus-client's default registry.

The worker updates them for every generation (browser chats and API requests alike) and the
engine for model loads; the HTTP layer serves them at /metrics. Labels are model ids from the
catalogue's allow-list and finish reasons, so their number stays small.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# Seconds: from a few milliseconds (a cached prompt on a GPU) to minutes (a long prefill).
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_INTER_TOKEN_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5)
_LOAD_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

GENERATION_REQUESTS = Counter(
    "mlxweb_generation_requests", "Generations ended, by finish reason", ["model", "finish_reason"]
)
PROMPT_TOKENS = Counter("mlxweb_prompt_tokens", "Prompt tokens of started generations", ["model"])
CACHED_PROMPT_TOKENS = Counter(
    "mlxweb_cached_prompt_tokens", "Prompt tokens served from the prompt cache", ["model"]
)
PROMPT_CACHE_HITS = Counter(
    "mlxweb_prompt_cache_hits", "Generations that reused a cached prompt prefix", ["model"]
)
COMPLETION_TOKENS = Counter("mlxweb_completion_tokens", "Tokens generated", ["model"])
TTFT_SECONDS = Histogram(
    "mlxweb_ttft_seconds", "Request to first token", ["model"], buckets=_TTFT_BUCKETS
)
INTER_TOKEN_SECONDS = Histogram(
    "mlxweb_inter_token_seconds",
    "Time between tokens of one generation",
    ["model"],
    buckets=_INTER_TOKEN_BUCKETS,
)
QUEUE_DEPTH = Gauge("mlxweb_queue_depth", "Generations waiting for a free stream")
ACTIVE_STREAMS = Gauge("mlxweb_active_streams", "Generations in the engine now")
MODEL_LOADS = Counter("mlxweb_model_loads", "Models loaded into memory", ["model"])
MODEL_LOAD_SECONDS = Histogram(
    "mlxweb_model_load_seconds", "Time to load a model", ["model"], buckets=_LOAD_BUCKETS
)


def model_loaded(model_id: str, seconds: float) -> None:
    MODEL_LOADS.labels(model=model_id).inc()
    MODEL_LOAD_SECONDS.labels(model=model_id).observe(seconds)


def generation_started(model_id: str, *, prompt_tokens: int, cached_tokens: int) -> None:
    PROMPT_TOKENS.labels(model=model_id).inc(prompt_tokens)
    CACHED_PROMPT_TOKENS.labels(model=model_id).inc(cached_tokens)
    if cached_tokens:
        PROMPT_CACHE_HITS.labels(model=model_id).inc()


def tokens_streamed(model_id: str, *, tokens: int, seconds: float) -> None:
    """`tokens` more tokens arrived `seconds` after the previous ones: one observation each."""
    if tokens <= 0:
        return
    histogram = INTER_TOKEN_SECONDS.labels(model=model_id)
    for _ in range(min(tokens, 64)):
        histogram.observe(seconds / tokens)


def generation_finished(
    model_id: str, *, finish_reason: str, completion_tokens: int, ttft: float | None
) -> None:
    GENERATION_REQUESTS.labels(model=model_id, finish_reason=finish_reason).inc()
    COMPLETION_TOKENS.labels(model=model_id).inc(completion_tokens)
    if ttft is not None:
        TTFT_SECONDS.labels(model=model_id).observe(ttft)


EMBEDDING_REQUESTS = Counter(
    "mlxweb_embedding_requests", "Embedding requests answered with vectors", ["model"]
)


def embedding_served(model_id: str) -> None:
    EMBEDDING_REQUESTS.labels(model=model_id).inc()
