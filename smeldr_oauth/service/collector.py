# -*- test-case-name: tests.test_service_collector -*-
"""
CPython's garbage collector in a server holding thousands of idle streams.

A full (generation 2) collection walks every object the collector tracks,
and stops the reactor while it does: each idle MCP stream holds some
eighty of them (twisted.web's request and channel, their headers, the
session's parts), so at 10,000 streams one full collection takes a good
part of a second, and a request arriving meanwhile waits for it
(docs/performance.md measured 3.7 s stalls at 20,000).

Two things here:

  - L{CollectionPauses} times every collection (C{gc.callbacks}) and keeps
    the longest pause and the total per generation, for the metrics page
    (C{smeldr_gc_pause_longest_seconds}, C{smeldr_gc_pause_seconds_total},
    C{smeldr_gc_collections_total}) and the benchmarks;
  - L{settle} runs once the server is up: one collection, then
    C{gc.freeze()}, which moves every object alive then (modules,
    classes, functions, the configuration, the route tables: some 70,000
    objects) out of the collector's view for good.  They live as long as
    the process anyway; no later collection walks them again.  It also
    raises the threshold of the youngest generation, so that the hundred
    or so short-lived container objects a request makes do not start a
    collection every few requests.
"""

from __future__ import annotations

import gc
import time
from typing import Any, Callable, Iterator

from twisted.logger import Logger

log = Logger()

#: The youngest generation's threshold after L{settle} (CPython's default
#: is 700 allocations net of deallocations).  The older two keep theirs.
YOUNG_THRESHOLD = 10000


class CollectionPauses:
    """
    How long each garbage collection stopped the process, per generation.

    @ivar longest: the longest pause (seconds) per generation.
    @ivar total: the pauses summed (seconds) per generation.
    @ivar count: collections per generation.
    """

    def __init__(self, timer: Callable[[], float] = time.perf_counter) -> None:
        self._timer = timer
        self._began = 0.0
        self.longest = [0.0, 0.0, 0.0]
        self.total = [0.0, 0.0, 0.0]
        self.count = [0, 0, 0]

    def install(self) -> None:
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)

    def uninstall(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        # Runs inside the collection: no allocation beyond a float, no log.
        if phase == "start":
            self._began = self._timer()
            return
        pause = self._timer() - self._began
        generation = info["generation"]
        self.count[generation] += 1
        self.total[generation] += pause
        if pause > self.longest[generation]:
            self.longest[generation] = pause

    def collect(self) -> Iterator[Any]:
        """The figures, as a Prometheus collector (registry.register(self))."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        longest = GaugeMetricFamily(
            "smeldr_gc_pause_longest_seconds",
            "Longest garbage-collection pause since start, by generation",
            labels=["generation"],
        )
        total = CounterMetricFamily(
            "smeldr_gc_pause_seconds", "Garbage-collection pauses summed, by generation", labels=["generation"]
        )
        count = CounterMetricFamily("smeldr_gc_collections", "Garbage collections, by generation", labels=["generation"])
        for generation in range(3):
            label = [str(generation)]
            longest.add_metric(label, self.longest[generation])
            total.add_metric(label, self.total[generation])
            count.add_metric(label, self.count[generation])
        yield longest
        yield total
        yield count


def settle() -> None:
    """
    Once start-up is over: collect, then freeze what is alive (see the
    module docstring) and raise the youngest generation's threshold.
    """
    gc.collect()
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, oldest)
    log.info("Start-up objects frozen out of garbage collection: {frozen}", frozen=gc.get_freeze_count())


class CollectorWatch:
    """
    What the standalone server does with the collector: time every
    collection from the start (L{pauses}, also its metrics), and
    L{settle} on the first turn after L{ready} unless told not to.
    """

    def __init__(self, clock: Any, freeze: bool = True) -> None:
        self.pauses = CollectionPauses()
        self._clock = clock
        self._freeze = freeze
        self._settling: Any = None

    def start(self) -> None:
        self.pauses.install()

    def ready(self) -> None:
        """Start-up is over (the database is open)."""
        if self._freeze:
            self._settling = self._clock.callLater(0, self._settle)

    def _settle(self) -> None:
        self._settling = None
        settle()

    def stop(self) -> None:
        self.pauses.uninstall()
        if self._settling is not None and self._settling.active():
            self._settling.cancel()
        self._settling = None
