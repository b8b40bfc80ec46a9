"""
An upstream MCP server built with the official Python SDK (C{MCPServer},
formerly FastMCP), served over Streamable HTTP on an ephemeral port.

It binds 127.0.0.1:0 itself and prints C{PORT <n>} on stdout once it
listens, so the test knows where it is without racing for a port.

Usage: python sdk_server.py [--json-response]

The tools show what the gateway must relay: progress, sampling,
elicitation, logging, list changes, resource updates, a call that never
ends (and whether it was cancelled), and the headers a request carried
(to check the gateway's credential and identity headers, and that no
caller token arrives).
"""

from __future__ import annotations

import asyncio
import socket
import sys

import uvicorn
from pydantic import BaseModel

from mcp.server.mcpserver import Context, MCPServer
from mcp.types import SamplingMessage, TextContent

CANCELLED: list[str] = []
HEADERS = ("authorization", "x-upstream-key", "x-smeldr-subject", "x-smeldr-client", "x-smeldr-scopes")

server = MCPServer("sdk-upstream", version="3.1", instructions="A Python SDK server behind the gateway.")


@server.tool()
def echo(text: str) -> str:
    """Echo the text."""
    return text


@server.tool()
def whoami(ctx: Context) -> dict:
    """The gateway-related headers this request carried."""
    headers = ctx.headers or {}
    return {name: headers.get(name) for name in HEADERS}


@server.tool()
async def progress(steps: int, ctx: Context) -> str:
    """Report progress at each step."""
    for step in range(steps):
        await ctx.report_progress(step + 1, steps, f"step {step + 1}")
        await asyncio.sleep(0.02)
    return f"{steps} steps done"


@server.tool()
async def sample(question: str, ctx: Context) -> str:
    """Ask the client's model."""
    result = await ctx.session.create_message(
        [SamplingMessage(role="user", content=TextContent(type="text", text=question))], max_tokens=20
    )
    return "model said: " + getattr(result.content, "text", "?")


class Name(BaseModel):
    name: str


@server.tool()
async def ask_name(ctx: Context) -> str:
    """Elicit the user's name."""
    answer = await ctx.elicit("What is your name?", Name)
    return f"{answer.action}: {answer.data.name if answer.data else '-'}"


@server.tool()
async def chatty(n: int, ctx: Context) -> str:
    """Send n log messages."""
    for i in range(n):
        await ctx.info(f"line {i}")
    return "said it"


@server.tool()
async def hang(ctx: Context) -> str:
    """Never answers; remembers being cancelled."""
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        CANCELLED.append(str(ctx.request_id))
        raise
    return "impossible"


@server.tool()
def cancelled() -> list[str]:
    """The request ids of hang calls that were cancelled."""
    return list(CANCELLED)


@server.tool()
async def changes(ctx: Context) -> str:
    """Announce a tools list change and an update of memo://one."""
    await ctx.session.send_tool_list_changed()
    await ctx.session.send_resource_updated("memo://one")
    return "announced"


@server.resource("memo://one")
def memo() -> str:
    return "the first memo"


@server.prompt()
def greet(name: str) -> str:
    return f"Hello {name}"


def main() -> None:
    app = server.streamable_http_app(json_response="--json-response" in sys.argv)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    print(f"PORT {sock.getsockname()[1]}", flush=True)
    config = uvicorn.Config(app, log_level="warning", lifespan="on")
    asyncio.run(uvicorn.Server(config).serve(sockets=[sock]))


if __name__ == "__main__":
    main()
