"""
Tests for L{smeldr_oauth.mcp.conversation}: the client-facing state both
the native and the gateway's sessions inherit.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from smeldr_oauth.gateway.proxy import GatewaySession
from smeldr_oauth.mcp.app import MCPApp
from smeldr_oauth.mcp.conversation import ConversationState
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
