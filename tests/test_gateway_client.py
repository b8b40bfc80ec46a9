"""
Tests for L{smeldr_oauth.gateway.client}: the MCP client side of one
upstream connection, driven through a scripted channel and a L{Clock}.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from smeldr_oauth.gateway import errors
from smeldr_oauth.gateway.client import CLIENT_CAPABILITIES, ServerInfo, UpstreamClient
from smeldr_oauth.gateway.config import Limits
from smeldr_oauth.gateway.interfaces import IChannelReceiver, IUpstreamChannel, IUpstreamHandler
from smeldr_oauth.mcp import jsonrpc
from smeldr_oauth.mcp.jsonrpc import JSONRPCError, Notification, Request


@implementer(IUpstreamChannel)
class ScriptedChannel:
    """A channel the test plays the upstream on."""

    pid = 4242

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.identities: list[Any] = []
        self.receiver: Optional[IChannelReceiver] = None
        self.version: Optional[str] = None
        self.closed = False
        self.exchanges: list[Deferred] = []
        self.cancelled: list[Any] = []
        self.hold = False

    def start(self, receiver: IChannelReceiver) -> Deferred:
        self.receiver = receiver
        return succeed(None)

    def send(self, message: dict[str, Any], identity: Any = None) -> Deferred:
        self.sent.append(message)
        self.identities.append(identity)
        if self.hold:
            d: Deferred = Deferred(lambda d: self.cancelled.append(message.get("id")))
            self.exchanges.append(d)
            return d
        return succeed(None)

    def negotiated(self, version: str) -> None:
        self.version = version

    def close(self) -> Deferred:
        self.closed = True
        return succeed(None)

    def push(self, message: dict[str, Any], related: Any = None) -> None:
        assert self.receiver is not None
        self.receiver.messageReceived(jsonrpc.parse_message(message), related)

    def last(self) -> dict[str, Any]:
        return self.sent[-1]


@implementer(IUpstreamHandler)
class Handler:
    def __init__(self) -> None:
        self.notifications: list[tuple[Notification, Any]] = []
        self.requests: list[tuple[Request, Any, Deferred]] = []
        self.lost: list[tuple[str, str]] = []
        self.cancelled: list[Any] = []

    def upstreamNotification(self, notification: Notification, context: Any) -> None:
        self.notifications.append((notification, context))

    def upstreamRequest(self, request: Request, context: Any) -> Deferred:
        d: Deferred = Deferred(lambda _: self.cancelled.append(request.id))
        self.requests.append((request, context, d))
        return d

    def upstreamLost(self, reason: str, detail: str) -> None:
        self.lost.append((reason, detail))


INIT_RESULT = {
    "protocolVersion": "2025-06-18",
    "capabilities": {"tools": {}},
    "serverInfo": {"name": "up", "version": "1"},
    "instructions": "be kind",
}


class ClientTestCase(SynchronousTestCase):
    limits = Limits(request_timeout=10, max_request_time=25, startup_timeout=5, max_in_flight=3, max_server_requests=2)

    def setUp(self) -> None:
        self.clock = Clock()
        self.channel = ScriptedChannel()
        self.handler = Handler()
        self.client = UpstreamClient(
            self.channel, self.clock, self.handler, upstream="up", limits=self.limits, identity="owner"
        )

    def ready(self) -> ServerInfo:
        d = self.client.start("2025-11-25")
        init = self.channel.last()
        self.channel.push(jsonrpc.result_response(init["id"], INIT_RESULT))
        return self.successResultOf(d)


class HandshakeTests(ClientTestCase):
    def test_interfaces(self) -> None:
        verifyObject(IChannelReceiver, self.client)
        verifyObject(IUpstreamChannel, self.channel)

    def test_handshake(self) -> None:
        d = self.client.start("2025-11-25")
        init = self.channel.last()
        self.assertEqual(init["method"], "initialize")
        self.assertEqual(init["params"]["protocolVersion"], "2025-11-25")
        self.assertEqual(init["params"]["capabilities"], CLIENT_CAPABILITIES)
        self.assertEqual(self.channel.identities[-1], "owner")
        self.channel.push(jsonrpc.result_response(init["id"], INIT_RESULT))
        info = self.successResultOf(d)
        self.assertEqual(info, ServerInfo("2025-06-18", {"tools": {}}, {"name": "up", "version": "1"}, "be kind"))
        self.assertEqual(self.channel.version, "2025-06-18")
        self.assertEqual(self.channel.last(), {"jsonrpc": "2.0", "method": "notifications/initialized", "params": {}})
        self.assertEqual(self.client.state, "ready")

    def test_unknown_version(self) -> None:
        d = self.client.start("2025-11-25")
        self.channel.push(jsonrpc.result_response(self.channel.last()["id"], {**INIT_RESULT, "protocolVersion": "1999-01-01"}))
        error = self.failureResultOf(d, JSONRPCError).value
        self.assertEqual(error.code, errors.UPSTREAM_UNAVAILABLE)
        self.assertIn("'1999-01-01'", error.message)
        self.assertEqual(error.data, {"upstream": "up", "reason": "start_failed"})
        self.assertTrue(self.channel.closed)
        self.assertEqual(self.client.state, "closed")

    def test_bad_answer(self) -> None:
        d = self.client.start("2025-11-25")
        self.channel.push(jsonrpc.result_response(self.channel.last()["id"], {"protocolVersion": 3}))
        self.assertIn("not valid", self.failureResultOf(d, JSONRPCError).value.message)

    def test_error_answer(self) -> None:
        d = self.client.start("2025-11-25")
        self.channel.push(jsonrpc.error_response(self.channel.last()["id"], JSONRPCError(-32602, "nope")))
        error = self.failureResultOf(d, JSONRPCError).value
        self.assertEqual((error.code, error.message), (errors.UPSTREAM_UNAVAILABLE, "Upstream unavailable: nope"))

    def test_startup_timeout(self) -> None:
        d = self.client.start("2025-11-25")
        self.clock.advance(5)
        error = self.failureResultOf(d, JSONRPCError).value
        self.assertIn("did not start within 5s", error.message)
        self.assertTrue(self.channel.closed)

    def test_channel_start_fails(self) -> None:
        self.channel.start = lambda receiver: fail(errors.unavailable("up", "start_failed", "its command was not found"))  # type: ignore[method-assign]
        d = self.client.start("2025-11-25")
        self.assertEqual(self.failureResultOf(d, JSONRPCError).value.message, "Upstream unavailable: its command was not found")


class RequestTests(ClientTestCase):
    def test_ids_are_the_clients_own(self) -> None:
        self.ready()
        first = self.client.request("tools/call", {"name": "a"}, identity="alice")
        second = self.client.request("tools/call", {"name": "b"})
        a, b = self.channel.sent[-2:]
        self.assertEqual((a["id"], b["id"]), (2, 3))
        self.assertEqual(self.channel.identities[-2], "alice")
        self.channel.push(jsonrpc.result_response(3, {"n": "b"}))
        self.channel.push(jsonrpc.result_response(2, {"n": "a"}))
        self.assertEqual(self.successResultOf(first), {"n": "a"})
        self.assertEqual(self.successResultOf(second), {"n": "b"})
        self.assertEqual(self.client.in_flight, 0)

    def test_timer_after_the_request_is_sent(self) -> None:
        """
        A request's timeout is set once the request has gone to the channel
        (what the upstream waits for comes first), and not at all when the
        channel has answered it meanwhile (an in-process upstream).
        """
        self.ready()
        pending: list[int] = []

        def send(message: dict[str, Any], identity: Any = None) -> Deferred:
            pending.append(len(self.clock.getDelayedCalls()))
            if message.get("params", {}).get("name") == "at-once":
                self.channel.receiver.messageReceived(  # type: ignore[union-attr]
                    jsonrpc.parse_message(jsonrpc.result_response(message["id"], {"ok": True}))
                )
            return succeed(None)

        self.channel.send = send  # type: ignore[method-assign]
        d = self.client.request("tools/call", {"name": "later"})
        self.assertEqual(pending, [0])
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.channel.push(jsonrpc.result_response(2, {}))
        self.successResultOf(d)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.successResultOf(self.client.request("tools/call", {"name": "at-once"})), {"ok": True})
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_upstream_error_passes_through(self) -> None:
        self.ready()
        d = self.client.request("tools/call", {})
        self.channel.push({"jsonrpc": "2.0", "id": 2, "error": {"code": -32602, "message": "x" * 900, "data": {"k": 1}}})
        error = self.failureResultOf(d, JSONRPCError).value
        self.assertEqual((error.code, len(error.message), error.data), (-32602, 500, {"k": 1}))

    def test_unknown_and_late_answers_are_ignored(self) -> None:
        self.ready()
        self.channel.push(jsonrpc.result_response(99, {}))
        self.channel.push(jsonrpc.result_response("2", {}))
        d = self.client.request("tools/list", {})
        self.assertNoResult(d)

    def test_timeout_cancels_upstream(self) -> None:
        self.ready()
        d = self.client.request("tools/call", {"name": "slow"})
        self.clock.advance(10)
        error = self.failureResultOf(d, JSONRPCError).value
        self.assertEqual((error.code, error.data), (jsonrpc.REQUEST_TIMEOUT, {"upstream": "up", "timeout": 10.0}))
        self.assertEqual(
            self.channel.last(),
            {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 2, "reason": "Request timed out"}},
        )
        self.channel.push(jsonrpc.result_response(2, {}))  # too late: ignored
        self.assertEqual(self.client.in_flight, 0)

    def test_progress_is_remapped_and_resets_the_timeout(self) -> None:
        self.ready()
        d = self.client.request("tools/call", {"name": "slow", "_meta": {"progressToken": "caller-token"}}, context="ctx")
        sent = self.channel.last()
        self.assertEqual(sent["params"]["_meta"], {"progressToken": 2})
        for _ in range(2):
            self.clock.advance(9)
            self.channel.push({"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progressToken": 2, "progress": 1}})
        self.assertNoResult(d)
        notification, context = self.handler.notifications[-1]
        self.assertEqual((notification.params["progressToken"], context), ("caller-token", "ctx"))
        # ... but never past max_request_time.
        self.clock.advance(7)
        self.assertEqual(self.failureResultOf(d, JSONRPCError).value.code, jsonrpc.REQUEST_TIMEOUT)

    def test_progress_for_unknown_tokens_is_dropped(self) -> None:
        self.ready()
        self.channel.push({"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progressToken": "x", "progress": 1}})
        self.channel.push({"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progressToken": 77, "progress": 1}})
        self.assertEqual(self.handler.notifications, [])

    def test_cancel_tells_upstream(self) -> None:
        self.ready()
        self.channel.hold = True
        d = self.client.request("tools/call", {"name": "never"})
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.channel.sent[-1]["params"], {"requestId": 2, "reason": "Cancelled by the client"})
        self.assertEqual(self.channel.cancelled, [2])  # the HTTP exchange is abandoned too

    def test_exchange_failure_fails_the_call(self) -> None:
        self.ready()
        self.channel.hold = True
        d = self.client.request("tools/call", {})
        self.channel.exchanges[-1].errback(errors.unavailable("up", "http", "it answered HTTP 500"))
        self.assertEqual(self.failureResultOf(d, JSONRPCError).value.message, "Upstream unavailable: it answered HTTP 500")
        other = self.client.request("tools/call", {})
        self.channel.exchanges[-1].errback(RuntimeError("boom"))
        self.assertEqual(self.failureResultOf(other, JSONRPCError).value.data["reason"], "http")

    def test_in_flight_bound(self) -> None:
        self.ready()
        for _ in range(3):
            self.client.request("tools/call", {})
        error = self.failureResultOf(self.client.request("tools/call", {}), JSONRPCError).value
        self.assertEqual(error.data, {"upstream": "up", "reason": "busy"})

    def test_lost_fails_everything_at_once(self) -> None:
        self.ready()
        calls = [self.client.request("tools/call", {}) for _ in range(2)]
        self.channel.push(jsonrpc.request("s1", "sampling/createMessage", {}))
        self.channel.receiver.channelLost("exited", "its process was killed by signal 9")  # type: ignore[union-attr]
        for d in calls:
            error = self.failureResultOf(d, JSONRPCError).value
            self.assertEqual(error.message, "Upstream unavailable: its process was killed by signal 9")
            self.assertEqual(error.data["reason"], "exited")
        self.assertEqual(self.handler.cancelled, ["s1"])
        self.assertEqual(self.handler.lost, [("exited", "its process was killed by signal 9")])
        later = self.failureResultOf(self.client.request("tools/call", {}), JSONRPCError).value
        self.assertEqual(later.data["reason"], "exited")
        self.assertEqual(self.clock.getDelayedCalls(), [])


class ServerRequestTests(ClientTestCase):
    def test_answered(self) -> None:
        self.ready()
        call = self.client.request("tools/call", {}, context="ctx")
        self.channel.push(jsonrpc.request("s1", "sampling/createMessage", {"maxTokens": 1}), related=2)
        request, context, d = self.handler.requests[-1]
        self.assertEqual((request.method, context), ("sampling/createMessage", "ctx"))
        d.callback({"content": {"type": "text", "text": "hi"}})
        self.assertEqual(self.channel.last(), jsonrpc.result_response("s1", {"content": {"type": "text", "text": "hi"}}))
        self.assertEqual(self.channel.identities[-1], "owner")
        self.assertNoResult(call)

    def test_error_and_failure(self) -> None:
        self.ready()
        self.channel.push(jsonrpc.request(7, "roots/list", {}))
        self.handler.requests[-1][2].errback(JSONRPCError(-32601, "no roots"))
        self.assertEqual(self.channel.last()["error"], {"code": -32601, "message": "no roots"})
        self.channel.push(jsonrpc.request(8, "roots/list", {}))
        self.handler.requests[-1][2].errback(RuntimeError("bug"))
        self.assertEqual(self.channel.last()["error"], {"code": -32603, "message": "Internal error"})
        self.flushLoggedErrors(RuntimeError)

    def test_ping_answered_here(self) -> None:
        self.ready()
        self.channel.push(jsonrpc.request("p", "ping", {}))
        self.assertEqual(self.channel.last(), jsonrpc.result_response("p", {}))
        self.assertEqual(self.handler.requests, [])

    def test_cancelled_by_upstream(self) -> None:
        self.ready()
        self.channel.push(jsonrpc.request("s1", "elicitation/create", {}))
        sent = len(self.channel.sent)
        self.channel.push({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": "s1"}})
        self.assertEqual(self.handler.cancelled, ["s1"])
        self.assertEqual(len(self.channel.sent), sent)  # no answer to a cancelled request

    def test_bounded(self) -> None:
        self.ready()
        for i in range(2):
            self.channel.push(jsonrpc.request(f"s{i}", "roots/list", {}))
        self.channel.push(jsonrpc.request("s2", "roots/list", {}))
        self.assertEqual(self.channel.last()["error"]["message"], "Too many requests waiting for a client")
        self.channel.push(jsonrpc.request("s1", "roots/list", {}))
        self.assertEqual(self.channel.last()["error"]["message"], "Request id already in use")
        self.assertEqual(self.client.serving, 2)

    def test_notifications_with_context(self) -> None:
        self.ready()
        self.client.request("tools/call", {}, context="ctx")
        self.channel.push({"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "info", "data": 1}}, related=2)
        self.channel.push({"jsonrpc": "2.0", "method": "notifications/tools/list_changed"})
        self.assertEqual([c for _, c in self.handler.notifications], ["ctx", None])

    def test_close(self) -> None:
        self.ready()
        d = self.client.request("tools/call", {})
        self.successResultOf(self.client.close())
        self.assertEqual(self.failureResultOf(d, JSONRPCError).value.data["reason"], "stopped")
        self.assertTrue(self.channel.closed)
        self.assertEqual(self.handler.lost, [("stopped", "it was stopped")])
        self.client.notify("notifications/roots/list_changed", {})
        self.assertNotEqual(self.channel.last()["method"], "notifications/roots/list_changed")
