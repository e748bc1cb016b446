"""A tiny MCP server for tests/tools/test_mcp.py: `add`, `echo`, `sleep` and `dot` (an image).

Run as `python mcp_server.py stdio` or `python mcp_server.py http PORT` (streamable HTTP on
127.0.0.1).
"""

from __future__ import annotations

import base64
import sys
import time

from mcp.server.mcpserver import MCPServer
from mcp.types import ImageContent

# A 1x1 PNG: what an image-returning tool sends.
DOT_PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg=="
)

server = MCPServer("test-tools")


@server.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@server.tool()
def echo(text: str) -> str:
    """Echo the text back."""
    return text


@server.tool()
def sleep(seconds: float) -> str:
    """Sleep, then say so."""
    time.sleep(seconds)
    return "slept"


@server.tool()
def dot() -> ImageContent:
    """A one-pixel image."""
    return ImageContent(data=base64.b64encode(DOT_PNG).decode(), mime_type="image/png")


if __name__ == "__main__":
    if sys.argv[1] == "stdio":
        server.run("stdio")
    else:
        server.run("streamable-http", host="127.0.0.1", port=int(sys.argv[2]))
