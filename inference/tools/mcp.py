"""Tools from Model Context Protocol servers listed in the config, through the official `mcp` SDK.

Each server's tools become ours as `mcp_<server>_<tool>`, with the server's description and input
schema. The SDK is async and our tools are called synchronously from a worker thread, so each
listing and each call runs in a private event loop (`asyncio.run`) with its own connection: a
stdio server is started per call, which costs a process start but leaves nothing running between
calls and nothing shared between threads. Listings are cached for `list_ttl` seconds.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import logging
import re
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from inference.tools.base import MAX_RESULT_CHARS, Tool, ToolContext, ToolFile, ToolResult

__all__ = ["McpServerSettings", "McpSettings", "tools"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_IMAGE_EXTENSIONS = {
    "image/png": "png",
    "image/jpeg": "jpg",
    "image/gif": "gif",
    "image/webp": "webp",
}


class McpServerSettings(BaseModel):
    """One MCP server: a command run over stdio, or a streamable HTTP endpoint."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$")
    transport: Literal["stdio", "http"]
    command: str = ""
    args: list[str] = Field(default_factory=list, max_length=64)
    # Added to the SDK's minimal default environment: the app's own variables are not passed on.
    env: dict[str, str] = Field(default_factory=dict)
    url: str = ""
    # True: its tools run without waiting for the user's approval.
    read_only: bool = False
    timeout: float = Field(default=30.0, gt=0, le=600)

    @model_validator(mode="after")
    def _check_transport(self) -> McpServerSettings:
        if self.transport == "stdio" and not self.command:
            raise ValueError(f"MCP server {self.name!r}: a stdio server needs a command")
        if self.transport == "http" and not re.match(r"^https?://", self.url):
            raise ValueError(f"MCP server {self.name!r}: an http server needs an http(s) url")
        return self


class McpSettings(BaseModel):
    """The MCP servers whose tools are offered (the `tools.mcp` section of the server config)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    servers: list[McpServerSettings] = Field(default_factory=list, max_length=32)
    list_ttl: float = Field(default=300.0, ge=0, le=86_400)
    max_image_bytes: int = Field(default=10_000_000, ge=1_000, le=100_000_000)

    @model_validator(mode="after")
    def _check_unique_names(self) -> McpSettings:
        names = [_slug(server.name) for server in self.servers]
        if len(set(names)) != len(names):
            raise ValueError("MCP server names must be unique")
        return self


def _slug(text: str) -> str:
    return re.sub(r"_+", "_", re.sub(r"[^a-z0-9_]", "_", text.lower())).strip("_")


def _cap(text: str) -> str:
    if len(text) <= MAX_RESULT_CHARS:
        return text
    return text[: MAX_RESULT_CHARS - 20] + "\n… (truncated)"


class McpServerError(Exception):
    """A server's failure with what it wrote on stderr: its message is the whole reason."""


