"""
The MCP server: the tool-author API (L{smeldr_oauth.mcp.app} and the
records it uses), a transport-independent protocol core
(L{smeldr_oauth.mcp.session}, L{smeldr_oauth.mcp.methods}), the session
state seams (L{smeldr_oauth.mcp.state}), and transports
(L{smeldr_oauth.mcp.http}, L{smeldr_oauth.mcp.stdio}).
"""

from smeldr_oauth.mcp.app import MCPApp
from smeldr_oauth.mcp.content import (
    AudioContent,
    EmbeddedResource,
    ImageContent,
    ResourceLink,
    TextContent,
)
from smeldr_oauth.mcp.context import Context, ToolError

__all__ = [
    "MCPApp",
    "Context",
    "ToolError",
    "TextContent",
    "ImageContent",
    "AudioContent",
    "EmbeddedResource",
    "ResourceLink",
]
