# -*- test-case-name: tests.test_flows_recorder -*-
"""
The log observer that feeds the timeline.

The request path must not wait for the timeline: an observer is called
synchronously by whoever logs, in the middle of a token refresh or a tool
call.  So L{FlowRecorder} only appends the events it keeps to a bounded
in-memory buffer (one set look-up for the events it does not keep).
Every C{interval} seconds, or as soon as C{batch} events are waiting, the
buffer is turned into L{Step}s (L{step_from_event}: the allow-listed
fields only) and written (L{FlowStore.record}), on a later turn of the
reactor, at most C{batch} steps a transaction: a longer backlog goes in
more writes on the turns that follow, with requests served between them.
Each write also enforces the per-client and per-grant limits
(L{FlowStore.record}) of at most C{trim_batch} of the clients and grants
written since their last trim, oldest first; the age and total limits
with every write.  Why slices: on SQLite on the reactor thread a write
stops the reactor for as long as it takes; 500 steps in one write took
3.5-16 ms, and the limits of 50 grants at once, every 30 writes, 25-95 ms
(each grant's steps of thirty writes to delete at once), the longest
stops under a refresh load (C{docs/performance.md}, round six).  While one
write is under way the next steps wait for it; when the buffer is full (the
database is down or slow), the oldest waiting steps are dropped and
counted (L{FlowRecorder.dropped}): a timeline may lose steps, the server
never waits or grows for it.

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

Refreshes are coalesced the same way: the C{token_issued} events of the
refresh grant waiting for one write that name the same client and grant
make one C{refreshed} step with their number.  A rotation chain
refreshing many times a second was a row per refresh (one insert into a
table with four indexes, and its WAL pages, in the refresh's own group
commit, and a delete later): 3.3% of a refresh's profile under the
bench's 50 chains, and enough rows to push every other client's steps
out of the table.  Every other protocol event (a code exchange, a
grant, a refusal, a call) stays its own step.
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

#: The events that are coalesced: the site's hook (one per request) and
#: token issues (one per refresh; only the refresh grant's, L{_coalesced}).
_HTTP_STEP = "http_step"
_TOKEN_ISSUED = "token_issued"
#: The fields of an event its step is made of (L{step_from_event}): two
#: events of one name equal on these make the same step but for the time.
_SAME_STEP = ("path", "status", "error", "client_id", "grant_id", "address") + tuple(
    f for f in DETAIL_FIELDS if f != "path"
)


def _coalesced(name: Any, event: dict[str, Any]) -> bool:
    """Whether an event of C{name} is counted with its identical neighbours."""
    return name == _HTTP_STEP or (name == _TOKEN_ISSUED and event.get("grant_type") == "refresh_token")


def _step_key(event: dict[str, Any]) -> Optional[tuple[Any, ...]]:
    """What makes a coalesced event's step, or C{None} (not comparable)."""
    get = event.get
    key = (get("smeldr_event"), *map(get, _SAME_STEP))
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
    @param batch: this many waiting steps start a write at once, and a
        write takes at most this many.
    @param capacity: most steps waiting; beyond it the oldest are dropped.
    @param trim_batch: the most clients and grants whose limits one
        write enforces.
    """

    def __init__(
        self,
        store: IFlowStore,
        clock: Any,
        interval: float = 1.0,
        batch: int = 100,
        capacity: int = 10000,
        trim_batch: int = 10,
    ) -> None:
        self.store = store
        self.clock = clock
        self.interval = interval
        self.batch = batch
        self.dropped = 0
        self.trim_batch = trim_batch
        self._waiting: deque[dict[str, Any]] = deque(maxlen=capacity)
        # Waiting http_step events by what makes their step: how many
        # identical ones arrived (see the module docstring).
        self._repeats: dict[tuple[Any, ...], int] = {}
        # Clients and grants written since their limits were last
        # enforced, oldest first (dicts as ordered sets).
        self._clients: dict[str, None] = {}
        self._grants: dict[str, None] = {}
        self._capacity = capacity
        self._writing: Optional[Deferred[None]] = None
        self._soon: Any = None
        self._loop: Optional[LoopingCall] = None
        self._failing = False
        self._stopped = False

    def __call__(self, event: dict[str, Any]) -> None:
        name = event.get("smeldr_event")
        if name not in EVENTS:
            return
        if _coalesced(name, event):
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
            key = _step_key(oldest) if _coalesced(oldest.get("smeldr_event"), oldest) else None
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
        """
        Stop the timer and write what is waiting: all of it, after the
        write under way if there is one.
        """
        self._stopped = True
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._soon is not None and self._soon.active():
            self._soon.cancel()
        self._soon = None
        if self._writing is None:
            return self.flush(final=True)
        finished: Deferred[None] = Deferred()

        def then(_: object) -> None:
            self.flush(final=True).chainDeferred(finished)

        self._writing.addBoth(then)
        return finished

    def _flush_soon(self) -> None:
        self._soon = None
        self.flush()

    def flush(self, final: bool = False) -> "Deferred[None]":
        """
        Write up to C{batch} waiting steps in one transaction (the next
        write waits for this one; a longer backlog follows on the next
        turns).  Never fails: a database error is logged once per outage
        and the steps are lost.

        @param final: write every waiting step, and enforce the limits of
            every client and grant waiting for it, now.
        """
        if self._writing is not None:
            return self._writing
        waiting = self._waiting
        if not waiting:
            return succeed(None)
        take = len(waiting) if final else min(len(waiting), self.batch)
        events = [waiting.popleft() for _ in range(take)]
        steps: list[Step] = []
        repeats = self._repeats
        for event in events:
            step = step_from_event(event)
            if repeats and _coalesced(event.get("smeldr_event"), event):
                key = _step_key(event)
                count = repeats.pop(key, 1) if key is not None else 1
                if count > 1 and step is not None:
                    step = attr.evolve(step, detail={**step.detail, REPEATS: str(count)})
            if step is not None:
                steps.append(step)
        clients, grants = self._clients, self._grants
        for step in steps:
            if step.client_id is not None and len(clients) < self._capacity:
                clients[step.client_id] = None
            if step.grant_id is not None and len(grants) < self._capacity:
                grants[step.grant_id] = None
        trim = self._due(final)

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
            # A full write may have left a backlog: the next slice on the
            # next turn, until one is not full.
            if self._stopped:
                return
            if self._waiting and (take >= self.batch or len(self._waiting) >= self.batch):
                self._soon = self._soon or self.clock.callLater(0, self._flush_soon)

        d = self.store.record(steps, trim).addCallbacks(written, failed)
        d.addBoth(done)
        if d.called:
            return d
        self._writing = d
        return d

    def _due(self, final: bool) -> tuple[set[str], set[str]]:
        """
        The clients and grants whose limits the next write enforces: the
        C{trim_batch} written longest ago (all when C{final}), taken off
        the waiting list.
        """
        clients: set[str] = set()
        grants: set[str] = set()
        for pending, due in ((self._clients, clients), (self._grants, grants)):
            while pending and (final or len(clients) + len(grants) < self.trim_batch):
                oldest = next(iter(pending))
                del pending[oldest]
                due.add(oldest)
        return clients, grants
