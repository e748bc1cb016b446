"""One memory budget (inference.memory) on the tiny real model: several models resident when they
fit, the least recently used idle one unloaded to make room, a model that can never fit refused
with the reason, keep-alives with several models, and library jobs sharing the budget through
the reservation table."""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from inference.catalogue import Catalogue
from inference.config import ModelConfig
from inference.engine import Engine, Finished, GenerationRequest
from inference.memory import (
    NotEnoughMemory,
    Reservation,
    ReservationTable,
    reserved,
    weights_bytes_on_disk,
)
from inference.schemas import GenerationParams
from mlxweb.config import Config, ServerConfig
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(120)

QUESTION = [{"role": "user", "content": "Hello there."}]
_ids = itertools.count()


@pytest.fixture
def models_dir(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """Three tiny models (a, b, c): the same files, hard-linked into three folders."""
    root = tmp_path / "models"
    for name in ("a", "b", "c"):
        folder = root / name
        folder.mkdir(parents=True)
        for item in tiny_model_dir.iterdir():
            if item.is_file():
                os.link(item, folder / item.name)
    return root


@pytest.fixture
def size(tiny_model_dir: Path) -> int:
    """One tiny model's weights (float32, so in memory as on disk)."""
    return weights_bytes_on_disk(tiny_model_dir)


@pytest.fixture
def make_engine(models_dir: Path, tmp_path: Path) -> Iterator[Callable[..., Engine]]:
    engines: list[Engine] = []

    def make(models: dict[str, ModelConfig] | None = None, **options: Any) -> Engine:
        server = ServerConfig.model_validate({"default_model": "a"})
        catalogue = Catalogue(Config(server=server, models=models or {}), models_dir)
        options.setdefault("max_loaded_models", 4)
        engine = Engine(catalogue=catalogue, converted_dir=tmp_path / "converted", **options)
        engine.start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.stop()


class Recorder:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.finished: Finished | None = None

    def __call__(self, event: Any) -> None:
        if isinstance(event, Finished):
            self.finished = event
            self.done.set()

    def wait(self, timeout: float = 60) -> Finished:
        assert self.done.wait(timeout), f"no Finished within {timeout}s"
        assert self.finished is not None
        return self.finished


def ask(engine: Engine, model_id: str) -> Recorder:
    recorder = Recorder()
    params = GenerationParams.model_validate({"temperature": 0, "max_tokens": 4})
    engine.submit(GenerationRequest(f"mem-{next(_ids)}", model_id, QUESTION, params), recorder)
    return recorder


def served(engine: Engine, model_id: str) -> Finished:
    finished = ask(engine, model_id).wait()
    assert finished.finish_reason in ("eos", "max_tokens"), finished.error
    return finished


def loaded(engine: Engine) -> list[str]:
    return sorted(info["model_id"] for info in engine.loaded_models())


def test_models_stay_resident_while_they_fit_then_the_lru_idle_one_makes_room(
    make_engine: Callable[..., Engine], size: int
) -> None:
    engine = make_engine(memory_budget_bytes=int(size * 2.5))
    served(engine, "a")
    served(engine, "b")
    assert loaded(engine) == ["a", "b"]
    # a answers without loading again, and is now the most recently used.
    served(engine, "a")
    assert loaded(engine) == ["a", "b"]
    # c does not fit beside both: b, the least recently used idle model, makes room.
    served(engine, "c")
    assert loaded(engine) == ["a", "c"]


def test_max_loaded_models_still_caps_what_the_budget_allows(
    make_engine: Callable[..., Engine], size: int
) -> None:
    engine = make_engine(memory_budget_bytes=size * 10, max_loaded_models=2)
    for model_id in ("a", "b", "c"):
        served(engine, model_id)
    assert loaded(engine) == ["b", "c"]


def test_a_model_bigger_than_the_whole_budget_is_refused_with_the_reason(
    make_engine: Callable[..., Engine], size: int
) -> None:
    engine = make_engine(memory_budget_bytes=size // 2)
    finished = ask(engine, "a").wait()
    assert finished.finish_reason == "error"
    assert "more than the whole memory budget" in (finished.error or "")
    assert "'a'" in (finished.error or "")
    assert loaded(engine) == []
    with pytest.raises(NotEnoughMemory, match="memory_budget_bytes"):
        engine.load("b")


def test_keep_alive_unloads_each_idle_model_on_its_own_clock(
    make_engine: Callable[..., Engine], size: int
) -> None:
    # a's own config keeps it 20 minutes; the others have the server's 10.
    a = ModelConfig.model_validate(
        {
            "id": "a",
            "name": "a",
            "source": {"path": "a"},
            "context_length": 2048,
            "keep_alive": "20m",
        }
    )
    engine = make_engine({"a": a}, memory_budget_bytes=size * 4, keep_alive=600)
    served(engine, "a")
    served(engine, "b")
    served(engine, "c")
    now = time.time()
    info = {i["model_id"]: i for i in engine.loaded_models()}
    assert now + 1100 < info["a"]["expires_at"] <= now + 1200
    assert now + 500 < info["b"]["expires_at"] <= now + 600
    # Per request (Ollama's keep_alive): b is kept for good, c goes at once.
    assert engine.unload_after("b", None) is None
    engine.unload_after("c", 0)
    assert loaded(engine) == ["a", "b"]
    assert {i["model_id"]: i for i in engine.loaded_models()}["b"]["expires_at"] is None
    # A request's keep-alive of half a second for a: it goes on its own clock, b stays.
    expires = engine.unload_after("a", 0.5)
    assert expires is not None and expires <= time.time() + 0.5
    wait_until(
        lambda: (
            loaded(engine) == ["b"]
            and [m["model_id"] for m in engine.memory_status()["models"]] == ["b"]
        ),
        timeout=20,
        what="a to unload, and leave the memory status",
    )


def test_memory_status_numbers_add_up(make_engine: Callable[..., Engine], size: int) -> None:
    budget = size * 3
    engine = make_engine(memory_budget_bytes=budget)
    served(engine, "a")
    served(engine, "b")
    status = wait_until(
        lambda: (
            s
            if len((s := engine.memory_status())["models"]) == 2
            and all(m["kv_bytes"] > 0 for m in s["models"])
            else None
        ),
        timeout=10,
        what="two models and their caches in the status",
    )
    assert status["budget_bytes"] == budget
    weights = {m["model_id"]: m["weights_bytes"] for m in status["models"]}
    assert weights == {i["model_id"]: i["bytes"] for i in engine.loaded_models()}
    assert all(size * 0.9 <= w <= size * 1.1 for w in weights.values())
    # The prompt cache holds the two replies' KV caches.
    assert all(m["kv_bytes"] > 0 for m in status["models"])
    models = sum(m["weights_bytes"] + m["kv_bytes"] for m in status["models"])
    jobs = sum(j["bytes"] for j in status["jobs"])
    assert status["used_bytes"] == models + jobs + status["other_bytes"] == models
    assert status["free_bytes"] == budget - status["used_bytes"]


def test_a_waiting_library_job_gets_an_idle_models_memory(
    make_engine: Callable[..., Engine], size: int, tmp_path: Path
) -> None:
    budget = int(size * 2.5)
    table = ReservationTable(tmp_path / "memory.json")
    engine = make_engine(memory_budget_bytes=budget, memory_table=table.path)
    served(engine, "a")
    served(engine, "b")
    served(engine, "a")
    # The engine's share is in the table for the machine's other processes.
    wait_until(
        lambda: any(r.kind == "engine" and r.nbytes >= 2 * size for r in table.entries()),
        timeout=10,
        what="the engine's share in the table",
    )
    waited: list[int] = []
    got = threading.Event()
    release = threading.Event()

    def job() -> None:
        with reserved(
            table,
            nbytes=int(size * 1.6),
            budget=budget,
            what="a test job",
            on_wait=waited.append,
            poll=0.05,
        ):
            got.set()
            release.wait(30)

    thread = threading.Thread(target=job)
    thread.start()
    try:
        # The job waits, then the engine unloads its idle models (least recently used first)
        # until the job fits: with 1.6 of 2.5 models' room, both go.
        assert got.wait(30), "the job never got its memory"
        assert waited, "the job did not have to wait"
        assert loaded(engine) == []
        held = [r for r in table.entries() if r.kind == "job"]
        assert [(r.what, r.waiting) for r in held] == [("a test job", False)]
        # While the job holds its share, a request for b (it needs 1 of the 0.9 left) waits
        # for it instead of failing.
        recorder = ask(engine, "b")
        assert not recorder.done.wait(1.5)
        status = engine.memory_status()
        assert [j["what"] for j in status["jobs"]] == ["a test job"]
        assert status["used_bytes"] <= budget
    finally:
        release.set()
        thread.join(30)
    assert recorder.wait().finish_reason in ("eos", "max_tokens")
    assert [r for r in table.entries() if r.kind == "job"] == []


def test_a_job_bigger_than_the_budget_is_refused_at_once(tmp_path: Path) -> None:
    table = ReservationTable(tmp_path / "memory.json")
    refused = pytest.raises(NotEnoughMemory, match="more than the whole memory budget")
    with refused, reserved(table, nbytes=200, budget=100, what="convert x"):
        pass
    assert table.entries() == []


def test_entries_of_dead_processes_hold_nothing(tmp_path: Path) -> None:
    table = ReservationTable(tmp_path / "memory.json")
    import subprocess
    import sys

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    table.put(Reservation("gone", int(dead.stdout), 10**9, "killed job", "job"))
    table.put(Reservation("here", os.getpid(), 5, "live job", "job"))
    assert [r.key for r in table.entries()] == ["here"]
    held, others = table.try_reserve(Reservation("new", os.getpid(), 90, "next", "job"), 100)
    assert held and others == 5
