"""The engine's scheduler on the tiny real model: chunked prefill between decode steps,
max_batch_tokens, priorities, and the one-stream path against the batch path."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from inference import fused
from inference.catalogue import Catalogue
from inference.engine import Delta, Engine, EngineEvent, GenerationRequest
from inference.schemas import GenerationParams
from mlxweb.config import Config, ServerConfig
from tests.support.engine import Recorder
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(120)

_ids = itertools.count()
SHORT = [{"role": "user", "content": "Say hi."}]
# Words the tokenizer keeps as single tokens: about 4 tokens a repeat.
LONG_TEXT = "The quick brown fox jumps over the lazy dog. " * 120


class RecordingModel:
    """The model, recording the width of every call (prefill chunks are (1, n))."""

    def __init__(self, model: Any) -> None:
        self._model = model
        self.widths: list[int] = []

    def __call__(self, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        self.widths.append(int(inputs.shape[1]))
        return self._model(inputs, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


@pytest.fixture
def make_engine(tiny_model_dir: Path, tmp_path: Path) -> Iterator[Callable[..., Engine]]:
    engines: list[Engine] = []

    def make(**options: Any) -> Engine:
        server = ServerConfig.model_validate({"default_model": "tiny"})
        catalogue = Catalogue(Config(server=server, models={}), tiny_model_dir.parent)
        options.setdefault("prompt_cache_entries", 0)  # every prompt prefills in full
        engine = Engine(catalogue=catalogue, converted_dir=tmp_path / "converted", **options)
        engine.start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.stop()


def ask(
    engine: Engine,
    messages: list[dict[str, Any]],
    recorder: Recorder,
    *,
    priority: str = "interactive",
    **params: Any,
) -> Recorder:
    params = {"temperature": 0.0, "max_tokens": 8} | params
    request = GenerationRequest(
        f"sched-{next(_ids)}",
        "tiny",
        messages,
        GenerationParams.model_validate(params),
        priority=priority,
    )
    engine.submit(request, recorder)
    return recorder


def _first_delta(log: list[tuple[str, EngineEvent]], recorder: Recorder) -> int:
    request_id = recorder.finished.request_id
    return next(i for i, (rid, e) in enumerate(log) if rid == request_id and isinstance(e, Delta))


def _started(recorder: Recorder) -> bool:
    return bool(recorder.events)


def test_a_long_prompt_does_not_hold_back_a_short_one(make_engine: Callable[..., Engine]) -> None:
    # 16 tokens a step: the long prompt needs well over a hundred chunks.
    engine = make_engine(max_batch_tokens=16)
    engine.load("tiny")
    log: list[tuple[str, EngineEvent]] = []
    long = ask(engine, [{"role": "user", "content": LONG_TEXT}], Recorder(log), max_tokens=4)
    wait_until(lambda: _started(long), timeout=30, what="the long request started")
    short = ask(engine, SHORT, Recorder(log), max_tokens=4)
    short.wait()
    long.wait()
    # Its first token came while the long prompt was still prefilling: before the long
    # request's first token, which its last chunk gives.
    assert _first_delta(log, short) < _first_delta(log, long)
    assert short.finished.finish_reason == "max_tokens"
    assert long.finished.finish_reason == "max_tokens"
    assert long.finished.prompt_tokens > 500
    assert long.finished.details["prefill_chunks"] >= long.finished.prompt_tokens // 16


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "separate"])
def test_chunks_stay_within_max_batch_tokens(
    make_engine: Callable[..., Engine], monkeypatch: pytest.MonkeyPatch, fuse: bool
) -> None:
    engine = make_engine(max_batch_tokens=24)
    engine.fuse_prefill = fuse
    engine.load("tiny")
    slot = engine._slots["tiny"]
    recording = RecordingModel(slot.loaded.model)
    slot.loaded.model = recording  # type: ignore[assignment]
    # A chunk that rides a decode pass (inference.fused) is counted with the pass's rows.
    passes: list[list[tuple[int, int]]] = []
    forward = fused.forward

    def recording_forward(model: Any, segments: list[Any]) -> list[Any]:
        passes.append([(int(t.shape[0]), int(t.shape[1])) for t, _, _ in segments])
        return forward(model, segments)

    monkeypatch.setattr(fused, "forward", recording_forward)
    # Two streams decode while the long prompt prefills: its chunks leave room for their rows.
    chats = [ask(engine, SHORT, Recorder(), max_tokens=400) for _ in range(2)]
    wait_until(lambda: all(len(c.deltas) >= 2 for c in chats), timeout=30, what="two streams")
    long = ask(engine, [{"role": "user", "content": LONG_TEXT}], Recorder(), max_tokens=2)
    long.wait()
    for chat in chats:
        engine.cancel(chat.events[0].request_id)
        chat.wait()
    # A pass of one segment is a prompt's own (inference.fused computes only its last logits);
    # in a pass of several, the first segment is the decode batch.
    riders = [
        width
        for segments in passes
        for _, width in (segments if len(segments) == 1 else segments[1:])
    ]
    chunks = [w for w in recording.widths if w > 1] + riders
    assert chunks, recording.widths
    assert max(chunks) <= 24
    assert all(sum(rows * width for rows, width in segments) <= 24 for segments in passes)
    prompt_tokens = long.finished.prompt_tokens
    short_prompts = 2 * chats[0].finished.prompt_tokens
    assert sum(recording.widths) + sum(riders) >= prompt_tokens + short_prompts
    # While both chats decoded, the long prompt's chunks took at most 24 - 2 tokens.
    assert long.finished.details["prefill_chunks"] >= prompt_tokens // 22
    # Fused: once the decode step's cost was measured, the chunks rode its passes.
    fused_chunks = long.finished.details["prefill_fused"]
    assert fused_chunks > long.finished.details["prefill_chunks"] // 2 if fuse else not fused_chunks


def test_interactive_requests_prefill_before_batch_ones(
    make_engine: Callable[..., Engine],
) -> None:
    engine = make_engine(max_batch_tokens=16)
    engine.load("tiny")
    log: list[tuple[str, EngineEvent]] = []
    background_text = "Summarize: " + "a title for this chat " * 40
    interactive_text = "Please answer: " + "why is the sky blue at noon " * 60
    background = ask(
        engine, [{"role": "user", "content": background_text}], Recorder(log), priority="batch"
    )
    interactive = ask(engine, [{"role": "user", "content": interactive_text}], Recorder(log))
    background.wait()
    interactive.wait()
    # The background prompt is shorter and came first, yet the interactive one was served
    # first.
    assert background.finished.prompt_tokens < interactive.finished.prompt_tokens
    assert _first_delta(log, interactive) < _first_delta(log, background)


def test_one_stream_and_the_batch_write_the_same_greedy_text(
    make_engine: Callable[..., Engine],
) -> None:
    engine = make_engine()
    story = [{"role": "user", "content": "Tell me a story."}]
    alone = ask(engine, story, Recorder(), max_tokens=60).wait()
    assert alone.finished.details["decode_path"] == "solo"

    # It starts alone, a second request makes it join the batch mid-reply, and once that one
    # ends it goes back to the solo path: the text is the same, token for token.
    moved = ask(engine, story, Recorder(), max_tokens=60)
    wait_until(lambda: len(moved.deltas) >= 5, timeout=30, what="the first stream's tokens")
    other = ask(engine, SHORT, Recorder(), max_tokens=10).wait()
    moved.wait()
    assert moved.finished.details["decode_path"].startswith("solo+batch")
    assert moved.finished.completion_tokens == alone.finished.completion_tokens
    assert moved.text == alone.text

    # In the batch from its first token to its last.
    first = ask(engine, SHORT, Recorder(), max_tokens=200)
    wait_until(lambda: len(first.deltas) >= 2, timeout=30, what="a stream")
    batched = ask(engine, story, Recorder(), max_tokens=60).wait()
    engine.cancel(first.finished.request_id if first.done.is_set() else first.events[0].request_id)
    first.wait()
    assert batched.finished.details["decode_path"] == "batch"
    assert batched.text == alone.text
    assert other.finished.finish_reason == "max_tokens"


def test_a_solo_stream_keeps_its_logprobs_and_stop_strings(
    make_engine: Callable[..., Engine],
) -> None:
    engine = make_engine()
    story = [{"role": "user", "content": "Tell me a story."}]
    plain = ask(engine, story, Recorder(), max_tokens=30).wait()
    words = plain.text.split()
    assert len(words) > 3
    stop = words[3]
    cut = ask(engine, story, Recorder(), max_tokens=30, stop=[stop]).wait()
    assert cut.finished.finish_reason == "stop_string"
    assert cut.text == plain.text[: plain.text.index(stop)]
    scored = ask(engine, story, Recorder(), max_tokens=12, logprobs=True, top_logprobs=2).wait()
    entries = [x for e in scored.events if isinstance(e, Delta) for x in (e.logprobs or [])]
    assert len(entries) == 12
    assert all(len(x["top_logprobs"]) == 2 and x["logprob"] <= 0 for x in entries)


class RecordingRows(RecordingModel):
    """The model, recording the shape of every call: (rows, tokens), and of every prompt's own
    pass through inference.fused.forward (the model's blocks, without its call: only the last
    position's logits)."""

    def __init__(self, model: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        super().__init__(model)
        self.shapes: list[tuple[int, int]] = []
        forward = fused.forward

        def recording_forward(model: Any, segments: list[Any]) -> list[Any]:
            if model is self:  # a pass of the engine's own, not a decode pass carrying riders
                self.shapes += [(int(t.shape[0]), int(t.shape[1])) for t, _, _ in segments]
            return forward(model, segments)

        monkeypatch.setattr(fused, "forward", recording_forward)

    def __call__(self, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        self.shapes.append((int(inputs.shape[0]), int(inputs.shape[1])))
        return super().__call__(inputs, *args, **kwargs)


def test_prompts_that_wait_together_prefill_as_rows_of_one_batch(
    make_engine: Callable[..., Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    questions = [
        "Tell me a story.",
        "What is the capital of France? Answer in one word, please.",
        "Name three colours.",
        "Why is the sky blue at noon but red in the evening? " * 3,
    ]
    engine = make_engine(max_batch_tokens=64)
    engine.load("tiny")
    slot = engine._slots["tiny"]
    recording = RecordingRows(slot.loaded.model, monkeypatch)
    slot.loaded.model = recording  # type: ignore[assignment]
    # One at a time: each prefills alone (and the engine learns its prefill speed).
    alone = [
        ask(engine, [{"role": "user", "content": q}], Recorder(), max_tokens=12).wait()
        for q in questions
    ]
    assert all(r.finished.details["prefill_rows"] == 1 for r in alone)
    assert all(rows == 1 for rows, _ in recording.shapes)

    # Sent together, they wait for the same step: new prompts at offset 0, prefilled as rows of
    # one forward pass; the shorter ones leave the batch as their prompts end.
    recorders = [Recorder() for _ in questions]
    for question, recorder in zip(questions, recorders, strict=True):
        ask(engine, [{"role": "user", "content": question}], recorder, max_tokens=12)
    together = [r.wait() for r in recorders]
    assert max(r.finished.details["prefill_rows"] for r in together) >= 2
    assert max(rows for rows, width in recording.shapes if width > 1) >= 2
    # Rows counted, no call went past the step's token bound.
    assert max(rows * width for rows, width in recording.shapes) <= 64
    # Each prompt's rows gave it the same cache as its prefill alone: the same greedy text,
    # token for token, and the prompt counted once.
    for one, other in zip(alone, together, strict=True):
        assert other.text == one.text
        assert other.finished.prompt_tokens == one.finished.prompt_tokens
        assert other.finished.finish_reason == one.finished.finish_reason


def test_prompts_that_share_a_cached_prefix_prefill_their_rest_together(
    make_engine: Callable[..., Engine],
) -> None:
    # A kept cache's arrays are longer than its tokens (trimmed to the shared prefix): each
    # row's part is cut to its tokens before the rows stack.
    engines = [make_engine(prompt_cache_entries=16, max_batch_tokens=256) for _ in range(2)]
    system = {"role": "system", "content": "You are a helpful assistant. " * 40}

    def chat(question: str) -> list[dict[str, Any]]:
        return [system, {"role": "user", "content": question}]

    questions = [f"Question {i}: " + "why is that so " * (i + 1) for i in range(4)]
    # Each engine keeps the system prompt from a first question; then the questions go to one
    # engine one at a time and to the other together: each hits the kept prefix.
    for engine in engines:
        ask(engine, chat("A first question."), Recorder()).wait()
    alone = [ask(engines[0], chat(q), Recorder()).wait() for q in questions]
    together = [Recorder() for _ in questions]
    for question, recorder in zip(questions, together, strict=True):
        ask(engines[1], chat(question), recorder)
    for recorder in together:
        recorder.wait()
    assert all(r.finished.prompt_cache == "memory" for r in alone + together)
    assert max(r.finished.details["prefill_rows"] for r in together) >= 2
    for one, other in zip(alone, together, strict=True):
        assert other.finished.finish_reason == one.finished.finish_reason == "max_tokens"
        assert other.text == one.text


def test_cuda_shapes_pad_chunks_and_align_prefixes_without_changing_the_text(
    make_engine: Callable[..., Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    # On CUDA every new prefill length costs a graph build, so chunks are padded to a multiple
    # of CUDA_SHAPE_GRANULE and kept prefixes reused in multiples of it. The padding lies past
    # each cache's tokens and the cut prefix is prefilled again: the text must not change.
    import inference.engine as engine_module

    plain = make_engine(prompt_cache_entries=16, max_batch_tokens=96)
    plain.load("tiny")  # its thread has read the device before the patch below
    monkeypatch.setattr(engine_module, "_on_cuda", lambda: True)
    padded = make_engine(prompt_cache_entries=16, max_batch_tokens=96)
    padded.load("tiny")
    granule = engine_module.CUDA_SHAPE_GRANULE
    slot = padded._slots["tiny"]
    recording = RecordingRows(slot.loaded.model, monkeypatch)
    slot.loaded.model = recording  # type: ignore[assignment]
    system = {"role": "system", "content": "You are a helpful assistant. " * 15}

    def chat(question: str) -> list[dict[str, Any]]:
        return [system, {"role": "user", "content": question}]

    questions = [f"Question {i}: " + "why is that so " * (3 * i + 1) for i in range(3)]
    texts: dict[Engine, list[str]] = {}
    for engine in (plain, padded):
        first = ask(engine, chat("A first question."), Recorder(), max_tokens=12).wait()
        alone = [ask(engine, chat(q), Recorder(), max_tokens=12).wait() for q in questions]
        together = [Recorder() for _ in questions]
        for question, recorder in zip(questions, together, strict=True):
            ask(engine, chat(question), recorder, max_tokens=12)
        texts[engine] = [r.wait().text for r in [first, *alone, *together]]
        if engine is padded:
            cached = [r.started.cached_tokens for r in alone + together if r.started]
            assert cached and all(n % granule == 0 for n in cached) and max(cached) > 0
    assert texts[padded] == texts[plain]
    prefills = [(rows, width) for rows, width in recording.shapes if width > 1]
    assert prefills and all(width % granule == 0 for _, width in prefills)


def test_cuda_chunks_take_lengths_from_the_ladder_without_changing_the_text(
    make_engine: Callable[..., Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    # On CUDA a chunk length chosen by measured times was a new shape from run to run, and a
    # new shape costs a prefill several times over the first time: there a chunk is the
    # granule times a power of two, or the prompt's whole rest.
    import inference.engine as engine_module

    plain = make_engine(max_batch_tokens=96)
    plain.load("tiny")
    monkeypatch.setattr(engine_module, "_on_cuda", lambda: True)
    laddered = make_engine(max_batch_tokens=96)
    laddered.load("tiny")
    slot = laddered._slots["tiny"]
    recording = RecordingRows(slot.loaded.model, monkeypatch)
    slot.loaded.model = recording  # type: ignore[assignment]
    messages = [{"role": "user", "content": LONG_TEXT[:1500]}]
    texts = [
        ask(engine, messages, Recorder(), max_tokens=12).wait().text
        for engine in (plain, laddered)
    ]
    assert texts[0] == texts[1]
    widths = [width for _, width in recording.shapes if width > 1]
    rungs = {engine_module.CUDA_SHAPE_GRANULE * 2**k for k in range(8)}
    assert len(widths) >= 4 and all(width in rungs for width in widths[:-1]), widths
    assert widths[-1] % engine_module.CUDA_SHAPE_GRANULE == 0


def _waiting(engine: Engine, rest: int, started_at: float) -> Any:
    """A request of `engine` with `rest` prompt tokens to prefill, as the engine keeps it."""
    from inference import engine as engine_module

    request = GenerationRequest(
        id=f"r{next(_ids)}", model_id="tiny", messages=SHORT, params=GenerationParams()
    )
    active = engine_module._Active(
        request=request, emit=lambda event: None, slot=None, uid=-1,  # type: ignore[arg-type]
        detokenizer=None, stop=(), prompt_tokens=rest, started_at=started_at,
    )  # fmt: skip
    active.seq = engine_module._Seq(
        cache=[], fed=[], rest=[1] * rest, sampler=None, processors=[], max_tokens=8,
        chunk=float(engine.max_batch_tokens),
    )  # fmt: skip
    return active


def test_a_cuda_step_runs_a_second_pass_only_to_finish_prompts_and_never_starves_one(
    make_engine: Callable[..., Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    # On CUDA a pass costs about the same for 256 tokens as for 1,500: after a step's first
    # pass, a second runs only for prompts it finishes. A prompt that shorter, newer ones keep
    # passing over gets its partial pass after PASSED_OVER_STEPS steps.
    from types import SimpleNamespace

    from inference import engine as engine_module

    engine = make_engine(max_batch_tokens=256)
    engine._granule = engine_module.CUDA_SHAPE_GRANULE
    passes: list[tuple[list[str], int]] = []

    def one_pass(slot: Any, rows: list[Any], n: int) -> bool:
        passes.append(([a.request.id for a in rows], n))
        for active in rows:
            active.seq.fed += active.seq.rest[:n]
            active.seq.rest = active.seq.rest[n:]
            active.seq.prefilled = not active.seq.rest
        return True

    monkeypatch.setattr(engine, "_prefill_or_fail", one_pass)
    old = _waiting(engine, 1000, started_at=1.0)
    slot = SimpleNamespace(prefilling=[old], chunk=256.0, token_s=0.0)

    def step(*newcomers: Any) -> list[tuple[list[str], int]]:
        slot.prefilling = [a for a in slot.prefilling if not a.seq.prefilled] + list(newcomers)
        passes.clear()
        engine._prefill_step(slot, decode_s=0.01, rows=4)  # type: ignore[arg-type]
        return list(passes)

    # Alone, the long prompt takes the step's first pass, on the ladder (252 tokens fit: 128).
    assert step() == [([old.request.id], 128)]
    # Newer short prompts go first; the long one waits rather than take a partial second pass.
    for i in range(engine_module.PASSED_OVER_STEPS):
        short = _waiting(engine, 40, started_at=2.0 + i)
        assert step(short) == [([short.request.id], 40)]
    # Passed over that often, it gets the partial pass beside the next newcomer's.
    short = _waiting(engine, 40, started_at=10.0)
    ran = step(short)
    assert ran[0] == ([short.request.id], 40) and ran[1][0] == [old.request.id]
    assert old.seq.passed_over == 0
    # A second pass that finishes its prompts always runs.
    pair = [_waiting(engine, 40, started_at=20.0), _waiting(engine, 30, started_at=21.0)]
    pair[1].seq.fed = [1]  # another offset: a pass of its own
    assert [ids for ids, _ in step(*pair)] == [[pair[1].request.id], [pair[0].request.id]]


def test_chunks_riding_decode_passes_write_the_same_text(
    make_engine: Callable[..., Engine],
) -> None:
    # The long prompt prefills while two chats decode: with fusion its chunks go through the
    # chats' decode passes (inference.fused), without it each is a pass of its own. Every
    # reply is the same greedy text either way.
    texts = []
    for fuse in (True, False):
        engine = make_engine(max_batch_tokens=48)
        engine.fuse_prefill = fuse
        chats = [
            ask(engine, [{"role": "user", "content": q}], Recorder(), max_tokens=40)
            for q in ("Say hi.", "Name a colour.")
        ]

        def both_streaming(streaming: list[Recorder] = chats) -> bool:
            return all(len(c.deltas) >= 2 for c in streaming)

        wait_until(both_streaming, timeout=30, what="two streams")
        long = ask(engine, [{"role": "user", "content": LONG_TEXT[:1500]}], Recorder())
        short = ask(engine, [{"role": "user", "content": "Why?"}], Recorder())
        replies = [r.wait() for r in [*chats, long, short]]
        fused_chunks = long.finished.details["prefill_fused"]
        assert fused_chunks > 0 if fuse else fused_chunks == 0
        # The short question's prompt fits the step: with fusion it goes through the model
        # whole just before a decode pass (its first token sooner); without, chunks follow it.
        ahead = short.finished.details["prefill_ahead"]
        if fuse:
            assert (ahead, short.finished.details["prefill_chunks"]) == (1, 1)
        else:
            assert ahead == 0
        texts.append([r.text for r in replies])
    assert texts[0] == texts[1]
