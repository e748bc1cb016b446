"""The tools registry and the config's `tools:` section (issue 11)."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from inference.tools import registry
from inference.tools.base import Tool, ToolContext, ToolResult
from mlxweb.config import ToolsSettings


class _FakeSettings(BaseModel):
    greeting: str = "hi"


class _Echo:
    name = "echo"
    description = "Echo the text"
    parameters: dict[str, Any] = {"type": "object", "properties": {"text": {"type": "string"}}}
    mutating = False

    def __init__(self, greeting: str) -> None:
        self.greeting = greeting

    def availability(self) -> str | None:
        return None

    def run(self, arguments: dict[str, Any], context: ToolContext) -> ToolResult:
        return ToolResult(ok=True, text=f"{self.greeting} {arguments.get('text', '')}")


@pytest.fixture
def fake_browser(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    module = types.ModuleType("inference.tools.browser")
    module.BrowserSettings = _FakeSettings  # type: ignore[attr-defined]
    module.tools = lambda settings: [_Echo(settings.greeting), _Echo("dup")]  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "inference.tools.browser", module)
    return module


def test_it_builds_the_enabled_tools_with_their_settings(fake_browser: types.ModuleType) -> None:
    settings = ToolsSettings.model_validate(
        {"enabled": ["browser"], "browser": {"greeting": "hello"}}
    )
    assert isinstance(settings.browser, _FakeSettings)
    tools = registry.tools_for(settings)
    # the second "echo" has a taken name and is skipped
    assert list(tools) == ["echo"]
    tool = tools["echo"]
    assert isinstance(tool, Tool)
    context = ToolContext(workspace=Path("."), cancelled=lambda: False)
    assert tool.run({"text": "x"}, context).text == "hello x"
    assert registry.tool_spec(tool).as_template_tool()["function"]["name"] == "echo"


def test_it_validates_a_section_with_the_executors_model(fake_browser: types.ModuleType) -> None:
    with pytest.raises(ValidationError):
        ToolsSettings.model_validate({"browser": {"greeting": 3}})


def test_it_skips_disabled_groups(fake_browser: types.ModuleType) -> None:
    assert registry.tools_for(ToolsSettings(enabled=())) == {}


def test_it_bounds_max_rounds() -> None:
    assert ToolsSettings().max_rounds == 4
    with pytest.raises(ValidationError):
        ToolsSettings(max_rounds=0)
    with pytest.raises(ValidationError):
        ToolsSettings(max_rounds=1000)
