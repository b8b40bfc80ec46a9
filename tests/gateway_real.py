"""
Helpers for the gateway's tests against real upstreams (processes nobody
here wrote, over real pipes and real sockets), on the real reactor.

L{Downstream} plays the MCP front: it drives a L{GatewaySession} as the HTTP
layer does, with an outlet that records what the gateway sends to the
client.  Nothing sleeps: waits poll with C{deferLater} under a deadline.
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import Any, Callable, Optional

from twisted.internet import error, reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase


from smeldr_oauth.gateway.agent import UpstreamAgent, upstream_agent
from smeldr_oauth.gateway.proxy import Gateway, GatewaySession
from smeldr_oauth.mcp import jsonrpc
from smeldr_oauth.mcp.session import Principal
from tests.e2e import CHECKOUT, _OutputCollector, freePort, subprocessEnvironment, waitForListening
from tests.gateway_fakes import RecordingOutlet
from tests.prerequisites import require

UPSTREAMS = os.path.join(CHECKOUT, "tests", "upstreams")
EVERYTHING = os.path.join(
    UPSTREAMS, "node_modules", "@modelcontextprotocol", "server-everything", "dist", "index.js"
)
SDK_SERVER = os.path.join(UPSTREAMS, "sdk_server.py")
MISBEHAVING = os.path.join(UPSTREAMS, "misbehaving.py")
ALL_CAPABILITIES = {"sampling": {}, "elicitation": {"form": {}}, "roots": {"listChanged": True}}

ALICE = Principal("alice", "client-a", frozenset({"mcp"}), "grant-a")
BOB = Principal("bob", "client-b", frozenset({"mcp"}), "grant-b")


def everything(mode: str = "stdio") -> list[str]:
    """The command line of server-everything in C{mode} (C{stdio}, C{streamableHttp}, C{sse})."""
    node = shutil.which("node")
    require(None if node else "node is not on PATH", "apt-get install nodejs (Node >= 20)")
    require(
        None if os.path.exists(EVERYTHING) else "@modelcontextprotocol/server-everything is not installed",
        "bash scripts/setup-upstreams.sh",
    )
    assert node is not None
    return [node, EVERYTHING, mode]


def python_sdk() -> None:
    """The official Python SDK (the C{mcp} package) must be importable."""
    try:
        import mcp.server.mcpserver  # noqa: F401
    except ImportError:
        require("the mcp package (official Python SDK) is not installed", ".venv/bin/pip install -r requirements-test.txt")


async def until(predicate: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll C{predicate} on the reactor until it is true."""
    deadline = reactor.seconds() + timeout  # type: ignore[attr-defined]
    while True:
        value = predicate()
        if value:
            return value
        if reactor.seconds() > deadline:  # type: ignore[attr-defined]
            raise AssertionError(f"timed out waiting for {what}")
        await deferLater(reactor, 0.02, lambda: None)  # type: ignore[arg-type]


async def answered(d: Deferred, timeout: float = 30.0) -> Any:
    """The result of C{d}, within C{timeout}."""
    box: list[Any] = []
    d.addBoth(box.append)
    await until(lambda: box, timeout, "an answer")
    return box[0]


