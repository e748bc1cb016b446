"""The engine's KV caches between requests: kept compact in memory, persisted to disk.

A finished request hands the engine its KV cache and the tokens it covers (prompt and reply).
`PromptCacheStore` keeps those of one loaded model, least recently used first, bounded by count
and bytes, so that the next turn of a conversation prefills only its new tokens. What it keeps
is compact: the extracted cache is sliced to its tokens, copied and evaluated at insert. An
unevaluated extract is a lazy slice of the running batch's whole KV buffer, so it would keep
that buffer (every other sequence's keys and values) alive until it is used, if ever.
With `kv_bits` the kept caches are also quantized (mlx-lm's `QuantizedKVCache`), a quarter
(4-bit) to about half (8-bit) of float16's bytes, and dequantized when reused: mlx-lm's
`BatchGenerator` cannot batch quantized caches, so the running batch always holds full precision.

An entry that leaves memory (evicted, its model unloaded, the engine stopped) is written to
`DiskKVStore`: one safetensors file per entry (mlx-lm's `save_prompt_cache`), holding the exact
tokens it covers and the key of the model it belongs to (model id, weights identity, chat
template hash, dtype, cache format), within a byte budget (least recently used files go first).
A request whose prompt extends a file's tokens further than anything in memory loads it; a
conversation being opened loads its file ahead of its next turn (`PromptCacheStore.warm`). A
file is used only when its key and token prefix match, checked against the file itself.

Everything here runs on the engine thread (it owns MLX); nothing is thread-safe on its own.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import hashlib
import json
import logging
import os
import struct
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from inference.catalogue import ModelSpec
    from inference.loader import LoadedModel

logger = logging.getLogger(__name__)

# Written into every cache file; a file of another format version is never read.
FORMAT_VERSION = "1"
# A safetensors header bigger than this is not one of ours (8,192 tokens take ~44 KB).
MAX_HEADER_BYTES = 16 * 1024 * 1024
KV_BITS = (4, 8)
# A file is read for a prompt only if it gives at least this many of its tokens: less (another
# conversation sharing only the default system prompt, say) is cheaper to prefill than to load.
MIN_DISK_REUSE = 128
KV_GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class KVCacheSettings:
    """How the engine keeps KV caches: in memory per model, quantized or not, and on disk.

    `max_kv_size` (a rotating cache: each sequence keeps its first 4 and its last
    `max_kv_size - 4` tokens' keys and values) and `kv_bits` are the server's defaults; a
    model's config may set its own.
    """

    max_entries: int = 16
    max_bytes: int = 2**31
    kv_bits: int | None = None
    kv_group_size: int = 64
    max_kv_size: int | None = None
    # None: nothing is written to disk.
    persist_dir: Path | None = None
    persist_max_bytes: int = 4 * 2**30

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0 and self.max_bytes > 0

    def for_model(self, spec: ModelSpec) -> KVCacheSettings:
        """These settings with the model's own `kv_bits` / `kv_group_size` / `max_kv_size`."""
        from dataclasses import replace

        changes: dict[str, Any] = {}
        for name in ("kv_bits", "kv_group_size", "max_kv_size"):
            value = getattr(spec, name, None)
            if value is not None:
                changes[name] = value
        merged = replace(self, **changes) if changes else self
        if merged.kv_bits is not None and merged.max_kv_size is not None:
            # mlx-lm cannot quantize a rotating cache (RotatingKVCache.to_quantized raises).
            logger.warning(
                "model %s: kv_bits is ignored with max_kv_size (rotating caches are not quantized)",
                spec.id,
            )
            merged = replace(merged, kv_bits=None)
        return merged

    @property
    def format(self) -> str:
        """What the kept caches look like; part of the disk key."""
        bits = f"q{self.kv_bits}g{self.kv_group_size}" if self.kv_bits else "full"
        rotating = f"rot{self.max_kv_size}" if self.max_kv_size else "all"
        return f"{bits}-{rotating}"


# --------------------------------------------------------------------------- keys


def weights_identity(spec: ModelSpec) -> str:
    """What changes when the model's weights change: the hub revision, or the files' sizes and
    modification times."""
    source = spec.local_path()
    if source is None:
        return "missing"
    if spec.kind == "hub":
        return f"hub:{spec.hub_repo}@{source.name}"  # the snapshot folder is the commit
    if source.is_file():
        files = [source]
    else:
        files = sorted(
            p for p in source.iterdir() if p.suffix in (".safetensors", ".json") and p.is_file()
        )
    adapter = getattr(spec, "adapter_path", None)  # a LoRA adapter on top of the weights
    if adapter is not None and Path(adapter).is_dir():
        files += sorted(p for p in Path(adapter).iterdir() if p.is_file())
    parts = []
    for path in files:
        stat = path.stat()
        parts.append(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}")
    return "|".join(parts)


def template_hash(tokenizer: Any) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str):
        template = "" if template is None else json.dumps(template, sort_keys=True, default=str)
    return hashlib.sha256(template.encode()).hexdigest()[:16]


