"""
MCP sessions shared by several processes on one PostgreSQL database, over
real sockets: two or three L{MCPHTTP} endpoints in this test process, each
with its own database pool, listening connection and process id (all that
a separate process has of its own), every request of a session sent to a
different one.

The two-process tests of L{tests.test_mcp_http_registry} run unchanged
on the PostgreSQL seams; the tests below add a third process.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred

from smeldr_oauth.db import open_database
from smeldr_oauth.mcp.app import MCPApp
from smeldr_oauth.mcp.http import MCPHTTP
from smeldr_oauth.mcp.state.postgres import PostgresSessionState
from tests import postgres
from tests.test_mcp_http import build_app
from tests import test_mcp_http_registry as registry
from tests.test_mcp_http_registry import sse_messages


class PostgresTwoProcessTests(registry.TwoProcessTests):
    """Endpoints A and B, each a process of its own on one database."""

    def shared(self) -> dict[str, Any]:
        self.url = postgres.database_url(self)
        self.states: list[PostgresSessionState] = []
        # Each endpoint gets its own seams in serve().
        return {"store": None}

    async def serve(self, app: MCPApp) -> tuple[MCPHTTP, Any]:
        database = open_database(self.url, reactor, threads=2)
        self.addCleanup(database.close)
        state = PostgresSessionState(database, self.clock)
        await state.start()
        # Cleanups run last first: the endpoint shuts down, then the
        # process leaves, then its pool closes.
        self.addCleanup(state.stop)
        self.states.append(state)
        self.options = state.seams()
        try:
            return await super().serve(app)
        finally:
            self.options = {}

    @property
    def store(self) -> Any:
        return self.states[0].store

    @store.setter
    def store(self, value: Any) -> None:
        pass

    async def settled(self) -> None:
        """What every process handed to the database so far is there."""
        for state in self.states:
            await state.delivery.settled()
            await state.store.flush()

    async def on_c(self, *args: Any, **kw: Any) -> Any:
        self.base = self.base_c
        try:
            return await self.request(*args, **kw)
        finally:
            self.base = self.base_a

    async def third(self) -> None:
        self.third_app = build_app()
        self.third_mcp, port = await self.serve(self.third_app)
        self.port_c = port.getHost().port
        self.base_c = f"http://127.0.0.1:{self.port_c}"

    async def open_get_on(self, session_id: str, port: int, last_event_id: str = "") -> Any:
        return await self.raw(
            b"GET /mcp HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\nAuthorization: Bearer alice\r\n"
            b"Mcp-Session-Id: " + session_id.encode() + b"\r\n"
            + (b"Last-Event-ID: " + last_event_id.encode() + b"\r\n" if last_event_id else b"")
            + b"\r\n",
            port=port,
        )

    async def test_initialize_a_call_b_stream_c(self) -> None:
        """
        initialize on A, the GET stream on C, a call on B; a notification
        B's copy of the session sends on the session's own channel reaches
        the stream on C.  The record names C as the stream's holder.
        """
        await self.third()
        session_id = await self.initialize()
        stream = await self.open_get_on(session_id, self.port_c)
        await stream.wait_for(b": stream open", timeout=15)
        await self.settled()
        record = await self.store.get(session_id)
        self.assertEqual(record.stream_process, self.states[2].delivery.process_id)
        code, _, body = await self.on_b("POST", body=self.call("echo", text="via b"), headers={"Mcp-Session-Id": session_id})
        self.assertEqual(code, 200, body)
        self.other_app.notify_list_changed("tools")
        await stream.wait_for(b"tools/list_changed", timeout=15)
        [message] = [m for m in sse_messages(stream.data) if m.get("method") == "notifications/tools/list_changed"]
        await self.settled()
        self.assertGreaterEqual(self.states[1].delivery.routed_out, 1)
        self.assertGreaterEqual(self.states[2].delivery.routed_in, 1)
        figures = self.states[2].figures()
        self.assertGreaterEqual(figures["routed_in"], 1)
        self.assertGreater(figures["route_latency_p99"], 0)

    async def test_resume_on_a_third_process(self) -> None:
        """
        Events sent from B to the stream on A are replayed by C from the
        shared log after the stream on A is gone.
        """
        await self.third()
        session_id = await self.initialize()
        on_b = await self.open_get_on(session_id, self.port_b)
        await on_b.wait_for(b": stream open", timeout=15)
        await self.settled()
        self.app.notify_list_changed("tools")
        await on_b.wait_for(b"id: 1\n", timeout=15)
        self.app.notify_list_changed("prompts")
        await on_b.wait_for(b"id: 2\n", timeout=15)
        on_b.transport.loseConnection()
        again = await self.open_get_on(session_id, self.port_c, last_event_id="1")
        await again.wait_for(b"prompts/list_changed", timeout=15)
        self.assertNotIn(b"tools/list_changed", again.data)

    async def test_sampling_across_three_processes(self) -> None:
        """
        The tool runs on A, its request goes to the stream on B, the
        client's answer is POSTed to C and resolves the call on A.
        """
        await self.third()
        session_id = await self.initialize(capabilities={"elicitation": {}})
        stream = await self.open_get_on(session_id, self.port_b)
        await stream.wait_for(b": stream open", timeout=15)
        await self.settled()
        pending = ensureDeferred(self.request("POST", body=self.call("ask", id=9), headers={"Mcp-Session-Id": session_id}))
        await stream.wait_for(b"elicitation/create", timeout=15)
        [ask] = [m for m in sse_messages(stream.data) if m.get("method") == "elicitation/create"]
        reply = {"jsonrpc": "2.0", "id": ask["id"], "result": {"action": "accept", "content": {"name": "carol"}}}
        code, _, _ = await self.on_c("POST", body=reply, headers={"Mcp-Session-Id": session_id})
        self.assertEqual(code, 202)
        code, _, body = await pending
        self.assertEqual(code, 200, body)
        self.assertIn('"name": "carol"', json.loads(body)["result"]["content"][0]["text"])

    async def test_legacy_message_on_c(self) -> None:
        """A legacy stream on A answers messages POSTed to B and to C."""
        await self.third()
        client, endpoint = await self.open_legacy()
        await self.settled()
        init = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"protocolVersion": "2024-11-05", "capabilities": {}}}
        code, _, _ = await self.on_b("POST", path=endpoint, body=init)
        self.assertEqual(code, 202)
        await client.wait_for(b'"protocolVersion":"2024-11-05"', timeout=15)
        code, _, _ = await self.on_c("POST", path=endpoint, body=self.call("echo", id=5, text="from c"))
        self.assertEqual(code, 202)
        await client.wait_for(b"from c", timeout=15)
        self.assertEqual([m["id"] for m in sse_messages(client.data)], [0, 5])

    async def test_legacy_post_elsewhere_at_once(self) -> None:
        """
        A client that POSTs to B the moment it learns the endpoint (nothing
        settled first) gets its answer on the stream held by A: the
        endpoint is announced after the stream's claim is in the database
        (L{tests.test_mcp_http_registry.LegacyClaimTests} shows the order).
        """
        client, endpoint = await self.open_legacy()
        init = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"protocolVersion": "2024-11-05", "capabilities": {}}}
        code, _, _ = await self.on_b("POST", path=endpoint, body=init)
        self.assertEqual(code, 202)
        await client.wait_for(b'"protocolVersion":"2024-11-05"', timeout=15)

    async def test_change_made_where_the_session_is_not(self) -> None:
        """
        The application on C (which holds no copy of the session) changes
        its tool list: the stream on B hears it once; A, which holds a
        copy without the stream, stays quiet.
        """
        await self.third()
        session_id = await self.initialize()
        stream = await self.open_get_on(session_id, self.port_b)
        await stream.wait_for(b": stream open", timeout=15)
        await self.settled()
        self.assertEqual(self.third_mcp.session_count, 0)
        self.third_app.notify_list_changed("tools")
        await stream.wait_for(b"tools/list_changed", timeout=15)
        # Changes from one process arrive in order: once the next one is
        # here, any copy of the first would be too.
        self.third_app.notify_list_changed("prompts")
        await stream.wait_for(b"prompts/list_changed", timeout=15)
        methods = [m.get("method") for m in sse_messages(stream.data)]
        self.assertEqual(methods, ["notifications/tools/list_changed", "notifications/prompts/list_changed"])
        # C counts a change once its write has come back, which may be
        # after the NOTIFY reached B.
        await self.settled()
        self.assertEqual(self.states[2].delivery.changes_out, 2)
