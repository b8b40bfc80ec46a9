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

Identical C{http_step}s waiting for the same write are kept once, with
how many there were (the step's L{REPEATS} detail, L{Step.count}): the
same discovery request from the same address, answered the same way, a
client polling the metadata or retrying a refused call.  A step per
request made every metadata C{GET} a row to insert, index and later
delete: 500 of them in one write every few tens of milliseconds under
load, a 5-7 ms stop of the reactor each time and the whole of the
metadata documents' tail latency beyond the bare twisted.web floor's
(C{docs/performance.md}, round six).  It also let one busy poller push
every other client's steps out of the table (L{Retention.total}).  What
is kept is what the steps said, each request counted; only the time of
the later ones goes.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Optional

import attr

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import ILogObserver, Logger
from zope.interface import implementer

from smeldr_oauth.db.errors import StoreUnavailable
from smeldr_oauth.flows.events import DETAIL_FIELDS, EVENTS, step_from_event
from smeldr_oauth.flows.model import REPEATS, Step
from smeldr_oauth.flows.store import IFlowStore

log = Logger()

#: The event that is coalesced (the site's hook, one per request).
_HTTP_STEP = "http_step"
#: The fields of an C{http_step} event its step is made of
#: (L{step_from_event}): two events equal on these make the same step but
#: for the time.
_SAME_STEP = ("path", "status", "error", "client_id", "grant_id", "address") + tuple(
    f for f in DETAIL_FIELDS if f != "path"
)


def _step_key(event: dict[str, Any]) -> Optional[tuple[Any, ...]]:
    """What makes an C{http_step} event's step, or C{None} (not comparable)."""
    key = tuple([event.get(name) for name in _SAME_STEP])
    try:
        hash(key)
    except TypeError:
        return None
    return key


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
        # Waiting http_step events by what makes their step: how many
        # identical ones arrived (see the module docstring).
        self._repeats: dict[tuple[Any, ...], int] = {}
        self._writes = 0
        self._clients: set[str] = set()
        self._grants: set[str] = set()
        self._capacity = capacity
        self._writing: Optional[Deferred[None]] = None
        self._soon: Any = None
        self._loop: Optional[LoopingCall] = None
        self._failing = False

    def __call__(self, event: dict[str, Any]) -> None:
        name = event.get("smeldr_event")
        if name not in EVENTS:
            return
        if name == _HTTP_STEP:
            key = _step_key(event)
            if key is not None:
                repeats = self._repeats
                if key in repeats:
                    repeats[key] += 1
                    return
                repeats[key] = 1
        waiting = self._waiting
        if len(waiting) == waiting.maxlen:
            # The oldest goes, with the requests it stood for.
            oldest = waiting[0]
            dropped = 1
            key = _step_key(oldest) if oldest.get("smeldr_event") == _HTTP_STEP else None
            if key is not None:
                dropped = self._repeats.pop(key, 1)
            self.dropped += dropped
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
        repeats, self._repeats = self._repeats, {}
        for event in self._waiting:
            step = step_from_event(event)
            if step is None:
                continue
            if repeats and event.get("smeldr_event") == _HTTP_STEP:
                key = _step_key(event)
                count = repeats.get(key, 1) if key is not None else 1
                if count > 1:
                    step = attr.evolve(step, detail={**step.detail, REPEATS: str(count)})
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
