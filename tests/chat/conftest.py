"""Chat test fixtures: a scripted fake engine and the inference worker on the test's loop."""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from hypothesis import settings as hypothesis_settings

from inference import worker as inference_worker
from inference.engine import Delta, Finished, GenerationRequest, Started
from tests.support.worker import in_process_worker


class FakeEngine:
    """Streams a scripted reply word by word from its own thread, like the real engine.

    Consumer unit tests use it for speed and control; the end-to-end tests use the real one.
    """

    def __init__(self, words: list[str] | None = None, delay: float = 0.01) -> None:
        self.words = words or ["Hello", " there", ",", " friend", "."]
        self.delay = delay
        self.requests: list[GenerationRequest] = []
        self.cancelled: set[str] = set()
        self.gate = threading.Event()
        self.gate.set()
        # Hold after this many words, as if the model were slow, until the test sets the gate.
        self.pause_after: int | None = None
        self.alive = True

    def start(self) -> None:
        pass

    def stop(self, timeout: float = 10.0) -> None:
        self.alive = False

    def load(self, model_id: str) -> None:
        pass

    def cancel(self, request_id: str) -> None:
        self.cancelled.add(request_id)

    def submit(self, request: GenerationRequest, emit: Callable[[Any], None]) -> None:
        self.requests.append(request)
        threading.Thread(target=self._run, args=(request, emit), daemon=True).start()

    def _run(self, request: GenerationRequest, emit: Callable[[Any], None]) -> None:
        emit(Started(request_id=request.id, prompt_tokens=7, cached_tokens=0, trimmed_messages=0))
        count = 0
        for word in self.words:
            if self.pause_after is not None and count == self.pause_after:
                self.gate.clear()
            self.gate.wait(10)
            if request.id in self.cancelled:
                emit(Finished(request.id, "stopped", 7, count))
                return
            time.sleep(self.delay)
            count += 1
            emit(Delta(request_id=request.id, text=word, tokens=count))
        emit(Finished(request.id, "eos", 7, count))


@pytest.fixture
def fake_engine(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeEngine]:
    engine = FakeEngine()
    monkeypatch.setattr(inference_worker, "get_engine", lambda: engine)
    yield engine


@pytest.fixture
async def running_worker() -> AsyncIterator[None]:
    """The inference worker on this test's event loop, as `manage.py serve` runs it."""
    async with in_process_worker(fresh_engine=False):
        yield


def session_cookie_for(user: Any) -> bytes:
    """A real session cookie, so the socket goes through AuthMiddlewareStack as a browser's."""
    from django.test import Client

    client = Client()
    client.force_login(user)
    return f"sessionid={client.cookies['sessionid'].value}".encode()


def communicator_for(
    cookie: bytes | None, code: Any, origin: bytes = b"http://127.0.0.1"
) -> WebsocketCommunicator:
    from mlxweb.asgi import application

    headers = [(b"origin", origin)]
    if cookie:
        headers.append((b"cookie", cookie))
    return WebsocketCommunicator(application, f"/ws/conversations/{code}/", headers=headers)


async def connected_socket(user: Any, conversation: Any) -> WebsocketCommunicator:
    """`user`'s socket on `conversation`, connected (with a real session cookie)."""
    cookie = await sync_to_async(session_cookie_for)(user)
    communicator = communicator_for(cookie, conversation.code)
    connected, _ = await communicator.connect()
    assert connected
    return communicator


async def frames_until(communicator: WebsocketCommunicator, needle: str, limit: int = 200) -> str:
    """The frames the socket receives up to the first that contains `needle`, joined."""
    seen = []
    for _ in range(limit):
        frame = await communicator.receive_from(timeout=5)
        seen.append(frame)
        if needle in frame:
            return "".join(seen)
    raise AssertionError(f"{needle!r} never arrived; got {seen!r}")


# The long fuzzing run of the socket message schema: --hypothesis-profile=fuzz.
hypothesis_settings.register_profile("fuzz", max_examples=20_000, deadline=None)
