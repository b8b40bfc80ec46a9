"""
Real C{twist smeldr-oauth --database postgresql://…} processes sharing
MCP sessions behind a real HAProxy (round-robin per request, no
stickiness, L{tests.haproxy}): the official MCP Python SDK completes its
whole flow on both transports, and a Streamable HTTP session survives
C{kill -9} of the process holding its stream.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Optional

import treq
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool

from tests import postgres
from tests.e2e import RunningServer, checkDriver, createSiteToken, runDriverReport, startServer
from tests.haproxy import RunningProxy, reserveFrontend, startHAProxy
from tests.test_e2e_python_sdk import DRIVER, _requireSDK
from tests.test_mcp_http import RawClient


class ThreeProcesses(TestCase):
    """Three server processes on one PostgreSQL database behind HAProxy."""

    timeout = 120

    async def setUp(self) -> None:  # type: ignore[override]
        self.url = postgres.database_url(self)
        frontend = reserveFrontend(self)
        self.issuer = frontend.url("http")
        options = ["--database", self.url, "--issuer", self.issuer, "--trust-forwarded-from", "127.0.0.1", "--keepalive", "2"]
        self.servers: list[RunningServer] = [await startServer(self, reactor, options) for _ in range(3)]
        self.proxy: RunningProxy = await startHAProxy(self, reactor, [s.port for s in self.servers], frontend=frontend)
        self.token = await createSiteToken(reactor, self.servers[0], "scaleout", self.url)
        self.pool = HTTPConnectionPool(reactor, persistent=False)

    def explain(self, message: str) -> str:
        for server in self.servers:
            message = server.annotate(message)
        return self.proxy.annotate(message)

    def taken_up(self) -> int:
        """How many times a process rebuilt a session from its record."""
        return sum(s.log().count("MCP session taken up from its record") for s in self.servers)


class SDKBehindBalancer:
    """
    An SDK's whole flow (discovery, registration, consent, code exchange,
    initialize, list, call) through the balancer: its requests land on the
    three processes in turn, so its session is served by all of them.
    """

    #: The driver's command line before its options, its working directory
    #: and the options that give it sessions.
    command: list[str] = []
    directory: Optional[str] = None
    options: tuple[str, ...] = ()

    async def drive(self, transport: str) -> dict[str, Any]:
        arguments = ("--transport", transport, *self.options)
        report, out, err, code = await runDriverReport(
            reactor,
            [
                *self.command, "--url", self.proxy.url + "/mcp", "--site-token", self.token,
                "--tool", "list_posts", "--args", "{}", "--timeout", "40", *arguments,
            ],
            timeout=60,
            path=self.directory,
        )
        try:
            return checkDriver(self, self.servers[0], arguments, report, out, err, code)
        except self.failureException as e:
            self.fail(self.explain(str(e)))

    async def check(self, transport: str) -> None:
        report = await self.drive(transport)
        self.assertFalse(report["tool_result"].get("isError", False), report["tool_result"])
        self.assertEqual([e for e in report["http"] if e.get("status", 0) >= 500], [])
        self.assertGreater(self.taken_up(), 0, self.explain("no process took a session up"))

    async def test_streamable(self) -> None:
        await self.check("streamable")

    async def test_legacy_sse(self) -> None:
        await self.check("sse")


class PythonSDKBehindBalancerTests(SDKBehindBalancer, ThreeProcesses):
    # With sessions (the SDK's default may be the stateless exchange).
    options = ("--mode", "legacy")

    def setUp(self) -> Any:
        _requireSDK()
        self.command = [sys.executable, DRIVER]
        return ThreeProcesses.setUp(self)


class TypeScriptSDKBehindBalancerTests(SDKBehindBalancer, ThreeProcesses):
    def setUp(self) -> Any:
        from tests.test_e2e_typescript_sdk import CALLBACK_PORT, NODE_DIRECTORY, SDK_PACKAGE, requireNodeClient
        from tests.test_e2e_typescript_sdk import DRIVER as TS_DRIVER

        self.command = [requireNodeClient(SDK_PACKAGE), TS_DRIVER, "--callback-port", str(CALLBACK_PORT)]
        self.directory = NODE_DIRECTORY
        return ThreeProcesses.setUp(self)


class ProcessDeathTests(ThreeProcesses):
    """
    C{kill -9} of the process holding a Streamable HTTP session's stream,
    while the client is mid-session.
    """

    async def setUp(self) -> None:  # type: ignore[override]
        await super().setUp()
        # A real access token, from the doctor's flow through the balancer.
        from smeldr_oauth.doctor.fetch import Fetcher, http_client
        from smeldr_oauth.doctor.guard import guard_around
        from smeldr_oauth.doctor.flow import Flow

        fetcher = Fetcher(reactor, http_client(reactor, None, 5, guard_around(["127.0.0.1"])), 5)
        metadata = json.loads((await fetcher.get(self.issuer + "/.well-known/oauth-authorization-server")).body)
        mcp = self.proxy.url + "/mcp"
        self.access = (await Flow(fetcher, mcp, mcp, metadata).run(self.token)).access_token

    async def post(self, body: Any, session_id: Optional[str] = None) -> tuple[int, Any, bytes]:
        headers = {
            "Authorization": [f"Bearer {self.access}"],
            "Content-Type": ["application/json"],
            "Accept": ["application/json, text/event-stream"],
        }
        if session_id is not None:
            headers["Mcp-Session-Id"] = [session_id]
        response = await treq.post(self.proxy.url + "/mcp", json.dumps(body).encode(), headers=headers, pool=self.pool)
        return response.code, response.headers, await response.content()

    async def stream(self, port: int, session_id: str, last_event_id: Optional[str] = None) -> RawClient:
        """The session's GET stream, straight to the process on C{port}."""
        client = RawClient()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
        self.addCleanup(lambda: client.transport.loseConnection())
        client.transport.write(
            b"GET /mcp HTTP/1.1\r\nHost: " + self.issuer.split("//")[1].encode()
            + b"\r\nAccept: text/event-stream\r\nAuthorization: Bearer " + self.access.encode()
            + b"\r\nMcp-Session-Id: " + session_id.encode()
            + (b"\r\nLast-Event-ID: " + last_event_id.encode() if last_event_id else b"")
            + b"\r\n\r\n"
        )
        await client.wait_for(b": stream open", timeout=20)
        return client

    def call(self, id: int, name: str, **arguments: Any) -> dict[str, Any]:
        return {"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": name, "arguments": arguments}}

    async def test_kill_the_stream_holder(self) -> None:
        code, headers, body = await self.post(
            {"jsonrpc": "2.0", "id": 0, "method": "initialize",
             "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}
        )
        self.assertEqual(code, 200, self.explain(repr(body)))
        [session_id] = headers.getRawHeaders("mcp-session-id")
        code, _, _ = await self.post({"jsonrpc": "2.0", "method": "notifications/initialized"}, session_id)
        self.assertEqual(code, 202)
        victim, *survivors = self.servers
        stream = await self.stream(victim.port, session_id)
        # A post created through whichever process: the resource list
        # changed, and the stream on the victim hears it.
        code, _, body = await self.post(self.call(1, "create_post", title="One", body="first", status="published"), session_id)
        self.assertEqual(code, 200, self.explain(repr(body)))
        await stream.wait_for(b"resources/list_changed", timeout=20)
        [first_id] = [line.split(b" ")[1] for line in stream.data.split(b"\n") if line.startswith(b"id: ")]

        victim._process.signalProcess("KILL")
        await stream.lost
        await victim._collector.ended

        # The client goes on through the balancer (a request sent to the
        # dead process is redispatched): same session, nothing lost.
        code, _, body = await self.post(self.call(2, "create_post", title="Two", body="second", status="published"), session_id)
        self.assertEqual(code, 200, self.explain(repr(body)))
        self.assertFalse(json.loads(body)["result"].get("isError"), body)
        # It reopens its stream elsewhere with Last-Event-ID and gets what
        # it missed, not what it had.
        again = await self.stream(survivors[0].port, session_id, last_event_id=first_id.decode())
        await again.wait_for(b"resources/list_changed", timeout=20)
        self.assertNotIn(b"id: " + first_id + b"\n", again.data)
        [second_id] = [line.split(b" ")[1] for line in again.data.split(b"\n") if line.startswith(b"id: ")]
        # Both events are in the shared log, the first one written by the
        # dead process: the third process replays them.
        again.transport.loseConnection()
        third = await self.stream(survivors[1].port, session_id, last_event_id="0")
        await third.wait_for(b"id: " + second_id + b"\n", timeout=20)
        replayed = [line.split(b" ")[1] for line in third.data.split(b"\n") if line.startswith(b"id: ")]
        self.assertEqual(replayed, [first_id, second_id])
        code, _, body = await self.post(self.call(3, "list_posts"), session_id)
        self.assertEqual(code, 200, self.explain(repr(body)))
        text = json.loads(body)["result"]["content"][0]["text"]
        self.assertIn("One", text)
        self.assertIn("Two", text)
