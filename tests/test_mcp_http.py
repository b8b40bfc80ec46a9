"""
Tests for L{smeldr_oauth.mcp.http}: both HTTP transports over real sockets
on 127.0.0.1, with a fake access-token verifier.  Timing (keepalives) is
driven by a L{Clock} given to L{MCPHTTP} as its reactor; only the sockets use
the real reactor.
"""

from __future__ import annotations

import gc
import json
import weakref
from typing import Any, Optional

import attr
import treq
from klein import Klein
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import HTTPConnectionPool
from zope.interface import implementer

from smeldr_oauth.mcp import Context, MCPApp
from smeldr_oauth.mcp.http import MCPHTTP
from smeldr_oauth.oauth.interfaces import IAccessVerifier
from smeldr_oauth.web.routes import direct_answers
from smeldr_oauth.web.site import SmeldrRequest, SmeldrSite
from smeldr_oauth.oauth.model import AccessInfo

METADATA = "https://mcp.example/.well-known/oauth-protected-resource/mcp"
RESOURCE = "https://mcp.example/mcp"
ACCEPT = "application/json, text/event-stream"


def access(subject: str = "alice", client: str = "c1", scopes: tuple = ("read",), grant: str = "g1") -> AccessInfo:
    return AccessInfo(
        subject=subject, client_id=client, scopes=frozenset(scopes), resource=RESOURCE, grant_id=grant, expires_at=1e12
    )


@implementer(IAccessVerifier)
class FakeVerifier:
    """Tokens are dictionary keys; anything else is unknown."""

    def __init__(self, tokens: dict[str, AccessInfo]) -> None:
        self.tokens = tokens

    def verify_access_token(self, token: str) -> Deferred:
        return succeed(self.tokens.get(token))


TOKENS = {
    "alice": access(),
    "alice-refreshed": access(grant="g1"),
    "alice-rw": access(scopes=("read", "write"), grant="g2"),
    "alice-other-client": access(client="c2", grant="g3"),
    "bob": access(subject="bob", grant="g4"),
}


def build_app() -> MCPApp:
    app = MCPApp(name="http-test", version="1")

    @app.tool()
    def echo(text: str) -> str:
        return text

    @app.tool(scopes=("write",))
    def write(text: str) -> str:
        return "wrote " + text

    @app.tool()
    async def progress(ctx: Context) -> str:
        await ctx.report_progress(1, 2)
        return "done"

    @app.tool()
    async def hang() -> str:
        await Deferred()  # until cancelled
        return "never"

    @app.tool()
    async def chatty(ctx: Context) -> str:
        await ctx.log("debug", "quiet")
        await ctx.log("warning", "loud")
        return "said"

    @app.tool()
    async def ask(ctx: Context) -> dict:
        return await ctx.elicit("Name?", {"type": "object", "properties": {"name": {"type": "string"}}})

    return app


