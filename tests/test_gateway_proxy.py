"""
Tests for L{smeldr_oauth.gateway.proxy}: downstream sessions relayed to an
upstream, through the whole stack (client, link, pool) down to an
in-process upstream MCP server, on a L{Clock}.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from smeldr_oauth.gateway import errors
from smeldr_oauth.gateway.interfaces import IDownstream, IMCPSession
from smeldr_oauth.gateway.proxy import Gateway, GatewaySession
from smeldr_oauth.gateway.scopes import SCOPES_META_KEY, ScopeMap, ScopeRule
from smeldr_oauth.mcp import MCPApp, jsonrpc
from smeldr_oauth.mcp.calls import CallbackOutlet, Principal
from smeldr_oauth.mcp.session import ServerSession
from tests.gateway_fakes import LoopbackChannel, RecordingOutlet, build_upstream_app, loop_config

ALICE = Principal("alice", "client-a", frozenset({"mcp", "notes:read"}), "grant-a")
ALICE_WRITER = Principal("alice", "client-a", frozenset({"mcp", "notes:read", "notes:write"}), "grant-a")
BOB = Principal("bob", "client-b", frozenset({"mcp", "notes:read"}), "grant-b")
ALL_CAPABILITIES = {"sampling": {}, "elicitation": {}, "roots": {"listChanged": True}}
MODERN_META = {
    "io.modelcontextprotocol/protocolVersion": "2026-07-28",
    "io.modelcontextprotocol/clientCapabilities": {},
}


class Harness:
    """A gateway in front of loopback upstreams, and helpers to drive it."""

    def __init__(self, **config: Any) -> None:
        self.clock = Clock()
        self.app = build_upstream_app(self.clock)
        self.channels: list[LoopbackChannel] = []
        self.gateway = Gateway(loop_config(**config), clock=self.clock, connector=self.connect)
        self._ids = 0

    def connect(self, owner: Any) -> LoopbackChannel:
        channel = LoopbackChannel(self.app, self.clock, owner)
        self.channels.append(channel)
        return channel

    def session(
        self,
        principal: Principal = ALICE,
        version: str = "2025-11-25",
        capabilities: Optional[dict[str, Any]] = None,
        **kwargs: Any,
    ) -> tuple[GatewaySession, RecordingOutlet]:
        outlet = RecordingOutlet()
        session = self.gateway.session(session_id=f"sid-{len(self.channels)}", default_outlet=outlet, **kwargs)
        params = {"protocolVersion": version, "capabilities": ALL_CAPABILITIES if capabilities is None else capabilities, "clientInfo": {"name": "t"}}
        answer = self.answer(session, principal, "initialize", params)
        assert "result" in answer, answer
        session.handle(jsonrpc.parse_message({"jsonrpc": "2.0", "method": "notifications/initialized"}), principal)
        return session, outlet

    def request(self, session: GatewaySession, principal: Principal, method: str, params: dict[str, Any], outlet: Any = None, msg_id: Any = None) -> Any:
        self._ids += 1
        message = jsonrpc.parse_message({"jsonrpc": "2.0", "id": msg_id if msg_id is not None else self._ids, "method": method, "params": params})
        return session.handle(message, principal, outlet)

    def answer(self, *args: Any, **kwargs: Any) -> Any:
        results: list[Any] = []
        self.request(*args, **kwargs).addBoth(results.append)
        assert results, "no answer yet"
        return results[0]

    def notify(self, session: GatewaySession, principal: Principal, method: str, params: dict[str, Any]) -> None:
        session.handle(jsonrpc.parse_message({"jsonrpc": "2.0", "method": method, "params": params}), principal)

    def respond(self, session: GatewaySession, principal: Principal, request_id: Any, result: Any) -> None:
        session.handle(jsonrpc.parse_message({"jsonrpc": "2.0", "id": request_id, "result": result}), principal)

    def call_tool(self, session: GatewaySession, principal: Principal, name: str, arguments: Optional[dict] = None, **kwargs: Any) -> Any:
        return self.request(session, principal, "tools/call", {"name": name, "arguments": arguments or {}}, **kwargs)


def text(answer: dict[str, Any]) -> str:
    return answer["result"]["content"][0]["text"]


class InterfaceTests(SynchronousTestCase):
    def test_same_surface_as_native_sessions(self) -> None:
        """The MCP front can drive a gateway session where it drives a native one."""
        h = Harness()
        verifyObject(IMCPSession, h.gateway.session())
        verifyObject(IDownstream, h.gateway.session())
        verifyObject(IMCPSession, ServerSession(MCPApp(), Clock()), tentative=True)


class HandshakeTests(SynchronousTestCase):
    def test_versions_negotiated_independently(self) -> None:
        h = Harness()
        session, _ = h.session(version="2024-11-05")
        self.assertEqual(session.protocol_version, "2024-11-05")
        self.assertEqual(h.channels[0].session.protocol_version, "2025-11-25")
        self.assertFalse(session.allows_batch)

    def test_initialize_answer(self) -> None:
        h = Harness()
        session = h.gateway.session()
        answer = h.answer(session, ALICE, "initialize", {"protocolVersion": "2099-01-01", "capabilities": {}, "clientInfo": {}})
        result = answer["result"]
        self.assertEqual(result["protocolVersion"], "2025-11-25")
        self.assertEqual(result["serverInfo"], {"name": "loop-upstream", "version": "7.0"})
        self.assertEqual(result["instructions"], "upstream instructions")
        self.assertEqual(set(result["capabilities"]), {"logging", "tools", "resources", "prompts", "completions"})
        self.assertTrue(session.initialized)

    def test_requests_before_initialize(self) -> None:
        h = Harness()
        session = h.gateway.session()
        self.assertEqual(h.answer(session, ALICE, "ping", {}), {"jsonrpc": "2.0", "id": 1, "result": {}})
        self.assertEqual(h.answer(session, ALICE, "tools/list", {})["error"]["code"], jsonrpc.INVALID_REQUEST)
        self.assertEqual(h.channels, [])
        bad = h.answer(session, ALICE, "initialize", {"protocolVersion": 5})
        self.assertEqual(bad["error"]["code"], jsonrpc.INVALID_PARAMS)

    def test_initialize_twice(self) -> None:
        h = Harness()
        session, _ = h.session()
        again = h.answer(session, ALICE, "initialize", {"protocolVersion": "2025-11-25"})
        self.assertEqual(again["error"]["message"], "Already initialized")

    def test_upstream_that_cannot_start(self) -> None:
        h = Harness()
        h.connect = lambda owner: _failing(h, owner)  # type: ignore[method-assign]
        h.gateway.pool.connector = h.connect
        session = h.gateway.session()
        answer = h.answer(session, ALICE, "initialize", {"protocolVersion": "2025-11-25"})
        self.assertEqual(answer["error"]["code"], errors.UPSTREAM_UNAVAILABLE)
        self.assertEqual(answer["error"]["data"], {"upstream": "loop", "reason": "start_failed"})
        self.assertFalse(session.initialized)

    def test_invalid_and_duplicate(self) -> None:
        h = Harness()
        session, _ = h.session()
        invalid = session.handle(jsonrpc.parse_message({"jsonrpc": "1.0", "id": 4}), ALICE)
        self.assertEqual(self.successResultOf(invalid)["error"]["code"], jsonrpc.INVALID_REQUEST)
        h.call_tool(session, ALICE, "never", msg_id="same")
        second = h.call_tool(session, ALICE, "never", msg_id="same")
        self.assertEqual(self.successResultOf(second)["error"]["message"], "Request id already in use")
        self.assertEqual(h.answer(session, ALICE, "tasks/list", {})["error"]["code"], jsonrpc.METHOD_NOT_FOUND)


def _failing(h: Harness, owner: Any) -> LoopbackChannel:
    channel = LoopbackChannel(h.app, h.clock, owner)
    channel.fail_start = True
    h.channels.append(channel)
    return channel


class ForwardingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness()
        self.session, self.outlet = self.h.session()

    def test_everything_passes_through(self) -> None:
        h, s = self.h, self.session
        self.assertEqual(text(h.answer(s, ALICE, "tools/call", {"name": "echo", "arguments": {"text": "hi"}})), "hi")
        self.assertIn("echo", [t["name"] for t in h.answer(s, ALICE, "tools/list", {})["result"]["tools"]])
        self.assertEqual(h.answer(s, ALICE, "resources/read", {"uri": "memo://one"})["result"]["contents"][0]["text"], "the first memo")
        self.assertEqual([r["uri"] for r in h.answer(s, ALICE, "resources/list", {})["result"]["resources"]], ["memo://one"])
        templates = h.answer(s, ALICE, "resources/templates/list", {})["result"]["resourceTemplates"]
        self.assertEqual([t["uriTemplate"] for t in templates], ["memo://secret/{name}"])
        self.assertEqual(h.answer(s, ALICE, "prompts/get", {"name": "greet", "arguments": {"name": "A"}})["result"]["messages"][0]["content"]["text"], "Hello A")
        self.assertEqual(sorted(p["name"] for p in h.answer(s, ALICE, "prompts/list", {})["result"]["prompts"]), ["embedded", "greet"])
        completion = h.answer(s, ALICE, "completion/complete", {"ref": {"type": "ref/prompt", "name": "greet"}, "argument": {"name": "name", "value": "a"}})
        self.assertEqual(completion["result"]["completion"]["values"], ["alice"])
        self.assertEqual(h.answer(s, ALICE, "ping", {})["result"], {})
        # The upstream saw each forwarded method once, under its own ids.
        sent = [m for m, _ in h.channels[0].sent if "id" in m and "method" in m]
        self.assertEqual([m["id"] for m in sent], list(range(1, len(sent) + 1)))

    def test_upstream_errors_pass_through(self) -> None:
        answer = self.h.answer(self.session, ALICE, "resources/read", {"uri": "memo://nothing"})
        self.assertEqual(answer["error"]["code"], jsonrpc.RESOURCE_NOT_FOUND)

    def test_progress_reaches_the_request_stream(self) -> None:
        post = RecordingOutlet()
        d = self.h.request(self.session, ALICE, "tools/call", {"name": "slow", "arguments": {"steps": 2}, "_meta": {"progressToken": "mine"}}, outlet=post)
        self.h.clock.advance(1)
        self.h.clock.advance(1)
        self.assertEqual(text(self.successResultOf(d)), "done after 2")
        self.assertEqual([m["params"]["progressToken"] for m in post.messages], ["mine", "mine"])
        self.assertEqual([m["params"]["progress"] for m in post.messages], [1, 2])
        upstream_call = [m for m, _ in self.h.channels[0].sent if m.get("method") == "tools/call"][-1]
        self.assertNotEqual(upstream_call["params"]["_meta"]["progressToken"], "mine")

    def test_cancellation_reaches_upstream(self) -> None:
        d = self.h.call_tool(self.session, ALICE, "never", msg_id="c1")
        self.assertTrue(self.session.busy)
        self.h.notify(self.session, ALICE, "notifications/cancelled", {"requestId": "c1"})
        self.assertIsNone(self.successResultOf(d))  # no answer to a cancelled request
        sent = self.h.channels[0].sent[-1][0]
        self.assertEqual(sent["method"], "notifications/cancelled")
        upstream_id = [m for m, _ in self.h.channels[0].sent if m.get("method") == "tools/call"][-1]["id"]
        self.assertEqual(sent["params"]["requestId"], upstream_id)
        self.assertFalse(self.session.busy)

    def test_timeout(self) -> None:
        d = self.h.call_tool(self.session, ALICE, "never")
        self.h.clock.advance(300)
        answer = self.successResultOf(d)
        self.assertEqual(answer["error"]["code"], jsonrpc.REQUEST_TIMEOUT)
        self.assertEqual(self.h.channels[0].sent[-1][0]["params"]["reason"], "Request timed out")
        self.assertEqual(self.h.gateway.metrics.timeouts, 1)
        self.assertEqual(self.h.gateway.metrics.errors, 1)

    def test_sampling_round_trip(self) -> None:
        post = RecordingOutlet()
        d = self.h.call_tool(self.session, ALICE, "ask", {"question": "6x7?"}, outlet=post)
        (request,) = post.requests()
        self.assertEqual(request["method"], "sampling/createMessage")
        self.assertTrue(request["id"].startswith("gw-"))
        self.h.respond(self.session, ALICE, request["id"], {"role": "assistant", "content": {"type": "text", "text": "42"}, "model": "m"})
        self.assertEqual(text(self.successResultOf(d)), "model said: 42")

    def test_cancellation_both_ways(self) -> None:
        """
        The client cancels a call while the upstream waits on a sampling
        request: the upstream is told, abandons its own request, and the
        client is told that request is off.
        """
        post = RecordingOutlet()
        d = self.h.call_tool(self.session, ALICE, "ask", {"question": "?"}, outlet=post, msg_id="call-1")
        (sampling,) = post.requests()
        self.h.notify(self.session, ALICE, "notifications/cancelled", {"requestId": "call-1"})
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(post.messages[-1], jsonrpc.notification("notifications/cancelled", {"requestId": sampling["id"]}))
        # A late answer from the client goes nowhere.
        self.h.respond(self.session, ALICE, sampling["id"], {"role": "assistant", "content": {"type": "text", "text": "late"}, "model": "m"})
        self.assertNotIn("late", str(self.h.channels[0].sent))

    def test_elicitation_and_roots(self) -> None:
        d = self.h.call_tool(self.session, ALICE, "form")
        request = self.outlet.requests()[-1]
        self.assertEqual(request["method"], "elicitation/create")
        self.h.respond(self.session, ALICE, request["id"], {"action": "accept", "content": {"name": "Ada"}})
        self.assertEqual(self.successResultOf(d)["result"]["structuredContent"], {"action": "accept", "content": {"name": "Ada"}})
        d = self.h.call_tool(self.session, ALICE, "roots")
        request = self.outlet.requests()[-1]
        self.h.respond(self.session, ALICE, request["id"], {"roots": [{"uri": "file:///w"}]})
        self.assertIn("file:///w", text(self.successResultOf(d)))
        self.h.notify(self.session, ALICE, "notifications/roots/list_changed", {})
        self.assertEqual(self.h.channels[0].sent[-1][0]["method"], "notifications/roots/list_changed")

    def test_client_without_the_capability(self) -> None:
        session, outlet = self.h.session(BOB, capabilities={})
        answer = self.successResultOf(self.h.call_tool(session, BOB, "ask", {"question": "?"}))
        self.assertTrue(answer["result"]["isError"])
        self.assertIn("'sampling' capability was not declared", text(answer))
        self.assertEqual(outlet.requests(), [])

    def test_client_does_not_answer(self) -> None:
        d = self.h.call_tool(self.session, ALICE, "ask", {"question": "?"})
        self.h.clock.advance(300)
        answer = self.successResultOf(d)
        # The gateway's wait for the client ends first: the upstream tool sees the error.
        self.assertIn("did not answer in time", str(answer))
        self.assertEqual(self.outlet.messages[-1]["method"], "notifications/cancelled")

    def test_logging(self) -> None:
        post = RecordingOutlet()
        self.assertEqual(self.h.answer(self.session, ALICE, "logging/setLevel", {"level": "info"})["result"], {})
        self.assertEqual(self.h.channels[0].session.log_level, "info")
        self.successResultOf(self.h.call_tool(self.session, ALICE, "chatty", {"n": 2}, outlet=post))
        # stdio-like upstream: log lines are not attributed; they go to the session's own channel.
        logged = [m["params"]["data"] for m in self.outlet.messages if m.get("method") == "notifications/message"]
        self.assertEqual(logged, ["line 0", "line 1"])
        bad = self.h.answer(self.session, ALICE, "logging/setLevel", {"level": "loud"})
        self.assertEqual(bad["error"]["code"], jsonrpc.INVALID_PARAMS)

    def test_log_levels_merge_per_instance(self) -> None:
        other, other_outlet = self.h.session(ALICE)
        self.h.answer(self.session, ALICE, "logging/setLevel", {"level": "error"})
        self.h.answer(other, ALICE, "logging/setLevel", {"level": "debug"})
        self.assertEqual(self.h.channels[0].session.log_level, "debug")
        self.successResultOf(self.h.call_tool(other, ALICE, "chatty", {"n": 1}))
        self.assertEqual([m.get("method") for m in self.outlet.messages if m.get("method") == "notifications/message"], [])
        self.assertEqual(len([m for m in other_outlet.messages if m.get("method") == "notifications/message"]), 2)
        other.close()
        self.assertEqual(self.h.channels[0].session.log_level, "error")

    def test_list_changed_and_subscriptions(self) -> None:
        other, other_outlet = self.h.session(ALICE)
        self.h.app.notify_list_changed("tools")
        self.assertIn("notifications/tools/list_changed", self.outlet.methods())
        self.assertIn("notifications/tools/list_changed", other_outlet.methods())
        self.assertEqual(self.h.answer(self.session, ALICE, "resources/subscribe", {"uri": "memo://one"})["result"], {})
        self.assertEqual(self.h.answer(other, ALICE, "resources/subscribe", {"uri": "memo://one"})["result"], {})
        subscribes = [m for m, _ in self.h.channels[0].sent if m.get("method") == "resources/subscribe"]
        self.assertEqual(len(subscribes), 1)  # one upstream subscription for both
        self.h.app.notify_resource_updated("memo://one")
        self.assertIn("notifications/resources/updated", self.outlet.methods())
        self.assertIn("notifications/resources/updated", other_outlet.methods())
        self.h.answer(self.session, ALICE, "resources/unsubscribe", {"uri": "memo://one"})
        self.assertNotIn("resources/unsubscribe", self.h.channels[0].sent_methods())
        other.close()
        self.assertIn("resources/unsubscribe", self.h.channels[0].sent_methods())
        before = len(self.outlet.messages)
        self.h.app.notify_resource_updated("memo://one")
        self.assertEqual(len(self.outlet.messages), before)

    def test_subscribe_errors(self) -> None:
        bad = self.h.answer(self.session, ALICE, "resources/subscribe", {"uri": "memo://missing"})
        self.assertEqual(bad["error"]["code"], jsonrpc.RESOURCE_NOT_FOUND)
        self.assertEqual(self.session.subscriptions, set())
        self.assertEqual(self.h.answer(self.session, ALICE, "resources/subscribe", {"uri": 3})["error"]["code"], jsonrpc.INVALID_PARAMS)

    def test_older_clients_get_older_content(self) -> None:
        session, _ = self.h.session(version="2025-03-26")
        answer = self.successResultOf(self.h.call_tool(session, ALICE, "link"))
        self.assertEqual(answer["result"]["content"], [{"type": "text", "text": "one: memo://one"}])
        current = self.successResultOf(self.h.call_tool(self.session, ALICE, "link"))
        self.assertEqual(current["result"]["content"][0]["type"], "resource_link")

    def test_close_cancels_and_detaches(self) -> None:
        d = self.h.call_tool(self.session, ALICE, "never")
        ask = self.h.call_tool(self.session, ALICE, "ask", {"question": "?"})
        self.session.close()
        self.assertIsNone(self.successResultOf(d))
        self.assertIsNone(self.successResultOf(ask))
        self.assertIn("notifications/cancelled", self.h.channels[0].sent_methods())
        answer = self.h.answer(self.session, ALICE, "ping", {})
        self.assertEqual(answer["error"]["message"], "Session ended")
        self.session.close()

    def test_another_subject_is_refused(self) -> None:
        answer = self.h.answer(self.session, BOB, "tools/call", {"name": "echo", "arguments": {"text": "x"}})
        self.assertEqual(answer["error"]["message"], "Session belongs to another subject")
        self.assertNotIn("tools/call", self.h.channels[0].sent_methods())

    def test_a_bug_is_an_internal_error(self) -> None:
        self.session._forward = None  # type: ignore[assignment]
        answer = self.h.answer(self.session, ALICE, "tools/list", {})
        self.assertEqual(answer["error"]["code"], jsonrpc.INTERNAL_ERROR)
        self.flushLoggedErrors(TypeError)


class ScopeTests(SynchronousTestCase):
    SCOPES = ScopeMap(
        required=("mcp",),
        tools=(ScopeRule("read_*", ("notes:read",)), ScopeRule("*", ("notes:write",))),
        resources=(ScopeRule("memo://secret/*", ("secrets",)),),
        list_policy="hide",
    )

    def test_step_up(self) -> None:
        h = Harness(scopes=self.SCOPES)
        session, _ = h.session()
        write = jsonrpc.parse_message({"jsonrpc": "2.0", "id": 9, "method": "tools/call", "params": {"name": "write_note", "arguments": {"name": "n"}}})
        self.assertEqual(session.missing_scopes(write, ALICE), ("mcp", "notes:write"))
        self.assertIsNone(session.missing_scopes(write, ALICE_WRITER))
        with capturedLogs() as events:
            refused = self.successResultOf(session.handle(write, ALICE))
        self.assertIn(
            "Gateway call refused: alice via client-a lacks scopes mcp notes:write",
            [formatEvent(e) for e in events],
        )
        self.assertEqual(refused["error"], {"code": jsonrpc.INSUFFICIENT_SCOPE, "message": "Insufficient scope", "data": {"error": "insufficient_scope", "scope": "mcp notes:write"}})
        self.assertNotIn("write_note", str(h.channels[0].sent))
        self.assertEqual(text(self.successResultOf(session.handle(write, ALICE_WRITER))), "wrote n")
        read = h.answer(session, ALICE, "resources/read", {"uri": "memo://secret/x"})
        self.assertEqual(read["error"]["data"]["scope"], "mcp secrets")

    def test_lists_follow_the_policy(self) -> None:
        h = Harness(scopes=self.SCOPES)
        session, _ = h.session()
        tools = h.answer(session, ALICE, "tools/list", {})["result"]["tools"]
        self.assertEqual([t["name"] for t in tools], ["read_note"])
        self.assertEqual(tools[0]["_meta"][SCOPES_META_KEY], ["mcp", "notes:read"])
        shown = Harness(scopes=ScopeMap(tools=self.SCOPES.tools))
        session, _ = shown.session()
        names = [t["name"] for t in shown.answer(session, ALICE, "tools/list", {})["result"]["tools"]]
        self.assertIn("write_note", names)

    def test_required_scope_for_everything(self) -> None:
        h = Harness(scopes=self.SCOPES)
        session = h.gateway.session()
        outsider = Principal("eve", None, frozenset(), None)
        init = h.answer(session, outsider, "initialize", {"protocolVersion": "2025-11-25"})
        self.assertEqual(init["error"]["data"]["scope"], "mcp")
        self.assertEqual(h.gateway.all_scopes(), {"mcp", "notes:read", "notes:write", "secrets"})


class ModernTests(SynchronousTestCase):
    def test_stateless_request(self) -> None:
        h = Harness()
        session = h.gateway.session(modern_only=True)
        params = {"name": "echo", "arguments": {"text": "now"}, "_meta": {**MODERN_META, "progressToken": "p"}}
        message = jsonrpc.parse_message({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": params})
        session.prepare(message, ALICE)  # type: ignore[arg-type]
        answer = self.successResultOf(session.handle(message, ALICE, None))
        self.assertEqual(answer["result"]["content"][0]["text"], "now")
        self.assertEqual(answer["result"]["resultType"], "complete")
        self.assertEqual(answer["result"]["_meta"]["io.modelcontextprotocol/serverInfo"]["name"], "loop-upstream")
        upstream = [m for m, _ in h.channels[0].sent if m.get("method") == "tools/call"][-1]
        self.assertEqual(set(upstream["params"]["_meta"]), {"progressToken"})
        listed = self.successResultOf(h.gateway.session(modern_only=True).handle(jsonrpc.parse_message({"jsonrpc": "2.0", "id": 2, "method": "tools/list", "params": {"_meta": MODERN_META}}), ALICE, None))
        self.assertEqual((listed["result"]["ttlMs"], listed["result"]["cacheScope"]), (0, "private"))
        # Stateless requests of one subject share its instance.
        self.assertEqual(len(h.channels), 1)

    def test_discover_and_ladder(self) -> None:
        h = Harness()
        session = h.gateway.session(modern_only=True)
        found = h.answer(session, ALICE, "server/discover", {"_meta": MODERN_META})["result"]
        self.assertEqual(found["supportedVersions"], ["2026-07-28"])
        self.assertEqual(set(found["capabilities"]), {"tools", "resources", "prompts", "completions"})
        self.assertEqual(found["capabilities"]["tools"], {})
        self.assertEqual(h.answer(session, ALICE, "tools/list", {})["error"]["code"], jsonrpc.INVALID_PARAMS)
        wrong = {**MODERN_META, "io.modelcontextprotocol/protocolVersion": "2030-01-01"}
        self.assertEqual(h.answer(session, ALICE, "tools/list", {"_meta": wrong})["error"]["code"], jsonrpc.UNSUPPORTED_PROTOCOL_VERSION)
        self.assertEqual(h.answer(session, ALICE, "ping", {"_meta": MODERN_META})["error"]["code"], jsonrpc.METHOD_NOT_FOUND)
        loud = {**MODERN_META, "io.modelcontextprotocol/logLevel": "loud"}
        self.assertEqual(h.answer(session, ALICE, "tools/list", {"_meta": loud})["error"]["code"], jsonrpc.INVALID_PARAMS)

    def test_no_server_requests_without_a_session(self) -> None:
        h = Harness()
        session = h.gateway.session(modern_only=True)
        answer = h.answer(session, ALICE, "tools/call", {"name": "ask", "arguments": {"question": "?"}, "_meta": MODERN_META})
        self.assertTrue(answer["result"]["isError"])


class MetricsTests(SynchronousTestCase):
    def test_counters_and_describe(self) -> None:
        h = Harness()
        session, _ = h.session()
        self.successResultOf(h.call_tool(session, ALICE, "echo", {"text": "x"}))
        h.answer(session, ALICE, "resources/read", {"uri": "memo://nothing"})
        state = h.gateway.describe()
        self.assertEqual(state["live"], 1)
        self.assertEqual(state["target"], "stdio:loop")
        metrics = state["metrics"]
        self.assertEqual((metrics["calls"], metrics["errors"], metrics["started"], metrics["live"]), (2, 1, 1, 1))
        self.assertEqual(metrics["by_method"], {"tools/call": 1, "resources/read": 1})
        self.assertEqual(metrics["latency"]["count"], 2)
        self.assertNotIn("alice", str(state))

    def test_call_events(self) -> None:
        from twisted.logger import LogLevel, capturedLogs

        h = Harness()
        session, _ = h.session()
        with capturedLogs() as events:
            self.successResultOf(h.call_tool(session, ALICE, "echo", {"text": "x"}))
        (event,) = [e for e in events if e.get("smeldr_event") == "gateway_call"]
        self.assertEqual((event["tool"], event["outcome"], event["subject"]), ("echo", "ok", "alice"))
        # A call that went well is routine (debug, as native tools); any
        # other outcome is worth a line at info.
        self.assertEqual(event["log_level"], LogLevel.debug)
        with capturedLogs() as events:
            self.successResultOf(h.call_tool(session, ALICE, "no-such-tool", {}))
        (event,) = [e for e in events if e.get("smeldr_event") == "gateway_call"]
        self.assertNotEqual(event["outcome"], "ok")
        self.assertEqual(event["log_level"], LogLevel.info)


    def test_call_event_routine(self) -> None:
        """
        A call that went well is a routine event: when every other observer
        drops debug events (the log file at info), it goes to the direct
        observers (the metrics, the timeline) without L{Logger.emit}.
        """
        from twisted.logger import FilteringLogObserver, Logger, LogLevel, LogLevelFilterPredicate, LogPublisher

        from smeldr_oauth.gateway import proxy
        from smeldr_oauth.oauth.routine import RoutineEvents

        publisher = LogPublisher()
        direct: list[dict] = []
        events = RoutineEvents(publisher)
        events.observe(direct.append)
        publisher.addObserver(FilteringLogObserver(lambda e: None, [LogLevelFilterPredicate(LogLevel.info)]))
        emitted: list[Any] = []

        class Counting(Logger):
            def emit(self, level: LogLevel, format: Optional[str] = None, **kwargs: Any) -> None:
                emitted.append(kwargs.get("smeldr_event"))
                super().emit(level, format, **kwargs)

        self.patch(proxy, "routine", events)
        self.patch(proxy, "log", Counting(namespace=proxy.log.namespace, observer=publisher))
        h = Harness()
        session, _ = h.session()
        self.successResultOf(h.call_tool(session, ALICE, "echo", {"text": "x"}))
        (event,) = [e for e in direct if e.get("smeldr_event") == "gateway_call"]
        self.assertEqual((event["tool"], event["outcome"], event["log_level"]), ("echo", "ok", LogLevel.debug))
        self.assertNotIn("gateway_call", emitted)
        # Any other outcome goes through the log, at info.
        self.successResultOf(h.call_tool(session, ALICE, "no-such-tool", {}))
        self.assertIn("gateway_call", emitted)


class OutletTests(SynchronousTestCase):
    def test_related_messages_prefer_the_request_stream(self) -> None:
        h = Harness()
        collected: list[dict] = []
        session = h.gateway.session(default_outlet=CallbackOutlet(collected.append))
        h.answer(session, ALICE, "initialize", {"protocolVersion": "2025-11-25", "capabilities": ALL_CAPABILITIES})
        plain = RecordingOutlet(can_request=False)
        d = h.call_tool(session, ALICE, "ask", {"question": "?"}, outlet=plain)
        # A JSON-only POST cannot carry a request: the session's own stream does.
        self.assertEqual(plain.messages, [])
        self.assertEqual(collected[-1]["method"], "sampling/createMessage")
        h.respond(session, ALICE, collected[-1]["id"], {"role": "assistant", "content": {"type": "text", "text": "ok"}, "model": "m"})
        self.assertEqual(text(self.successResultOf(d)), "model said: ok")
