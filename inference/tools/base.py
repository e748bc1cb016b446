"""The types every tool executor and its callers share (the issue 11 contract).

Executors import nothing from Django: their settings arrive as arguments, so they run in the worker,
a Celery job or a test alike. A tool's `run` is synchronous and never raises for its own failures
(bad arguments included): it returns `ToolResult(ok=False, error=..., text=...)`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "MAX_RESULT_CHARS",
    "TOOL_NAME_RE",
    "Tool",
    "ToolContext",
    "ToolFile",
    "ToolResult",
]

# What goes back to the model is capped by each executor at this many characters.
MAX_RESULT_CHARS = 16_000
TOOL_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


@dataclass(frozen=True)
class ToolFile:
    name: str  # file name shown to the user
    mime: str  # "image/png", "text/plain", ...
    path: Path  # where it is on disk (inside the workspace or a tool's own folder)


@dataclass(frozen=True)
class ToolResult:
    ok: bool
    text: str  # what goes back to the model (executors cap it: <= MAX_RESULT_CHARS)
    data: dict[str, Any] = field(default_factory=dict)  # JSON-serialisable details for display
    files: tuple[ToolFile, ...] = ()  # images are shown in the chat
    error: str = ""  # a clear message when ok is False (also in text)


@dataclass
class ToolContext:
    workspace: Path  # this conversation's folder (exists; survives between calls)
    cancelled: Callable[[], bool]  # poll it; stop promptly and return ok=False "stopped"
    timeout: float = 60.0  # wall-clock budget for this call, seconds


@runtime_checkable
class Tool(Protocol):
    name: str  # ^[a-z][a-z0-9_]{0,63}$, e.g. "browser_fetch"
    description: str
    parameters: dict[str, Any]  # JSON Schema of the arguments (type: object)
    mutating: bool  # True: waits for the user's approval unless allowed

    def availability(self) -> str | None:
        """None when usable, else why not (shown to users)."""
        ...

    def run(self, arguments: dict[str, Any], context: ToolContext) -> ToolResult:
        """Synchronous; validates `arguments` itself (bad input: ok=False with the reason, never
        an exception); never raises for the tool's own failures."""
        ...
