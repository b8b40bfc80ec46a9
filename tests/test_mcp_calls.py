"""
Tests for L{smeldr_oauth.mcp.calls.outcome_now}: what a L{Deferred} already
knows is taken out at once, and nothing else is; and for
L{smeldr_oauth.mcp.calls.is_deferred}, C{isinstance} against L{Deferred}
without the abstract base class's check.

The fast path reads a fired L{Deferred}'s C{result} directly; these tests
pin down the cases where that would be wrong (a failure that must be
marked handled, a L{Deferred} waiting on another, one whose callbacks are
running) so that each keeps the long way's answer.
"""

from __future__ import annotations

import abc
import gc
from typing import Any, Iterator
from contextlib import contextmanager

from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from smeldr_oauth.mcp.calls import is_deferred, outcome_now


@contextmanager
def abc_checks() -> Iterator[list[object]]:
    """
    Count the calls of C{ABCMeta.__instancecheck__} (the slow path of
    C{isinstance} against L{Deferred}, an C{Awaitable}) made inside.
    """
    seen: list[object] = []
    original = abc.ABCMeta.__instancecheck__

    def counting(cls: Any, instance: object) -> bool:
        seen.append(instance)
        return original(cls, instance)

    abc.ABCMeta.__instancecheck__ = counting  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        abc.ABCMeta.__instancecheck__ = original  # type: ignore[method-assign]


class _Sub(Deferred[Any]):
    pass


class IsDeferredTests(SynchronousTestCase):
    def test_same_answer_as_isinstance(self) -> None:
        """
        True for a L{Deferred} (fired or not) and a subclass's instance,
        False for what MCP work answers instead: a C{dict}, bytes, C{None},
        a L{Failure}, a coroutine, a class.
        """

        async def coroutine() -> None:
            return None

        pending = coroutine()
        self.addCleanup(pending.close)
        values: list[object] = [Deferred(), succeed(1), _Sub(), {}, b"x", None, Failure(ValueError()), pending, Deferred]
        for value in values:
            self.assertEqual(is_deferred(value), isinstance(value, Deferred), value)

    def test_no_abc_check(self) -> None:
        """
        The usual answers (not a L{Deferred}) take no C{ABCMeta} check; a
        plain C{isinstance} does, which is what this avoids.
        """
        with abc_checks() as seen:
            for value in ({}, b"x", None, [], "text"):
                self.assertFalse(is_deferred(value))
            self.assertTrue(is_deferred(_Sub()))
        self.assertEqual(seen, [])
        with abc_checks() as seen:
            self.assertFalse(isinstance({}, Deferred))
        self.assertEqual(len(seen), 1)

    def test_outcome_now_no_abc_check(self) -> None:
        """
        Taking a fired Deferred's plain value out makes no C{ABCMeta} check
        either (three a C{tools/call}).
        """
        d = succeed({"a": 1})
        with abc_checks() as seen:
            self.assertEqual(outcome_now(d), [{"a": 1}])
        self.assertEqual(seen, [])


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