class Downstream:
    """A downstream client session, as the MCP front would drive it."""

    def __init__(self, gateway: Gateway, principal: Principal = ALICE, capabilities: Optional[dict] = None) -> None:
        self.outlet = RecordingOutlet()
        self.session: GatewaySession = gateway.session(session_id=f"down-{id(self):x}", default_outlet=self.outlet)
        self.principal = principal
        self.capabilities = ALL_CAPABILITIES if capabilities is None else capabilities
        self._ids = 0

    def send(self, method: str, params: Optional[dict] = None, outlet: Any = None, msg_id: Any = None) -> Deferred:
        self._ids += 1
        message = {"jsonrpc": "2.0", "id": msg_id if msg_id is not None else self._ids, "method": method, "params": params or {}}
        return self.session.handle(jsonrpc.parse_message(message), self.principal, outlet)

    async def request(self, method: str, params: Optional[dict] = None, outlet: Any = None, timeout: float = 30.0) -> Any:
        return await answered(self.send(method, params, outlet), timeout)

    async def initialize(self, version: str = "2025-11-25") -> dict:
        answer = await self.request(
            "initialize", {"protocolVersion": version, "capabilities": self.capabilities, "clientInfo": {"name": "test"}}, timeout=60
        )
        assert "result" in answer, answer
        self.notify("notifications/initialized")
        return answer["result"]

    def notify(self, method: str, params: Optional[dict] = None) -> None:
        self.session.handle(jsonrpc.parse_message({"jsonrpc": "2.0", "method": method, "params": params or {}}), self.principal)

    def respond(self, request_id: Any, result: Any) -> None:
        self.session.handle(jsonrpc.parse_message({"jsonrpc": "2.0", "id": request_id, "result": result}), self.principal)

    async def tool(self, name: str, arguments: Optional[dict] = None, outlet: Any = None, timeout: float = 30.0) -> Any:
        return await self.request("tools/call", {"name": name, "arguments": arguments or {}}, outlet, timeout)

    async def client_request(self, outlet: RecordingOutlet, method: str, timeout: float = 20.0) -> dict:
        """Wait for the gateway to send the client a request."""
        return await until(lambda: next((m for m in outlet.requests() if m["method"] == method), None), timeout, method)


def text(answer: dict) -> str:
    assert "result" in answer, answer
    return "".join(c.get("text", "") for c in answer["result"]["content"])


def agent(test: TestCase) -> UpstreamAgent:
    """The gateway's HTTP agent, its idle connections closed at cleanup."""
    made = upstream_agent(reactor)
    test.addCleanup(made.close)
    return made


class Recorder:
    """
    Wraps a gateway's connector so a test sees what went upstream.

    @ivar sent: every message sent to any upstream instance, in order.
    @ivar channel: the channel made last.
    """

    def __init__(self, gateway: Gateway) -> None:
        self.sent: list[dict[str, Any]] = []
        self.channel: Any = None
        self._connector = gateway.pool.connector
        gateway.pool.connector = self._connect

    def _connect(self, owner: Any) -> Any:
        channel = self.channel = self._connector(owner)
        send = channel.send

        def record(message: dict[str, Any], identity: Any = None) -> Any:
            self.sent.append(message)
            return send(message, identity)

        channel.send = record
        return channel


class UpstreamProcess:
    """An HTTP upstream running as a process of its own."""

    def __init__(self, argv: list[str], env: Optional[dict[str, str]] = None) -> None:
        self.collector = _OutputCollector()
        self.process = reactor.spawnProcess(  # type: ignore[attr-defined]
            self.collector, argv[0], argv, env=env or subprocessEnvironment(), path=UPSTREAMS
        )
        self.port: Optional[int] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.collector.reason is None

    async def stop(self) -> None:
        if self.alive():
            try:
                self.process.signalProcess("KILL")
            except error.ProcessExitedAlready:
                pass
            await self.collector.ended

    @classmethod
    async def sdk(cls, test: TestCase, *flags: str) -> "UpstreamProcess":
        """The Python SDK server: it picks its port and prints it."""
        python_sdk()
        upstream = cls([sys.executable, SDK_SERVER, *flags])
        test.addCleanup(lambda: Deferred.fromCoroutine(upstream.stop()))

        def port() -> Optional[int]:
            out = b"".join(upstream.collector.out).decode()
            if not upstream.alive():
                raise AssertionError("the SDK server exited:\n" + upstream.collector.output())
            return int(out.split("PORT ", 1)[1].split()[0]) if "PORT " in out and "\n" in out.split("PORT ", 1)[1] else None

        upstream.port = await until(port, 60, "the SDK server's port")
        return upstream

    @classmethod
    async def everything(cls, test: TestCase, mode: str) -> "UpstreamProcess":
        """server-everything over HTTP on a free port (it takes PORT from the environment)."""
        argv = everything(mode)
        env = subprocessEnvironment()
        port = freePort()
        env["PORT"] = str(port)
        upstream = cls(argv, env)
        upstream.port = port
        test.addCleanup(lambda: Deferred.fromCoroutine(upstream.stop()))
        await waitForListening(reactor, port, upstream.alive, timeout=30)  # type: ignore[arg-type]
        return upstream
