"""Which tools a server offers: built from the config's `tools:` section.

Each executor module (`inference.tools.<group>`) exposes `tools(settings) -> list[Tool]` and a
pydantic settings model; a group whose module is not installed yet (or fails to import) is skipped
with a log line, so the chat and the API keep working with the groups that are there.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterable
from typing import Any, Protocol

from pydantic import BaseModel

from inference.schemas import ToolSpec
from inference.tools.base import TOOL_NAME_RE, Tool

__all__ = ["GROUPS", "SETTINGS_MODELS", "ToolsConfig", "settings_model", "tool_spec", "tools_for"]

logger = logging.getLogger(__name__)

# group (the key under `tools:` and the module's name) -> its settings model's class name
SETTINGS_MODELS: dict[str, str] = {
    "browser": "BrowserSettings",
    "python": "PythonSettings",
    "patch": "PatchSettings",
    "mcp": "McpSettings",
}
GROUPS: tuple[str, ...] = tuple(SETTINGS_MODELS)


class ToolsConfig(Protocol):
    """What `tools_for` reads (mlxweb.config.ToolsSettings)."""

    @property
    def enabled(self) -> Iterable[str]: ...

    def settings_for(self, group: str) -> Any: ...


def _module(group: str) -> Any | None:
    try:
        return importlib.import_module(f"inference.tools.{group}")
    except ImportError as exc:
        logger.info("tools: %s is not available (%s)", group, exc)
        return None


def settings_model(group: str) -> type[BaseModel] | None:
    """The executor's settings model, or None while its module is not there."""
    module = _module(group)
    model = getattr(module, SETTINGS_MODELS[group], None) if module is not None else None
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def tools_for(config: ToolsConfig) -> dict[str, Tool]:
    """The enabled tools by name, in the order of `config.enabled`.

    A tool whose name is invalid or taken by an earlier one is skipped with a warning: names are
    how the model calls them and how the chat records them.
    """
    found: dict[str, Tool] = {}
    for group in config.enabled:
        module = _module(group) if group in SETTINGS_MODELS else None
        factory = getattr(module, "tools", None)
        if factory is None:
            continue
        try:
            built = list(factory(config.settings_for(group)))
        except Exception:
            logger.exception("tools: building the %s tools failed", group)
            continue
        for tool in built:
            if not TOOL_NAME_RE.match(tool.name) or tool.name in found:
                logger.warning("tools: skipping %r from %s (bad or taken name)", tool.name, group)
                continue
            found[tool.name] = tool
    return found


def tool_spec(tool: Tool) -> ToolSpec:
    """What a generation is given (`GenerationParams.tools`) for this tool."""
    return ToolSpec(name=tool.name, description=tool.description[:4096], parameters=tool.parameters)
