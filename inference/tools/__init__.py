"""Tools the models may call (issue 11): plain Python, no Django imports.

`base` holds the shared types (`Tool`, `ToolContext`, `ToolResult`, `ToolFile`); each executor
module (`browser`, `python`, `patch`, `mcp`) exposes `tools(settings) -> list[Tool]` and its
settings model; `registry.tools_for(config)` builds the enabled ones from the server config's
`tools:` section.
"""
