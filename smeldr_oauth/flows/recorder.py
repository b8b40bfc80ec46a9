# -*- test-case-name: tests.test_flows_recorder -*-
"""
The log observer that feeds the timeline.

The request path must not wait for the timeline: an observer is called
synchronously by whoever logs, in the middle of a token refresh or a tool
call.  So L{FlowRecorder} only turns the event into a L{Step} (a few
dictionary look-ups, and nothing at all for the events it does not keep)
and appends it to a bounded in-memory buffer.  Every
C{interval} seconds, or as soon as C{batch} steps are waiting, the
buffer is written in one transaction (L{FlowStore.record}), on a later
turn of the reactor.  While one write is under way the next steps wait
for it; when the buffer is full (the database is down or slow), the
oldest waiting steps are dropped and counted (L{FlowRecorder.dropped}):
a timeline may lose steps, the server never waits or grows for it.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Optional

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import ILogObserver, Logger
from zope.interface import implementer

from smeldr_oauth.flows.events import EVENTS, step_from_event
from smeldr_oauth.flows.model import Step

log = Logger()


@implementer(ILogObserver)
class FlowRecorder:
    """
    @param store: a L{smeldr_oauth.flows.store.FlowStore}.
    @param clock: schedules the flushes.
    @param interval: seconds between two flushes.
    @param batch: this many waiting steps start a flush at once.
    @param capacity: most steps waiting; beyond it the oldest are dropped.
    """

    def __init__(
        self, store: Any, clock: Any, interval: float = 1.0, batch: int = 500, capacity: int = 10000
    ) -> None:
        self.store = store
        self.clock = clock
        self.interval = interval
        self.batch = batch
        self.dropped = 0
        self._waiting: deque[Step] = deque(maxlen=capacity)
        self._writing: Optional[Deferred[None]] = None
        self._soon: Any = None
        self._loop: Optional[LoopingCall] = None
        self._failing = False

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("smeldr_event") not in EVENTS:
            return
        step = step_from_event(event)
        if step is None:
            return
        waiting = self._waiting
        if len(waiting) == waiting.maxlen:
            self.dropped += 1
        waiting.append(step)
        if len(waiting) >= self.batch and self._soon is None and self._writing is None:
            self._soon = self.clock.callLater(0, self._flush_soon)

    @property
    def waiting(self) -> int:
        """Steps not yet written."""
        return len(self._waiting)

    def start(self) -> None:
        """Flush every C{interval} seconds until L{stop}."""
        self._loop = LoopingCall(self.flush)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=False)

    def stop(self) -> "Deferred[None]":
        """Stop the timer and write what is waiting."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._soon is not None and self._soon.active():
            self._soon.cancel()
        self._soon = None
        return self.flush()

    def _flush_soon(self) -> None:
        self._soon = None
        self.flush()

    def flush(self) -> "Deferred[None]":
        """
        Write the waiting steps in one transaction (the next write waits
        for this one).  Never fails: a database error is logged once per
        outage and the steps are lost.
        """
        if self._writing is not None:
            return self._writing
        if not self._waiting:
            return succeed(None)
        steps = list(self._waiting)
        self._waiting.clear()

        def written(_: object) -> None:
            self._failing = False

        def failed(f: Any) -> None:
            if not self._failing:
                log.failure("could not record {count} flow steps", f, count=len(steps))
            self._failing = True

        def done(_: object) -> None:
            self._writing = None
            if len(self._waiting) >= self.batch:
                self._soon = self._soon or self.clock.callLater(0, self._flush_soon)

        d = self.store.record(steps).addCallbacks(written, failed)
        d.addBoth(done)
        if d.called:
            return d
        self._writing = d
        return d
