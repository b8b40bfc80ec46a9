"""
Tests for L{smeldr_oauth.mcp.calls.outcome_now}: what a L{Deferred} already
knows is taken out at once, and nothing else is.

The fast path reads a fired L{Deferred}'s C{result} directly; these tests
pin down the cases where that would be wrong (a failure that must be
marked handled, a L{Deferred} waiting on another, one whose callbacks are
running) so that each keeps the long way's answer.
"""

from __future__ import annotations

import gc
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from smeldr_oauth.mcp.calls import outcome_now


class OutcomeNowTests(SynchronousTestCase):
    def test_fired_value(self) -> None:
        """A fired L{Deferred}'s value, and the Deferred still has it."""
        d = succeed({"a": 1})
        self.assertEqual(outcome_now(d), [{"a": 1}])
        self.assertEqual(self.successResultOf(d), {"a": 1})

    def test_fired_none(self) -> None:
        """C{None} is a value like any other: C{[None]}, not C{[]}."""
        self.assertEqual(outcome_now(succeed(None)), [None])

    def test_after_callbacks(self) -> None:
        """The value the callbacks made, not the one the Deferred fired with."""
        d = succeed(1).addCallback(lambda n: n + 1)
        self.assertEqual(outcome_now(d), [2])

    def test_not_fired(self) -> None:
        """Nothing yet: C{[]}, and the Deferred goes on as before."""
        d: Deferred[int] = Deferred()
        self.assertEqual(outcome_now(d), [])
        d.callback(3)
        self.assertEqual(self.successResultOf(d), 3)

    def test_failure_taken_and_handled(self) -> None:
        """
        A failure is given to the caller, and the Deferred no longer holds
        it (no "Unhandled error in Deferred" when it is collected).
        """
        d = fail(ValueError("no"))
        known = outcome_now(d)
        self.assertEqual(len(known), 1)
        self.assertIsInstance(known[0], Failure)
        known[0].trap(ValueError)
        self.assertIsNone(self.successResultOf(d))
        del d, known
        gc.collect()
        self.assertEqual(self.flushLoggedErrors(ValueError), [])

    def test_waiting_on_another(self) -> None:
        """
        A fired Deferred paused on one its callback returned is not done:
        C{[]}, then the inner result arrives as usual.
        """
        inner: Deferred[str] = Deferred()
        d = succeed(None).addCallback(lambda _: inner)
        self.assertTrue(d.called)
        self.assertEqual(outcome_now(d), [])
        inner.callback("later")
        self.assertEqual(self.successResultOf(d), "later")

    def test_inside_its_own_callbacks(self) -> None:
        """
        Asked from within one of the Deferred's own callbacks, its result
        is not final yet (later callbacks may change it): C{[]}, and the
        Deferred ends with what its remaining callbacks make.
        """
        seen: list[Any] = []
        d: Deferred[int] = Deferred()

        def asks(value: int) -> int:
            seen.append(list(outcome_now(d)))
            return value

        d.addCallback(asks).addCallback(lambda n: n * 10)
        d.callback(4)
        self.assertEqual(seen, [[]])
        self.assertEqual(self.successResultOf(d), 40)
