"""
The MCP server: a transport-independent protocol core
(L{smeldr_oauth.mcp.session}), the tool-author API (L{smeldr_oauth.mcp.app}),
and transports (L{smeldr_oauth.mcp.http}, L{smeldr_oauth.mcp.stdio}).
"""

from smeldr_oauth.mcp.app import (
    AudioContent,
    Context,
    EmbeddedResource,
    ImageContent,
    MCPApp,
    ResourceLink,
    TextContent,
    ToolError,
)

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
