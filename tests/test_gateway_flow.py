"""
Tests for L{smeldr_oauth.gateway.flow}: upstream notifications at a bounded
rate, coalesced or dropped, never queued without bound.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from smeldr_oauth.gateway.flow import NotificationGate, TokenBucket, coalesce_key
from smeldr_oauth.mcp.jsonrpc import Notification


def log(i: int) -> Notification:
    return Notification("notifications/message", {"level": "info", "data": i})


class BucketTests(SynchronousTestCase):
    def test_rate(self) -> None:
        clock = Clock()
        bucket = TokenBucket(clock, 2.0, 3)
        self.assertEqual([bucket.take() for _ in range(4)], [True, True, True, False])
        self.assertEqual(bucket.wait(), 0.5)
        clock.advance(0.5)
        self.assertTrue(bucket.take())
        clock.advance(100)
        self.assertEqual(sum(bucket.take() for _ in range(10)), 3)


class GateTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.delivered: list[tuple[Notification, Any]] = []
        self.gate = NotificationGate(self.clock, 10.0, 5, lambda n, c: self.delivered.append((n, c)), max_pending=3)

    def test_within_budget(self) -> None:
        for i in range(5):
            self.gate.offer(log(i), "ctx")
        self.assertEqual([n.params["data"] for n, _ in self.delivered], [0, 1, 2, 3, 4])
        self.assertEqual(self.delivered[0][1], "ctx")

    def test_flood_is_bounded(self) -> None:
        """100 000 log lines at once: burst passes, the rest is counted, nothing waits."""
        for i in range(100_000):
            self.gate.offer(log(i))
        self.assertEqual(len(self.delivered), 5)
        self.assertEqual(self.gate.dropped, 99_995)
        self.assertEqual(self.gate.pending, 0)

    def test_changes_are_coalesced_not_lost(self) -> None:
        for i in range(5):
            self.gate.offer(log(i))
        for _ in range(1000):
            self.gate.offer(Notification("notifications/tools/list_changed", {}))
            self.gate.offer(Notification("notifications/resources/updated", {"uri": "a"}))
        for step in range(1000):
            self.gate.offer(Notification("notifications/progress", {"progressToken": "t", "progress": step}))
        self.assertEqual(self.gate.pending, 3)
        self.assertEqual(self.gate.dropped, 0)
        self.clock.advance(1)
        methods = [n.method for n, _ in self.delivered[5:]]
        self.assertEqual(
            methods,
            ["notifications/tools/list_changed", "notifications/resources/updated", "notifications/progress"],
        )
        self.assertEqual(self.delivered[-1][0].params["progress"], 999)

    def test_pending_is_capped(self) -> None:
        for i in range(5):
            self.gate.offer(log(i))
        for i in range(10):
            self.gate.offer(Notification("notifications/resources/updated", {"uri": f"u{i}"}))
        self.assertEqual((self.gate.pending, self.gate.dropped), (3, 7))

    def test_order_kept_when_budget_returns(self) -> None:
        for i in range(5):
            self.gate.offer(log(i))
        self.gate.offer(Notification("notifications/prompts/list_changed", {}))
        self.clock.advance(10)
        self.gate.offer(log(99))
        self.assertEqual([n.method for n, _ in self.delivered[5:]], ["notifications/prompts/list_changed", "notifications/message"])

    def test_close(self) -> None:
        for i in range(5):
            self.gate.offer(log(i))
        self.gate.offer(Notification("notifications/tools/list_changed", {}))
        self.gate.close()
        self.clock.advance(10)
        self.gate.offer(log(1))
        self.assertEqual(len(self.delivered), 5)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_keys(self) -> None:
        self.assertEqual(coalesce_key(Notification("notifications/resources/list_changed", {})), ("notifications/resources/list_changed",))
        self.assertIsNone(coalesce_key(Notification("notifications/resources/updated", {"uri": 3})))
        self.assertIsNone(coalesce_key(Notification("notifications/progress", {"progressToken": None})))
        self.assertEqual(
            coalesce_key(Notification("notifications/elicitation/complete", {"elicitationId": "e"})),
            ("notifications/elicitation/complete", "e"),
        )
        self.assertIsNone(coalesce_key(log(1)))
