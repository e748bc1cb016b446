"""The server's own tools (issue 11) offered through the chat completions API.

A request names them in `mlxweb_tools`; when the model calls one, the server runs it, sends the
result back as a `tool` message and lets the model continue, up to `tools.max_rounds` rounds, all
in one response. Nobody is there to approve a call, so a tool that changes something (`mutating`)
is offered only when the request sets `mlxweb_allow_mutating`. Each request gets a workspace of its
own, removed when the response ends.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from django.conf import settings

from inference.api.errors import ApiError
from inference.schemas import ChatMessage
from inference.tools.base import MAX_RESULT_CHARS, Tool, ToolContext
from inference.tools.registry import tool_spec, tools_for

logger = logging.getLogger(__name__)

PARAM = "mlxweb_tools"
ALLOW_PARAM = "mlxweb_allow_mutating"


@functools.cache
def _configured_tools() -> dict[str, Tool]:
    return tools_for(settings.MLXWEB_CONFIG.server.tools)


def available_tools() -> dict[str, Tool]:
    """The server's tools that can be used now, by name (tests replace this)."""
    return {name: t for name, t in _configured_tools().items() if t.availability() is None}


def max_rounds() -> int:
    return int(settings.MLXWEB_CONFIG.server.tools.max_rounds)


def select(
    names: Sequence[str], *, allow_mutating: bool, client_names: Sequence[str]
) -> dict[str, Tool]:
    """The tools a request asked for, or a 400 that names the parameter at fault."""
    if not names:
        raise ApiError(400, f"{PARAM}: name at least one tool", param=PARAM)
    tools = available_tools()
    chosen: dict[str, Tool] = {}
    for name in names:
        tool = tools.get(name)
        if tool is None:
            offered = ", ".join(sorted(tools)) or "none"
            raise ApiError(
                400,
                f"{PARAM}: {name!r} is not a tool of this server (available: {offered})",
                param=PARAM,
            )
        if name in client_names:
            raise ApiError(
                400, f"{PARAM}: {name!r} is also one of the request's own tools", param=PARAM
            )
        if tool.mutating and not allow_mutating:
            raise ApiError(
                400,
                f"{PARAM}: {name!r} changes things and nobody can approve it here; "
                f"set {ALLOW_PARAM} to true to let the server run it",
                param=ALLOW_PARAM,
            )
        chosen[name] = tool
    return chosen


def specs(tools: dict[str, Tool]) -> list[dict[str, Any]]:
    """The generation parameters' `tools` entries for these tools."""
    return [tool_spec(tool).model_dump() for tool in tools.values()]


@dataclass
class ToolRound:
    """A request's server-side calls: its workspace, the steps so far, and a stop flag that a
    client going away sets."""

    tools: dict[str, Tool]
    workspace: Path = field(
        default_factory=lambda: Path(settings.VAR_DIR) / "api-workspaces" / uuid.uuid4().hex
    )
    steps: list[dict[str, Any]] = field(default_factory=list)
    stopped: threading.Event = field(default_factory=threading.Event)

    def handles(self, calls: Sequence[dict[str, Any]]) -> bool:
        """Whether the server runs these calls: all of them name its tools. A call of the
        client's own functions sends every call back to the client, as OpenAI defines."""
        return bool(calls) and all(str(call.get("name", "")) in self.tools for call in calls)

    def run(self, calls: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """Run the calls one after another (synchronous: call it in a thread) and return their
        steps, which are also kept in `steps`."""
        self.workspace.mkdir(parents=True, exist_ok=True)
        made = [self._run_one(call) for call in calls]
        self.steps += made
        return made

    def _run_one(self, call: dict[str, Any]) -> dict[str, Any]:
        name = str(call.get("name", ""))
        raw = call.get("arguments")
        arguments: Any = raw
        if isinstance(raw, str):
            try:
                arguments = json.loads(raw)
            except ValueError:
                arguments = None
        step: dict[str, Any] = {
            "id": str(call.get("id") or f"call_{name}"),
            "name": name,
            "arguments": raw if isinstance(raw, str) else json.dumps(raw),
        }
        if self.stopped.is_set():
            return {**step, "ok": False, "result": "stopped", "data": {}, "files": []}
        if not isinstance(arguments, dict):
            message = "The arguments are not a JSON object."
            return {**step, "ok": False, "result": message, "data": {}, "files": []}
        context = ToolContext(
            workspace=self.workspace,
            cancelled=self.stopped.is_set,
            timeout=settings.MLXWEB_CONFIG.server.tools.timeout,
        )
        try:
            result = self.tools[name].run(arguments, context)
        except Exception as exc:  # a tool must not raise; if one does, the model hears why
            logger.exception("api tool %s raised", name)
            failed = f"The tool failed: {exc}"
            return {**step, "ok": False, "result": failed, "data": {}, "files": []}
        return {
            **step,
            "ok": result.ok,
            "result": (result.text or result.error)[:MAX_RESULT_CHARS],
            "data": result.data,
            # Names only: the workspace goes when the response ends.
            "files": [{"name": f.name, "mime": f.mime} for f in result.files],
        }

    def close(self) -> None:
        self.stopped.set()
        shutil.rmtree(self.workspace, ignore_errors=True)


def continuation(answer: str, steps: Sequence[dict[str, Any]]) -> list[ChatMessage]:
    """The assistant's calls and their results, to append to the prompt for the next round."""
    calls = [{"id": s["id"], "name": s["name"], "arguments": s["arguments"]} for s in steps]
    said = {"role": "assistant", "content": answer, "tool_calls": calls}
    messages = [ChatMessage.model_validate(said)]
    messages += [
        ChatMessage(role="tool", content=s["result"], tool_call_id=s["id"], name=s["name"])
        for s in steps
    ]
    return messages
