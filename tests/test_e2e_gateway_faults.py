"""
Faults through the front, over real sockets: a real upstream process
(C{tests/upstreams/misbehaving.py}) behind the MCP front and our OAuth, a
client speaking Streamable HTTP with a real token.  The upstream dies
mid-call (an error, then a fresh process); it never answers (a timeout,
and the cancellation reaches it); it floods a client that stopped reading
(the front disconnects the client: nothing piles up).
"""

from __future__ import annotations

import json
import socket
import sys
from typing import Any, Optional

from klein import Klein
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, serverFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from zope.interface import implementer

from smeldr_oauth.gateway import configfile as gateway_config
from smeldr_oauth.gateway import errors
from smeldr_oauth.gateway.front import authorization_settings, plan
from smeldr_oauth.gateway.proxy import Gateway
from smeldr_oauth.mcp import jsonrpc
from smeldr_oauth.mcp.http import MCPHTTP
from smeldr_oauth.oauth.interfaces import IAccessVerifier
from smeldr_oauth.oauth.model import AccessInfo
from smeldr_oauth.oauth.config import Config
from smeldr_oauth.oauth.model import Approval
from smeldr_oauth.oauth.server import OAuthServer
from smeldr_oauth.service.wiring import mount
from smeldr_oauth.web.site import SmeldrSite
from tests.gateway_real import MISBEHAVING, until
from tests.oauth_socket import OAuthSocketMixin

SITE_TOKEN = "gateway-faults-site-token-0123456789"
ACCEPT = {"Content-Type": ["application/json"], "Accept": ["application/json, text/event-stream"]}


def verify_bearer(pasted: str) -> Optional[Approval]:
    return Approval(subject="alice", site_token_id="st-faults") if pasted == SITE_TOKEN else None


def answer_of(body: bytes) -> dict[str, Any]:
    """The JSON-RPC answer in a JSON or an SSE response body."""
    text = body.decode()
    if text.lstrip().startswith("{"):
        return dict(json.loads(text))
    data = [line[5:].strip() for line in text.splitlines() if line.startswith("data:")]
    answers = [json.loads(d) for d in data if d and ("result" in d or "error" in d)]
    return dict(answers[-1])


class _Front(OAuthSocketMixin):
    """Our OAuth and the MCP front over one upstream, C{command}."""

    timeout = 60
    #: the upstream's command
    command = sys.executable + " " + MISBEHAVING

    async def setUp(self) -> None:  # type: ignore[override]
        app = await self.serve()
        store = await self.open_store()
        toml = f"""
[upstreams.bad]
command = {json.dumps(self.command)}
limits = {{ request_timeout = 1, stop_grace = 1, restart_backoff = 1 }}
"""
        mounted = plan(gateway_config.load((), toml), self.issuer)
        oauth = OAuthServer(
            Config(issuer=self.issuer, verify_bearer=verify_bearer, **authorization_settings(mounted)), store, reactor
        )
        self.gateway = Gateway(mounted[0].config, clock=reactor, reactor=reactor)
        self.mounted = mount(app, oauth, None, reactor=reactor, upstreams=[(mounted[0], self.gateway)])
        self.addCleanup(self.mounted.shutdown)
        self.bearer = (await self.token(self.issuer + "/mcp", "mcp", SITE_TOKEN))["access_token"]
        self.session: Optional[str] = None
        self.ids = 0

    async def post(self, message: dict[str, Any]) -> tuple[Any, bytes]:
        headers = dict(ACCEPT, Authorization=["Bearer " + self.bearer])
        if self.session is not None:
            headers["Mcp-Session-Id"] = [self.session]
        return await self.call("POST", self.issuer + "/mcp", data=json.dumps(message).encode(), headers=headers)


class FaultsThroughTheFrontTests(_Front, TestCase):
    async def setUp(self) -> None:  # type: ignore[override]
        await super().setUp()
        response, body = await self.post(
            {
                "jsonrpc": "2.0",
                "id": 0,
                "method": "initialize",
                "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "faults"}},
            }
        )
        self.assertEqual(response.code, 200, body)
        self.session = response.headers.getRawHeaders("mcp-session-id")[0]
        await self.post({"jsonrpc": "2.0", "method": "notifications/initialized"})

    async def tool(self, name: str) -> dict[str, Any]:
        self.ids += 1
        response, body = await self.post(
            {"jsonrpc": "2.0", "id": self.ids, "method": "tools/call", "params": {"name": name, "arguments": {}}}
        )
        self.assertEqual(response.code, 200, body)
        return answer_of(body)

    def text(self, answer: dict[str, Any]) -> str:
        self.assertIn("result", answer)
        return "".join(c.get("text", "") for c in answer["result"]["content"])

    async def test_killed_mid_call(self) -> None:
        """An error for the call in flight; the next call runs on a fresh process."""
        first = json.loads(self.text(await self.tool("pid")))["pid"]
        answer = await self.tool("crash")
        self.assertEqual(answer["error"]["code"], errors.UPSTREAM_UNAVAILABLE, answer)
        self.assertEqual(answer["error"]["data"]["reason"], "exited")
        # A quick crash makes the next start wait for the backoff (1 s):
        # ask until it is over, as a client would.
        for _ in range(100):
            answer = await self.tool("pid")
            if "result" in answer:
                break
            self.assertEqual(answer["error"]["data"]["reason"], "restarting", answer)
            await deferLater(reactor, 0.1, lambda: None)
        second = json.loads(self.text(answer))["pid"]
        self.assertNotEqual(first, second)
        self.assertEqual(self.gateway.metrics.crashes, 1)

    async def test_never_answers(self) -> None:
        """A timeout error; the upstream is told the call is cancelled."""
        answer = await self.tool("silent")
        self.assertEqual(answer["error"]["code"], jsonrpc.REQUEST_TIMEOUT, answer)
        cancelled = json.loads(self.text(await self.tool("cancelled")))
        self.assertEqual(len(cancelled), 1, cancelled)
        self.assertEqual(self.gateway.metrics.timeouts, 1)