class RawClient(Protocol):
    """A bare TCP client: send bytes, wait for bytes, pause reading."""

    def __init__(self) -> None:
        self.data = b""
        self.lost: Deferred = Deferred()
        self._waiters: list[tuple[bytes, Deferred]] = []

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        for needle, d in list(self._waiters):
            if needle in self.data:
                self._waiters.remove((needle, d))
                d.callback(self.data)

    def connectionLost(self, reason: Any) -> None:
        self.lost.callback(None)
        for needle, d in self._waiters:
            d.errback(AssertionError(f"connection lost waiting for {needle!r}; got {self.data!r}"))
        self._waiters = []

    def wait_for(self, needle: bytes, timeout: float = 5.0) -> Deferred:
        if needle in self.data:
            return succeed(self.data)
        d: Deferred = Deferred()
        waiter = (needle, d)
        self._waiters.append(waiter)

        def expire() -> None:
            # No longer waited for: a later connectionLost must not answer
            # the same Deferred again.
            self._waiters.remove(waiter)
            d.errback(AssertionError(f"timeout waiting for {needle!r}; got {self.data!r}"))

        timer = reactor.callLater(timeout, expire)  # type: ignore[attr-defined]

        def stop(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            return result

        return d.addBoth(stop)


class HTTPTestBase(TestCase):
    timeout = 30
    keepalive = 15.0
    max_queue = 256
    #: more MCPHTTP keyword arguments
    options: dict[str, Any] = {}

    async def setUp(self) -> None:  # type: ignore[override]
        self.clock = Clock()
        self.app = build_app()
        # A copy: tests add and remove (revoke) tokens.
        self.verifier = FakeVerifier(dict(TOKENS))
        self.mcp, self.port = await self.serve(self.app)
        self.base = f"http://127.0.0.1:{self.port.getHost().port}"
        self.pool = HTTPConnectionPool(reactor, persistent=False)

    async def serve(self, app: MCPApp) -> tuple[MCPHTTP, Any]:
        """An MCP endpoint for C{app} on its own port (stopped after the test)."""
        mcp = MCPHTTP(
            self.clock,
            app,
            self.verifier,
            resource_url=RESOURCE,
            resource_metadata_url=METADATA,
            challenge_scope="read write",
            allowed_origins=("https://claude.ai",),
            keepalive_interval=self.keepalive,
            max_body=1000,
            max_queue=self.max_queue,
            **self.options,
        )
        klein = Klein()
        mcp.register(klein)
        site = SmeldrSite(klein.resource(), max_body=1000)
        site.noisy = False
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
        self.addCleanup(port.stopListening)
        self.addCleanup(mcp.shutdown)
        return mcp, port

    async def request(
        self,
        method: str,
        path: str = "/mcp",
        body: Any = None,
        token: Optional[str] = "alice",
        headers: Optional[dict[str, str]] = None,
    ) -> tuple[int, Any, bytes]:
        all_headers = {"Accept": "application/json"}
        if body is not None:
            all_headers["Content-Type"] = "application/json"
        if token is not None:
            all_headers["Authorization"] = f"Bearer {token}"
        all_headers.update(headers or {})
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        response = await treq.request(
            method, self.base + path, headers={k: [v] for k, v in all_headers.items()}, data=data, pool=self.pool
        )
        content = await response.content()
        return response.code, response.headers, content

    async def initialize(
        self, token: str = "alice", version: str = "2025-06-18", capabilities: Optional[dict] = None
    ) -> str:
        code, headers, body = await self.request(
            "POST",
            body={
                "jsonrpc": "2.0",
                "id": 0,
                "method": "initialize",
                "params": {
                    "protocolVersion": version,
                    "capabilities": capabilities or {},
                    "clientInfo": {"name": "t", "version": "1"},
                },
            },
            token=token,
        )
        self.assertEqual(code, 200, body)
        self.assertEqual(json.loads(body)["result"]["protocolVersion"], version)
        [session_id] = headers.getRawHeaders("mcp-session-id")
        code, _, _ = await self.request(
            "POST",
            body={"jsonrpc": "2.0", "method": "notifications/initialized"},
            token=token,
            headers={"Mcp-Session-Id": session_id},
        )
        self.assertEqual(code, 202)
        return session_id

    async def raw(self, request: bytes, port: Optional[int] = None) -> RawClient:
        client = RawClient()
        port = port if port is not None else self.port.getHost().port
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
        client.transport.write(request)

        async def close() -> None:
            if not client.lost.called:
                client.transport.abortConnection()
            await client.lost

        self.addCleanup(close)
        return client

    async def open_get(self, session_id: str, token: str = "alice") -> RawClient:
        """The Streamable HTTP GET stream of a session."""
        client = await self.raw(
            b"GET /mcp HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\nAuthorization: Bearer "
            + token.encode()
            + b"\r\nMcp-Session-Id: "
            + session_id.encode()
            + b"\r\n\r\n"
        )
        await client.wait_for(b": stream open")
        return client

    async def open_legacy(self, token: str = "alice") -> tuple[RawClient, str]:
        client = await self.raw(
            b"GET /mcp HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\nAuthorization: Bearer "
            + token.encode()
            + b"\r\n\r\n"
        )
        data = await client.wait_for(b"session_id=")
        await client.wait_for(b"\n\n")
        line = data.split(b"data: ", 1)[1].split(b"\n", 1)[0].decode()
        return client, line


class AuthTests(HTTPTestBase):
    async def test_no_token(self) -> None:
        code, headers, body = await self.request("POST", body={"jsonrpc": "2.0", "id": 1, "method": "ping"}, token=None)
        self.assertEqual(code, 401)
        self.assertEqual(
            headers.getRawHeaders("www-authenticate"), [f'Bearer resource_metadata="{METADATA}", scope="read write"']
        )
        self.assertEqual(headers.getRawHeaders("content-type"), ["application/json"])

    async def test_invalid_token(self) -> None:
        code, headers, _ = await self.request("POST", body={}, token="nope")
        self.assertEqual(code, 401)
        challenge = headers.getRawHeaders("www-authenticate")[0]
        self.assertIn('error="invalid_token"', challenge)
        self.assertIn(f'resource_metadata="{METADATA}"', challenge)

    async def test_expired_token(self) -> None:
        self.verifier.tokens["old"] = AccessInfo(
            subject="a", client_id="c", scopes=frozenset(), resource=RESOURCE, grant_id="g", expires_at=-1.0
        )
        code, headers, _ = await self.request("GET", token="old")
        self.assertEqual(code, 401)
        self.assertIn('error="invalid_token"', headers.getRawHeaders("www-authenticate")[0])

    async def test_query_token_never_accepted(self) -> None:
        code, _, _ = await self.request("POST", path="/mcp?access_token=alice", body={}, token=None)
        self.assertEqual(code, 401)

    async def test_malformed_and_other_schemes(self) -> None:
        for value in ("Basic YWxpY2U6eA==", "Bearer", "Bearer a b", "Bearer \u00e9"):
            code, _, _ = await self.request("GET", token=None, headers={"Authorization": value})
            self.assertEqual(code, 401, value)

    async def test_insufficient_scope(self) -> None:
        session_id = await self.initialize()
        code, headers, body = await self.request(
            "POST",
            body={"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "write", "arguments": {"text": "x"}}},
            headers={"Mcp-Session-Id": session_id},
        )
        self.assertEqual(code, 403)
        self.assertEqual(
            headers.getRawHeaders("www-authenticate"),
            [
                'Bearer error="insufficient_scope", error_description="The access token lacks a required scope", '
                f'scope="write", resource_metadata="{METADATA}"'
            ],
        )
        # A stepped-up token of the same user and client works on the same session.
        self.verifier.tokens["alice-rw"] = access(scopes=("read", "write"))
        code, _, body = await self.request(
            "POST",
            body={"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "write", "arguments": {"text": "x"}}},
            headers={"Mcp-Session-Id": session_id},
            token="alice-rw",
        )
        self.assertEqual(code, 200)
        self.assertEqual(json.loads(body)["result"]["content"][0]["text"], "wrote x")

    async def test_verifier_failure_is_503_not_500(self) -> None:
        class Broken:
            def verify_access_token(self, token: str) -> Deferred:
                raise RuntimeError("db down")

        self.mcp.auth.verifier = Broken()
        code, headers, body = await self.request("GET")
        self.assertEqual(code, 503)
        self.assertNotIn(b"db down", body)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    async def test_verifier_answering_plainly(self) -> None:
        """
        A verifier that answers with the value itself rather than a
        L{Deferred} (as C{verify} has always accepted) is served over a
        real socket: the token it knows works, one it refuses is a 401.
        """
        tokens = self.verifier.tokens

        class Plain:
            def verify_access_token(self, token: str) -> Any:
                return tokens.get(token)

        self.mcp.auth.verifier = Plain()
        await self.initialize()
        code, _, _ = await self.request("POST", body={"jsonrpc": "2.0", "id": 1, "method": "ping"}, token="nobody")
        self.assertEqual(code, 401)


class StreamableHTTPTests(HTTPTestBase):
    _ECHO = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "echo", "arguments": {"text": "hi"}}}

    async def test_initialize_and_call(self) -> None:
        session_id = await self.initialize()
        self.assertGreaterEqual(len(session_id), 22)
        code, headers, body = await self.request(
            "POST", body=self._ECHO, headers={"Mcp-Session-Id": session_id, "MCP-Protocol-Version": "2025-06-18"}
        )
        self.assertEqual(code, 200)
        self.assertEqual(headers.getRawHeaders("content-type"), ["application/json"])
        self.assertEqual(json.loads(body)["result"]["content"], [{"type": "text", "text": "hi"}])

    async def test_failed_initialize_names_no_session(self) -> None:
        """
        An C{initialize} refused (here: a protocolVersion that is not a
        string) leaves no session behind, so its answer names none: an
        C{Mcp-Session-Id} there would send the client on to a session
        that answers 404.  A good one after it still gets its id.
        """
        for params in ({"protocolVersion": 7}, {"protocolVersion": "2025-06-18", "capabilities": []}):
            code, headers, body = await self.request(
                "POST", body={"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": params}
            )
            self.assertEqual(json.loads(body)["error"]["code"], -32602, body)
            self.assertIsNone(headers.getRawHeaders("mcp-session-id"), body)
        self.assertEqual(len(self.mcp.sessions), 0)
        session_id = await self.initialize()
        self.assertGreaterEqual(len(session_id), 22)

    async def test_answered_call_freed_without_the_collector(self) -> None:
        """
        A C{tools/call} answered as JSON through the site's direct route
        (as the server answers C{/mcp}) leaves nothing to the garbage
        collector: once it has finished, its request, and what its exchange
        holds (the headers, the credential, the answer), go by reference
        counting.  The exchange's outlet, a separate object holding the
        exchange, made a cycle that kept it all until a collection.
        """
        requests: list[weakref.ref] = []

        class Recording(SmeldrRequest):
            def process(self) -> None:
                requests.append(weakref.ref(self))
                super().process()

        site = SmeldrSite(Klein().resource(), max_body=1000, direct=direct_answers(self.mcp.routes()))
        site.requestFactory = Recording
        site.noisy = False
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
        self.addCleanup(port.stopListening)
        self.base = f"http://127.0.0.1:{port.getHost().port}"
        session_id = await self.initialize()
        del requests[:]
        gc.disable()
        self.addCleanup(gc.enable)
        code, _, body = await self.request(
            "POST", body=self._ECHO, headers={"Mcp-Session-Id": session_id, "MCP-Protocol-Version": "2025-06-18"}
        )
        self.assertEqual((code, json.loads(body)["result"]["content"]), (200, [{"type": "text", "text": "hi"}]))
        [request] = requests
        self.assertIsNone(request())

    async def test_lone_surrogate_answered(self) -> None:
        """
        A call whose answer holds a lone surrogate (the client sent
        C{"\\ud800"}; the tool echoes it) is answered, over a real
        socket, as JSON and as SSE: the encoding error left the request
        without an answer for good.
        """
        session_id = await self.initialize()
        call = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "echo", "arguments": {"text": "a\ud800"}}}
        for accept, decode in (
            ("application/json", json.loads),
            ("text/event-stream", lambda body: json.loads(body.split(b"data: ", 1)[1].split(b"\n", 1)[0])),
        ):
            code, _, body = await self.request("POST", body=call, headers={"Mcp-Session-Id": session_id, "Accept": accept})
            self.assertEqual(code, 200, accept)
            self.assertEqual(decode(body)["result"]["content"], [{"type": "text", "text": "a\ud800"}], accept)

    async def test_answer_that_cannot_be_sent(self) -> None:
        """
        When an answer cannot be encoded (a bug), the request still ends:
        a 500 as JSON, a closed stream as SSE, the error logged; before,
        the exchange's callback failed unseen and the request hung.
        """
        from smeldr_oauth.mcp import jsonrpc

        encode = jsonrpc.encode

        def broken(message: Any) -> bytes:
            if "boom" in json.dumps(message):
                raise RuntimeError("cannot encode")
            return encode(message)

        session_id = await self.initialize()
        self.patch(jsonrpc, "encode", broken)
        call = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "echo", "arguments": {"text": "boom"}}}
        code, _, body = await self.request("POST", body=call, headers={"Mcp-Session-Id": session_id})
        self.assertEqual(code, 500)
        self.assertNotIn(b"boom", body)
        code, _, body = await self.request(
            "POST", body=call, headers={"Mcp-Session-Id": session_id, "Accept": "text/event-stream"}
        )
        self.assertEqual(code, 200)
        self.assertNotIn(b"boom", body)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)

    async def test_sse_only_client_gets_sse(self) -> None:
        """
        A client that accepts only C{text/event-stream} gets its answer as
        an SSE event even when the call is answered at once.
        """
        session_id = await self.initialize()
        sse_only = {"Mcp-Session-Id": session_id, "Accept": "text/event-stream"}
        code, headers, body = await self.request("POST", body=self._ECHO, headers=sse_only)
        self.assertEqual((code, headers.getRawHeaders("content-type")), (200, ["text/event-stream; charset=utf-8"]))
        events = [json.loads(line[6:]) for line in body.decode().splitlines() if line.startswith("data: ")]
        self.assertEqual([(e["id"], e["result"]["content"]) for e in events], [(1, [{"type": "text", "text": "hi"}])])

    async def test_session_bound_to_subject_and_client(self) -> None:
        session_id = await self.initialize()
        ping = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
        for token in ("bob", "alice-other-client"):
            code, _, _ = await self.request("POST", body=ping, token=token, headers={"Mcp-Session-Id": session_id})
            self.assertEqual(code, 404, token)
        code, _, _ = await self.request("POST", body=ping, token="alice-refreshed", headers={"Mcp-Session-Id": session_id})
        self.assertEqual(code, 200)

    async def test_unknown_session(self) -> None:
        code, _, body = await self.request(
            "POST", body={"jsonrpc": "2.0", "id": 1, "method": "ping"}, headers={"Mcp-Session-Id": "nope"}
        )
        self.assertEqual(code, 404)
        self.assertEqual(json.loads(body)["error"]["code"], -32600)

    async def test_missing_session(self) -> None:
        code, _, _ = await self.request("POST", body={"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
        self.assertEqual(code, 400)

    async def test_bad_protocol_version_header(self) -> None:
        session_id = await self.initialize()
        code, _, _ = await self.request(
            "POST",
            body={"jsonrpc": "2.0", "id": 1, "method": "ping"},
            headers={"Mcp-Session-Id": session_id, "MCP-Protocol-Version": "1999-01-01"},
        )
        self.assertEqual(code, 400)

    async def test_origin(self) -> None:
        ping = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
        code, _, _ = await self.request("POST", body=ping, headers={"Origin": "https://evil.example"})
        self.assertEqual(code, 403)
        code, _, _ = await self.request("POST", body=ping, headers={"Origin": "null"})
        self.assertEqual(code, 403)
        session_id = await self.initialize()
        code, headers, _ = await self.request(
            "POST", body=ping, headers={"Origin": "https://claude.ai", "Mcp-Session-Id": session_id}
        )
        self.assertEqual(code, 200)
        self.assertEqual(headers.getRawHeaders("access-control-allow-origin"), ["https://claude.ai"])

    async def test_huge_body_then_still_serving(self) -> None:
        code, _, _ = await self.request("POST", body=b"[" + b"1," * 5000 + b"1]")
        self.assertEqual(code, 413)
        await self.initialize()

    async def test_huge_chunked_body(self) -> None:
        client = await self.raw(
            b"POST /mcp HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer alice\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + b"800\r\n" + b" " * 2048 + b"\r\n0\r\n\r\n"
        )
        await client.wait_for(b"413")

    async def test_malformed_bodies(self) -> None:
        code, _, body = await self.request("POST", body=b"{nope")
        self.assertEqual((code, json.loads(body)["error"]["code"]), (400, -32700))
        code, _, _ = await self.request("POST", body=b"{}", headers={"Content-Type": "text/plain"})
        self.assertEqual(code, 415)
        code, _, body = await self.request("POST", body=b"\xff\xfe")
        self.assertEqual((code, json.loads(body)["error"]["code"]), (400, -32700))
        session_id = await self.initialize()
        code, _, body = await self.request("POST", body=b'{"jsonrpc":"2.0","id":1,"method":7}', headers={"Mcp-Session-Id": session_id})
        self.assertEqual(json.loads(body)["error"]["code"], -32600)
        code, _, body = await self.request(
            "POST",
            body={"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "echo", "arguments": {"text": 1}}},
            headers={"Mcp-Session-Id": session_id},
        )
        self.assertEqual(json.loads(body)["error"]["code"], -32602)

    async def test_batches(self) -> None:
        batch = [{"jsonrpc": "2.0", "id": 1, "method": "ping"}, {"jsonrpc": "2.0", "id": 2, "method": "ping"}]
        session_id = await self.initialize(version="2025-03-26")
        code, _, body = await self.request("POST", body=batch, headers={"Mcp-Session-Id": session_id})
        self.assertEqual(code, 200)
        self.assertEqual([r["id"] for r in json.loads(body)], [1, 2])
        session_id = await self.initialize(version="2025-06-18")
        code, _, _ = await self.request("POST", body=batch, headers={"Mcp-Session-Id": session_id})
        self.assertEqual(code, 400)

    async def test_progress_turns_answer_into_sse(self) -> None:
        session_id = await self.initialize()
        code, headers, body = await self.request(
            "POST",
            body={"jsonrpc": "2.0", "id": 4, "method": "tools/call", "params": {"name": "progress", "_meta": {"progressToken": 1}}},
            headers={"Mcp-Session-Id": session_id, "Accept": ACCEPT},
        )
        self.assertEqual(code, 200)
        self.assertEqual(headers.getRawHeaders("content-type"), ["text/event-stream; charset=utf-8"])
        events = [json.loads(line[6:]) for line in body.decode().splitlines() if line.startswith("data: ")]
        self.assertEqual([e.get("method") for e in events], ["notifications/progress", None])
        self.assertEqual(events[1]["result"]["content"][0]["text"], "done")

    async def test_get_stream_resume_and_delete(self) -> None:
        session_id = await self.initialize()
        get = (
            b"GET /mcp HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\nAuthorization: Bearer alice\r\n"
            b"Mcp-Session-Id: " + session_id.encode() + b"\r\n"
        )
        client = await self.raw(get + b"\r\n")
        await client.wait_for(b": stream open")
        self.app.notify_list_changed("tools")
        await client.wait_for(b"id: 1\nevent: message\ndata: ")
        self.app.notify_list_changed("prompts")
        await client.wait_for(b"id: 2\n")
        # Reconnect asking for everything after event 1.
        again = await self.raw(get + b"Last-Event-ID: 1\r\n\r\n")
        await again.wait_for(b"prompts/list_changed")
        self.assertNotIn(b"tools/list_changed", again.data)
        await client.wait_for(b"\r\n0\r\n\r\n")  # the new stream replaced (ended) the old one
        code, _, _ = await self.request("DELETE", headers={"Mcp-Session-Id": session_id})
        self.assertEqual(code, 204)
        await again.wait_for(b"\r\n0\r\n\r\n")
        code, _, _ = await self.request("DELETE", headers={"Mcp-Session-Id": session_id})
        self.assertEqual(code, 404)

    async def test_get_stream_of_someone_else(self) -> None:
        session_id = await self.initialize()
        code, _, _ = await self.request("GET", token="bob", headers={"Mcp-Session-Id": session_id, "Accept": "text/event-stream"})
        self.assertEqual(code, 404)

    async def test_options_and_405(self) -> None:
        code, headers, _ = await self.request("OPTIONS", token=None)
        self.assertEqual(code, 204)
        self.assertEqual(headers.getRawHeaders("allow"), ["DELETE, GET, OPTIONS, POST"])
        code, headers, body = await self.request("PUT", body={})
        self.assertEqual(code, 405)
        self.assertEqual(headers.getRawHeaders("allow"), ["DELETE, GET, OPTIONS, POST"])
        self.assertEqual(headers.getRawHeaders("content-type"), ["application/json"])
        self.assertEqual(json.loads(body)["error"]["code"], -32600)
        # HEAD is not a GET here: it opens no session and no stream.
        code, headers, _ = await self.request("HEAD")
        self.assertEqual((code, headers.getRawHeaders("allow")), (405, ["DELETE, GET, OPTIONS, POST"]))
        self.assertEqual(self.mcp.session_count, 0)
        code, headers, _ = await self.request("GET", path="/mcp/message")
        self.assertEqual((code, headers.getRawHeaders("allow")), (405, ["OPTIONS, POST"]))

    async def test_revocation_ends_sessions(self) -> None:
        session_id = await self.initialize()
        self.mcp.close_grant("g1")
        code, _, _ = await self.request("POST", body={"jsonrpc": "2.0", "id": 1, "method": "ping"}, headers={"Mcp-Session-Id": session_id})
        self.assertEqual(code, 404)


class StatelessTests(HTTPTestBase):
    META = {"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}}

    def headers(self, method: str, name: Optional[str] = None, version: str = "2026-07-28") -> dict[str, str]:
        headers = {"MCP-Protocol-Version": version, "Mcp-Method": method}
        if name:
            headers["Mcp-Name"] = name
        return headers

    async def test_discover_and_call(self) -> None:
        code, headers, body = await self.request(
            "POST", body={"jsonrpc": "2.0", "id": 1, "method": "server/discover", "params": {"_meta": self.META}},
            headers=self.headers("server/discover"),
        )
        self.assertEqual(code, 200)
        self.assertIsNone(headers.getRawHeaders("mcp-session-id"))
        self.assertEqual(json.loads(body)["result"]["supportedVersions"], ["2026-07-28"])
        code, _, body = await self.request(
            "POST",
            body={"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "echo", "arguments": {"text": "s"}, "_meta": self.META}},
            headers=self.headers("tools/call", "echo"),
        )
        self.assertEqual(json.loads(body)["result"]["content"][0]["text"], "s")

    async def test_errors_and_statuses(self) -> None:
        cases = [
            ({"method": "tools/list", "params": {"_meta": self.META}}, self.headers("tools/call"), 400, -32020),
            ({"method": "tools/call", "params": {"name": "echo", "_meta": self.META}}, self.headers("tools/call", "x"), 400, -32020),
            (
                {"method": "tools/list", "params": {"_meta": dict(self.META, **{"io.modelcontextprotocol/protocolVersion": "2099-01-01"})}},
                self.headers("tools/list", version="2099-01-01"),
                400,
                -32022,
            ),
            ({"method": "ping", "params": {"_meta": self.META}}, self.headers("ping"), 404, -32601),
            ({"method": "tools/list", "params": {}}, self.headers("tools/list"), 400, -32602),
        ]
        for body, headers, status, error in cases:
            code, _, content = await self.request("POST", body=dict(body, jsonrpc="2.0", id=1), headers=headers)
            self.assertEqual((code, json.loads(content)["error"]["code"]), (status, error), body)

    async def test_scope_still_enforced(self) -> None:
        code, headers, _ = await self.request(
            "POST",
            body={"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "write", "arguments": {"text": "s"}, "_meta": self.META}},
            headers=self.headers("tools/call", "write"),
        )
        self.assertEqual(code, 403)
        self.assertIn('scope="write"', headers.getRawHeaders("www-authenticate")[0])


class LegacySSETests(HTTPTestBase):
    keepalive = 10.0
    max_queue = 4

    async def test_endpoint_then_messages(self) -> None:
        client, endpoint = await self.open_legacy()
        self.assertTrue(endpoint.startswith("/mcp/message?session_id="))
        self.assertIn(b"event: endpoint\ndata: /mcp/message", client.data)
        init = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"protocolVersion": "2024-11-05", "capabilities": {}}}
        code, _, body = await self.request("POST", path=endpoint, body=init)
        self.assertEqual((code, body), (202, b"Accepted"))
        await client.wait_for(b'"protocolVersion":"2024-11-05"')
        self.assertIn(b"event: message\ndata: {", client.data)
        # A refreshed token of the same user and client may post.
        code, _, _ = await self.request(
            "POST", path=endpoint, token="alice-refreshed",
            body={"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "echo", "arguments": {"text": "zz"}}},
        )
        self.assertEqual(code, 202)
        await client.wait_for(b'"text":"zz"')

    async def test_answer_that_comes_later(self) -> None:
        """
        A call still running when its POST is answered (202) sends its
        answer to the stream once it ends (most answers are there at once
        and go out before the 202; this one cannot).
        """
        release: Deferred = Deferred()

        @self.app.tool()
        def later() -> Deferred:
            return release

        client, endpoint = await self.open_legacy()
        init = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"protocolVersion": "2024-11-05", "capabilities": {}}}
        code, _, _ = await self.request("POST", path=endpoint, body=init)
        self.assertEqual(code, 202)
        await client.wait_for(b'"protocolVersion":"2024-11-05"')
        call = {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "later", "arguments": {}}}
        code, _, body = await self.request("POST", path=endpoint, body=call)
        self.assertEqual((code, body), (202, b"Accepted"))
        self.assertNotIn(b'"id":7', client.data)
        release.callback("at last")
        data = await client.wait_for(b'"text":"at last"')
        self.assertIn(b'"id":7', data)

    async def test_insufficient_scope_is_a_403_step_up(self) -> None:
        """
        On the legacy transport too, a call the token lacks a scope for is
        refused with HTTP 403 and an insufficient_scope challenge (not a
        JSON-RPC error on the stream), so the client steps up; the stepped-up
        token then works on the same session and stream.
        """
        client, endpoint = await self.open_legacy()
        init = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"protocolVersion": "2024-11-05", "capabilities": {}}}
        await self.request("POST", path=endpoint, body=init)
        await client.wait_for(b'"protocolVersion"')
        write = {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "write", "arguments": {"text": "x"}}}
        from twisted.logger import capturedLogs, formatEvent

        with capturedLogs() as events:
            code, headers, body = await self.request("POST", path=endpoint, body=write)
        self.assertEqual(code, 403, body)
        # A refusal for scope is a security event.
        self.assertTrue(
            any(formatEvent(e).startswith("MCP request refused: alice via ") for e in events),
            [formatEvent(e) for e in events],
        )
        self.assertEqual(
            headers.getRawHeaders("www-authenticate"),
            [
                'Bearer error="insufficient_scope", error_description="The access token lacks a required scope", '
                f'scope="write", resource_metadata="{METADATA}"'
            ],
        )
        self.assertEqual(json.loads(body)["error"], "insufficient_scope")
        self.verifier.tokens["alice-rw"] = access(scopes=("read", "write"))
        code, _, _ = await self.request("POST", path=endpoint, body=write, token="alice-rw")
        self.assertEqual(code, 202)
        await client.wait_for(b"wrote x")
        # The refused call never reached the stream.
        self.assertEqual(client.data.count(b'"id":3'), 1)

    async def test_answer_that_cannot_be_sent(self) -> None:
        """
        When the answer to a legacy POST cannot be encoded (a bug), the
        stream still gets an internal error for the request and the failure
        is logged at once; before, the request waited for good.
        """
        from smeldr_oauth.mcp import jsonrpc

        encode = jsonrpc.encode

        def broken(message: Any) -> bytes:
            if "boom" in json.dumps(message):
                raise RuntimeError("cannot encode")
            return encode(message)

        client, endpoint = await self.open_legacy()
        init = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"protocolVersion": "2024-11-05", "capabilities": {}}}
        await self.request("POST", path=endpoint, body=init)
        await client.wait_for(b'"protocolVersion"')
        self.patch(jsonrpc, "encode", broken)
        call = {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "echo", "arguments": {"text": "boom"}}}
        code, _, _ = await self.request("POST", path=endpoint, body=call)
        self.assertEqual(code, 202)
        await client.wait_for(b'"id":7,"error":{"code":-32603')
        self.assertNotIn(b"boom", client.data)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    async def test_post_needs_owner_token(self) -> None:
        client, endpoint = await self.open_legacy()
        ping = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
        for token in ("bob", "alice-other-client"):
            code, _, _ = await self.request("POST", path=endpoint, body=ping, token=token)
            self.assertEqual(code, 404)
        code, _, _ = await self.request("POST", path=endpoint, body=ping, token=None)
        self.assertEqual(code, 401)
        code, _, _ = await self.request("POST", path="/mcp/message?session_id=x", body=ping)
        self.assertEqual(code, 404)
        code, _, _ = await self.request("POST", path="/mcp/message", body=ping)
        self.assertEqual(code, 400)
        code, _, _ = await self.request("POST", path=endpoint, body=b"{bad")
        self.assertEqual(code, 400)

    async def test_get_without_session_is_legacy_whatever_accept(self) -> None:
        client = await self.raw(b"GET /mcp HTTP/1.1\r\nHost: x\r\nAccept: application/json, text/event-stream\r\nAuthorization: Bearer alice\r\n\r\n")
        await client.wait_for(b"event: endpoint")

    async def test_keepalive(self) -> None:
        client, _ = await self.open_legacy()
        self.assertNotIn(b": keepalive", client.data)
        self.clock.advance(10)
        await client.wait_for(b": keepalive\n\n")
        count = client.data.count(b": keepalive")
        self.clock.advance(10)
        await client.wait_for(b": keepalive\n\n" * 1)
        await deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(client.data.count(b": keepalive"), count + 1)

    async def test_revocation_closes_stream(self) -> None:
        client, endpoint = await self.open_legacy()
        other, _ = await self.open_legacy("bob")
        self.mcp.close_grant("g1")
        await client.wait_for(b"\r\n0\r\n\r\n")  # the response (stream) ended
        self.assertNotIn(b"\r\n0\r\n\r\n", other.data)
        code, _, _ = await self.request("POST", path=endpoint, body={"jsonrpc": "2.0", "id": 1, "method": "ping"})
        self.assertEqual(code, 404)

    async def test_slow_consumer_disconnected(self) -> None:
        client, endpoint = await self.open_legacy()
        await self.request(
            "POST", path=endpoint,
            body={"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"protocolVersion": "2024-11-05", "capabilities": {}}},
        )
        client.transport.pauseProducing()  # stop reading
        [http_session] = [s for s in self.mcp.sessions.live_sessions() if s.kind == "legacy"]
        big = "x" * 65536
        for _ in range(400):
            if client.lost.called:
                break
            for _ in range(8):
                http_session.protocol.notify(None, "notifications/message", {"level": "info", "data": big})
            await deferLater(reactor, 0.001, lambda: None)
        client.transport.resumeProducing()
        await client.lost
        self.assertEqual(self.mcp.session_count, 0)
        # Everyone else is still served.
        await self.initialize()

    async def test_shutdown_ends_streams(self) -> None:
        client, _ = await self.open_legacy()
        await self.mcp.shutdown()
        await client.wait_for(b"\r\n0\r\n\r\n")
        self.assertEqual(self.mcp.session_count, 0)


END = b"\r\n0\r\n\r\n"  # the last chunk: the response (stream) ended


async def settle() -> None:
    """Let the real reactor move bytes written by a Clock-driven action."""
    await deferLater(reactor, 0.05, lambda: None)


PING = {"jsonrpc": "2.0", "id": 1, "method": "ping"}


class SessionCapTests(HTTPTestBase):
    """
    One token (one grant, one user) cannot fill the server-wide session cap
    and lock everybody else out: sessions are capped per grant and per
    subject, the caller's least recently active idle session makes room,
    and sessions nobody used after initialize expire soon.
    """

    options = {"max_sessions": 12, "max_sessions_per_grant": 3, "max_sessions_per_subject": 5}

    async def test_initialize_flood_does_not_lock_out_others(self) -> None:
        """
        Many more initializes from one token than the server-wide cap:
        every one succeeds (the oldest idle sessions of that grant make
        room), the grant never holds more than its cap, and another grant's
        initialize and legacy GET still work.
        """
        first = await self.initialize()
        for _ in range(20):
            await self.initialize()
        self.assertEqual(self.mcp.session_count, 3)
        code, _, _ = await self.request("POST", body=PING, headers={"Mcp-Session-Id": first})
        self.assertEqual(code, 404)  # evicted: the client starts over
        bob = await self.initialize("bob")
        code, _, _ = await self.request("POST", body=PING, token="bob", headers={"Mcp-Session-Id": bob})
        self.assertEqual(code, 200)
        client, _ = await self.open_legacy("bob")
        self.assertIn(b"event: endpoint", client.data)

    async def test_least_recently_active_idle_session_goes_first(self) -> None:
        sessions = []
        for _ in range(3):
            sessions.append(await self.initialize())
            self.clock.advance(1)
        # The oldest one is used again: the second-oldest is now the least recently active.
        code, _, _ = await self.request("POST", body=PING, headers={"Mcp-Session-Id": sessions[0]})
        self.assertEqual(code, 200)
        await self.initialize()
        codes = []
        for session_id in sessions:
            code, _, _ = await self.request("POST", body=PING, headers={"Mcp-Session-Id": session_id})
            codes.append(code)
        self.assertEqual(codes, [200, 404, 200])

    async def test_sessions_with_open_streams_are_not_evicted(self) -> None:
        """
        Only idle sessions make room; when every session of the grant has
        an open stream the answer is 429 (with Retry-After), and other
        grants are unaffected.
        """
        streamable = await self.initialize()
        await self.open_get(streamable)
        for _ in range(2):
            await self.open_legacy()
        code, headers, body = await self.request(
            "POST",
            body={"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"protocolVersion": "2025-06-18"}},
        )
        self.assertEqual(code, 429)
        self.assertEqual(json.loads(body)["error"]["message"], "Too many sessions")
        self.assertEqual(headers.getRawHeaders("retry-after"), ["60"])
        self.assertEqual(headers.getRawHeaders("cache-control"), ["no-store"])
        code, _, _ = await self.request("GET", headers={"Accept": "text/event-stream"})
        self.assertEqual(code, 429)
        # The sessions that were there are intact.
        code, _, _ = await self.request("POST", body=PING, headers={"Mcp-Session-Id": streamable})
        self.assertEqual(code, 200)
        await self.initialize("bob")

    async def test_subject_cap_across_grants(self) -> None:
        """
        A user cannot get around the grant cap by authorizing again: the
        subject's sessions across all its grants are capped too.
        """
        for grant in ("ga", "gb", "gc"):
            self.verifier.tokens[grant] = access(grant=grant)
            for _ in range(3):
                await self.initialize(grant)
        self.assertEqual(self.mcp.session_count, 5)
        await self.initialize("bob")
        self.assertEqual(self.mcp.session_count, 6)

    async def test_server_wide_cap_is_last_resort(self) -> None:
        for n in range(12):
            self.verifier.tokens[f"user{n}"] = access(subject=f"user{n}", grant=f"gu{n}")
            await self.initialize(f"user{n}")
        code, _, _ = await self.request(
            "POST",
            body={"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"protocolVersion": "2025-06-18"}},
        )
        self.assertEqual(code, 503)

    async def test_unused_session_expires_soon(self) -> None:
        """
        A session that saw nothing after initialize (and its
        notifications/initialized) ends after new_session_timeout; one that
        served a request, or opened its GET stream, gets the long timeout.
        """
        unused = await self.initialize()
        used = await self.initialize()
        code, _, _ = await self.request("POST", body=PING, headers={"Mcp-Session-Id": used})
        self.assertEqual(code, 200)
        streamed = await self.initialize()
        client = await self.open_get(streamed)
        client.transport.loseConnection()
        await client.lost
        await settle()
        self.clock.advance(60)
        await settle()  # a session store may answer on a later turn
        self.assertEqual(self.mcp.session_count, 2)
        code, _, _ = await self.request("POST", body=PING, headers={"Mcp-Session-Id": unused})
        self.assertEqual(code, 404)
        for session_id in (used, streamed):
            code, _, _ = await self.request("POST", body=PING, headers={"Mcp-Session-Id": session_id})
            self.assertEqual(code, 200)
        self.clock.advance(3600)
        await settle()
        self.assertEqual(self.mcp.session_count, 0)


class StreamTokenTests(HTTPTestBase):
    """
    Every open stream checks the access token that holds it open: every
    stream_recheck_interval seconds (30), and at the token's expiry.
    Revoking a token is modelled by removing it from the fake verifier, as
    the OAuth server's answer changes after /oauth/revoke or a revocation
    made by another process.
    """

    async def setUp(self) -> None:  # type: ignore[override]
        await super().setUp()
        self.verifier.tokens["t1"] = access(grant="g1")
        self.verifier.tokens["t2"] = access(grant="g1")

    async def test_revoked_access_token_closes_legacy_stream(self) -> None:
        client, endpoint = await self.open_legacy("t1")
        other, _ = await self.open_legacy("alice")
        del self.verifier.tokens["t1"]
        self.clock.advance(29)
        await settle()
        self.assertNotIn(END, client.data)
        self.clock.advance(1)
        await client.wait_for(END)
        code, _, _ = await self.request("POST", path=endpoint, body=PING)
        self.assertEqual(code, 404)  # the legacy session ended with its stream
        await settle()
        self.assertNotIn(END, other.data)
        # Still valid: checked again every 30 seconds, and kept.
        self.clock.advance(60)
        await settle()
        self.assertNotIn(END, other.data)
        self.assertEqual(self.mcp.stream_count, 1)

    async def test_revoked_token_closes_get_stream_not_session(self) -> None:
        session_id = await self.initialize("t1")
        client = await self.open_get(session_id, "t1")
        del self.verifier.tokens["t1"]
        self.clock.advance(30)
        await client.wait_for(END)
        # The session is not bound to a token: the owner's valid token still works.
        code, _, _ = await self.request("POST", body=PING, headers={"Mcp-Session-Id": session_id})
        self.assertEqual(code, 200)

    async def test_expiry_closes_stream_without_asking(self) -> None:
        """
        A stream ends when its token expires even if the verifier would
        still accept it (a stale cache, or a verifier that does not look
        at the clock).
        """
        self.verifier.tokens["short"] = attr.evolve(access(), expires_at=10.0)
        client, _ = await self.open_legacy("short")
        self.verifier.tokens["short"] = access()  # the verifier would say yes
        self.clock.advance(9)
        await settle()
        self.assertNotIn(END, client.data)
        self.clock.advance(1)
        await client.wait_for(END)
        self.assertEqual(self.mcp.stream_count, 0)

    async def test_legacy_stream_follows_refreshed_token(self) -> None:
        """
        A legacy client keeps its SSE session after refreshing (or
        re-authorizing): a POST with the new token makes the stream
        depend on that token instead of the old one.
        """
        self.verifier.tokens["old"] = attr.evolve(access(), expires_at=100.0)
        self.verifier.tokens["new"] = access(grant="g9")
        client, endpoint = await self.open_legacy("old")
        code, _, _ = await self.request("POST", path=endpoint, body=PING, token="new")
        self.assertEqual(code, 202)
        await client.wait_for(b'"result":{}')
        del self.verifier.tokens["old"]
        self.clock.advance(200)
        await settle()
        self.assertNotIn(END, client.data)
        # Now it is the new token that counts, its grant included.
        self.mcp.close_grant("g9")
        await client.wait_for(END)

    async def test_legacy_stream_follows_token_then_revocation(self) -> None:
        client, endpoint = await self.open_legacy("t1")
        code, _, _ = await self.request("POST", path=endpoint, body=PING, token="t2")
        self.assertEqual(code, 202)
        del self.verifier.tokens["t2"]
        self.clock.advance(30)
        await client.wait_for(END)

    async def test_get_stream_follows_token_of_session_posts(self) -> None:
        self.verifier.tokens["old"] = attr.evolve(access(), expires_at=50.0)
        session_id = await self.initialize("old")
        client = await self.open_get(session_id, "old")
        code, _, _ = await self.request("POST", body=PING, token="t1", headers={"Mcp-Session-Id": session_id})
        self.assertEqual(code, 200)
        self.clock.advance(100)
        await settle()
        self.assertNotIn(END, client.data)

    async def test_post_stream_checked_too(self) -> None:
        """A long call's SSE answer is held open by its POST's token."""
        session_id = await self.initialize("t1")
        body = b'{"jsonrpc":"2.0","id":5,"method":"tools/call","params":{"name":"hang"}}'
        client = await self.raw(
            b"POST /mcp HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t1\r\nContent-Type: application/json\r\n"
            b"Accept: application/json, text/event-stream\r\nMcp-Session-Id: " + session_id.encode() + b"\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        await settle()
        self.clock.advance(15)  # past the keepalive interval: the answer becomes a stream
        await client.wait_for(b"text/event-stream")
        self.assertEqual(self.mcp.stream_count, 1)
        del self.verifier.tokens["t1"]
        self.clock.advance(29)
        await settle()
        self.assertNotIn(END, client.data)
        self.clock.advance(1)  # 30 s after the stream opened
        await client.wait_for(END)
        self.assertEqual(self.mcp.stream_count, 0)

    async def test_verifier_down_keeps_stream_until_expiry(self) -> None:
        self.verifier.tokens["short"] = attr.evolve(access(), expires_at=100.0)
        client, _ = await self.open_legacy("short")

        class Broken:
            def verify_access_token(self, token: str) -> Deferred:
                raise RuntimeError("db down")

        self.mcp.auth.verifier = Broken()
        for _ in range(9):
            self.clock.advance(10)
        await settle()
        self.assertNotIn(END, client.data)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 3)
        self.clock.advance(10)
        await client.wait_for(END)

    async def test_token_not_in_logs(self) -> None:
        from twisted.logger import capturedLogs, formatEvent

        secret = "SECRETxTOKENx0123456789"
        self.verifier.tokens[secret] = access()
        with capturedLogs() as events:
            client, endpoint = await self.open_legacy(secret)
            await self.request("POST", path=endpoint, body=PING, token="t1")
            await self.request("POST", path=endpoint, body=PING, token=secret)
            del self.verifier.tokens[secret]
            self.clock.advance(30)
            await client.wait_for(END)
        text = " ".join(formatEvent(e) + repr(e) for e in events)
        self.assertIn("no longer valid", text)
        self.assertNotIn("SECRETxTOKEN", text)


class CacheControlTests(HTTPTestBase):
    """Every MCP answer says no-store: they depend on the token."""

    async def test_every_answer(self) -> None:
        answers = [await self.request("POST", body=PING, token=None), await self.request("OPTIONS", token=None)]
        session_id = await self.initialize()
        answers.append(await self.request("POST", body=PING, headers={"Mcp-Session-Id": session_id}))
        answers.append(
            await self.request(
                "POST", body={"jsonrpc": "2.0", "method": "notifications/x"}, headers={"Mcp-Session-Id": session_id}
            )
        )
        answers.append(await self.request("PUT", body={}))
        answers.append(await self.request("DELETE", headers={"Mcp-Session-Id": session_id}))
        self.assertEqual([code for code, _, _ in answers], [401, 204, 200, 202, 405, 204])
        for code, headers, _ in answers:
            self.assertEqual(headers.getRawHeaders("cache-control"), ["no-store"], code)

    async def test_streams(self) -> None:
        client, _ = await self.open_legacy()
        self.assertIn(b"Cache-Control: no-store, no-transform\r\n", client.data)
        session_id = await self.initialize()
        code, headers, _ = await self.request(
            "POST",
            body={"jsonrpc": "2.0", "id": 4, "method": "tools/call", "params": {"name": "progress", "_meta": {"progressToken": 1}}},
            headers={"Mcp-Session-Id": session_id, "Accept": ACCEPT},
        )
        self.assertEqual(headers.getRawHeaders("content-type"), ["text/event-stream; charset=utf-8"])
        self.assertEqual(headers.getRawHeaders("cache-control"), ["no-store, no-transform"])


class SessionIdQueryTests(SynchronousTestCase):
    """
    The legacy POST's C{session_id}, read from the query by hand, is what
    hyperlink's C{URL.get} read before (as sent, not decoded).
    """

    def test_same_as_hyperlink(self) -> None:
        import hyperlink

        from smeldr_oauth.mcp.http.legacy import _session_ids

        for uri in (
            "/mcp/message?session_id=abc-DEF_1",
            "/mcp/message?session_id=a&session_id=b",
            "/mcp/message?x=1&session_id=s&y=2",
            "/mcp/message?x=1",
            "/mcp/message",
            "/mcp/message?session_id=",
            "/mcp/message?session_id=a%20b",
            "/mcp/message?session_id=a+b",
            "/mcp/message?session_id=a=b",
            "/mcp/message?session_id=s#frag",
        ):
            self.assertEqual(_session_ids(uri.encode("ascii")), hyperlink.URL.from_text(uri).get("session_id"), uri)

    def test_no_usable_value(self) -> None:
        from smeldr_oauth.mcp.http.legacy import _session_ids

        # No "=": hyperlink said [None]; either way not one usable id (400).
        self.assertEqual(_session_ids(b"/mcp/message?session_id"), [""])
        self.assertEqual(_session_ids(b"/mcp/message?session_id=\xff"), [])