def _float_dtype(model: Any) -> str:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    leaves: Any = tree_flatten(model.parameters())
    for _, value in leaves:
        if mx.issubdtype(value.dtype, mx.floating):
            return str(value.dtype)
    return "unknown"


def model_cache_key(loaded: LoadedModel, settings: KVCacheSettings) -> str:
    """The key a model's caches are filed under: a cache is valid only for the same model id,
    weights, chat template, compute dtype and cache format."""
    parts = [
        loaded.spec.id,
        weights_identity(loaded.spec),
        template_hash(loaded.tokenizer),
        _float_dtype(loaded.model),
        settings.format,
    ]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


# --------------------------------------------------------------------------- cache arrays


def new_cache(model: Any, settings: KVCacheSettings) -> list[Any] | None:
    """A fresh cache for a request with nothing cached: rotating when `max_kv_size` is set
    (mlx-lm's own `max_kv_size` is ignored by models that make their own cache, llama among
    them), else None (the generator makes the model's own)."""
    if not settings.max_kv_size:
        return None
    from mlx_lm.models.cache import KVCache, RotatingKVCache, make_prompt_cache

    caches = make_prompt_cache(model)
    if not all(type(c) is KVCache for c in caches):
        return None  # sliding-window or recurrent layers: keep the model's own design
    return [RotatingKVCache(max_size=settings.max_kv_size, keep=4) for _ in caches]


def compact(cache: list[Any], settings: KVCacheSettings) -> list[Any]:
    """The cache as it should be kept: its own arrays (sliced to its tokens, contiguous,
    quantized with `kv_bits`), evaluated now so that nothing refers to the batch's buffers.

    A head size that `kv_group_size` does not divide (MLX quantizes groups of 32, 64 or 128
    values) stays in full precision."""
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache, QuantizedKVCache

    kept: list[Any] = []
    layer: Any
    for layer in cache:
        if type(layer) is KVCache and layer.keys is not None:
            fresh: Any = KVCache()
            keys: Any = layer.keys
            values: Any = layer.values
            fresh.keys = mx.contiguous(keys[..., : layer.offset, :])
            fresh.values = mx.contiguous(values[..., : layer.offset, :])
            fresh.offset = layer.offset
            group = settings.kv_group_size
            if settings.kv_bits and keys.shape[-1] % group == 0 and values.shape[-1] % group == 0:
                quantized: Any = QuantizedKVCache(
                    group_size=settings.kv_group_size, bits=settings.kv_bits
                )
                quantized.offset = fresh.offset
                quantized.keys = mx.quantize(
                    fresh.keys, group_size=settings.kv_group_size, bits=settings.kv_bits
                )
                quantized.values = mx.quantize(
                    fresh.values, group_size=settings.kv_group_size, bits=settings.kv_bits
                )
                kept.append(quantized)
            else:
                kept.append(fresh)
        else:
            kept.append(_copied(layer))
    mx.eval([c.state for c in kept])
    return kept