class UpstreamWontStartTests(_Front, TestCase):
    """An upstream that exits at once (C{false}): every C{initialize} fails."""

    command = "false"

    async def test_initialize_refused(self) -> None:
        """
        The refused C{initialize} names no session (C{Mcp-Session-Id}):
        none was kept, and the client would be sent on to a 404.
        """
        response, body = await self.post(
            {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"protocolVersion": "2025-11-25"}}
        )
        self.assertEqual(response.code, 200, body)
        answer = answer_of(body)
        self.assertEqual(answer["error"]["data"]["reason"], "exited", answer)
        self.assertIsNone(response.headers.getRawHeaders("mcp-session-id"))


@implementer(IAccessVerifier)
class _OneToken:
    def __init__(self, resource: str) -> None:
        self.info = AccessInfo(
            subject="alice", client_id="c", scopes=frozenset({"mcp"}), resource=resource, grant_id="g", expires_at=1e12
        )

    def verify_access_token(self, token: str) -> Any:
        return succeed(self.info if token == "slow-client-token" else None)


class _StalledReader(Protocol):
    """
    Reads a legacy SSE stream up to the answer to C{initialize}, then stops
    reading (a slow client).
    """

    def __init__(self) -> None:
        self.received = b""
        self.stalled = False
        self.lost: Deferred = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if b'"id":1,"result"' in self.received and not self.stalled:
            # From now on the kernel's buffers fill, then the server's.
            self.stalled = True
            self.transport.pauseProducing()  # type: ignore[union-attr]

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback(None)

    def endpoint(self) -> Optional[str]:
        rest = self.received.partition(b"event: endpoint\ndata: ")[2]
        return rest.split(b"\n", 1)[0].decode() if b"\n" in rest else None


class SlowClientTests(TestCase):
    """
    An upstream floods a session whose client stopped reading its legacy
    SSE stream: the front disconnects the client (its queue is bounded)
    rather than holding the flood in memory.
    """

    timeout = 60

    async def test_flood_to_a_stalled_client(self) -> None:
        app = Klein()
        port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(SmeldrSite(app.resource()))
        self.addCleanup(port.stopListening)
        base = f"http://127.0.0.1:{port.getHost().port}"
        toml = f"""
[upstreams.flood]
command = {json.dumps(sys.executable + " " + MISBEHAVING)}
limits = {{ notification_rate = 1000000, notification_burst = 1000000, stop_grace = 1 }}
"""
        gateway = Gateway(gateway_config.load((), toml).upstreams[0], clock=reactor, reactor=reactor)
        self.addCleanup(gateway.stop)
        front = MCPHTTP(
            reactor,
            None,
            _OneToken(base + "/mcp"),
            resource_url=base + "/mcp",
            resource_metadata_url=base + "/.well-known/oauth-protected-resource/mcp",
            challenge_scope="mcp",
            session_factory=gateway.session,
            max_queue=16,
        )
        front.register(app, "/mcp")
        self.addCleanup(front.shutdown)
        http = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))
        reader = _StalledReader()
        connection = await TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port).connect(
            Factory.forProtocol(lambda: reader)
        )
        # A small receive buffer (no autotuning): the kernel holds little
        # of the flood for the client, as on a slow link.
        connection.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        connection.transport.write(
            b"GET /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n"
            b"Authorization: Bearer slow-client-token\r\n\r\n"
        )
        endpoint = await until(reader.endpoint, 20, "the endpoint event")
        headers = {"Content-Type": ["application/json"], "Authorization": ["Bearer slow-client-token"]}

        async def send(message: dict[str, Any]) -> None:
            response = await http.post(base + endpoint, data=json.dumps(message).encode(), headers=headers)
            await response.content()
            self.assertEqual(response.code, 202)

        init = {"protocolVersion": "2024-11-05", "capabilities": {}, "clientInfo": {"name": "slow"}}
        await send({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": init})
        await until(lambda: reader.stalled, 20, "the answer to initialize")
        await send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        self.assertEqual(front.stream_count, 1)
        with capturedLogs() as events:
            flood = {"name": "flood", "arguments": {"count": 100000}}
            await send({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": flood})
            await until(lambda: front.stream_count == 0, 40, "the stalled client's stream to end")
        texts = [formatEvent(e) for e in events]
        self.assertTrue([t for t in texts if "stopped reading" in t], texts[-5:])
        # The client, reading again, finds its connection closed.
        connection.transport.resumeProducing()
        await until(lambda: reader.lost.called, 20, "the client to see the disconnection")
