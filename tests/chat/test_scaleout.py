"""Scaled out: PostgreSQL, the Redis channel layer, and the inference worker in its own process.

Everything here is real: `manage.py serve` and `manage.py inference_worker` run as subprocesses
against the PostgreSQL and Redis on loopback, and a websocket client talks to daphne.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import websockets

from tests.support.live import Site
from tests.support.scaleout import chat, generation_rows, sign_up_and_open_chat
from tests.support.scaleout import scaled_site as scaled_site_for
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.scaleout, pytest.mark.timeout(300)]


@pytest.fixture
def scaled_site(tmp_path: Path, tiny_model_dir: Path) -> Iterator[tuple[Site, str]]:
    with scaled_site_for(tmp_path, tiny_model_dir) as site:
        yield site


def test_it_streams_through_redis_from_a_separate_worker(scaled_site) -> None:
    site, db_url = scaled_site
    site.start("worker", "inference_worker")
    site.serve()
    client, code = sign_up_and_open_chat(site)

    frames = asyncio.run(chat(site, client, code, "Hello over Redis", 'class="body md"'))

    assert any("beforeend:#reply-" in f for f in frames), "no token deltas arrived"
    [(state, text, tokens)] = generation_rows(db_url)
    assert state == "complete"
    assert tokens > 0 and text
    assert "inference worker" in site.log("worker")


def test_it_marks_a_reply_interrupted_when_its_worker_dies(scaled_site) -> None:
    site, db_url = scaled_site
    site.start("worker", "inference_worker")
    site.serve()
    client, code = sign_up_and_open_chat(site)

    async def start_reply_then_kill_worker() -> None:
        async with websockets.connect(
            f"ws://127.0.0.1:{site.port}/ws/conversations/{code}/",
            additional_headers={"Cookie": client.cookie_header(), "Origin": site.url},
        ) as socket:
            await socket.send(
                json.dumps({"type": "send", "text": "Go on and on", "max_tokens": "2000"})
            )
            async with asyncio.timeout(60):
                while "beforeend:#reply-" not in str(await socket.recv()):
                    pass
            # Killed once the worker has flushed some of the text to the row.
            await asyncio.to_thread(
                wait_until,
                lambda: generation_rows(db_url)[0][1],
                timeout=60,
                interval=0.05,
                what="the reply's first flush",
            )
            site.stop("worker", signal.SIGKILL)

    asyncio.run(start_reply_then_kill_worker())
    [(state, text, _)] = generation_rows(db_url)
    assert state == "streaming"  # nobody is left to say otherwise...
    flushed = text

    # ...until a worker starts and finds the dead one's heartbeat lapsed: it marks the reply
    # and continues it as a new generation (inference.cluster; tests/scaleout/test_workers.py).
    site.start("worker", "inference_worker", "--no-warm-up")
    wait_until(
        lambda: generation_rows(db_url)[0][0] != "streaming",
        timeout=60,
        interval=0.1,
        what="the new worker to mark the reply",
    )
    state, text, _ = generation_rows(db_url)[0]
    assert state == "interrupted"
    assert text == flushed and text, "the text written before the crash was kept"


def test_it_keeps_the_text_when_the_worker_is_stopped(scaled_site) -> None:
    site, db_url = scaled_site
    # No other worker to hand the reply to, and no time to finish it: interrupted, text kept.
    site.start("worker", "inference_worker", "--drain-timeout", "0")
    site.serve()
    client, code = sign_up_and_open_chat(site)

    async def start_reply_then_stop_worker() -> None:
        async with websockets.connect(
            f"ws://127.0.0.1:{site.port}/ws/conversations/{code}/",
            additional_headers={"Cookie": client.cookie_header(), "Origin": site.url},
        ) as socket:
            await socket.send(
                json.dumps({"type": "send", "text": "Keep going", "max_tokens": "2000"})
            )
            async with asyncio.timeout(60):
                while "beforeend:#reply-" not in str(await socket.recv()):
                    pass
            assert site.stop("worker", signal.SIGTERM) == 0

    asyncio.run(start_reply_then_stop_worker())
    [(state, text, tokens)] = generation_rows(db_url)
    assert state == "interrupted"
    assert text and tokens > 0
