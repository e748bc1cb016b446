"""POST /v1/chat/completions with `mlxweb_tools`: the server runs its own tools and continues,
through the real engine and the tiny model, forced (`tool_choice`) to call a fake tool."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import sync_to_async

from inference.api import server_tools
from inference.models import Generation
from inference.tools.base import ToolContext, ToolResult
from tests.api.conftest import Api, read_stream, sse_events

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(300)]


class EchoTool:
    name = "echo"
    description = "Repeat the text back."
    parameters: dict[str, Any] = {
        "type": "object",
        # bounded: the tiny model writes noise, and an unbounded string runs to max_tokens
        "properties": {"text": {"type": "string", "maxLength": 8}},
        "required": ["text"],
        "additionalProperties": False,
    }

    def __init__(self, mutating: bool = False) -> None:
        self.mutating = mutating
        self.calls: list[dict[str, Any]] = []
        self.workspaces: list[Path] = []

    def availability(self) -> str | None:
        return None

    def run(self, arguments: dict[str, Any], context: ToolContext) -> ToolResult:
        self.calls.append(arguments)
        self.workspaces.append(context.workspace)
        assert context.workspace.is_dir()
        return ToolResult(ok=True, text=f"echoed: {arguments.get('text', '')}", data={"n": 1})


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 8}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


def _forced(name: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name}}


@pytest.fixture
def echo(monkeypatch: pytest.MonkeyPatch, settings: Any, tmp_path: Path) -> EchoTool:
    settings.VAR_DIR = tmp_path / "var"
    config = settings.MLXWEB_CONFIG
    tools = config.server.tools.model_copy(update={"max_rounds": 1})
    server = config.server.model_copy(update={"tools": tools})
    settings.MLXWEB_CONFIG = config.model_copy(update={"server": server})
    tool = EchoTool()
    monkeypatch.setattr(server_tools, "available_tools", lambda: {tool.name: tool})
    return tool


def _request(model: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "Echo hello"}],
        "max_tokens": 120,
        "temperature": 0,
        **extra,
    }


async def test_it_runs_a_server_tool_and_continues(
    api: Api, echo: EchoTool, tiny: str, real_engine, running_worker
) -> None:
    body = _request(tiny, mlxweb_tools=["echo"], tool_choice=_forced("echo"))
    response = await api.post("/v1/chat/completions", body)

    assert response.status_code == 200, response.content
    [choice] = response.json()["choices"]
    [step] = choice["message"]["mlxweb_tool_steps"]
    assert step["name"] == "echo" and step["ok"] is True
    assert step["result"].startswith("echoed:")
    assert json.loads(step["arguments"]) == echo.calls[0]
    assert step["data"] == {"n": 1} and step["files"] == []
    # max_rounds is 1: the second round answers without tools, and the client sees no call.
    assert choice["finish_reason"] != "tool_calls"
    assert choice["message"]["tool_calls"] is None
    first, second = [g async for g in Generation.objects.order_by("id")]
    assert first.finish_reason == Generation.FinishReason.TOOL_CALLS
    assert second.params.get("tools") == []
    chain = await sync_to_async(second.prompt_messages)()
    assert [m["role"] for m in chain][-2:] == ["assistant", "tool"]
    assert chain[-1]["content"] == step["result"] and chain[-1]["tool_call_id"] == step["id"]
    usage = response.json()["usage"]
    assert usage["completion_tokens"] == first.completion_tokens + second.completion_tokens
    # the request's workspace is gone with the response
    assert echo.workspaces and not echo.workspaces[0].exists()


async def test_plain_function_calls_still_go_back_to_the_client(
    api: Api, echo: EchoTool, tiny: str, real_engine, running_worker
) -> None:
    body = _request(
        tiny, tools=[WEATHER], mlxweb_tools=["echo"], tool_choice=_forced("get_weather")
    )
    response = await api.post("/v1/chat/completions", body)

    assert response.status_code == 200, response.content
    [choice] = response.json()["choices"]
    assert choice["finish_reason"] == "tool_calls"
    [call] = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert choice["message"]["mlxweb_tool_steps"] == []
    assert not echo.calls
    assert await Generation.objects.acount() == 1


async def test_it_streams_the_rounds_with_their_steps(
    api: Api, echo: EchoTool, tiny: str, real_engine, running_worker
) -> None:
    body = _request(
        tiny,
        mlxweb_tools=["echo"],
        tool_choice=_forced("echo"),
        stream=True,
        stream_options={"include_usage": True},
    )
    response = await api.post("/v1/chat/completions", body)

    assert response.status_code == 200
    events = sse_events(await read_stream(response))
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if e["choices"]]
    steps = [
        c["choices"][0]["delta"]["mlxweb_tool_steps"]
        for c in chunks
        if "mlxweb_tool_steps" in c["choices"][0]["delta"]
    ]
    assert len(steps) == 1 and steps[0][0]["name"] == "echo" and steps[0][0]["ok"]
    finishes = [
        c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]
    ]
    assert len(finishes) == 1 and finishes[0] != "tool_calls"
    assert not any("tool_calls" in c["choices"][0]["delta"] for c in chunks)
    rows = [g async for g in Generation.objects.order_by("id")]
    assert len(rows) == 2
    usage = events[-2]["usage"]
    assert usage["completion_tokens"] == sum(g.completion_tokens for g in rows)
    assert len(echo.calls) == 1 and not echo.workspaces[0].exists()


async def test_it_leaves_the_extension_out_of_plain_requests(api: Api, engine_running) -> None:
    body = {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Hi"}]}
    response = await api.post("/v1/chat/completions", body)

    assert response.status_code == 200
    assert "mlxweb_tool_steps" not in response.json()["choices"][0]["message"]


@pytest.mark.parametrize(
    ("extra", "param", "words"),
    [
        ({"mlxweb_tools": ["rm_rf"]}, "mlxweb_tools", "'rm_rf' is not a tool of this server"),
        ({"mlxweb_tools": []}, "mlxweb_tools", "at least one tool"),
        ({"mlxweb_tools": ["echo"], "n": 2}, "n", "one choice"),
        (
            {"mlxweb_tools": ["echo"], "tools": [{**WEATHER, "function": {"name": "echo"}}]},
            "mlxweb_tools",
            "also one of the request's own tools",
        ),
    ],
)
async def test_it_refuses_bad_server_tool_requests(
    api: Api, echo: EchoTool, extra: dict[str, Any], param: str, words: str
) -> None:
    response = await api.post("/v1/chat/completions", _request("smollm2-135m-instruct", **extra))

    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"]
    assert not await Generation.objects.aexists()


async def test_mutating_tools_need_the_explicit_opt_in(
    api: Api, echo: EchoTool, tiny: str, real_engine, running_worker
) -> None:
    echo.mutating = True
    body = _request(tiny, mlxweb_tools=["echo"], tool_choice=_forced("echo"))
    response = await api.post("/v1/chat/completions", body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "mlxweb_allow_mutating"
    assert not echo.calls

    response = await api.post("/v1/chat/completions", {**body, "mlxweb_allow_mutating": True})
    assert response.status_code == 200, response.content
    assert len(echo.calls) == 1
    assert response.json()["choices"][0]["message"]["mlxweb_tool_steps"][0]["ok"] is True
