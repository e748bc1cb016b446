"""mlxweb's gRPC service through `mlxweb.client`, against a live `manage.py serve`."""

from __future__ import annotations

import math
import os
import signal
import stat
import subprocess
import sys
import textwrap
from collections.abc import Sequence

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mlxweb.client import Client, ClientError, Delta, Finished, Started
from tests.api.conftest import EMBED_MODEL
from tests.grpc.conftest import LiveGrpc
from tests.support.live import ROOT

pytestmark = [pytest.mark.timeout(300)]

HELLO = [{"role": "user", "content": "Say hello"}]
# Long enough that the tiny model is still writing when a test stops it.
LONG = {"max_tokens": 2000, "temperature": 0}


def _split(events: Sequence[object]) -> tuple[Started, str, Finished]:
    assert isinstance(events[0], Started), events[:1]
    assert isinstance(events[-1], Finished), events[-1:]
    deltas = events[1:-1]
    assert all(isinstance(event, Delta) for event in deltas)
    return events[0], "".join(d.text for d in deltas if isinstance(d, Delta)), events[-1]


def test_it_streams_a_chat_reply_over_the_unix_socket(live_grpc: LiveGrpc) -> None:
    with live_grpc.client() as client:
        events = list(client.chat(model="tiny", messages=HELLO, max_tokens=12, temperature=0))

    started, text, finished = _split(events)
    assert len(events) > 3, "the reply came in several deltas"
    assert started.prompt_tokens > 0
    assert finished.finish_reason in {"eos", "max_tokens", "stop_string"}
    assert finished.completion_tokens > 0 and finished.error == ""
    # The stream is a view of the row: the same text, the same end.
    state, reason, row_text = live_grpc.generation(started.code)
    assert (state, reason, row_text) == ("complete", finished.finish_reason, text)


def test_it_streams_generate_over_tcp_and_reads_the_prompt_cache(live_grpc: LiveGrpc) -> None:
    prompt = "Tell me about the sea. " * 8
    with live_grpc.client(tcp=True) as client:
        first = list(client.generate(model="tiny", prompt=prompt, max_tokens=4, temperature=0))
        second = list(client.generate(model="tiny", prompt=prompt, max_tokens=4, temperature=0))

    started, text, finished = _split(first)
    again, text_again, _ = _split(second)
    assert text and text == text_again
    assert finished.finish_reason in {"eos", "max_tokens"}
    assert again.prompt_tokens == started.prompt_tokens and again.cached_tokens > 0


def test_it_sends_a_raw_prompt_without_the_template(live_grpc: LiveGrpc) -> None:
    with live_grpc.client() as client:
        templated = _split(list(client.generate(model="tiny", prompt="Paris is", max_tokens=2)))
        raw = _split(list(client.generate(model="tiny", prompt="Paris is", max_tokens=2, raw=True)))

    assert raw[0].prompt_tokens < templated[0].prompt_tokens


def test_it_embeds_texts(live_grpc: LiveGrpc) -> None:
    with live_grpc.client() as client:
        vectors = client.embed(model=EMBED_MODEL, texts=["A cat sits.", "Stocks fell."])

    assert len(vectors) == 2 and all(len(v) == 384 for v in vectors)
    assert all(math.isclose(math.hypot(*v), 1.0, rel_tol=1e-3) for v in vectors)
    assert vectors[0] != vectors[1]


def test_it_refuses_to_chat_with_an_embedding_model(live_grpc: LiveGrpc) -> None:
    with live_grpc.client() as client, pytest.raises(ClientError) as error:
        list(client.chat(model=EMBED_MODEL, messages=HELLO))

    assert error.value.code == "INVALID_ARGUMENT"
    assert "embedding model" in str(error.value)


def test_it_lists_models_with_their_task(live_grpc: LiveGrpc) -> None:
    with live_grpc.client() as client:
        models = {m["id"]: m for m in client.list_models()}
        embedders = client.list_models(task="embed")

    assert models["tiny"]["task"] == "generate" and models["tiny"]["available"]
    assert models[EMBED_MODEL]["task"] == "embed"
    assert [m["id"] for m in embedders] == [EMBED_MODEL]


def test_it_answers_the_standard_health_check_and_says_how_the_worker_is(
    live_grpc: LiveGrpc,
) -> None:
    with grpc.insecure_channel(live_grpc.unix_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "mlxweb.v1.Mlxweb"):
            answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING

    with Client(live_grpc.tcp_target, api_key="") as client:  # no key needed
        assert client.is_serving()
        state = client.health()

    assert state["status"] == "SERVING" and state["worker_alive"] is True
    assert {"queued", "streaming", "loaded"} <= state.keys()


def test_it_says_nobody_serves_a_socket_without_a_server(tmp_path) -> None:
    with Client(str(tmp_path / "grpc.sock")) as client:
        assert client.is_serving() is False
        with pytest.raises(ClientError) as error:
            client.list_models()

    assert error.value.code == "UNAVAILABLE"
    assert "cannot reach" in str(error.value)


