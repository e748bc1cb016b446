"""Continuing a reply (issue 9): the engine writes what follows an assistant prefix, exactly
what it would have written had the reply gone on; through the worker the new row starts with
the prefix, grows with new text only, and keeps provenance and the token trace."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer

from inference import services
from inference.catalogue import Catalogue, UnknownModel
from inference.engine import Engine, GenerationRequest
from inference.models import Generation, PromptMessage
from inference.provenance import trace_entry, trace_text
from inference.schemas import ChatMessage, GenerationParams
from mlxweb.config import Config, ServerConfig
from tests.inference.test_engine import QUESTION, Recorder
from tests.support.worker import in_process_worker

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def engine(tiny_model_dir: Path, tmp_path: Path) -> Iterator[Engine]:
    server = ServerConfig.model_validate({"default_model": "tiny"})
    catalogue = Catalogue(Config(server=server, models={}), tiny_model_dir.parent)
    engine = Engine(catalogue=catalogue, converted_dir=tmp_path / "converted")
    engine.start()
    yield engine
    engine.stop()


def _run(
    engine: Engine,
    request_id: str,
    prefix: str = "",
    prefix_tokens: tuple[int, ...] = (),
    **params: Any,
) -> Recorder:
    values = {"temperature": 0.0, "max_tokens": 24, **params}
    request = GenerationRequest(
        request_id,
        "tiny",
        QUESTION,
        GenerationParams.model_validate(values),
        assistant_prefix=prefix,
        assistant_prefix_tokens=prefix_tokens,
    )
    recorder = Recorder()
    engine.submit(request, recorder)
    return recorder.wait()


def _tokens(recorder: Recorder) -> list[dict[str, Any]]:
    return [trace_entry(e) for d in recorder.deltas for e in (d.logprobs or [])]


def _text_of_tokens(tokens: list[dict[str, Any]], reply: str) -> str:
    """The reply text those first tokens wrote (the detokenizer trims the reply's leading
    space)."""
    text = trace_text(tokens)
    return text if reply.startswith(text) else text.removeprefix(" ")


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Any:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(tiny_model_dir)


def _canonical_cuts(tokenizer: Any, tokens: list[dict[str, Any]]) -> list[int]:
    """The token counts whose text tokenizes back into the same tokens. A random model may
    write a word in pieces that its tokenizer would not choose (real models rarely do); text
    that tokenizes otherwise continues from the tokenizer's tokens, as any prompt would."""
    cuts = []
    for cut in range(1, len(tokens)):
        ids = tokenizer.encode(trace_text(tokens[:cut]), add_special_tokens=False)
        pieces = [trace_text([{"token": tokenizer.decode([i])}]) for i in ids]
        if pieces == [t["token"] for t in tokens[:cut]]:
            cuts.append(cut)
    return cuts


@pytest.mark.parametrize("cut", [1, 7, 15, 23])
def test_greedy_continuation_from_a_greedy_replys_tokens_writes_the_rest_of_it(
    engine: Engine, cut: int
) -> None:
    full = _run(engine, f"full-{cut}", logprobs=True, top_logprobs=2)
    assert full.finished.finish_reason == "max_tokens"
    tokens = _tokens(full)
    assert len(tokens) == 24
    prefix = _text_of_tokens(tokens[:cut], full.text)
    ids = tuple(t["id"] for t in tokens[:cut])
    rest = _run(
        engine, f"rest-{cut}", prefix, ids, max_tokens=24 - cut, logprobs=True, top_logprobs=2
    )
    assert rest.finished.finish_reason == "max_tokens"
    assert rest.finished.completion_tokens == 24 - cut
    # Deltas carry only the new text: the prefix and the continuation are the whole reply.
    assert prefix + rest.text == full.text
    assert _tokens(rest) == tokens[cut:]
    # The prompt counts the prefix's tokens.
    assert rest.started is not None and full.started is not None
    assert rest.started.prompt_tokens == full.started.prompt_tokens + cut