def _reason(exc: BaseException) -> str:
    """A one-line reason from an exception, unwrapping the task groups' exception groups."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    if isinstance(exc, McpServerError):
        return str(exc)
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _run_in_private_loop[R](factory: Callable[[], Awaitable[R]]) -> R:
    """Run a coroutine to the end in a fresh event loop, from sync code.

    The worker calls tools from a plain thread; should a loop already run in this thread, the
    coroutine gets a thread of its own rather than nesting loops.
    """

    async def main() -> R:
        return await factory()

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(main())
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, main()).result()


class McpConnection:
    """How to reach one server: opens an SDK `Client` for the length of one listing or call."""

    def __init__(self, server: McpServerSettings) -> None:
        self.server = server

    async def _session(
        self, work: Callable[[Any], Awaitable[T]], timeout: float, cancelled: Callable[[], bool]
    ) -> T:
        import anyio
        from mcp import Client, StdioServerParameters
        from mcp.client.stdio import stdio_client

        result: list[T] = []
        # The SDK writes a stdio server's stderr here: its last lines tell why it failed.
        with tempfile.TemporaryFile(mode="w+") as errlog:
            try:
                with anyio.fail_after(timeout):
                    async with anyio.create_task_group() as group:

                        async def watch() -> None:
                            while not cancelled():
                                await anyio.sleep(0.1)
                            group.cancel_scope.cancel()

                        async def run() -> None:
                            client = Client(
                                self._transport(stdio_client, StdioServerParameters, errlog),
                                read_timeout_seconds=timeout,
                            )
                            async with client:
                                result.append(await work(client))
                            group.cancel_scope.cancel()

                        group.start_soon(watch)
                        group.start_soon(run)
            except BaseException as exc:
                errlog.seek(0)
                stderr = errlog.read()[-300:].strip()
                if stderr and not isinstance(exc, TimeoutError):
                    raise McpServerError(f"{_reason(exc)} (server said: {stderr})") from exc
                raise
        if not result:
            raise InterruptedError("stopped")
        return result[0]

    def _transport(self, stdio_client: Any, parameters: Any, errlog: Any) -> Any:
        if self.server.transport == "http":
            return self.server.url
        server = parameters(command=self.server.command, args=self.server.args, env=self.server.env)
        return stdio_client(server, errlog=errlog)

    def run(
        self,
        work: Callable[[Any], Awaitable[T]],
        *,
        timeout: float,
        cancelled: Callable[[], bool] = lambda: False,
    ) -> T:
        return _run_in_private_loop(lambda: self._session(work, timeout, cancelled))


class McpTool:
    """One tool of an MCP server, offered as `mcp_<server>_<tool>`."""

    def __init__(
        self,
        *,
        name: str,
        remote_name: str,
        description: str,
        parameters: dict[str, Any],
        server: McpServerSettings,
        settings: McpSettings,
    ) -> None:
        self.name = name
        self.remote_name = remote_name
        self.description = description
        self.parameters = parameters
        self.mutating = not server.read_only
        self.server = server
        self.settings = settings

    def availability(self) -> str | None:
        return None

    def run(self, arguments: dict[str, Any], context: ToolContext) -> ToolResult:
        if not isinstance(arguments, dict):
            return _failure("the arguments must be a JSON object")
        timeout = min(self.server.timeout, context.timeout)

        async def call(client: Any) -> Any:
            return await client.call_tool(self.remote_name, arguments)

        started = time.monotonic()
        try:
            result = McpConnection(self.server).run(
                call, timeout=timeout, cancelled=context.cancelled
            )
        except InterruptedError:
            return _failure("stopped")
        except Exception as exc:
            reason = _reason(exc)
            if reason == "timed out":
                reason = f"timed out after {timeout:g} s"
            logger.info("mcp: %s on %s failed: %s", self.remote_name, self.server.name, reason)
            return _failure(f"MCP server {self.server.name!r}: {reason}")
        logger.info(
            "mcp: %s on %s in %.2f s",
            self.remote_name,
            self.server.name,
            time.monotonic() - started,
        )
        return self._result(result, context.workspace)

    def _result(self, result: Any, workspace: Path) -> ToolResult:
        texts: list[str] = []
        files: list[ToolFile] = []
        for block in result.content:
            kind = getattr(block, "type", "")
            if kind == "text":
                texts.append(block.text)
            elif kind == "image":
                saved = self._save_image(block.data, block.mime_type, workspace)
                if isinstance(saved, str):
                    texts.append(saved)
                else:
                    files.append(saved)
                    texts.append(f"[image: {saved.name}]")
            elif kind == "resource_link":
                texts.append(f"[resource: {block.uri}]")
            else:
                texts.append(f"[{kind or 'content'} not shown]")
        data: dict[str, Any] = {"server": self.server.name, "tool": self.remote_name}
        if result.structured_content is not None:
            data["structured"] = result.structured_content
        text = _cap("\n".join(texts))
        if result.is_error:
            return ToolResult(
                ok=False, text=text, data=data, files=tuple(files), error=text or "the tool failed"
            )
        return ToolResult(ok=True, text=text, data=data, files=tuple(files))

    def _save_image(self, data: str, mime: str, workspace: Path) -> ToolFile | str:
        extension = _IMAGE_EXTENSIONS.get(mime)
        if extension is None:
            return f"[an image of type {mime!r} was not kept]"
        if len(data) > self.settings.max_image_bytes * 4 // 3 + 4:
            return "[an image larger than the limit was not kept]"
        try:
            content = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            return "[an image that was not valid base64 was not kept]"
        folder = workspace / "mcp"
        folder.mkdir(exist_ok=True)
        name = f"{self.name}-{uuid.uuid4().hex[:8]}.{extension}"
        path = folder / name
        path.write_bytes(content)
        return ToolFile(name=name, mime=mime, path=path)


class UnavailableServer:
    """Stands for a server that failed to start or list: its tools are unavailable, and why."""

    def __init__(self, server: McpServerSettings, reason: str) -> None:
        self.name = f"mcp_{_slug(server.name)}"[:64]
        self.description = f"Tools of the MCP server {server.name!r} (unavailable)."
        self.parameters: dict[str, Any] = {"type": "object", "properties": {}}
        self.mutating = not server.read_only
        self.reason = f"MCP server {server.name!r} is unavailable: {reason}"

    def availability(self) -> str | None:
        return self.reason

    def run(self, arguments: dict[str, Any], context: ToolContext) -> ToolResult:
        return _failure(self.reason)


def _failure(error: str) -> ToolResult:
    return ToolResult(ok=False, text=_cap(error), error=error)


def _list_server(server: McpServerSettings, settings: McpSettings) -> list[Tool]:
    async def list_all(client: Any) -> list[Any]:
        found: list[Any] = []
        cursor: str | None = None
        for _ in range(100):  # a paginator that never ends cannot hang the listing
            page = await client.list_tools(cursor=cursor)
            found += page.tools
            cursor = page.next_cursor
            if not cursor:
                break
        return found

    try:
        listed = McpConnection(server).run(list_all, timeout=server.timeout)
    except Exception as exc:
        reason = _reason(exc)
        if reason == "timed out":
            reason = f"listing its tools timed out after {server.timeout:g} s"
        logger.warning("mcp: server %s is unavailable: %s", server.name, reason)
        return [UnavailableServer(server, reason)]
    built: list[Tool] = []
    taken: set[str] = set()
    prefix = f"mcp_{_slug(server.name)}_"
    for remote in listed:
        base = (prefix + (_slug(remote.name) or "tool"))[:64]
        name, number = base, 2
        while name in taken:
            suffix = f"_{number}"
            name, number = base[: 64 - len(suffix)] + suffix, number + 1
        taken.add(name)
        schema = dict(remote.input_schema or {})
        schema.setdefault("type", "object")
        description = (remote.description or remote.name).strip()
        built.append(
            McpTool(
                name=name,
                remote_name=remote.name,
                description=f"[MCP {server.name}] {description}"[:2_000],
                parameters=schema,
                server=server,
                settings=settings,
            )
        )
    return built


_listings: dict[str, tuple[float, list[Tool]]] = {}
_listings_lock = threading.Lock()


def tools(settings: McpSettings) -> list[Tool]:
    """The tools of every configured server; a server that fails gives one unavailable entry.

    Listings are cached for `list_ttl` seconds (a failure for at most 30 s, so a server that comes
    up later is picked up soon).
    """
    found: list[Tool] = []
    for server in settings.servers:
        key = settings.model_dump_json(exclude={"servers"}) + server.model_dump_json()
        now = time.monotonic()
        with _listings_lock:
            cached = _listings.get(key)
        if cached is not None and cached[0] > now:
            found += cached[1]
            continue
        listed = _list_server(server, settings)
        failed = any(isinstance(tool, UnavailableServer) for tool in listed)
        ttl = min(settings.list_ttl, 30.0) if failed else settings.list_ttl
        with _listings_lock:
            _listings[key] = (now + ttl, listed)
        found += listed
    return found


def forget_listings() -> None:
    """Drop the cached listings (tests; a config reload)."""
    with _listings_lock:
        _listings.clear()
