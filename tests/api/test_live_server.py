"""The live server as a whole: API streams beside browser chats, the OpenAPI document under
schemathesis, /health and /metrics."""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request
from typing import Any

import openai
import pytest
import schemathesis
import websockets
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.api.conftest import PASSWORD, LiveApi
from tests.support.live import Browserless

pytestmark = [pytest.mark.timeout(300)]


def _browser_chat(live_api: LiveApi) -> tuple[Browserless, str]:
    client = Browserless(live_api.url)
    client.post("/login/", {"username": "bob", "password": PASSWORD})
    url, _ = client.post("/c/new/", {"text": "", "model": "tiny"}, form_page="/")
    match = re.search(r"/c/([0-9a-f-]{36})/", url)
    assert match, url
    return client, match.group(1)


async def _chat_over_websocket(live_api: LiveApi, client: Browserless, code: str) -> str:
    frames: list[str] = []
    async with websockets.connect(
        f"ws://127.0.0.1:{live_api.site.port}/ws/conversations/{code}/",
        additional_headers={"Cookie": client.cookie_header(), "Origin": live_api.url},
    ) as socket:
        await socket.send(json.dumps({"type": "send", "text": f"Hello {code[:4]}"}))
        async with asyncio.timeout(180):
            while 'class="body md"' not in "".join(frames):
                frames.append(str(await socket.recv()))
    return "".join(frames)


async def _api_stream(client: openai.AsyncOpenAI, index: int) -> tuple[str, str]:
    stream = await client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": f"Tell me about {index}"}],
        temperature=0,
        stream=True,
    )
    parts, completion_id = [], ""
    async for chunk in stream:
        completion_id = chunk.id
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
    return completion_id, "".join(parts)


def test_eight_api_streams_and_two_browser_chats_at_once(live_api: LiveApi) -> None:
    chats = [_browser_chat(live_api) for _ in range(2)]
    client = openai.AsyncOpenAI(base_url=f"{live_api.url}/v1", api_key=live_api.key, max_retries=0)

    async def everything() -> tuple[list[Any], list[str]]:
        streams = [_api_stream(client, i) for i in range(8)]
        sockets = [_chat_over_websocket(live_api, c, code) for c, code in chats]
        results: list[Any] = list(await asyncio.gather(*streams, *sockets))
        return results[:8], results[8:]

    streams, pages = asyncio.run(everything())

    with live_api.db() as db:
        for completion_id, text in streams:
            code = completion_id.removeprefix("chatcmpl-")
            row = db.execute(
                "SELECT state, content, user_id FROM inference_generation "
                "WHERE replace(code, '-', '') = ?",
                [code],
            ).fetchone()
            assert row is not None, completion_id
            state, content, user_id = row
            assert state == "complete" and text and text == content
            # The key's owner is who asked.
            owner = db.execute("SELECT username FROM auth_user WHERE id = ?", [user_id]).fetchone()
            assert owner == ("ada",)
        for (_, code), page in zip(chats, pages, strict=True):
            [(text,)] = db.execute(
                "SELECT g.text FROM chat_message m JOIN inference_generation g "
                "ON g.id = m.generation_id JOIN chat_conversation c ON c.id = m.conversation_id "
                "WHERE replace(c.code, '-', '') = ?",
                [code.replace("-", "")],
            ).fetchall()
            assert text and 'class="body md"' in page


def test_a_key_sees_nothing_of_another_users_chats(live_api: LiveApi) -> None:
    # The APIs expose no stored conversations or generations: another user's key finds the
    # same models and nothing else, and a browser page of theirs needs their session.
    mine = openai.OpenAI(base_url=f"{live_api.url}/v1", api_key=live_api.key, max_retries=0)
    theirs = openai.OpenAI(base_url=f"{live_api.url}/v1", api_key=live_api.other_key, max_retries=0)
    assert [m.id for m in mine.models.list()] == [m.id for m in theirs.models.list()]
    _, code = _browser_chat(live_api)  # bob's conversation
    request = urllib.request.Request(
        f"{live_api.url}/c/{code}/", headers={"Authorization": f"Bearer {live_api.key}"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        # A bearer key is no session: the page sends ada's key to the sign-in page.
        assert "/login/" in response.geturl()


def test_health_reports_the_worker_and_loaded_models(live_api: LiveApi) -> None:
    openai.OpenAI(
        base_url=f"{live_api.url}/v1", api_key=live_api.key, max_retries=0
    ).completions.create(model="tiny", prompt="x", max_tokens=1)

    def health() -> dict[str, Any]:
        with urllib.request.urlopen(f"{live_api.url}/health", timeout=30) as response:
            return dict(json.load(response))

    from tests.support.waiting import wait_until

    body = wait_until(
        lambda: (h := health())["models"] and h, timeout=20, interval=0.5, what="loaded models"
    )
    assert body["status"] == "ok" and body["worker"]["alive"] is True
    assert [m["id"] for m in body["models"]] == ["tiny"]


def test_metrics_count_http_requests_and_tokens(live_api: LiveApi) -> None:
    openai.OpenAI(
        base_url=f"{live_api.url}/v1", api_key=live_api.key, max_retries=0
    ).completions.create(model="tiny", prompt="x", max_tokens=2)

    with urllib.request.urlopen(f"{live_api.url}/metrics", timeout=30) as response:
        text = response.read().decode()

    assert re.search(
        r'mlxweb_http_requests_total\{method="POST",route="/v1/completions",status="200"\} \d',
        text,
    )
    assert 'mlxweb_completion_tokens_total{model="tiny"}' in text
    assert "mlxweb_ttft_seconds_bucket" in text


@pytest.fixture(scope="module")
def openapi(live_api: LiveApi) -> Any:
    return schemathesis.openapi.from_url(
        f"{live_api.url}/v1/openapi.json",
        headers={"Authorization": f"Bearer {live_api.key}"},
    )


def test_the_openapi_document_holds_under_schemathesis(live_api: LiveApi, openapi: Any) -> None:
    failures: list[str] = []
    for result in openapi.get_all_operations():
        operation = result.ok()

        @settings(
            max_examples=12,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        @given(case=operation.as_strategy())
        def check(case: Any) -> None:
            response = case.call(headers={"Authorization": f"Bearer {live_api.key}"})
            assert response.status_code < 500, (case.path, case.body, response.text[:500])
            # Bounds live in GenerationParams (one bounded model for every caller), so the
            # document's request schemas are looser than what is accepted: a 400 for a
            # schema-valid request is expected, a 500 or an undocumented answer is not.
            case.validate_response(response, excluded_checks=[positive_data_acceptance])

        try:
            check()
        except Exception as e:  # collect every operation's failure, then fail once
            failures.append(f"{operation.label}: {e}")
    assert not failures, "\n\n".join(failures)
