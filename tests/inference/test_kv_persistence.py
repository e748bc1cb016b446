"""KV caches kept between turns (inference.kvcache): on disk across engine restarts, warmed when
a conversation is opened, never used when they do not match, within a disk budget; quantized
and rotating caches. All on the tiny real model."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import KVCache

from inference.engine import Engine
from inference.kvcache import DiskKVStore, KVCacheSettings, PromptCacheStore
from tests.inference.test_engine import _catalogue, complete

pytestmark = pytest.mark.timeout(120)

# Long enough that the kept prefix is most of the next turn's prompt.
TURN1 = [
    {"role": "system", "content": "You answer questions about European geography. " * 20},
    {"role": "user", "content": "What is the capital of France? Tell me about it."},
]
OTHER = [{"role": "user", "content": "Name three rivers in Germany, please."}]


def next_turn(first: list[dict[str, Any]], reply: str, question: str) -> list[dict[str, Any]]:
    return [*first, {"role": "assistant", "content": reply}, {"role": "user", "content": question}]


@pytest.fixture
def model_root(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """A copy of the tiny model, so a test may change its files."""
    root = tmp_path / "models"
    shutil.copytree(tiny_model_dir, root / "tiny")
    return root


@pytest.fixture
def make_engine(model_root: Path, tmp_path: Path) -> Iterator[Callable[..., Engine]]:
    engines: list[Engine] = []

    def make(*, persist: bool = True, **options: Any) -> Engine:
        settings = KVCacheSettings(
            persist_dir=tmp_path / "kv" if persist else None,
            persist_max_bytes=options.pop("persist_max_bytes", 2**30),
            kv_bits=options.pop("kv_bits", None),
            kv_group_size=options.pop("kv_group_size", 64),
            max_kv_size=options.pop("max_kv_size", None),
        )
        engine = Engine(
            catalogue=_catalogue(model_root),
            converted_dir=tmp_path / "converted",
            kv_cache=settings,
            **options,
        )
        engine.start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.stop()


def _files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.safetensors")) if folder.exists() else []


def _uncached(make_engine: Callable[..., Engine], messages: list[dict[str, Any]]) -> str:
    engine = make_engine(persist=False, prompt_cache_entries=0)
    try:
        return complete(engine, messages, max_tokens=20).text
    finally:
        engine.stop()


def test_it_saves_an_evicted_cache_and_restores_it_after_a_restart(
    make_engine: Callable[..., Engine], tmp_path: Path
) -> None:
    engine = make_engine(prompt_cache_entries=1)
    turn1 = complete(engine, TURN1, max_tokens=20)
    assert not _files(tmp_path / "kv")
    complete(engine, OTHER, max_tokens=8)  # the only memory slot goes to this one
    assert len(_files(tmp_path / "kv")) == 1  # turn 1's cache, written on its way out
    engine.stop()  # stopping writes what is still in memory
    assert len(_files(tmp_path / "kv")) == 2

    messages = next_turn(TURN1, turn1.text, "And of Italy?")
    restarted = make_engine()
    turn2 = complete(restarted, messages, max_tokens=20)
    assert turn2.started is not None and turn1.started is not None
    assert turn2.started.cached_tokens >= turn1.started.prompt_tokens
    assert turn2.started.cached_tokens < turn2.started.prompt_tokens
    assert turn2.finished.prompt_cache == "disk"
    assert turn2.text == _uncached(make_engine, messages)


def test_opening_a_conversation_restores_its_cache_before_the_next_turn(
    make_engine: Callable[..., Engine],
) -> None:
    engine = make_engine()
    turn1 = complete(engine, TURN1, max_tokens=20)
    engine.stop()

    restarted = make_engine()
    assert restarted.loaded_models() == []
    history = [*TURN1, {"role": "assistant", "content": turn1.text}]
    covered = restarted.warm("tiny", history, wait=30)
    assert covered > 0
    assert [m["model_id"] for m in restarted.loaded_models()] == ["tiny"]

    turn2 = complete(restarted, next_turn(TURN1, turn1.text, "And of Spain?"), max_tokens=20)
    assert turn2.finished.prompt_cache == "warm"
    assert turn2.started is not None and turn2.started.cached_tokens >= covered - 8
    # Warming again finds it in memory already: nothing to load.
    assert restarted.warm("tiny", history, wait=30) == 0


def test_a_cache_for_another_prefix_is_used_only_up_to_where_they_agree(
    make_engine: Callable[..., Engine],
) -> None:
    engine = make_engine()
    complete(engine, TURN1, max_tokens=20)
    engine.stop()

    restarted = make_engine()
    other = [TURN1[0], {"role": "user", "content": "Which sea is south of Greece?"}]
    answer = complete(restarted, other, max_tokens=20)
    assert answer.started is not None
    tokenizer = restarted._slots["tiny"].loaded.tokenizer
    shared = 0
    for a, b in zip(
        tokenizer.apply_chat_template(TURN1, add_generation_prompt=True),
        tokenizer.apply_chat_template(other, add_generation_prompt=True),
        strict=False,
    ):
        if a != b:
            break
        shared += 1
    assert shared >= 128  # kvcache.MIN_DISK_REUSE: worth reading the file
    assert answer.started.cached_tokens == shared  # the system prompt, not the question
    assert answer.text == _uncached(make_engine, other)


@pytest.mark.parametrize("change", ["weights", "template"])
def test_a_cache_for_another_model_revision_or_template_is_not_used(
    make_engine: Callable[..., Engine], model_root: Path, change: str
) -> None:
    engine = make_engine()
    turn1 = complete(engine, TURN1, max_tokens=20)
    engine.stop()

    if change == "weights":
        weights = model_root / "tiny" / "model.safetensors"
        stat = weights.stat()
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    else:
        template = model_root / "tiny" / "chat_template.jinja"
        template.write_text(template.read_text() + "\n")
    restarted = make_engine()
    turn2 = complete(restarted, next_turn(TURN1, turn1.text, "And of Italy?"), max_tokens=20)
    assert turn2.started is not None and turn2.started.cached_tokens == 0
    assert turn2.finished.prompt_cache == "none"


def _small_cache(length: int, seed: int) -> list[Any]:
    layer = KVCache()
    layer.keys = mx.random.normal((1, 2, length, 16), key=mx.random.key(seed))
    layer.values = mx.random.normal((1, 2, length, 16), key=mx.random.key(seed + 1))
    layer.offset = length
    return [layer, layer]


def test_the_disk_budget_removes_the_least_recently_used(tmp_path: Path) -> None:
    n = 200
    probe = DiskKVStore(tmp_path / "probe", 2**30)
    assert probe.save("k", np.arange(n), _small_cache(n, 0))
    size = probe.total_bytes
    store = DiskKVStore(tmp_path / "kv", int(size * 2.5))
    a, b, c = (np.arange(n) + offset for offset in (1000, 2000, 3000))
    assert store.save("k", a, _small_cache(n, 1))
    assert store.save("k", b, _small_cache(n, 2))
    reuse, record = store.best("k", np.concatenate([a, [7, 8]]))
    assert reuse == n and record is not None
    assert store.load(record) is not None  # a is used: b is now the least recently used
    assert store.save("k", c, _small_cache(n, 3))
    assert store.total_bytes <= int(size * 2.5)
    assert store.best("k", np.concatenate([b, [7]]))[0] == 0
    assert store.best("k", np.concatenate([a, [7]]))[0] == n
    # A new store on the same folder finds the same files.
    again = DiskKVStore(tmp_path / "kv", int(size * 2.5))
    assert again.best("k", np.concatenate([c, [7]]))[0] == n
    assert again.best("other-model", np.concatenate([c, [7]]))[0] == 0
    # Too little of a file to be worth reading: another prompt that shares its first tokens.
    assert again.best("k", np.concatenate([c[:100], [7]]))[0] == 0


def test_a_longer_cache_replaces_the_files_of_its_prefixes(tmp_path: Path) -> None:
    store = DiskKVStore(tmp_path / "kv", 2**30)
    tokens = np.arange(400)
    assert store.save("k", tokens[:200], _small_cache(200, 1))
    assert store.save("k", tokens, _small_cache(400, 2))
    assert len(_files(tmp_path / "kv")) == 1


def test_a_corrupt_file_is_ignored_with_a_log(
    make_engine: Callable[..., Engine], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    engine = make_engine()
    turn1 = complete(engine, TURN1, max_tokens=20)
    engine.stop()
    (path,) = _files(tmp_path / "kv")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # the header is intact, the tensors cut short

    restarted = make_engine()
    messages = next_turn(TURN1, turn1.text, "And of Italy?")
    with caplog.at_level(logging.WARNING, logger="inference.kvcache"):
        turn2 = complete(restarted, messages, max_tokens=20)
    assert turn2.finished.finish_reason in ("eos", "max_tokens")
    assert turn2.finished.prompt_cache == "none"
    assert turn2.text == _uncached(make_engine, messages)
    assert "unusable" in caplog.text
    assert not path.exists()

    (tmp_path / "kv" / "junk.safetensors").write_bytes(b"not a safetensors file")
    with caplog.at_level(logging.WARNING, logger="inference.kvcache"):
        assert DiskKVStore(tmp_path / "kv", 2**30).records("anything") == []
    assert "unreadable" in caplog.text


def _agreement(a: list[int], b: list[int]) -> float:
    same = next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )
    return same / max(1, max(len(a), len(b)))


@pytest.mark.parametrize("option", [{"kv_bits": 8}, {"kv_bits": 4}, {"max_kv_size": 64}])
def test_quantized_and_rotating_caches_produce_output(
    make_engine: Callable[..., Engine], model_root: Path, option: dict[str, Any]
) -> None:
    # Two heads of 32 instead of four of 16 (same weight shapes): MLX quantizes groups of 32+.
    config_path = model_root / "tiny" / "config.json"
    config = json.loads(config_path.read_text())
    config.update(num_attention_heads=2, num_key_value_heads=1)
    config_path.write_text(json.dumps(config))
    engine = make_engine(persist=False, kv_group_size=32, **option)
    turn1 = complete(engine, TURN1, max_tokens=20)
    messages = next_turn(TURN1, turn1.text, "And of Italy?")
    turn2 = complete(engine, messages, max_tokens=20)
    assert turn2.finished.finish_reason in ("eos", "max_tokens")
    assert turn2.finished.completion_tokens > 0
    if "kv_bits" in option:
        assert turn2.finished.prompt_cache == "memory"
        assert turn2.started is not None and turn2.started.cached_tokens > 0
        store = engine._slots["tiny"].prompt_cache
        assert store is not None and len(store) >= 1
        for kept in store._entries.values():
            assert type(kept.cache[0]).__name__ == "QuantizedKVCache"
            assert kept.cache[0].bits == option["kv_bits"]
    else:
        assert turn1.started is not None and turn1.started.prompt_tokens > 64
    # The quality cost: how much of the full-cache greedy reply it keeps (measured, reported;
    # docs/benchmarks.md has the default model's numbers).
    full = _uncached(make_engine, messages)
    tokenizer = engine._slots["tiny"].loaded.tokenizer
    agreement = _agreement(tokenizer.encode(turn2.text), tokenizer.encode(full))
    logging.getLogger(__name__).info("%s: greedy agreement %.2f", option, agreement)


def test_the_store_keeps_compact_evaluated_copies(tmp_path: Path) -> None:
    # A cache sliced out of a bigger buffer: the kept copy holds its tokens only.
    layer = KVCache()
    layer.keys = mx.zeros((1, 2, 256, 16))
    layer.values = mx.zeros((1, 2, 256, 16))
    layer.offset = 40
    store = PromptCacheStore("k", KVCacheSettings(max_entries=4))
    store.insert(list(range(40)), [layer])
    assert store.nbytes == 2 * 40 * 2 * 16 * 4
    hit = store.fetch([*range(40), 99])
    assert hit.source == "memory" and hit.rest == [99] and hit.cache is not None
    hit.cache[0].trim(10)
    # Trimming or extending the copy leaves the kept one as it was.
    again = store.fetch([*range(40), 99])
    assert again.cache is not None and again.cache[0].offset == 40
    # The whole prompt kept: one token is given back to produce the first logits.
    whole = store.fetch(list(range(40)))
    assert whole.rest == [39] and whole.cache is not None and whole.cache[0].offset == 39


def test_a_kept_cache_does_not_hold_on_to_the_batch_buffer_it_came_from() -> None:
    """What the generator hands over is a lazy slice of the whole batch's KV buffer; kept as
    it is, it would keep that buffer (every sequence's keys and values) alive."""
    import gc

    gc.collect()
    before = mx.get_active_memory()
    batch_keys = mx.ones((8, 4, 2048, 64))  # 16 MiB each: a batch of 8 sequences
    batch_values = mx.ones((8, 4, 2048, 64))
    mx.eval(batch_keys, batch_values)
    layer = KVCache()
    layer.keys = mx.contiguous(batch_keys[2:3, :, :100])  # as BatchKVCache.extract does
    layer.values = mx.contiguous(batch_values[2:3, :, :100])
    layer.offset = 100
    store = PromptCacheStore("k", KVCacheSettings(max_entries=4))
    store.insert(list(range(100)), [layer])
    del batch_keys, batch_values, layer
    gc.collect()
    held = mx.get_active_memory() - before
    assert held < 2 * 2**20, f"{held} bytes still held"  # the 200 KB kept, not the 32 MiB
    hit = store.fetch([*range(100), 5])
    assert hit.cache is not None and hit.cache[0].keys.shape == (1, 4, 100, 64)
    assert mx.all(hit.cache[0].keys == 1).item()
