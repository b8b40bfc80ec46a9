"""
Tests for L{smeldr_oauth.mcp.conversation}: the client-facing state both
the native and the gateway's sessions inherit.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from smeldr_oauth.gateway.proxy import GatewaySession
from smeldr_oauth.mcp import jsonrpc
from smeldr_oauth.mcp.app import MCPApp
from smeldr_oauth.mcp.calls import CallbackOutlet, Principal
from smeldr_oauth.mcp.conversation import ConversationState
from smeldr_oauth.mcp.jsonrpc import JSONRPCError
from smeldr_oauth.mcp.session import ServerSession


class _Delivery:
    """Enough of an L{ISessionDelivery} for the constructor."""


class ConversationStateTests(SynchronousTestCase):
    def test_changes(self) -> None:
        """
        Each change of the recorded state is told to C{on_change}; the
        client's C{notifications/initialized} is not recorded.
        """
        seen: list[Any] = []
        state = ConversationState(Clock(), session_id="s", on_change=seen.append)
        self.assertEqual((state.state, state.log_level, state.subscriptions), ("new", None, frozenset()))
        state.initialized_as("2025-06-18", {"roots": {}}, {"name": "c"})
        state.client_initialized()
        state.set_log_level("debug")
        state.subscribe("memo://a")
        state.unsubscribe("memo://a")
        self.assertEqual(seen, [state] * 4)
        self.assertEqual((state.state, state.protocol_version, state.log_level), ("ready", "2025-06-18", "debug"))
        self.assertTrue(state.initialized)

    def test_clientInitializedOnlyAfterTheHandshake(self) -> None:
        state = ConversationState(Clock())
        state.client_initialized()
        self.assertEqual(state.state, "new")
        self.assertFalse(state.initialized)

    def test_resume(self) -> None:
        """
        A record whose handshake finished makes the session ready; one
        recorded before it leaves the session new, with its level.
        """
        done = ConversationState(Clock())
        done.resume(
            protocol_version="2025-03-26",
            client_capabilities={"sampling": {}},
            client_info={"name": "c"},
            log_level="error",
            subscriptions=frozenset({"memo://a"}),
        )
        self.assertEqual((done.state, done.protocol_version, done.subscriptions), ("ready", "2025-03-26", frozenset({"memo://a"})))
        early = ConversationState(Clock())
        early.resume(
            protocol_version=None, client_capabilities={}, client_info={}, log_level="error", subscriptions=frozenset()
        )
        self.assertEqual((early.state, early.log_level), ("new", "error"))

    def test_delivery(self) -> None:
        """
        With a delivery (copies of the session in several processes ask
        the client things), request ids start at random points, for the
        gateway's sessions as for the native ones; a session without an id
        keeps no delivery.
        """
        starts = {ConversationState(Clock(), session_id="s", delivery=_Delivery())._next_id for _ in range(8)}  # type: ignore[arg-type]
        self.assertGreater(len(starts), 1)
        self.assertEqual(ConversationState(Clock())._next_id, 0)
        self.assertIsNone(ConversationState(Clock(), delivery=_Delivery())._delivery)  # type: ignore[arg-type]
        self.assertTrue(issubclass(GatewaySession, ConversationState))

    def test_native(self) -> None:
        """
        The native session: C{info} until the client chooses, and no
        instance dictionary (idle sessions stay small).
        """
        session = ServerSession(MCPApp(name="t"), Clock())
        self.assertEqual(session.log_level, "info")
        self.assertFalse(hasattr(session, "__dict__"))


class _Call:
    cancelled = False


class _Telling(ConversationState):
    cancel_on_timeout = True


class RequestTests(SynchronousTestCase):
    """
    What both sessions do with requests the same way (the base's): the
    ones they serve, and the ones they send to the client.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.sent: list[dict[str, Any]] = []
        self.state = ConversationState(self.clock, default_outlet=CallbackOutlet(self.sent.append), request_timeout=10)
        self.principal = Principal("alice", "c", frozenset(), None)

    def ask(self) -> tuple[Deferred, list[Any]]:
        d = self.state._ask_client(None, "roots/list", {})
        outcome: list[Any] = []
        d.addBoth(outcome.append)
        return d, outcome

    def reply(self, **fields: Any) -> Any:
        message = jsonrpc.parse_message({"jsonrpc": "2.0", "id": self.sent[0]["id"], **fields})
        return self.state._settle(message, self.principal)

    def test_answered(self) -> None:
        """The client's reply fires the request it answers; the timeout is stopped."""
        _, outcome = self.ask()
        self.assertEqual(self.sent[0]["id"], "req-1")
        self.reply(result={"roots": []})
        self.assertEqual(outcome, [{"roots": []}])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_client_error(self) -> None:
        """The client's error is passed on, checked for shape and cut short."""
        _, outcome = self.ask()
        self.reply(error={"code": True, "message": "x" * 600})
        error = outcome[0].value
        self.assertEqual((error.code, len(error.message)), (jsonrpc.INTERNAL_ERROR, 500))

    def test_timeout(self) -> None:
        """
        Unanswered in time, the request fails; the client is told it is
        cancelled only by a session that says so (the gateway's).
        """
        _, outcome = self.ask()
        self.clock.advance(10)
        self.assertEqual(outcome[0].value.code, jsonrpc.REQUEST_TIMEOUT)
        self.assertEqual(len(self.sent), 1)
        self.state = _Telling(self.clock, default_outlet=CallbackOutlet(self.sent.append), request_timeout=10)
        _, outcome = self.ask()
        self.clock.advance(10)
        self.assertEqual(outcome[0].value.code, jsonrpc.REQUEST_TIMEOUT)
        self.assertEqual(self.sent[-1]["params"], {"requestId": "req-1", "reason": "timeout"})

    def test_cancelled_by_the_asker(self) -> None:
        """Cancelling the wait cancels the request at the client; a late reply is ignored."""
        d, outcome = self.ask()
        d.cancel()
        self.assertTrue(outcome[0].check(CancelledError))
        self.assertEqual(self.sent[-1], jsonrpc.notification("notifications/cancelled", {"requestId": "req-1"}))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.reply(result={})

    def test_no_channel(self) -> None:
        state = ConversationState(self.clock)
        failure = self.failureResultOf(state._ask_client(None, "roots/list", {}), JSONRPCError)
        self.assertEqual(failure.value.code, jsonrpc.INVALID_REQUEST)

    def test_end(self) -> None:
        """
        Closing cancels what is served (it gets no answer) and fails what
        waits for the client, once; a closed session asks nothing more.
        """
        inner: Deferred = Deferred()
        call = _Call()
        request = jsonrpc.Request(1, "tools/call", {})
        answer = self.state._serve(request, inner, call, lambda r: self.state._failed(request, call, r))
        self.assertTrue(self.state.busy)
        _, outcome = self.ask()
        self.assertTrue(self.state._end())
        self.assertIsNone(self.successResultOf(answer))
        self.assertTrue(call.cancelled)
        self.assertEqual(outcome[0].value.code, jsonrpc.REQUEST_CANCELLED)
        self.assertFalse(self.state._end())
        self.assertFalse(self.state.busy)
        failure = self.failureResultOf(self.state._ask_client(None, "roots/list", {}), JSONRPCError)
        self.assertEqual(failure.value.code, jsonrpc.REQUEST_CANCELLED)

    def test_client_cancels(self) -> None:
        """C{notifications/cancelled} cancels the request it names, and only a valid id."""
        inner: Deferred = Deferred()
        call = _Call()
        request = jsonrpc.Request(1, "tools/call", {})
        answer = self.state._serve(request, inner, call, lambda r: self.state._failed(request, call, r))
        cancel = jsonrpc.Notification("notifications/cancelled", {"requestId": True})
        self.assertIsNone(self.successResultOf(self.state._settle(cancel, self.principal)))
        self.assertNoResult(answer)
        cancel = jsonrpc.Notification("notifications/cancelled", {"requestId": 1})
        self.state._settle(cancel, self.principal)
        self.assertIsNone(self.successResultOf(answer))

    def test_failed(self) -> None:
        """A method's JSON-RPC error is its answer; anything else is logged and internal."""
        request = jsonrpc.Request(7, "tools/call", {})
        inner: Deferred = Deferred()
        answer = self.state._serve(request, inner, _Call(), lambda r: self.state._failed(request, _Call(), r))
        inner.errback(ZeroDivisionError())
        self.assertEqual(self.successResultOf(answer)["error"]["code"], jsonrpc.INTERNAL_ERROR)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
