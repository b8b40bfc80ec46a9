"""
Tests for L{smeldr_oauth.mcp.http.registry} and the session seams as the
HTTP transports use them: two MCP endpoints on their own sockets, each
with its own application, sharing one L{ISessionStore}, L{ISessionDelivery}
and L{IEventLog} as two processes share a database.  Every request may
land on either.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from smeldr_oauth.mcp.http.registry import SessionRegistry
from smeldr_oauth.mcp.state import LEGACY, STREAMABLE, SessionLimits
from smeldr_oauth.mcp.state.memory import LocalDelivery, MemoryEventLog, MemorySessionStore
from tests.gateway_real import until
from tests.test_mcp_http import HTTPTestBase, LegacySSETests, SessionCapTests, StreamableHTTPTests, access, build_app


def sse_messages(data: bytes) -> list[dict[str, Any]]:
    """The JSON-RPC messages of the C{data:} lines of an SSE byte stream."""
    found = []
    for line in data.split(b"\n"):
        if line.startswith(b"data: {"):
            found.append(json.loads(line[len(b"data: ") :]))
    return found


class TwoProcessTests(HTTPTestBase):
    """Endpoint A (C{self.mcp}) and endpoint B (C{self.other}) on shared seams."""

    def shared(self) -> dict[str, Any]:
        return {"store": MemorySessionStore(), "delivery": LocalDelivery(), "events": MemoryEventLog(16)}

    async def setUp(self) -> None:  # type: ignore[override]
        self.options = self.shared()
        self.store = self.options["store"]
        await super().setUp()
        self.other_app = build_app()
        self.other, port = await self.serve(self.other_app)
        self.base_a = self.base
        self.port_b = port.getHost().port
        self.base_b = f"http://127.0.0.1:{self.port_b}"

    async def on_b(self, *args: Any, **kw: Any) -> Any:
        self.base = self.base_b
        try:
            return await self.request(*args, **kw)
        finally:
            self.base = self.base_a

    def call(self, name: str, id: int = 1, **arguments: Any) -> dict[str, Any]:
        return {"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": name, "arguments": arguments}}

    async def test_request_lands_on_the_other_process(self) -> None:
        session_id = await self.initialize()
        self.assertEqual(self.other.session_count, 0)
        code, _, body = await self.on_b("POST", body=self.call("echo", text="hi"), headers={"Mcp-Session-Id": session_id})
        self.assertEqual(code, 200, body)
        self.assertEqual(json.loads(body)["result"]["content"][0]["text"], "hi")
        # B took the session up from its record, initialized.
        self.assertEqual(self.other.session_count, 1)
        [live] = self.other.sessions.live_sessions()
        self.assertEqual(live.protocol.protocol_version, "2025-06-18")
        # Someone else's token is refused on B as on A.
        code, _, _ = await self.on_b("POST", body=self.call("echo", text="x"), token="bob", headers={"Mcp-Session-Id": session_id})
        self.assertEqual(code, 404)

    async def test_unknown_session_on_either(self) -> None:
        for ask in (self.request, self.on_b):
            code, _, _ = await ask("POST", body=self.call("echo", text="x"), headers={"Mcp-Session-Id": "nope"})
            self.assertEqual(code, 404)

    async def test_state_written_back_and_taken_up(self) -> None:
        """
        logging/setLevel on B is saved to the record, and the copy of the
        session on A follows it: a warning is no longer sent from A.
        """
        session_id = await self.initialize()
        headers = {"Mcp-Session-Id": session_id, "Accept": "application/json, text/event-stream"}
        # At the default level (info) the warning goes out: the answer is a stream.
        code, response_headers, body = await self.request("POST", body=self.call("chatty"), headers=headers)
        self.assertEqual(response_headers.getRawHeaders("content-type"), ["text/event-stream; charset=utf-8"])
        self.assertEqual([m.get("params", {}).get("data") for m in sse_messages(body)][0], "loud")
        set_level = {"jsonrpc": "2.0", "id": 2, "method": "logging/setLevel", "params": {"level": "error"}}
        code, _, _ = await self.on_b("POST", body=set_level, headers=headers)
        self.assertEqual(code, 200)
        record = await self.store.get(session_id)
        self.assertEqual((record.log_level, record.protocol_version, record.used), ("error", "2025-06-18", True))
        # A's copy follows through the delivery: at once in one process, a
        # NOTIFY later between processes on PostgreSQL.
        await until(
            lambda: [live.protocol.log_level for live in self.mcp.sessions.live_sessions()] == ["error"],
            what="A's copy of the session to take up the new level",
        )
        code, response_headers, body = await self.request("POST", body=self.call("chatty", id=3), headers=headers)
        self.assertEqual(response_headers.getRawHeaders("content-type"), ["application/json"])
        self.assertEqual(json.loads(body)["result"]["content"][0]["text"], "said")

    async def test_legacy_answer_reaches_the_stream_on_the_other_process(self) -> None:
        client, endpoint = await self.open_legacy()
        init = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"protocolVersion": "2024-11-05", "capabilities": {}}}
        code, _, body = await self.on_b("POST", path=endpoint, body=init)
        self.assertEqual((code, body), (202, b"Accepted"))
        await client.wait_for(b'"protocolVersion":"2024-11-05"')
        code, _, _ = await self.on_b("POST", path=endpoint, body=self.call("echo", id=5, text="over there"))
        self.assertEqual(code, 202)
        await client.wait_for(b"over there")
        self.assertEqual([m["id"] for m in sse_messages(client.data)], [0, 5])

    async def test_reply_finds_the_pending_request_on_the_other_process(self) -> None:
        """
        A tool on A asks the client (elicitation) through the session's own
        stream; the client's answer is POSTed to B and reaches the tool.
        """
        session_id = await self.initialize(capabilities={"elicitation": {}})
        stream = await self.open_get(session_id)
        # JSON only: the request cannot ride on the POST's answer.
        pending = ensureDeferred(self.request("POST", body=self.call("ask", id=9), headers={"Mcp-Session-Id": session_id}))
        await stream.wait_for(b"elicitation/create")
        [ask] = [m for m in sse_messages(stream.data) if m.get("method") == "elicitation/create"]
        reply = {"jsonrpc": "2.0", "id": ask["id"], "result": {"action": "accept", "content": {"name": "bob"}}}
        code, _, _ = await self.on_b("POST", body=reply, headers={"Mcp-Session-Id": session_id})
        self.assertEqual(code, 202)
        code, _, body = await pending
        self.assertEqual(code, 200, body)
        self.assertIn('"name": "bob"', json.loads(body)["result"]["content"][0]["text"])

    async def test_delete_on_the_other_process_ends_the_stream(self) -> None:
        session_id = await self.initialize()
        stream = await self.open_get(session_id)
        code, _, _ = await self.on_b("DELETE", headers={"Mcp-Session-Id": session_id})
        self.assertEqual(code, 204)
        await stream.wait_for(b"\r\n0\r\n\r\n")
        self.assertEqual((self.mcp.session_count, self.other.session_count), (0, 0))
        code, _, _ = await self.request("POST", body=self.call("echo", text="x"), headers={"Mcp-Session-Id": session_id})
        self.assertEqual(code, 404)

    async def test_resumption_on_the_other_process(self) -> None:
        """Events sent through A are replayed by B from the shared log."""
        session_id = await self.initialize()
        stream = await self.open_get(session_id)
        self.app.notify_list_changed("tools")
        await stream.wait_for(b"id: 1\n")
        self.app.notify_list_changed("prompts")
        await stream.wait_for(b"id: 2\n")
        again = await self.raw(
            b"GET /mcp HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\nAuthorization: Bearer alice\r\n"
            b"Mcp-Session-Id: " + session_id.encode() + b"\r\nLast-Event-ID: 1\r\n\r\n",
            port=self.port_b,
        )
        await again.wait_for(b"prompts/list_changed")
        self.assertNotIn(b"tools/list_changed", again.data)


class _Later:
    """
    A seam whose Deferreds fire on a later reactor turn, as a database's
    do: every method of C{inner} that returns a L{Deferred} answers later.
    """

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._inner, name)
        if not callable(method):
            return method

        def later(*args: Any, **kw: Any) -> Any:
            result = method(*args, **kw)
            if not isinstance(result, Deferred):
                return result
            answer: Deferred = Deferred()
            result.addBoth(lambda value: reactor.callLater(0, answer.callback, value))  # type: ignore[attr-defined]
            return answer

        return later


class LaterStoreMixin:
    """Run a test class with a session store and event log that answer later."""

    async def setUp(self) -> None:  # type: ignore[override]
        self.options = dict(self.options, store=_Later(MemorySessionStore()), events=_Later(MemoryEventLog(16)))
        await super().setUp()  # type: ignore[misc]


class LaterStoreStreamableTests(LaterStoreMixin, StreamableHTTPTests):
    pass


class LaterStoreLegacyTests(LaterStoreMixin, LegacySSETests):
    pass


class LaterStoreCapTests(LaterStoreMixin, SessionCapTests):
    pass


class LaterStoreTwoProcessTests(TwoProcessTests):
    # The shared seams of TwoProcessTests, answering later.
    def shared(self) -> dict[str, Any]:
        return {"store": _Later(MemorySessionStore()), "delivery": LocalDelivery(), "events": _Later(MemoryEventLog(16))}


class _GatedDelivery(LocalDelivery):
    """Claims that reach the shared store when the test says so."""

    def __init__(self) -> None:
        super().__init__()
        self.gate: Deferred[None] = Deferred()
        self.streams: list[tuple[str, bool]] = []

    def stream_held(self, session_id: str, held: bool) -> None:
        self.streams.append((session_id, held))

    def settled(self, session_id: Any = None) -> "Deferred[None]":
        d: Deferred[None] = Deferred()
        self.gate.addCallback(lambda _: d.callback(None))
        return d


class LegacyClaimTests(SynchronousTestCase):
    def test_endpoint_after_the_stream_claim(self) -> None:
        """
        A new legacy session claims its stream here before anything else,
        and C{then} (which announces the message endpoint) waits for that
        claim to be in the shared store; a Streamable HTTP session does not
        wait.
        """
        delivery = _GatedDelivery()
        sessions = SessionRegistry(
            build_app(),
            Clock(),
            store=MemorySessionStore(),
            delivery=delivery,
            events=MemoryEventLog(16),
            limits=SessionLimits(),
        )
        opened: list[Any] = []
        sessions.create(LEGACY, access(), opened.append)
        [(session_id, held)] = delivery.streams
        self.assertTrue(held)
        self.assertEqual(opened, [])
        delivery.gate.callback(None)
        self.assertEqual([live.session_id for live in opened], [session_id])
        sessions.create(STREAMABLE, access(), opened.append)
        self.assertEqual(len(opened), 2)
