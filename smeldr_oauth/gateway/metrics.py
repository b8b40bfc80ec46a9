# -*- test-case-name: tests.test_gateway_proxy -*-
"""
Counters for one upstream, as a plain object.

L{PrometheusFigures} turns them into C{prometheus_client} metrics
(counters, a gauge, a histogram with the same bucket bounds), and
C{/healthz} shows L{UpstreamMetrics.snapshot}; counting needs no metrics
library (the figures import C{prometheus_client} only when the service
asks for them).
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
    #: Called with each forwarded request's seconds (L{PrometheusFigures}'
    #: histogram: a latency cannot be derived later from the buckets).
    latency_observers: list[Callable[[float], None]] = attr.ib(factory=list)

    def observe(self, method: str, seconds: float, ok: bool) -> None:
        """One forwarded request finished after C{seconds}."""
        for observer in self.latency_observers:
            observer(seconds)
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
            **{name: getattr(self, name) for name in COUNTER_NAMES},
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


#: The counters exported by upstream alone, with their help text
#: (C{smeldr_gateway_NAME_total}); C{calls} is exported by method too.
_COUNTERS = (
    ("errors", "Forwarded requests that ended in an error (the upstream's, a timeout, a crash)"),
    ("timeouts", "Forwarded requests that timed out"),
    ("refused", "Requests refused before the upstream (instance limit, too many in flight)"),
    ("started", "Upstream instances started"),
    ("crashes", "Upstream instances that ended without being asked to"),
    ("restarts", "Upstream instances started again after a crash"),
    ("dropped_notifications", "Upstream notifications dropped by the flow policy"),
)

#: Every plain counter of L{UpstreamMetrics}, in the order C{snapshot} lists
#: them: the one list both the snapshot and the Prometheus figures follow.
COUNTER_NAMES = ("calls",) + tuple(name for name, _ in _COUNTERS)


class PrometheusFigures:
    """
    Every upstream's counters as C{prometheus_client} metrics in a
    registry, brought up to date by L{refresh}: counters advance by what
    the plain counters grew since the last refresh, the live-instances
    gauge is set, and the latency histogram observes each request as it
    finishes (through L{UpstreamMetrics.latency_observers}).

    Real metric objects rather than a scrape-time collector, so that they
    follow the service's metrics design: in one process C{refresh} runs
    before each scrape; in a worker of C{--workers} it runs every second
    and the values go to the worker's multiprocess files, which the parent
    adds up (counters and the histogram summed over every worker that
    ever ran, the gauge over the live ones).  A scrape then gives the
    service's figures, not one worker's.

    Names are C{smeldr_gateway_*}, labelled by C{upstream} (a single
    unnamed upstream is C{default}) and, for calls, C{method}.
    """

    def __init__(self, registry: Any, upstreams: Callable[[], list[UpstreamMetrics]]) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.upstreams = upstreams
        self._seen: dict[tuple[str, ...], int] = {}
        self._hooked: set[UpstreamMetrics] = set()
        self.counters = {
            name: Counter(f"smeldr_gateway_{name}", text, ["upstream"], registry=registry) for name, text in _COUNTERS
        }
        self.calls = Counter("smeldr_gateway_calls", "Requests forwarded upstream", ["upstream", "method"], registry=registry)
        self.live = Gauge(
            "smeldr_gateway_live_instances", "Upstream instances running", ["upstream"],
            registry=registry, multiprocess_mode="livesum",
        )
        self.latency = Histogram(
            "smeldr_gateway_request_duration_seconds", "Forwarded request latency", ["upstream"],
            buckets=LATENCY_BOUNDS, registry=registry,
        )
        self._hook()

    def _hook(self) -> None:
        for m in self.upstreams():
            if m not in self._hooked:
                self._hooked.add(m)
                m.latency_observers.append(self.latency.labels(upstream=m.upstream or "default").observe)

    def _advance(self, counter: Any, key: tuple[str, ...], total: int) -> None:
        grown = total - self._seen.get(key, 0)
        self._seen[key] = total
        if grown > 0:
            counter.inc(grown)

    def refresh(self) -> None:
        self._hook()
        for m in self.upstreams():
            name = m.upstream or "default"
            for key, counter in self.counters.items():
                self._advance(counter.labels(upstream=name), (key, name), getattr(m, key))
            for method, count in list(m.by_method.items()):
                self._advance(self.calls.labels(upstream=name, method=method), ("calls", name, method), count)
            self.live.labels(upstream=name).set(m.live())
