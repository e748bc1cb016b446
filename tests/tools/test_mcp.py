"""MCP tools against a tiny real server (tests/tools/mcp_server.py), over stdio and HTTP."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from inference.tools.base import ToolContext
from inference.tools.mcp import McpSettings, McpTool, forget_listings, tools

SERVER_SCRIPT = str(Path(__file__).with_name("mcp_server.py"))


@pytest.fixture(autouse=True)
def _fresh_listings() -> Iterator[None]:
    forget_listings()
    yield
    forget_listings()


@pytest.fixture
def context(tmp_path: Path) -> ToolContext:
    return ToolContext(workspace=tmp_path, cancelled=lambda: False)


def _stdio(name: str = "local", **extra: object) -> dict[str, object]:
    return {
        "name": name,
        "transport": "stdio",
        "command": sys.executable,
        "args": [SERVER_SCRIPT, "stdio"],
        **extra,
    }


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def http_url() -> Iterator[str]:
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, SERVER_SCRIPT, "http", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        else:
            pytest.fail("the MCP HTTP server did not start")
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        process.terminate()
        process.wait(timeout=10)


def _by_name(settings: McpSettings) -> dict[str, McpTool]:
    return {tool.name: tool for tool in tools(settings)}  # type: ignore[misc]


def test_it_lists_a_stdio_servers_tools_with_their_schemas() -> None:
    found = _by_name(McpSettings(servers=[_stdio()]))

    assert set(found) == {"mcp_local_add", "mcp_local_echo", "mcp_local_sleep", "mcp_local_dot"}
    add = found["mcp_local_add"]
    assert add.description == "[MCP local] Add two integers."
    assert add.parameters["type"] == "object"
    assert set(add.parameters["properties"]) == {"a", "b"}
    assert add.mutating and add.availability() is None


def test_a_read_only_servers_tools_need_no_approval() -> None:
    found = _by_name(McpSettings(servers=[_stdio("Read-Only", read_only=True)]))

    assert "mcp_read_only_echo" in found
    assert not any(tool.mutating for tool in found.values())


def test_it_calls_tools_over_stdio(context: ToolContext) -> None:
    found = _by_name(McpSettings(servers=[_stdio()]))

    added = found["mcp_local_add"].run({"a": 2, "b": 3}, context)
    echoed = found["mcp_local_echo"].run({"text": "héllo"}, context)

    assert added.ok and added.text == "5"
    assert added.data["structured"] == {"result": 5}
    assert echoed.ok and echoed.text == "héllo"


def test_it_saves_images_in_the_workspace(context: ToolContext) -> None:
    result = _by_name(McpSettings(servers=[_stdio()]))["mcp_local_dot"].run({}, context)

    assert result.ok
    (image,) = result.files
    assert image.mime == "image/png"
    assert image.path.parent == context.workspace / "mcp"
    assert image.path.read_bytes().startswith(b"\x89PNG")


def test_a_tool_error_and_bad_arguments_come_back_as_failures(context: ToolContext) -> None:
    add = _by_name(McpSettings(servers=[_stdio()]))["mcp_local_add"]

    failed = add.run({"a": "two"}, context)

    assert not failed.ok
    assert "validation error" in failed.error
    assert add.run([1, 2], context).error == "the arguments must be a JSON object"  # type: ignore[arg-type]


def test_it_lists_and_calls_tools_over_streamable_http(http_url: str, context: ToolContext) -> None:
    found = _by_name(McpSettings(servers=[{"name": "web", "transport": "http", "url": http_url}]))

    assert {"mcp_web_add", "mcp_web_echo"} <= set(found)
    result = found["mcp_web_add"].run({"a": 40, "b": 2}, context)
    assert result.ok and result.text == "42"


def test_a_failing_server_makes_its_tools_unavailable_with_the_reason(
    context: ToolContext,
) -> None:
    crash = "import sys; sys.stderr.write('no licence key\\n'); sys.exit(3)"
    settings = McpSettings(
        servers=[
            {
                "name": "crashes",
                "transport": "stdio",
                "command": sys.executable,
                "args": ["-c", crash],
            },
            {"name": "missing", "transport": "stdio", "command": "/nonexistent/mcp-server"},
            {"name": "down", "transport": "http", "url": f"http://127.0.0.1:{_free_port()}/mcp"},
            _stdio(),
        ]
    )

    found = _by_name(settings)

    assert "no licence key" in (found["mcp_crashes"].availability() or "")
    assert "No such file" in (found["mcp_missing"].availability() or "")
    assert "'down' is unavailable" in (found["mcp_down"].availability() or "")
    assert found["mcp_local_add"].availability() is None
    assert not found["mcp_crashes"].run({}, context).ok


def test_a_slow_call_times_out(context: ToolContext) -> None:
    sleep = _by_name(McpSettings(servers=[_stdio(timeout=2)]))["mcp_local_sleep"]

    started = time.monotonic()
    result = sleep.run({"seconds": 30}, context)

    assert not result.ok
    assert result.error == "MCP server 'local': timed out after 2 s"
    assert time.monotonic() - started < 10


def test_a_stop_ends_the_call(tmp_path: Path) -> None:
    sleep = _by_name(McpSettings(servers=[_stdio()]))["mcp_local_sleep"]
    started = time.monotonic()
    stop = ToolContext(workspace=tmp_path, cancelled=lambda: time.monotonic() - started > 1)

    result = sleep.run({"seconds": 30}, stop)

    assert result.error == "stopped"
    assert time.monotonic() - started < 10