def _copied(layer: Any) -> Any:
    """A cache object of its own over the same (immutable) arrays: trimming or extending it
    leaves the kept one as it is. `mx.array(a)` shares `a`'s data without copying it, and
    an update of the new array writes a new buffer."""
    import mlx.core as mx
    from mlx.utils import tree_map

    fresh = copy.copy(layer)
    fresh.state = tree_map(lambda a: mx.array(a) if isinstance(a, mx.array) else a, layer.state)
    return fresh


def for_use(kept: list[Any]) -> list[Any]:
    """A copy of a kept cache to hand to the generator (quantized layers dequantized: the
    batch runs in full precision)."""
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache, QuantizedKVCache

    out: list[Any] = []
    for layer in kept:
        if isinstance(layer, QuantizedKVCache) and layer.keys is not None:
            fresh = KVCache()
            n = layer.offset
            fresh.keys = mx.dequantize(
                *(part[..., :n, :] for part in layer.keys),
                group_size=layer.group_size,
                bits=layer.bits,
            )
            fresh.values = mx.dequantize(
                *(part[..., :n, :] for part in layer.values),
                group_size=layer.group_size,
                bits=layer.bits,
            )
            fresh.offset = n
            out.append(fresh)
        else:
            out.append(_copied(layer))
    return out


def _nbytes(cache: list[Any]) -> int:
    return sum(int(c.nbytes) for c in cache)


def _trimmable(cache: list[Any]) -> bool:
    from mlx_lm.models.cache import can_trim_prompt_cache

    return bool(cache) and can_trim_prompt_cache(cache)


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n


def _reuse(tokens: np.ndarray, trimmable: bool, prompt: np.ndarray) -> int:
    """How many of `prompt`'s tokens a cache over `tokens` can give (0: none)."""
    common = _common_prefix(tokens, prompt)
    if common == 0:
        return 0
    if common == len(prompt):
        # The whole prompt is cached, but its last token must still go through the model to
        # give the first logits: keep one token fewer (a trim).
        return common - 1 if trimmable else 0
    if common < len(tokens) and not trimmable:
        return 0  # a cache that went past the common prefix and cannot be cut back
    return common


def _as_tokens(tokens: Sequence[int] | np.ndarray) -> np.ndarray:
    return np.asarray(tokens, dtype=np.int64).reshape(-1)


# --------------------------------------------------------------------------- disk


@dataclass(eq=False)
class _DiskRecord:
    path: Path
    model_key: str
    tokens: np.ndarray
    trimmable: bool
    size: int
    last_used: float


