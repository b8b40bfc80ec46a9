# -*- test-case-name: tests.test_gateway_proxy -*-
"""
Counters for one upstream, as a plain object.

The service layer exports them (Prometheus counters, a gauge, a histogram
with the same bucket bounds) and C{/healthz} shows L{UpstreamMetrics.snapshot};
nothing here depends on a metrics library, so the gateway runs and is
tested without one.
"""

from __future__ import annotations

import bisect
import math
from typing import Any, Callable

import attr

#: Upper bounds (seconds) of the latency histogram's buckets; the last is +Inf.
LATENCY_BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, math.inf)


def _zero_buckets() -> list[int]:
    return [0] * len(LATENCY_BOUNDS)


@attr.s(auto_attribs=True, eq=False)
class UpstreamMetrics:
    """
    What happened on one upstream since the gateway started.

    @ivar calls: requests forwarded upstream (answered or not).
    @ivar errors: forwarded requests that ended in a JSON-RPC error (the
        upstream's own or the gateway's: timeout, crash, refusal).
    @ivar timeouts: forwarded requests that timed out (also in C{errors}).
    @ivar refused: requests refused before reaching the upstream (instance
        limit, too many in flight).
    @ivar started: instances started (processes spawned, HTTP sessions opened).
    @ivar crashes: instances that ended without being asked to.
    @ivar restarts: instances started again after a crash.
    @ivar dropped_notifications: upstream notifications dropped by the flow
        policy.
    @ivar by_method: C{calls} per MCP method.
    @ivar live: how many instances run now (a callable: the pool knows).
    """

    upstream: str
    calls: int = 0
    errors: int = 0
    timeouts: int = 0
    refused: int = 0
    started: int = 0
    crashes: int = 0
    restarts: int = 0
    dropped_notifications: int = 0
    by_method: dict[str, int] = attr.ib(factory=dict)
    latency_buckets: list[int] = attr.ib(factory=_zero_buckets)
    latency_sum: float = 0.0
    latency_count: int = 0
    live: Callable[[], int] = lambda: 0

    def observe(self, method: str, seconds: float, ok: bool) -> None:
        """One forwarded request finished after C{seconds}."""
        self.calls += 1
        self.by_method[method] = self.by_method.get(method, 0) + 1
        if not ok:
            self.errors += 1
        self.latency_buckets[bisect.bisect_left(LATENCY_BOUNDS, seconds)] += 1
        self.latency_sum += seconds
        self.latency_count += 1

    def snapshot(self) -> dict[str, Any]:
        """Everything, as JSON-ready data (for C{/healthz} and tests)."""
        return {
            "upstream": self.upstream,
            "calls": self.calls,
            "errors": self.errors,
            "timeouts": self.timeouts,
            "refused": self.refused,
            "started": self.started,
            "crashes": self.crashes,
            "restarts": self.restarts,
            "dropped_notifications": self.dropped_notifications,
            "live": self.live(),
            "by_method": dict(self.by_method),
            "latency": {
                "count": self.latency_count,
                "sum": self.latency_sum,
                "buckets": [
                    {"le": "+Inf" if math.isinf(b) else b, "count": c}
                    for b, c in zip(LATENCY_BOUNDS, self.latency_buckets)
                ],
            },
        }
