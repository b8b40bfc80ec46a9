# -*- test-case-name: tests.test_store_ratelimits -*-
"""
A token request's two shared buckets asked of their store at once, when
the question is handed on (L{SharedRateLimiter.ask_with}): what to ask, and
what to make of the answer, apart from the limiter so that a caller that
carries the question in another call of the store (the refresh grant on
PostgreSQL: L{smeldr_oauth.db.database.Before}) takes the same decisions
as L{SharedRateLimiter.take_with}.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from twisted.python.failure import Failure

if TYPE_CHECKING:
    from smeldr_oauth.oauth.ratelimit import SharedRateLimiter

#: C{take_both}'s arguments: two buckets (name, key, capacity, rate), the time.
Request = tuple[tuple[str, str, float, float], tuple[str, str, float, float], float]


class BothAsked:
    """
    Two shared limiters' buckets to ask of their store at once
    (L{SharedRateLimiter.ask_with}), their local pre-checks spent.

    @ivar request: C{take_both}'s arguments: the two buckets and the time.
    """

    __slots__ = ("_first", "_key", "_then", "_then_key", "_now", "request")

    def __init__(
        self, first: SharedRateLimiter, key: str, then: SharedRateLimiter, then_key: str, now: float, request: Request
    ) -> None:
        self._first, self._key, self._then, self._then_key, self._now = first, key, then, then_key, now
        self.request = request

    def decided(self, results: tuple[tuple[bool, float], Optional[tuple[bool, float]]]) -> tuple[int, int]:
        """
        The store's answer: C{(-1, 0)} when both were spent, else which was
        refused (0 or 1) and its C{Retry-After}; the local bookkeeping done.
        """
        first, later = results
        retry_after = self._first._decided(first, self._key, self._now)
        if retry_after is not None:
            self._then._local.refund(self._then_key)
            return (0, retry_after)
        assert later is not None
        retry_after = self._then._decided(later, self._then_key, self._now)
        return (-1, 0) if retry_after is None else (1, retry_after)

    def failed(self, failure: Failure) -> Failure:
        """
        The store could not answer: both local pre-checks given back.
        """
        self._then._failed(failure, self._then_key)
        return self._first._failed(failure, self._key)


def both_spent(results: tuple[tuple[bool, float], Optional[tuple[bool, float]]]) -> bool:
    """
    Whether a C{take_both} answer spent both buckets (what lets a carried
    write go ahead: L{smeldr_oauth.db.database.Before}).
    """
    first, later = results
    return bool(first[0]) and later is not None and bool(later[0])