class DiskKVStore:
    """KV caches on disk, one safetensors file each, under `folder`, within `max_bytes`.

    The index (each file's key and tokens, from the files' headers) is read on first use, so
    a new engine on the same folder finds what an earlier one left.
    """

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder = Path(folder)
        self.max_bytes = max_bytes
        self._index: dict[Path, _DiskRecord] | None = None

    # -- index

    def _records(self) -> dict[Path, _DiskRecord]:
        if self._index is None:
            self._index = {}
            if self.folder.is_dir():
                for path in self.folder.rglob("*.safetensors"):
                    if path.name.endswith(".tmp.safetensors"):
                        path.unlink(missing_ok=True)  # a write that never finished
                        continue
                    record = self._read_record(path)
                    if record is not None:
                        self._index[path] = record
            self._enforce_budget()
        return self._index

    def _read_record(self, path: Path) -> _DiskRecord | None:
        try:
            meta = _read_metadata(path)
            if meta.get("0.mlxweb_kv") != FORMAT_VERSION:
                raise ValueError("not an mlxweb KV cache file")
            tokens = np.frombuffer(base64.b64decode(meta["0.tokens"]), dtype="<i4").astype(np.int64)
            if len(tokens) != int(meta["0.n_tokens"]) or not len(tokens):
                raise ValueError("token count does not match")
            stat = path.stat()
            return _DiskRecord(
                path=path,
                model_key=meta["0.model_key"],
                tokens=tokens,
                trimmable=meta.get("0.trimmable") == "1",
                size=stat.st_size,
                last_used=stat.st_mtime,
            )
        except Exception as e:
            logger.warning("KV cache file %s is unreadable, removed: %s", path, e)
            path.unlink(missing_ok=True)
            return None

    def records(self, model_key: str) -> list[_DiskRecord]:
        return [r for r in self._records().values() if r.model_key == model_key]

    @property
    def total_bytes(self) -> int:
        return sum(r.size for r in self._records().values())

    def best(self, model_key: str, prompt: np.ndarray) -> tuple[int, _DiskRecord | None]:
        """The file giving most of `prompt` (tokens reused, record), if it gives at least
        `MIN_DISK_REUSE` tokens."""
        found: tuple[int, _DiskRecord | None] = (0, None)
        for record in self.records(model_key):
            reuse = _reuse(record.tokens, record.trimmable, prompt)
            if reuse >= MIN_DISK_REUSE and reuse > found[0]:
                found = (reuse, record)
        return found

    # -- files

    def _path_for(self, model_key: str, tokens: np.ndarray) -> Path:
        digest = hashlib.sha256(tokens.astype("<i4").tobytes()).hexdigest()[:32]
        return self.folder / model_key[:16] / f"{digest}.safetensors"

    def has(self, model_key: str, tokens: np.ndarray) -> bool:
        record = self._records().get(self._path_for(model_key, tokens))
        return record is not None and np.array_equal(record.tokens, tokens)

    def save(self, model_key: str, tokens: np.ndarray, cache: list[Any]) -> bool:
        """Write a cache (and drop the files it supersedes: shorter prefixes of it)."""
        from mlx_lm.models.cache import save_prompt_cache

        records = self._records()
        path = self._path_for(model_key, tokens)
        trimmable = _trimmable(cache)
        metadata = {
            "mlxweb_kv": FORMAT_VERSION,
            "model_key": model_key,
            "n_tokens": str(len(tokens)),
            "tokens": base64.b64encode(tokens.astype("<i4").tobytes()).decode(),
            "trimmable": "1" if trimmable else "0",
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f"{path.stem}.{os.getpid()}.tmp.safetensors")
        try:
            save_prompt_cache(str(temporary), cache, metadata)
            os.replace(temporary, path)
        except Exception:
            temporary.unlink(missing_ok=True)
            logger.exception("could not write the KV cache file %s", path)
            return False
        size = path.stat().st_size
        if size > self.max_bytes:
            logger.info(
                "KV cache of %d tokens (%d bytes) exceeds the disk budget", len(tokens), size
            )
            path.unlink(missing_ok=True)
            records.pop(path, None)
            return False
        records[path] = _DiskRecord(path, model_key, tokens.copy(), trimmable, size, time.time())
        if trimmable:
            for other in list(records.values()):
                if (
                    other.path != path
                    and other.model_key == model_key
                    and len(other.tokens) < len(tokens)
                    and _common_prefix(other.tokens, tokens) == len(other.tokens)
                ):
                    self._remove(other)
        self._enforce_budget(keep=path)
        return path in records

    def load(self, record: _DiskRecord) -> list[Any] | None:
        """The cache in a file, after checking the file still says what the index says."""
        from mlx_lm.models.cache import load_prompt_cache

        try:
            fresh = self._read_record(record.path) if record.path.exists() else None
            if (
                fresh is None
                or fresh.model_key != record.model_key
                or not np.array_equal(fresh.tokens, record.tokens)
            ):
                raise ValueError("the file changed since it was indexed")
            cache = load_prompt_cache(str(record.path))
            offsets = {getattr(layer, "offset", None) for layer in cache}
            if not cache or offsets != {len(record.tokens)}:
                raise ValueError("its cache does not cover its tokens")
        except Exception as e:
            logger.warning("KV cache file %s is unusable, removed: %s", record.path, e)
            self._remove(record)
            return None
        self.touch(record)
        return list(cache)

    def touch(self, record: _DiskRecord) -> None:
        record.last_used = time.time()
        with contextlib.suppress(OSError):
            os.utime(record.path, (record.last_used, record.last_used))

    def _remove(self, record: _DiskRecord) -> None:
        record.path.unlink(missing_ok=True)
        if self._index is not None:
            self._index.pop(record.path, None)

    def _enforce_budget(self, keep: Path | None = None) -> None:
        records = self._index or {}
        total = sum(r.size for r in records.values())
        for record in sorted(records.values(), key=lambda r: r.last_used):
            if total <= self.max_bytes:
                break
            if record.path == keep:
                continue
            total -= record.size
            logger.info("KV cache file %s removed: over the disk budget", record.path.name)
            self._remove(record)


