# -*- test-case-name: tests.test_gateway_proxy -*-
"""
Counters for one upstream, as a plain object.

L{PrometheusCollector} exports them (counters, a gauge, a histogram with
the same bucket bounds) at scrape time, and C{/healthz} shows
L{UpstreamMetrics.snapshot}; counting needs no metrics library (the
collector imports C{prometheus_client} only when a registry asks).
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


class PrometheusCollector:
    """
    A C{prometheus_client} collector of every upstream's counters, read at
    scrape time (the counters stay plain attributes on the hot path).

    Names are C{smeldr_gateway_*}, labelled by C{upstream}.  With
    C{--workers}, each worker holds its own upstreams and the parent
    serves only the multiprocess values: these are not among them.
    """

    def __init__(self, upstreams: "Callable[[], list[UpstreamMetrics]]") -> None:
        self.upstreams = upstreams

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        counters = {
            name: CounterMetricFamily(f"smeldr_gateway_{name}", text, labels=["upstream"])
            for name, text in (
                ("errors", "Forwarded requests that ended in an error (the upstream's, a timeout, a crash)"),
                ("timeouts", "Forwarded requests that timed out"),
                ("refused", "Requests refused before the upstream (instance limit, too many in flight)"),
                ("started", "Upstream instances started"),
                ("crashes", "Upstream instances that ended without being asked to"),
                ("restarts", "Upstream instances started again after a crash"),
                ("dropped_notifications", "Upstream notifications dropped by the flow policy"),
            )
        }
        calls = CounterMetricFamily("smeldr_gateway_calls", "Requests forwarded upstream", labels=["upstream", "method"])
        live = GaugeMetricFamily("smeldr_gateway_live_instances", "Upstream instances running", labels=["upstream"])
        latency = HistogramMetricFamily(
            "smeldr_gateway_request_duration_seconds", "Forwarded request latency", labels=["upstream"]
        )
        for m in self.upstreams():
            name = m.upstream or "default"
            for key, family in counters.items():
                family.add_metric([name], getattr(m, key))
            for method, count in sorted(m.by_method.items()):
                calls.add_metric([name, method], count)
            live.add_metric([name], m.live())
            cumulative, buckets = 0, []
            for bound, count in zip(LATENCY_BOUNDS, m.latency_buckets):
                cumulative += count
                buckets.append(("+Inf" if math.isinf(bound) else repr(bound), cumulative))
            latency.add_metric([name], buckets, m.latency_sum)
        yield calls
        yield from counters.values()
        yield live
        yield latency