def test_a_text_prefix_continues_exactly_where_it_tokenizes_back_the_same(
    engine: Engine, tokenizer: Any
) -> None:
    full = _run(engine, "text-full", logprobs=True)
    tokens = _tokens(full)
    cuts = _canonical_cuts(tokenizer, tokens)
    assert cuts
    for cut in cuts[:3]:
        # The text as the tokens wrote it: with the first token's space, which the reply's
        # text has trimmed.
        prefix = trace_text(tokens[:cut])
        rest = _run(engine, f"text-rest-{cut}", prefix, max_tokens=24 - cut, logprobs=True)
        assert prefix + rest.text == trace_text(tokens)
        assert [t["id"] for t in _tokens(rest)] == [t["id"] for t in tokens[cut:]]


def test_a_prefix_token_outside_the_vocabulary_is_an_error(engine: Engine) -> None:
    failed = _run(engine, "bad-ids", "x", (10**9,), max_tokens=2)
    assert failed.finished.finish_reason == "error"
    assert "not in the vocabulary" in failed.finished.error


def test_a_continuation_with_another_token_goes_on_from_that_token(engine: Engine) -> None:
    full = _run(engine, "fork-full", logprobs=True, top_logprobs=3)
    tokens = _tokens(full)
    alternative = next(t for t in tokens[4]["top"] if t["token"] != tokens[4]["token"])
    prefix = _text_of_tokens(tokens[:4], full.text) + alternative["token"]
    ids = (*[t["id"] for t in tokens[:4]], alternative["id"])
    assert not full.text.startswith(prefix)
    forked = _run(engine, "fork", prefix, ids, max_tokens=6)
    assert forked.finished.finish_reason == "max_tokens"
    assert forked.finished.completion_tokens == 6
    assert forked.started is not None and full.started is not None
    assert forked.started.prompt_tokens == full.started.prompt_tokens + 5
    # Greedy from the chosen token on: the same prefix continues the same way every time.
    assert _run(engine, "fork-again", prefix, ids, max_tokens=6).text == forked.text


def test_started_carries_the_models_provenance(engine: Engine) -> None:
    recorder = _run(engine, "prov", max_tokens=2)
    assert recorder.started is not None
    provenance = recorder.started.provenance
    assert provenance["model_id"] == "tiny"
    assert provenance["kind"] == "mlx"
    assert len(provenance["chat_template_sha256"]) == 64
    assert len(provenance["weights_fingerprint"]) == 64
    assert provenance["versions"]["mlx"] and provenance["versions"]["mlx_lm"]
    assert provenance["quantization"] == {"method": "none"}
    assert provenance["compute_dtype"] == "float32"


# --- through the worker ------------------------------------------------------------------


@pytest.fixture
async def worker(tiny: str) -> AsyncIterator[None]:
    async with in_process_worker():
        yield


async def _listen() -> tuple[str, str]:
    layer = get_channel_layer()
    assert layer is not None
    channel = await layer.new_channel()
    group = f"test-{channel.rsplit('!', 1)[-1]}"
    await layer.group_add(group, channel)
    return channel, group


async def _until_done(channel: str) -> list[dict[str, Any]]:
    layer = get_channel_layer()
    assert layer is not None
    heard = []
    async with asyncio.timeout(200):
        while True:
            message = await layer.receive(channel)
            heard.append(message)
            if message["type"] == "generation.done":
                return heard


async def _create(make: Callable[..., Generation], **kwargs: Any) -> tuple[Generation, list]:
    channel, group = await _listen()
    row = await sync_to_async(make)(notify_group=group, **kwargs)
    heard = await _until_done(channel)
    return await Generation.objects.aget(pk=row.pk), heard


