# -*- test-case-name: tests.test_oauth_ratelimit -*-
"""
A small token-bucket rate limiter keyed by client address, on an injected
clock so tests drive it with L{twisted.internet.task.Clock}.
"""

from __future__ import annotations

from collections import OrderedDict

from twisted.internet.interfaces import IReactorTime


class RateLimiter:
    """
    Allow C{per_minute} events per key, with bursts up to the same number.
    At most C{max_keys} keys are tracked (least recently seen forgotten
    first), so a flood of addresses cannot grow memory without bound.
    """

    def __init__(self, clock: IReactorTime, per_minute: int, max_keys: int = 10000) -> None:
        self._clock = clock
        self._capacity = float(max(per_minute, 1))
        self._rate = self._capacity / 60.0
        self._max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def _level(self, key: str) -> float:
        now = self._clock.seconds()
        tokens, stamp = self._buckets.get(key, (self._capacity, now))
        return min(self._capacity, tokens + (now - stamp) * self._rate)

    def allowed(self, key: str) -> bool:
        """
        Is there room for one more event for C{key}?  (Does not spend it.)
        """
        return self._level(key) >= 1.0

    def hit(self, key: str) -> bool:
        """
        Spend one event for C{key}; C{False} if none was left.
        """
        now = self._clock.seconds()
        tokens = self._level(key)
        ok = tokens >= 1.0
        if ok:
            tokens -= 1.0
        self._buckets[key] = (tokens, now)
        self._buckets.move_to_end(key)
        while len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)
        return ok
