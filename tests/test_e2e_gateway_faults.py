"""
Faults through the front, over real sockets: a real upstream process
(C{tests/upstreams/misbehaving.py}) behind the MCP front and our OAuth, a
client speaking Streamable HTTP with a real token.  The upstream dies
mid-call (an error, then a fresh process); it never answers (a timeout,
and the cancellation reaches it).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Optional

from klein import Klein
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from smeldr_oauth.gateway import config as gateway_config
from smeldr_oauth.gateway import errors
from smeldr_oauth.gateway.front import authorization_settings, plan
from smeldr_oauth.gateway.proxy import Gateway
from smeldr_oauth.mcp import jsonrpc
from smeldr_oauth.oauth.config import Config
from smeldr_oauth.oauth.model import Approval
from smeldr_oauth.oauth.server import OAuthServer
from smeldr_oauth.service.wiring import mount
from smeldr_oauth.store.sqlite import SQLiteStore
from smeldr_oauth.web.site import SmeldrSite
from tests.gateway_real import MISBEHAVING
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


class FaultsThroughTheFrontTests(OAuthSocketMixin, TestCase):
    timeout = 60

    async def setUp(self) -> None:  # type: ignore[override]
        app = Klein()
        port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(SmeldrSite(app.resource()))
        self.addCleanup(port.stopListening)
        self.issuer = f"http://127.0.0.1:{port.getHost().port}"
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        store = SQLiteStore(os.path.join(directory, "oauth.db"), reactor)
        self.addCleanup(store.close)
        await store.ready
        toml = f"""
[upstreams.bad]
command = {json.dumps(sys.executable + " " + MISBEHAVING)}
limits = {{ request_timeout = 1, stop_grace = 1, restart_backoff = 1 }}
"""
        mounted = plan(gateway_config.load((), toml), self.issuer)
        oauth = OAuthServer(
            Config(issuer=self.issuer, verify_bearer=verify_bearer, **authorization_settings(mounted)), store, reactor
        )
        self.gateway = Gateway(mounted[0].config, clock=reactor, reactor=reactor)
        self.mounted = mount(app, oauth, None, reactor=reactor, upstreams=[(mounted[0], self.gateway)])
        self.addCleanup(self.mounted.shutdown)
        self.http = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))
        self.bearer = (await self.token(self.issuer + "/mcp", "mcp", SITE_TOKEN))["access_token"]
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
        self.ids = 0

    async def post(self, message: dict[str, Any]) -> tuple[Any, bytes]:
        headers = dict(ACCEPT, Authorization=["Bearer " + self.bearer])
        if getattr(self, "session", None):
            headers["Mcp-Session-Id"] = [self.session]
        return await self.call("POST", self.issuer + "/mcp", data=json.dumps(message).encode(), headers=headers)

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
