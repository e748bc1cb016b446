"""The engine on the tiny real model: streaming, batching, sampling, stops, caches, failures."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from mlx_lm.generate import BatchGenerator

from inference.catalogue import Catalogue, UnknownModel
from inference.engine import (
    Delta,
    Engine,
    EngineEvent,
    GenerationRequest,
    Started,
)
from inference.schemas import GenerationParams
from inference.testing import build_tiny_model
from mlxweb.config import Config, ServerConfig
from tests.support.engine import Recorder
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(120)

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
_ids = itertools.count()


def _catalogue(models_dir: Path) -> Catalogue:
    server = ServerConfig.model_validate({"default_model": "tiny"})
    return Catalogue(Config(server=server, models={}), models_dir)


@pytest.fixture
def make_engine(tiny_model_dir: Path, tmp_path: Path) -> Iterator[Callable[..., Engine]]:
    engines: list[Engine] = []

    def make(models_dir: Path | None = None, **options: Any) -> Engine:
        catalogue = _catalogue(models_dir or tiny_model_dir.parent)
        engine = Engine(catalogue=catalogue, converted_dir=tmp_path / "converted", **options)
        engine.start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.stop()


@pytest.fixture
def engine(make_engine: Callable[..., Engine]) -> Engine:
    return make_engine()


def ask(
    engine: Engine,
    messages: list[dict[str, Any]] = QUESTION,
    recorder: Recorder | None = None,
    model_id: str = "tiny",
    **params: Any,
) -> tuple[str, Recorder]:
    """Submit a request (greedy and short unless told otherwise); return its id and recorder."""
    params = {"temperature": 0.0, "max_tokens": 24} | params
    request_id = f"req-{next(_ids)}"
    recorder = recorder or Recorder()
    request = GenerationRequest(
        request_id, model_id, messages, GenerationParams.model_validate(params)
    )
    engine.submit(request, recorder)
    return request_id, recorder


def complete(engine: Engine, messages: list[dict[str, Any]] = QUESTION, **params: Any) -> Recorder:
    return ask(engine, messages, **params)[1].wait()


def wait_for_deltas(recorder: Recorder, count: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while len(recorder.deltas) < count:
        assert time.monotonic() < deadline, "no deltas"
        assert not recorder.done.is_set(), recorder.events
        time.sleep(0.005)


# --------------------------------------------------------------------------- streaming


def test_it_streams_deltas_between_one_started_and_one_finished(engine: Engine) -> None:
    recorder = complete(engine, max_tokens=16)
    events = recorder.events
    assert isinstance(events[0], Started)
    assert events[0].prompt_tokens > 20 and events[0].cached_tokens == 0
    assert events[0].trimmed_messages == 0
    assert all(isinstance(e, Delta) for e in events[1:-1]) and len(events) > 3
    assert recorder.finished is events[-1]
    assert recorder.finished.finish_reason == "max_tokens"
    assert recorder.finished.completion_tokens == 16
    assert recorder.finished.prompt_tokens == events[0].prompt_tokens
    counts = [d.tokens for d in recorder.deltas]
    assert counts == sorted(counts) and counts[-1] <= 16
    assert recorder.text.strip()


def test_it_gives_the_same_text_twice_when_greedy(engine: Engine) -> None:
    first = complete(engine, max_tokens=30)
    second = complete(engine, max_tokens=30)
    assert first.text == second.text


def test_it_batches_a_request_that_arrives_while_another_decodes(engine: Engine) -> None:
    log: list[tuple[str, EngineEvent]] = []
    alone = complete(engine, [{"role": "user", "content": "Tell me a story."}], max_tokens=40)

    first_id, first = ask(engine, QUESTION, Recorder(log), max_tokens=200)
    wait_for_deltas(first, 3)
    second_id, second = ask(
        engine, [{"role": "user", "content": "Tell me a story."}], Recorder(log), max_tokens=40
    )
    second.wait()
    assert not first.done.is_set(), "the second request waited for the first to finish"
    first.wait()

    # Both streamed at once: deltas of the two requests interleave.
    order = [rid for rid, e in log if isinstance(e, Delta)]
    first_after_second = [
        i for i, rid in enumerate(order) if rid == first_id and i > order.index(second_id)
    ]
    assert first_after_second and first_after_second[0] < len(order) - 1
    assert second.finished.finish_reason == "max_tokens"
    assert first.finished.completion_tokens == 200
    # Joining a running batch does not change what greedy decoding writes.
    assert second.text == alone.text


def test_it_streams_concurrent_requests_together(engine: Engine) -> None:
    log: list[tuple[str, EngineEvent]] = []
    recorders = [ask(engine, QUESTION, Recorder(log), max_tokens=30)[1] for _ in range(3)]
    for recorder in recorders:
        recorder.wait()
    texts = {r.text for r in recorders}
    assert len(texts) == 1
    # Round-robin arrival: no request's deltas all come before another's first.
    ids = [rid for rid, e in log if isinstance(e, Delta)]
    firsts = {rid: ids.index(rid) for rid in set(ids)}
    lasts = {rid: len(ids) - 1 - ids[::-1].index(rid) for rid in set(ids)}
    assert max(firsts.values()) < min(lasts.values())


# --------------------------------------------------------------------------- sampling


@pytest.mark.parametrize(
    "params",
    [
        {"temperature": 0.8},
        {"temperature": 0.8, "top_p": 0.9},
        {"temperature": 0.8, "top_k": 40},
        {"temperature": 0.8, "min_p": 0.05},
        {"temperature": 0.0, "repetition_penalty": 1.3},
        {"temperature": 1.2, "top_p": 0.95, "top_k": 50, "min_p": 0.02, "repetition_penalty": 1.1},
        {"temperature": 0.7, "top_k": 1000, "seed": 3},
    ],
)
def test_it_accepts_each_sampling_parameter(engine: Engine, params: dict[str, Any]) -> None:
    recorder = complete(engine, max_tokens=12, **params)
    assert recorder.started is not None
    assert recorder.finished.finish_reason in ("max_tokens", "eos"), recorder.finished
    assert recorder.finished.completion_tokens >= 1


def test_it_repeats_a_seeded_reply_even_inside_a_batch(engine: Engine) -> None:
    seeded: dict[str, Any] = {"temperature": 1.0, "top_p": 0.95, "seed": 1234, "max_tokens": 30}
    alone = complete(engine, **seeded)
    again = complete(engine, **seeded)
    assert alone.text == again.text

    _, other = ask(engine, [{"role": "user", "content": "Hello!"}], temperature=1.0, max_tokens=60)
    wait_for_deltas(other, 2)
    batched = complete(engine, **seeded)
    other.wait()
    assert batched.text == alone.text

    different = complete(engine, **(seeded | {"seed": 99}))
    assert different.text != alone.text


def test_it_repeats_greedy_output_with_a_repetition_penalty(engine: Engine) -> None:
    first = complete(engine, max_tokens=20, repetition_penalty=1.5)
    second = complete(engine, max_tokens=20, repetition_penalty=1.5)
    plain = complete(engine, max_tokens=20)
    assert first.text == second.text
    assert first.text != plain.text


# --------------------------------------------------------------------------- endings


def test_it_cuts_the_reply_at_a_stop_string_and_never_emits_it(engine: Engine) -> None:
    full = complete(engine, max_tokens=40).text
    stop = full[12:19]
    expected = full[: full.index(stop)]
    recorder = complete(engine, max_tokens=40, stop=["never-in-the-text", stop])
    assert recorder.finished.finish_reason == "stop_string"
    assert recorder.text == expected
    for delta in recorder.deltas:
        assert stop not in delta.text
    assert recorder.finished.completion_tokens < 40


def test_it_releases_held_back_text_when_a_stop_string_does_not_complete(engine: Engine) -> None:
    full = complete(engine, max_tokens=30).text
    never = full[-3:] + "\x00"  # its start is the reply's end, so the tail is held till the end
    recorder = complete(engine, max_tokens=30, stop=[never])
    assert recorder.finished.finish_reason == "max_tokens"
    assert recorder.text == full


def test_it_reports_the_token_limit(engine: Engine) -> None:
    recorder = complete(engine, max_tokens=5)
    assert recorder.finished.finish_reason == "max_tokens"
    assert recorder.finished.completion_tokens == 5


def test_it_caps_max_tokens_at_the_engine_limit(make_engine: Callable[..., Engine]) -> None:
    engine = make_engine(max_new_tokens=7)
    recorder = complete(engine, max_tokens=500)
    assert recorder.finished.completion_tokens == 7


def test_it_ends_on_eos(make_engine: Callable[..., Engine], tiny_model_dir: Path) -> None:
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    from inference.loader import LoadedModel

    # Declare the first token the tiny model writes an end-of-sequence token.
    model, tokenizer = cast(tuple[Any, Any], load(str(tiny_model_dir)))
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True)
    first_token = int(next(generate_step(mx.array(prompt), model, max_tokens=1))[0])
    original = LoadedModel.__init__

    def first_token_is_eos(self: LoadedModel, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self.tokenizer.eos_token_ids = {*self.tokenizer.eos_token_ids, first_token}

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(LoadedModel, "__init__", first_token_is_eos)
        engine = make_engine()
        recorder = complete(engine, max_tokens=10)
    assert recorder.finished.finish_reason == "eos"
    assert recorder.text == ""
    assert recorder.finished.completion_tokens == 1


def test_it_cancels_a_request_keeping_the_text_sent(engine: Engine) -> None:
    request_id, recorder = ask(engine, max_tokens=2000)
    wait_for_deltas(recorder, 3)
    engine.cancel(request_id)
    recorder.wait()
    assert recorder.finished.finish_reason == "stopped"
    assert recorder.finished.completion_tokens >= 3
    assert recorder.text
    assert complete(engine, max_tokens=4).finished.finish_reason == "max_tokens"


def test_it_ignores_cancelling_an_unknown_request(engine: Engine) -> None:
    engine.cancel("no-such-request")
    assert complete(engine, max_tokens=3).finished.finish_reason == "max_tokens"


# --------------------------------------------------------------------------- failures


def test_it_fails_an_unknown_model_and_keeps_serving(engine: Engine) -> None:
    _, recorder = ask(engine, model_id="no-such-model")
    recorder.wait()
    assert recorder.started is None
    assert recorder.finished.finish_reason == "error"
    assert "unknown model 'no-such-model'" in recorder.finished.error
    assert complete(engine, max_tokens=3).finished.finish_reason == "max_tokens"
    assert engine.alive


def test_it_fails_a_model_that_cannot_load(
    tiny_model_dir: Path, tmp_path: Path, make_engine: Callable[..., Engine]
) -> None:
    models = tmp_path / "models"
    broken = models / "broken"
    broken.mkdir(parents=True)
    (broken / "config.json").write_text('{"model_type": "llama"}')
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    (models / "tiny").symlink_to(tiny_model_dir)
    engine = make_engine(models)
    _, recorder = ask(engine, model_id="broken")
    recorder.wait()
    assert recorder.finished.finish_reason == "error"
    assert "cannot load" in recorder.finished.error
    assert complete(engine, max_tokens=3).finished.finish_reason == "max_tokens"


def test_it_fails_only_the_request_whose_event_handler_raises(engine: Engine) -> None:
    class Exploding(Recorder):
        def __call__(self, event: EngineEvent) -> None:
            super().__call__(event)
            if isinstance(event, Delta):
                raise RuntimeError("socket gone")

    _, healthy = ask(engine, max_tokens=30)
    _, broken = ask(engine, recorder=Exploding(), max_tokens=30)
    broken.wait()
    healthy.wait()
    assert broken.finished.finish_reason == "error"
    assert "socket gone" in broken.finished.error
    assert len(broken.deltas) == 1
    assert healthy.finished.finish_reason == "max_tokens"
    assert healthy.finished.completion_tokens == 30


def test_it_fails_a_request_whose_template_raises(
    tiny_model_dir: Path, tmp_path: Path, make_engine: Callable[..., Engine]
) -> None:
    import yaml

    from mlxweb.config import load_config

    configs = tmp_path / "configs"
    (configs / "models").mkdir(parents=True)
    (configs / "server.yaml").write_text("default_model: picky\n")
    template = (
        "{% for m in messages %}{% if 'boom' in m['content'] %}"
        "{{ raise_exception('no booms here') }}{% endif %}{{ m['content'] }}\n{% endfor %}"
    )
    (configs / "models" / "picky.yaml").write_text(
        yaml.safe_dump(
            {
                "name": "Picky",
                "source": {"path": "tiny"},
                "context_length": 2048,
                "chat_template": template,
            }
        )
    )
    config = load_config(configs, environ={})
    engine = Engine(catalogue=Catalogue(config, tiny_model_dir.parent), converted_dir=tmp_path)
    engine.start()
    try:
        _, boom = ask(engine, [{"role": "user", "content": "boom"}], model_id="picky")
        _, fine = ask(engine, [{"role": "user", "content": "fine"}], model_id="picky")
        assert boom.wait().finished.finish_reason == "error"
        assert "no booms here" in boom.finished.error and boom.started is None
        assert fine.wait().finished.finish_reason == "max_tokens"
    finally:
        engine.stop()


def test_it_fails_the_batch_when_a_step_raises_and_serves_on(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine.load("tiny")
    real_next = BatchGenerator.next
    calls = itertools.count()

    def failing_next(self: BatchGenerator) -> Any:
        if next(calls) == 3:
            raise RuntimeError("[malloc] out of memory")
        return real_next(self)

    monkeypatch.setattr(BatchGenerator, "next", failing_next)
    first = ask(engine, max_tokens=50)[1]
    second = ask(engine, max_tokens=50)[1]
    for recorder in (first, second):
        recorder.wait()
        assert recorder.finished.finish_reason == "error"
        assert "out of memory" in recorder.finished.error
    assert complete(engine, max_tokens=5).finished.finish_reason == "max_tokens"


def test_it_finishes_everything_when_the_thread_dies(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, running = ask(engine, max_tokens=2000)
    wait_for_deltas(running, 2)

    def broken_step(slot: Any) -> None:
        raise SystemError("interpreter trouble")

    monkeypatch.setattr(engine, "_step", broken_step)
    running.wait()
    assert running.finished.finish_reason == "error"
    assert "engine crashed" in running.finished.error
    wait_until(lambda: not engine.alive, timeout=10, interval=0.01, what="the engine to die")
    assert not engine.alive
    late = ask(engine)[1].wait(5)
    assert late.finished.finish_reason == "error" and "dead" in late.finished.error


def test_it_rejects_a_duplicate_request_id(engine: Engine) -> None:
    first, second = Recorder(), Recorder()
    params = GenerationParams.model_validate({"max_tokens": 20})
    request = GenerationRequest("same", "tiny", QUESTION, params)
    engine.submit(request, first)
    engine.submit(request, second)
    assert second.wait().finished.error == "duplicate request id"
    assert first.wait().finished.finish_reason in ("max_tokens", "eos")


# --------------------------------------------------------------------------- prompts


def test_it_reuses_the_prompt_cache_for_the_next_turn(make_engine: Callable[..., Engine]) -> None:
    engine = make_engine()
    turn1 = complete(engine, max_tokens=20)
    messages = [
        *QUESTION,
        {"role": "assistant", "content": turn1.text},
        {"role": "user", "content": "And the capital of Spain?"},
    ]
    turn2 = complete(engine, messages, max_tokens=20)
    assert turn2.started is not None
    assert turn2.started.cached_tokens >= turn1.started.prompt_tokens  # type: ignore[union-attr]
    assert turn2.started.cached_tokens < turn2.started.prompt_tokens

    uncached_engine = make_engine(prompt_cache_entries=0)
    uncached = complete(uncached_engine, messages, max_tokens=20)
    assert uncached.started is not None and uncached.started.cached_tokens == 0
    assert turn2.text == uncached.text

    # Asking the very same thing again hits the whole prompt.
    again = complete(engine, messages, max_tokens=20)
    assert again.started.cached_tokens == again.started.prompt_tokens - 1  # type: ignore[union-attr]
    assert again.text == turn2.text


def test_it_drops_the_oldest_turns_and_keeps_the_system_message(
    make_engine: Callable[..., Engine], tiny_model_dir: Path
) -> None:
    from mlx_lm.utils import load_tokenizer

    system = {"role": "system", "content": "You answer in one word."}
    history: list[dict[str, str]] = []
    for i in range(6):
        history.append({"role": "user", "content": f"Question number {i}: " + "why? " * 10})
        history.append({"role": "assistant", "content": f"Answer number {i}: " + "because. " * 10})
    messages = [system, *history, {"role": "user", "content": "And finally?"}]

    tokenizer = load_tokenizer(tiny_model_dir)

    def length(msgs: list[dict[str, str]]) -> int:
        return len(tokenizer.apply_chat_template(msgs, add_generation_prompt=True))

    limit = length([system, *history[8:], messages[-1]])  # room for the last two turns
    engine = make_engine(max_prompt_tokens=limit)
    recorder = complete(engine, messages, max_tokens=4)
    started = recorder.started
    assert started is not None
    assert started.trimmed_messages == 8
    assert started.prompt_tokens == limit  # the system message is still there
    assert recorder.finished.finish_reason == "max_tokens"


def test_it_refuses_a_last_message_longer_than_the_limit(
    make_engine: Callable[..., Engine],
) -> None:
    engine = make_engine(max_prompt_tokens=40)
    recorder = complete(engine, [{"role": "user", "content": "words " * 100}])
    assert recorder.started is None
    assert recorder.finished.finish_reason == "error"
    assert recorder.finished.error.startswith("prompt too long: ")
    assert recorder.finished.error.endswith("tokens, limit 40")


def test_it_leaves_room_for_the_reply_in_the_context(make_engine: Callable[..., Engine]) -> None:
    # The tiny model's context is 2048: asking for 2000 new tokens leaves a quarter of it.
    engine = make_engine(max_new_tokens=2000)
    long_history = []
    for i in range(12):
        long_history.append({"role": "user", "content": f"Q{i} " + "tell me more " * 20})
        long_history.append({"role": "assistant", "content": f"A{i} " + "sure thing " * 20})
    messages = [*long_history, {"role": "user", "content": "ok"}]
    _, recorder = ask(engine, messages, max_tokens=2000)
    wait_for_deltas(recorder, 1)
    started = recorder.started
    assert started is not None and started.trimmed_messages > 0
    assert started.prompt_tokens <= 2048 // 4
    engine.cancel(started.request_id)
    recorder.wait()


# --------------------------------------------------------------------------- the thread


def test_it_loads_a_model_on_request_and_raises_for_unknown_ones(engine: Engine) -> None:
    engine.load("tiny")
    with pytest.raises(UnknownModel):
        engine.load("no-such-model")


def test_it_keeps_at_most_the_configured_number_of_models(
    make_engine: Callable[..., Engine],
    tiny_model_dir: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    models = tmp_path / "two-models"
    models.mkdir()
    (models / "tiny-a").symlink_to(tiny_model_dir)
    (models / "tiny-b").symlink_to(tiny_model_dir)
    engine = make_engine(models, max_loaded_models=1)
    with caplog.at_level(logging.INFO, logger="inference.engine"):
        a = complete(engine, model_id="tiny-a", max_tokens=3)
        b = complete(engine, model_id="tiny-b", max_tokens=3)
        a_again = complete(engine, model_id="tiny-a", max_tokens=3)
    assert a.text == b.text == a_again.text
    unloaded = [r.getMessage() for r in caplog.records if r.getMessage().startswith("unloaded")]
    assert unloaded == ["unloaded model tiny-a", "unloaded model tiny-b"]


@pytest.mark.parametrize(("max_bytes", "float32"), [(2**31, True), (0, False)])
def test_it_serves_quantized_models_in_float32_on_the_cpu_within_the_budget(
    make_engine: Callable[..., Engine],
    smollm2_gguf: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    max_bytes: int,
    float32: bool,
) -> None:
    build_tiny_model(tmp_path / "quantized" / "tiny", smollm2_gguf, quantize_bits=4)
    engine = make_engine(tmp_path / "quantized", cpu_float32_max_bytes=max_bytes)
    with caplog.at_level(logging.INFO, logger="inference.loader"):
        recorder = complete(engine, max_tokens=5)
    assert recorder.finished.finish_reason == "max_tokens" and recorder.text
    said = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("model tiny runs in float32 on the CPU") for m in said) is float32


def test_it_waits_on_its_queue_when_idle(engine: Engine) -> None:
    complete(engine, max_tokens=3)

    # A preloaded OpenBLAS's worker threads spin for a moment after each call: measure once the
    # process has gone quiet (a 50 ms stretch with under 5 ms of CPU), not after a fixed wait.
    def quiet() -> bool:
        before = time.process_time()
        time.sleep(0.05)
        return time.process_time() - before < 0.005

    wait_until(quiet, timeout=10, interval=0, what="the process to go quiet after the reply")
    before = time.process_time()
    time.sleep(0.5)  # the stretch measured: an idle engine uses no CPU in it
    assert time.process_time() - before < 0.05


def test_it_stops_active_requests_and_refuses_new_ones(make_engine: Callable[..., Engine]) -> None:
    engine = make_engine()
    _, running = ask(engine, max_tokens=2000)
    wait_for_deltas(running, 2)
    engine.stop()
    assert running.wait(5).finished.finish_reason == "stopped"
    assert not engine.alive
    late = ask(engine)[1].wait(5)
    assert late.finished.finish_reason == "error" and "stopped" in late.finished.error
    with pytest.raises(RuntimeError, match="stopped"):
        engine.load("tiny")
    engine.start()  # idempotent: a stopped engine stays stopped
    assert not engine.alive


def test_it_emits_events_from_its_own_thread(engine: Engine) -> None:
    threads: set[int] = set()
    recorder = Recorder()

    def emit(event: EngineEvent) -> None:
        threads.add(threading.get_ident())
        recorder(event)

    params = GenerationParams.model_validate({"max_tokens": 3})
    engine.submit(GenerationRequest("t", "tiny", QUESTION, params), emit)
    recorder.wait()
    assert len(threads) == 1 and threading.get_ident() not in threads
