"""
Test doubles for the gateway's unit tests: an in-process upstream (our own
native MCP server, L{ServerSession}, behind a channel that round-trips every
message through the JSON encoder), and a downstream outlet that records.

The upstream is a real MCP implementation, not a script of canned answers,
so handshakes, progress, server-to-client requests and cancellation behave
as a server's would; everything runs on a L{Clock}.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock, deferLater
from zope.interface import implementer

from smeldr_oauth.gateway import errors
from smeldr_oauth.gateway.config import Limits, UpstreamConfig
from smeldr_oauth.gateway.interfaces import IChannelReceiver, IUpstreamChannel
from smeldr_oauth.mcp import Context, EmbeddedResource, MCPApp, ResourceLink, jsonrpc
from smeldr_oauth.mcp.session import CallbackOutlet, Outlet, Principal, ServerSession

UPSTREAM_PRINCIPAL = Principal("upstream-operator", None, frozenset({"read", "write"}), None)


def build_upstream_app(clock: Clock) -> MCPApp:
    """The upstream's tools: one for each behaviour the gateway relays."""
    app = MCPApp(name="loop-upstream", version="7.0", instructions="upstream instructions")

    @app.tool(scopes=())
    def echo(text: str) -> str:
        """Echo the text."""
        return text

    @app.tool(scopes=())
    def read_note(name: str) -> str:
        return f"note {name}"

    @app.tool(scopes=())
    def write_note(name: str) -> str:
        return f"wrote {name}"

    @app.tool(scopes=())
    async def slow(ctx: Context, steps: int) -> str:
        for step in range(steps):
            await ctx.report_progress(step + 1, steps, f"step {step + 1}")
            await deferLater(clock, 1.0, lambda: None)
        return f"done after {steps}"

    @app.tool(scopes=())
    def never(ctx: Context) -> Deferred:
        return Deferred()

    @app.tool(scopes=())
    async def ask(ctx: Context, question: str) -> str:
        result = await ctx.sample([{"role": "user", "content": {"type": "text", "text": question}}], 20)
        return "model said: " + result["content"]["text"]

    @app.tool(scopes=())
    async def form(ctx: Context) -> dict:
        return await ctx.elicit("Your name?", {"type": "object", "properties": {"name": {"type": "string"}}})

    @app.tool(scopes=())
    async def roots(ctx: Context) -> list:
        return await ctx.list_roots()

    @app.tool(scopes=())
    async def chatty(ctx: Context, n: int) -> str:
        for i in range(n):
            await ctx.log("info", f"line {i}")
        await ctx.log("debug", "a debug line")
        return "said it"

    @app.tool(scopes=())
    def link() -> ResourceLink:
        return ResourceLink("memo://one", "one")

    @app.resource("memo://one", scopes=())
    def one() -> str:
        return "the first memo"

    @app.resource("memo://secret/{name}", scopes=())
    def secret(name: str) -> str:
        return f"secret {name}"

    @app.prompt(scopes=())
    def greet(name: str) -> str:
        return f"Hello {name}"

    @app.prompt(scopes=())
    def embedded() -> list:
        return [{"role": "user", "content": EmbeddedResource("memo://one", "text/plain", text="x")}]

    @app.completion("greet", "name")
    def names(value: str) -> list:
        return [n for n in ("alice", "bob") if n.startswith(value)]

    return app


@implementer(IUpstreamChannel)
class LoopbackChannel:
    """
    A channel to an in-process L{ServerSession}.  Every message is encoded
    and parsed again, as on a wire.

    @ivar sent: every message the gateway sent, with its identity.
    """

    pid = None
    instances = 0

    def __init__(self, app: MCPApp, clock: Clock, owner: Any = None) -> None:
        LoopbackChannel.instances += 1
        self.number = LoopbackChannel.instances
        self.owner = owner
        self.clock = clock
        self.session = ServerSession(app, clock, default_outlet=CallbackOutlet(self._from_server))
        self.sent: list[tuple[dict[str, Any], Any]] = []
        self.receiver: Optional[IChannelReceiver] = None
        self.version: Optional[str] = None
        self.closed = False
        self.fail_start = False

    def start(self, receiver: IChannelReceiver) -> Deferred:
        self.receiver = receiver
        if self.fail_start:
            return fail(errors.unavailable("loop", "start_failed", "its command was not found"))
        return succeed(None)

    def send(self, message: dict[str, Any], identity: Any = None) -> Deferred:
        if self.closed:
            return fail(errors.unavailable("loop", "exited", "its process is not running"))
        self.sent.append((message, identity))
        _, messages = jsonrpc.parse_frame(jsonrpc.encode(message))
        for parsed in messages:
            self.session.handle(parsed, UPSTREAM_PRINCIPAL, self.session.default_outlet).addCallback(self._reply)
        return succeed(None)

    def negotiated(self, version: str) -> None:
        self.version = version

    def close(self) -> Deferred:
        self.closed = True
        self.session.close()
        return succeed(None)

    def crash(self, detail: str = "its process exited with status 1") -> None:
        """The upstream dies."""
        self.closed = True
        self.session.close()
        assert self.receiver is not None
        self.receiver.channelLost("exited", detail)

    def push(self, message: dict[str, Any]) -> None:
        """The upstream sends something on its own."""
        self._from_server(message)

    def sent_methods(self) -> list[str]:
        return [m.get("method", "(response)") for m, _ in self.sent]

    def _reply(self, response: Optional[dict[str, Any]]) -> None:
        if response is not None:
            self._from_server(response)

    def _from_server(self, message: dict[str, Any]) -> None:
        if self.closed or self.receiver is None:
            return
        for parsed in jsonrpc.parse_frame(jsonrpc.encode(message))[1]:
            self.receiver.messageReceived(parsed, None)


class RecordingOutlet(Outlet):
    """A downstream channel that keeps what it is given."""

    def __init__(self, can_request: bool = True) -> None:
        self.can_request = can_request
        self.messages: list[dict[str, Any]] = []

    def send(self, message: dict[str, Any]) -> None:
        self.messages.append(message)

    def methods(self) -> list[str]:
        return [m.get("method", "(response)") for m in self.messages]

    def requests(self) -> list[dict[str, Any]]:
        return [m for m in self.messages if "method" in m and "id" in m]


def loop_config(**kwargs: Any) -> UpstreamConfig:
    """An upstream configuration for the loopback (kind stdio: it has processes)."""
    limits = kwargs.pop("limits", Limits())
    return UpstreamConfig(name=kwargs.pop("name", "loop"), kind="stdio", command=("loop",), limits=limits, **kwargs)
