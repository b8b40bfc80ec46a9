# -*- test-case-name: tests.test_flows_recorder -*-
"""
The log observer that feeds the timeline.

The request path must not wait for the timeline: an observer is called
synchronously by whoever logs, in the middle of a token refresh or a tool
call.  So L{FlowRecorder} only appends the events it keeps to a bounded
in-memory buffer (one set look-up for the events it does not keep).
Every C{interval} seconds, or as soon as C{batch} events are waiting, the
buffer is turned into L{Step}s (L{step_from_event}: the allow-listed
fields only) and written in one transaction (L{FlowStore.record}), on a
later turn of the reactor.  The per-client and per-grant limits are
enforced every C{trim_every} writes, for the clients and grants written
since (L{FlowStore.trim}); the age and total limits with every write.  While one write is under way the next steps wait
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

from smeldr_oauth.db.errors import StoreUnavailable
from smeldr_oauth.flows.events import EVENTS, step_from_event
from smeldr_oauth.flows.model import Step
from smeldr_oauth.flows.store import IFlowStore

log = Logger()


@implementer(ILogObserver)
class FlowRecorder:
    """
    @param store: where the steps go.
    @param clock: schedules the flushes.
    @param interval: seconds between two flushes.
    @param batch: this many waiting steps start a flush at once.
    @param capacity: most steps waiting; beyond it the oldest are dropped.
    """

    def __init__(
        self,
        store: IFlowStore,
        clock: Any,
        interval: float = 1.0,
        batch: int = 500,
        capacity: int = 10000,
        trim_every: int = 30,
    ) -> None:
        self.store = store
        self.clock = clock
        self.interval = interval
        self.batch = batch
        self.dropped = 0
        self.trim_every = trim_every
        self._waiting: deque[dict[str, Any]] = deque(maxlen=capacity)
        self._writes = 0
        self._clients: set[str] = set()
        self._grants: set[str] = set()
        self._capacity = capacity
        self._writing: Optional[Deferred[None]] = None
        self._soon: Any = None
        self._loop: Optional[LoopingCall] = None
        self._failing = False

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("smeldr_event") not in EVENTS:
            return
        waiting = self._waiting
        if len(waiting) == waiting.maxlen:
            self.dropped += 1
        waiting.append(event)
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
        return self.flush(final=True)

    def _flush_soon(self) -> None:
        self._soon = None
        self.flush()

    def flush(self, final: bool = False) -> "Deferred[None]":
        """
        Write the waiting steps in one transaction (the next write waits
        for this one).  Never fails: a database error is logged once per
        outage and the steps are lost.

        @param final: enforce the per-client and per-grant limits now.
        """
        if self._writing is not None:
            return self._writing
        if not self._waiting:
            return succeed(None)
        steps: list[Step] = []
        for event in self._waiting:
            step = step_from_event(event)
            if step is not None:
                steps.append(step)
        self._waiting.clear()
        self._writes += 1
        clients, grants = self._clients, self._grants
        for step in steps:
            if step.client_id is not None and len(clients) < self._capacity:
                clients.add(step.client_id)
            if step.grant_id is not None and len(grants) < self._capacity:
                grants.add(step.grant_id)
        trim: Any = False
        if self._writes % self.trim_every == 0 or final:
            trim = (clients, grants)
            self._clients, self._grants = set(), set()

        def written(_: object) -> None:
            self._failing = False

        def failed(f: Any) -> None:
            if not self._failing:
                if f.check(StoreUnavailable):
                    # An outage is the operator's to see once, not a bug:
                    # one line, as every endpoint writes it.
                    log.warn("could not record {count} flow steps: {error}", count=len(steps), error=str(f.value))
                else:
                    log.failure("could not record {count} flow steps", f, count=len(steps))
            self._failing = True

        def done(_: object) -> None:
            self._writing = None
            if len(self._waiting) >= self.batch:
                self._soon = self._soon or self.clock.callLater(0, self._flush_soon)

        d = self.store.record(steps, trim).addCallbacks(written, failed)
        d.addBoth(done)
        if d.called:
            return d
        self._writing = d
        return d
