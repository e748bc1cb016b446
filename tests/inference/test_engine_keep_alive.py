"""The engine's keep-alive on the tiny real model: an idle model is unloaded from the engine's
own thread once its keep-alive is over, never while a request for it runs."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from inference.catalogue import Catalogue, UnknownModel
from inference.config import ModelConfig
from inference.engine import Delta, Engine, EngineEvent, Finished, GenerationRequest
from inference.schemas import GenerationParams
from mlxweb.config import Config, ServerConfig
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(120)

QUESTION = [{"role": "user", "content": "Tell me a long story."}]
_ids = itertools.count()


class Recorder:
    """One request's events, as the engine thread emits them."""

    def __init__(self) -> None:
        self.events: list[EngineEvent] = []
        self.done = threading.Event()

    def __call__(self, event: EngineEvent) -> None:
        self.events.append(event)
        if isinstance(event, Finished):
            self.done.set()

    @property
    def tokens(self) -> int:
        deltas = [e for e in self.events if isinstance(e, Delta)]
        return deltas[-1].tokens if deltas else 0

    def finished(self, timeout: float = 60) -> Finished:
        assert self.done.wait(timeout), f"no Finished within {timeout}s"
        return next(e for e in self.events if isinstance(e, Finished))


def _catalogue(models_dir: Path, keep_alive: Any = None) -> Catalogue:
    """The tiny model as a found folder, or configured with its own `keep_alive`."""
    server = ServerConfig.model_validate({"default_model": "tiny"})
    models = {}
    if keep_alive is not None:
        models["tiny"] = ModelConfig.model_validate(
            {
                "id": "tiny",
                "name": "tiny",
                "source": {"path": "tiny"},
                "context_length": 2048,
                "keep_alive": keep_alive,
            }
        )
    return Catalogue(Config(server=server, models=models), models_dir)


@pytest.fixture
def make_engine(tiny_model_dir: Path, tmp_path: Path) -> Iterator[Callable[..., Engine]]:
    engines: list[Engine] = []

    def make(model_keep_alive: Any = None, **options: Any) -> Engine:
        catalogue = _catalogue(tiny_model_dir.parent, model_keep_alive)
        engine = Engine(catalogue=catalogue, converted_dir=tmp_path / "converted", **options)
        engine.start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.stop()


def ask(engine: Engine, max_tokens: int = 8) -> tuple[str, Recorder]:
    request_id = f"keep-{next(_ids)}"
    recorder = Recorder()
    params = GenerationParams.model_validate({"temperature": 0.7, "max_tokens": max_tokens})
    engine.submit(GenerationRequest(request_id, "tiny", QUESTION, params), recorder)
    return request_id, recorder


def loaded(engine: Engine) -> dict[str, dict[str, Any]]:
    return {info["model_id"]: info for info in engine.loaded_models()}


def test_an_idle_model_is_unloaded_once_its_keep_alive_is_over(
    make_engine: Callable[..., Engine],
) -> None:
    engine = make_engine(keep_alive=1.0)
    _, recorder = ask(engine)
    recorder.finished()
    ended = time.time()

    # Idle: the clock runs from the request's end and says when it stops.
    expires = wait_until(
        lambda: loaded(engine).get("tiny", {}).get("expires_at"), timeout=10, what="expires_at"
    )
    assert ended - 0.5 <= expires - 1.0 <= time.time()
    wait_until(lambda: not loaded(engine), timeout=20, what="the model to unload")
    # Asked again, it loads again.
    _, again = ask(engine)
    assert again.finished().finish_reason in ("eos", "max_tokens")


def test_a_running_request_keeps_its_model_loaded(make_engine: Callable[..., Engine]) -> None:
    ttl = 0.05
    engine = make_engine(keep_alive=ttl)
    request_id, recorder = ask(engine, max_tokens=2048)
    began = time.monotonic()

    # Many keep-alives pass while it decodes: the model stays, with no expiry.
    wait_until(
        lambda: recorder.tokens >= 50 and time.monotonic() - began > 20 * ttl,
        timeout=60,
        what="the request to run for a while",
    )
    assert not recorder.done.is_set(), "the request ended too soon to tell"
    assert loaded(engine)["tiny"]["expires_at"] is None
    # Unloading now is only planned: it happens once the request is over.
    assert engine.unload_after("tiny", 0) is None
    assert "tiny" in loaded(engine) and not recorder.done.is_set()

    engine.cancel(request_id)
    assert recorder.finished().finish_reason == "stopped"
    wait_until(lambda: not loaded(engine), timeout=20, what="the model to unload")


def test_unload_after_zero_unloads_an_idle_model_at_once(
    make_engine: Callable[..., Engine],
) -> None:
    engine = make_engine()  # no keep-alive: kept loaded
    ask(engine)[1].finished()
    assert loaded(engine)["tiny"]["expires_at"] is None

    assert engine.unload_after("tiny", 0) is None
    assert not loaded(engine)


def test_unload_after_loads_a_model_and_sets_its_expiry(
    make_engine: Callable[..., Engine],
) -> None:
    engine = make_engine()
    before = time.time()

    expires = engine.unload_after("tiny", 60)

    assert expires is not None and before + 60 <= expires <= time.time() + 60
    assert loaded(engine)["tiny"]["expires_at"] == expires
    # Negative (Ollama's "keep it"): no expiry any more.
    assert engine.unload_after("tiny", -1) is None
    assert loaded(engine)["tiny"]["expires_at"] is None


def test_unload_after_zero_leaves_a_model_that_is_not_loaded_alone(
    make_engine: Callable[..., Engine],
) -> None:
    engine = make_engine()
    assert engine.unload_after("tiny", 0) is None
    assert not loaded(engine)
    with pytest.raises(UnknownModel):
        engine.unload_after("no-such-model", 30)


def test_a_models_own_keep_alive_comes_before_the_servers(
    make_engine: Callable[..., Engine],
) -> None:
    engine = make_engine(model_keep_alive="0s", keep_alive=3600)
    ask(engine)[1].finished()
    wait_until(lambda: not loaded(engine), timeout=20, what="the model to unload")