def _read_metadata(path: Path) -> dict[str, str]:
    """The `__metadata__` of a safetensors file, without reading its tensors."""
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError("truncated header")
        (length,) = struct.unpack("<Q", head)
        if length > MAX_HEADER_BYTES:
            raise ValueError("header too large")
        header = json.loads(f.read(length))
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict):
        raise ValueError("no metadata")
    return {str(k): str(v) for k, v in metadata.items()}


# --------------------------------------------------------------------------- memory


@dataclass(eq=False)
class _Entry:
    tokens: np.ndarray
    cache: list[Any]
    nbytes: int
    trimmable: bool
    # Where it came from: "memory" (a request in this process), "disk" (loaded for a prompt)
    # or "warm" (loaded when its conversation was opened).
    origin: str = "memory"


@dataclass(frozen=True)
class CacheHit:
    """What `PromptCacheStore.fetch` found: a cache to start from (None: nothing), the tokens
    still to prefill and where the cache came from ("memory", "disk", "warm" or "none")."""

    cache: list[Any] | None
    rest: list[int]
    source: str


@dataclass(eq=False)
class PromptCacheStore:
    """One model's kept KV caches (least recently used first) and its share of the disk."""

    model_key: str
    settings: KVCacheSettings
    disk: DiskKVStore | None = None
    # Reuse prefixes in multiples of this many tokens (a trimmable cache is cut back to one): on
    # CUDA, prompts resuming at a few distinct offsets prefill together and meet shapes seen
    # before (inference.engine.CUDA_SHAPE_GRANULE).
    align: int = 1
    _entries: OrderedDict[int, _Entry] = field(default_factory=OrderedDict)
    _nbytes: int = 0
    _next_id: int = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def insert(self, tokens: Sequence[int], cache: list[Any]) -> None:
        """Keep a finished request's cache over `tokens` (one token per cached position)."""
        if not cache or not len(tokens):
            return
        kept = compact(cache, self.settings)
        entry = _Entry(
            tokens=_as_tokens(tokens), cache=kept, nbytes=_nbytes(kept), trimmable=_trimmable(kept)
        )
        for key, other in list(self._entries.items()):
            covered = _common_prefix(other.tokens, entry.tokens) == len(other.tokens)
            # A shorter prefix is no use once a trimmable cache covers it (and the same tokens
            # twice is one entry).
            if covered and (entry.trimmable or len(other.tokens) == len(entry.tokens)):
                self._drop(key)
        self._add(entry)

    def fetch(self, prompt: Sequence[int]) -> CacheHit:
        """The longest kept prefix of `prompt` (memory or disk), as a cache of its own."""
        from mlx_lm.models.cache import trim_prompt_cache

        wanted = _as_tokens(prompt)
        reuse, key = self._best_in_memory(wanted)
        entry = self._entries.get(key) if key is not None else None
        if self.disk is not None:
            disk_reuse, record = self.disk.best(self.model_key, wanted)
            if record is not None and disk_reuse > reuse:
                loaded = self._load(record, origin="disk")
                if loaded is not None:
                    reuse, entry = disk_reuse, loaded
        if entry is not None and self.align > 1 and entry.trimmable:
            reuse -= reuse % self.align
        if entry is None or reuse == 0:
            return CacheHit(None, list(prompt), "none")
        for k, e in self._entries.items():
            if e is entry:
                self._entries.move_to_end(k)
                break
        source = entry.origin
        cache = for_use(entry.cache)
        excess = len(entry.tokens) - reuse
        if excess and trim_prompt_cache(cache, excess) != excess:
            return CacheHit(None, list(prompt), "none")
        return CacheHit(cache, list(prompt)[reuse:], source)

    def peek(self, prompt: Sequence[int]) -> tuple[int, str]:
        """How many of `prompt`'s tokens `fetch` would reuse and from where ("memory", "disk"
        or "none"), without loading, copying or reordering anything (the chat composer's
        cache probe, inference.engine.Engine.probe)."""
        wanted = _as_tokens(prompt)
        reuse, _ = self._best_in_memory(wanted)
        if self.disk is not None:
            disk_reuse, record = self.disk.best(self.model_key, wanted)
            if record is not None and disk_reuse > reuse:
                return disk_reuse, "disk"
        return reuse, "memory" if reuse else "none"

    def warm(self, tokens: Sequence[int]) -> int:
        """Load from disk the file that gives most of `tokens`, unless memory already gives
        as much; returns the tokens it covers (0: none found)."""
        wanted = _as_tokens(tokens)
        reuse, _ = self._best_in_memory(wanted)
        if self.disk is None:
            return 0
        disk_reuse, record = self.disk.best(self.model_key, wanted)
        if record is None or disk_reuse <= reuse:
            return 0
        return disk_reuse if self._load(record, origin="warm") is not None else 0

    def trim_to(self, *, n_sequences: int | None = None, n_bytes: int | None = None) -> None:
        """Evict (to disk) the least recently used caches until at most `n_sequences` and
        `n_bytes` remain (the memory budget asks for room)."""
        while self._entries and (
            (n_sequences is not None and len(self._entries) > n_sequences)
            or (n_bytes is not None and self._nbytes > n_bytes)
        ):
            oldest = next(iter(self._entries))
            self._persist(self._entries[oldest])
            self._drop(oldest)

    def persist_all(self) -> int:
        """Write every kept cache not yet on disk (the model is being unloaded)."""
        saved = 0
        for entry in self._entries.values():
            saved += self._persist(entry)
        return saved

    # -- internals

    def _best_in_memory(self, wanted: np.ndarray) -> tuple[int, int | None]:
        best: tuple[int, int | None] = (0, None)
        for key, entry in self._entries.items():
            reuse = _reuse(entry.tokens, entry.trimmable, wanted)
            if reuse > best[0]:
                best = (reuse, key)
        return best

    def _load(self, record: _DiskRecord, *, origin: str) -> _Entry | None:
        assert self.disk is not None
        cache = self.disk.load(record)
        if cache is None:
            return None
        entry = _Entry(
            tokens=record.tokens,
            cache=cache,
            nbytes=_nbytes(cache),
            trimmable=_trimmable(cache),
            origin=origin,
        )
        logger.info("KV cache of %d tokens loaded from disk (%s)", len(record.tokens), origin)
        self._add(entry)
        return entry

    def _add(self, entry: _Entry) -> None:
        key = self._next_id
        self._next_id += 1
        self._entries[key] = entry
        self._nbytes += entry.nbytes
        while self._entries and (
            len(self._entries) > self.settings.max_entries or self._nbytes > self.settings.max_bytes
        ):
            oldest = next(iter(self._entries))
            self._persist(self._entries[oldest])
            self._drop(oldest)

    def _drop(self, key: int) -> None:
        entry = self._entries.pop(key)
        self._nbytes -= entry.nbytes

    def _persist(self, entry: _Entry) -> int:
        if self.disk is None or self.disk.has(self.model_key, entry.tokens):
            return 0
        return int(self.disk.save(self.model_key, entry.tokens, entry.cache))


def disk_store(settings: KVCacheSettings) -> DiskKVStore | None:
    """The disk store the settings ask for (None: persistence off)."""
    if settings.persist_dir is None or settings.persist_max_bytes <= 0:
        return None
    return DiskKVStore(settings.persist_dir, settings.persist_max_bytes)