@pytest.mark.django_db(transaction=True)
async def test_a_continued_row_starts_with_the_prefix_and_grows_with_new_text(
    worker: None,
) -> None:
    first, _ = await _create(
        services.generation_create,
        model_id="tiny",
        messages=[ChatMessage(role="user", content="What is the capital of France?")],
        params=GenerationParams(temperature=0.0, max_tokens=20),
        replayable=True,
    )
    assert first.finish_reason == Generation.FinishReason.MAX_TOKENS
    # Provenance: the request's half (greedy: no seed needed) and the model's.
    assert first.provenance["seed_source"] == "greedy"
    assert first.provenance["sampler"]["max_tokens"] == 20
    assert first.provenance["model_id"] == "tiny"
    assert len(first.provenance["chat_template_sha256"]) == 64
    # The trace: one entry per token, five alternatives each, the sampled token first.
    assert len(first.token_trace) == 20
    assert all(len(entry["top"]) == 5 for entry in first.token_trace)
    assert all(entry["top"][0]["token"] == entry["token"] for entry in first.token_trace)

    n = 9
    cut = _text_of_tokens(first.token_trace[:n], first.text)
    reference, _ = await _create(
        services.generation_create,
        model_id="tiny",
        messages=[ChatMessage(role="user", content="What is the capital of France?")],
        params=GenerationParams(temperature=0.0, max_tokens=30),
    )
    continued, heard = await _create(
        services.generation_continue,
        generation=first,
        prefix=cut,
        params=GenerationParams(temperature=0.0, max_tokens=30 - n),
    )
    assert continued.state == Generation.State.COMPLETE
    assert continued.text == reference.text
    assert continued.details["prefix_chars"] == len(cut)
    assert continued.details["continues"] == str(first.code)
    assert continued.details["prefix_tokens"] == n
    assert continued.provenance["continues"] == str(first.code)
    assert continued.prompt_id == first.prompt_id
    assert continued.completion_tokens == 30 - n
    streamed = "".join(m["text"] for m in heard if m["type"] == "generation.delta")
    assert streamed == reference.text[len(cut) :]
    # The prefix's trace entries are kept, the new tokens' follow.
    assert len(continued.token_trace) == 30
    assert continued.token_trace[:n] == first.token_trace[:n]
    assert continued.content == continued.text


@pytest.mark.django_db(transaction=True)
async def test_a_sampled_replayable_reply_records_the_seed_it_used_and_replays(worker) -> None:
    question = [ChatMessage(role="user", content="Tell me a story.")]
    # The prompt is cached first, so the reply and its replay both prefill only its last token
    # on that cache: prefilled whole, the prompt's last position comes out of a different
    # matmul, and the tiny model's near-uniform distribution made a sampled token differ once.
    await _create(
        services.generation_create,
        model_id="tiny",
        messages=question,
        params=GenerationParams(temperature=0.0, max_tokens=1),
    )
    first, _ = await _create(
        services.generation_create,
        model_id="tiny",
        messages=question,
        params=GenerationParams(temperature=1.0, max_tokens=12),
        replayable=True,
    )
    assert first.provenance["seed_source"] == "picked"
    seed = first.provenance["seed"]
    assert isinstance(seed, int) and first.params["seed"] == seed
    again, _ = await _create(
        services.generation_create,
        model_id="tiny",
        messages=question,
        params=GenerationParams(temperature=1.0, max_tokens=12, seed=seed),
    )
    assert again.provenance["seed_source"] == "request"
    assert again.text == first.text


@pytest.mark.django_db
def test_an_active_or_raw_reply_cannot_be_continued(tiny: str) -> None:
    active = services.generation_create(
        model_id="tiny",
        messages=[ChatMessage(role="user", content="hi")],
        params=GenerationParams(),
    )
    with pytest.raises(services.NotContinuable, match="still being written"):
        services.generation_continue(generation=active)
    done = services.generation_record(
        model_id="tiny",
        messages=[ChatMessage(role="user", content="hi")],
        text="hello",
        params=GenerationParams(),
    )
    with pytest.raises(services.NotContinuable, match="over 1,000,000"):
        services.generation_continue(generation=done, prefix="x" * 1_000_001)
    with pytest.raises(UnknownModel):
        services.generation_continue(generation=done, model_id="nope")
    assert done.prompt is not None
    done.prompt.role = PromptMessage.Role.RAW
    done.prompt.save()
    with pytest.raises(services.NotContinuable, match="raw completion"):
        services.generation_continue(generation=done)


def test_the_trace_covering_a_prefix_is_a_whole_number_of_its_tokens() -> None:
    trace = [
        {"token": " Par", "id": 1},
        {"token": "is", "id": 2},
        {"token": " is", "id": 3},
        {"token": "\ufffd", "bytes": [0xC3], "id": 4},
        {"token": "\ufffd", "bytes": [0xA9], "id": 5},
    ]
    covering = services._trace_covering
    # The reply's text lost its first token's space (detokenizers trim it).
    assert covering(trace, "Paris") == trace[:2]
    assert covering(trace, " Paris is") == trace[:3]
    assert covering(trace, "Paris isé") == trace  # a character split over two tokens
    assert covering(trace, "Pari") == []  # mid-token: the engine tokenizes the text
    assert covering(trace, "Lyon") == []