def test_it_cancels_a_reply_mid_stream_and_keeps_its_text(live_grpc: LiveGrpc) -> None:
    with live_grpc.client() as client:
        events = client.chat(model="tiny", messages=HELLO, **LONG)
        started = next(events)
        assert isinstance(started, Started)
        streamed = ""
        for event in events:
            assert isinstance(event, Delta)
            streamed += event.text
            if len(streamed) > 10:
                break
        assert client.cancel(started.code) is True
        rest = list(events)

    *deltas, finished = rest
    streamed += "".join(d.text for d in deltas if isinstance(d, Delta))
    assert isinstance(finished, Finished) and finished.finish_reason == "stopped"
    assert 0 < finished.completion_tokens < 2000
    state, reason, text = live_grpc.generation(started.code)
    assert (state, reason) == ("stopped", "stopped")
    assert text == streamed and text, "the stopped row keeps the text that was streamed"

    with live_grpc.client() as client:
        assert client.cancel(started.code) is False  # it has ended already


def test_it_refuses_a_wrong_or_missing_key(live_grpc: LiveGrpc) -> None:
    for key in ("mlxw_0123456789ab_not-the-secret", "not-a-key"):
        with Client(live_grpc.unix_target, api_key=key) as client:
            with pytest.raises(ClientError) as error:
                client.list_models()
            assert error.value.code == "UNAUTHENTICATED"
            with pytest.raises(ClientError) as error:
                list(client.chat(model="tiny", messages=HELLO))
            assert error.value.code == "UNAUTHENTICATED"
    with grpc.insecure_channel(live_grpc.tcp_target) as channel:
        from inference.grpc import mlxweb_pb2 as pb
        from inference.grpc import mlxweb_pb2_grpc as pb_grpc

        with pytest.raises(grpc.RpcError) as rpc_error:
            pb_grpc.MlxwebStub(channel).ListModels(pb.ListModelsRequest(), timeout=10)
    assert rpc_error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "authorization: Bearer" in str(rpc_error.value.details())


def test_a_stranger_cannot_cancel_someone_elses_reply(live_grpc: LiveGrpc) -> None:
    with live_grpc.client() as owner, live_grpc.client(key=live_grpc.other_key) as stranger:
        events = owner.chat(model="tiny", messages=HELLO, **LONG)
        started = next(events)
        assert isinstance(started, Started)
        with pytest.raises(ClientError) as error:
            stranger.cancel(started.code)
        assert error.value.code == "NOT_FOUND"
        with pytest.raises(ClientError) as error:
            stranger.cancel("not-a-code")
        assert error.value.code == "NOT_FOUND"
        assert isinstance(next(events), Delta), "the owner's reply goes on"
        assert owner.cancel(started.code) is True
        finished = list(events)[-1]
    assert isinstance(finished, Finished) and finished.finish_reason == "stopped"


def test_it_names_a_bad_option_and_an_unknown_model(live_grpc: LiveGrpc) -> None:
    with live_grpc.client() as client:
        with pytest.raises(ClientError) as error:
            list(client.chat(model="tiny", messages=HELLO, temperature=9))
        assert error.value.code == "INVALID_ARGUMENT" and "temperature" in str(error.value)
        with pytest.raises(ClientError) as error:
            list(client.chat(model="no-such-model", messages=HELLO))
        assert error.value.code == "NOT_FOUND"
        with pytest.raises(ClientError) as error:
            list(client.chat(model="tiny", messages=[{"role": "wizard", "content": "hi"}]))
        assert error.value.code == "INVALID_ARGUMENT" and "messages.0" in str(error.value)


def test_it_limits_a_keys_concurrent_replies(live_grpc: LiveGrpc) -> None:
    # The site allows 2 generations at once per key (MLXWEB_API_MAX_CONCURRENT_STREAMS).
    with live_grpc.client() as client:
        running = [client.chat(model="tiny", messages=HELLO, **LONG) for _ in range(2)]
        codes = [event.code for event in map(next, running) if isinstance(event, Started)]
        with pytest.raises(ClientError) as error:
            list(client.chat(model="tiny", messages=HELLO, max_tokens=2))
        assert error.value.code == "RESOURCE_EXHAUSTED"
        for code in codes:
            assert client.cancel(code)
        for events in running:
            list(events)


def test_a_client_that_goes_away_stops_its_reply(live_grpc: LiveGrpc) -> None:
    # A separate process, killed mid-stream: its connection closes without a goodbye.
    script = textwrap.dedent(
        f"""
        from mlxweb.client import Client, Delta, Started
        with Client({live_grpc.unix_target!r}, api_key={live_grpc.key!r}) as client:
            for event in client.chat(model="tiny", messages={HELLO!r}, max_tokens=2000):
                if isinstance(event, Started):
                    print(event.code, flush=True)
                elif isinstance(event, Delta):
                    print("delta", flush=True)
        """
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert process.stdout is not None
        code = process.stdout.readline().strip()
        assert process.stdout.readline().strip() == "delta"
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(30)

    state, reason, text = live_grpc.wait_ended(code)
    assert (state, reason) == ("stopped", "stopped") and text


def test_a_client_that_stops_reading_stops_its_reply(live_grpc: LiveGrpc) -> None:
    with live_grpc.client() as client:
        events = client.chat(model="tiny", messages=HELLO, **LONG)
        started = next(events)
        assert isinstance(started, Started)
        assert isinstance(next(events), Delta)
        events.close()  # what a `break` out of the loop does once the iterator is dropped

    state, reason, _ = live_grpc.wait_ended(started.code)
    assert (state, reason) == ("stopped", "stopped")


def test_the_socket_is_only_for_its_owner(live_grpc: LiveGrpc) -> None:
    assert stat.S_ISSOCK(live_grpc.socket.stat().st_mode)
    assert stat.S_IMODE(live_grpc.socket.stat().st_mode) == 0o600
