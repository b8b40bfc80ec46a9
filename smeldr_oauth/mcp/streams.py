# -*- test-case-name: tests.test_mcp_streams -*-
"""
Server-Sent Events responses on Klein/twisted.web, with the three things a
long-lived stream needs on the open internet:

  - keepalive comments, so proxies (and ChatGPT) do not drop an idle stream;
  - a bounded outgoing queue: the stream is a streaming producer of its
    request, so when the client stops reading and the transport's buffer
    fills, writes queue here instead; past C{max_queue} queued events the
    client is disconnected rather than buffered without limit;
  - an end the server controls: L{SSEStream.done} is the L{Deferred} the
    Klein route returns (Klein cancels it when the client goes away; firing
    it finishes the response).

L{Deadlines} is the one timer behind per-stream deadlines (for MCP: when a
stream's access token must be checked again, or expires).  L{StreamOptions}
makes every stream of one endpoint with the same settings.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from typing import Callable, Hashable, Optional

import attr
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from smeldr_oauth.mcp.shedding import shed

log = Logger()


def format_event(data: str, event: Optional[str] = None, event_id: Optional[str] = None) -> bytes:
    """
    One SSE frame.  Multi-line data becomes several C{data:} lines, so a
    newline in a payload cannot end the event early or inject fields.
    """
    lines = []
    if event_id is not None:
        lines.append(f"id: {_one_line(event_id)}")
    if event is not None:
        lines.append(f"event: {_one_line(event)}")
    for line in data.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        lines.append(f"data: {line}")
    return ("\n".join(lines) + "\n\n").encode("utf-8")


def _one_line(value: str) -> str:
    return value.replace("\r", " ").replace("\n", " ")


class KeepaliveTimer:
    """
    One timer for the keepalive comments of many streams.

    A timer per stream (a L{LoopingCall} and its delayed call) costs about
    0.6 KiB; with 10,000 idle streams that is 6 MiB for nothing.  Here the
    interval is cut into C{slots} ticks and each stream joins the bucket
    that the timer has just swept, so it is next visited one whole interval
    later (at least C{interval - interval / slots} after it started) and
    then every C{interval}: the keepalives stay spread over the interval
    instead of leaving in one burst, and each tick writes to about
    C{1 / slots} of the streams.  The timer runs only while a stream is
    registered.
    """

    __slots__ = ("_clock", "interval", "_tick", "_buckets", "_next", "_due", "_call", "_count")

    def __init__(self, clock: IReactorTime, interval: float, slots: int = 20) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        self._clock = clock
        self.interval = interval
        self._tick = interval / slots
        # Dicts keep insertion order and remove in O(1).
        self._buckets: list[dict["SSEStream", None]] = [{} for _ in range(slots)]
        self._next = 0
        self._due = 0.0
        self._call: Optional[IDelayedCall] = None
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, stream: "SSEStream") -> int:
        """Send C{stream} a keepalive every interval; return its bucket."""
        slot = (self._next - 1) % len(self._buckets)
        self._buckets[slot][stream] = None
        self._count += 1
        if self._call is None:
            self._due = self._clock.seconds() + self._tick
            self._call = self._clock.callLater(self._tick, self._fire)
        return slot

    def remove(self, stream: "SSEStream", slot: int) -> None:
        if self._buckets[slot].pop(stream, 0) is None:
            self._count -= 1
            if self._count == 0 and self._call is not None:
                if self._call.active():
                    self._call.cancel()
                self._call = None

    def _fire(self) -> None:
        self._call = None
        bucket = self._buckets[self._next]
        self._next = (self._next + 1) % len(self._buckets)
        for stream in list(bucket):
            try:
                stream.comment("keepalive")
            except Exception:
                log.failure("SSE keepalive failed")
        if self._count:
            # Scheduled from the planned time, not from now, so that a
            # late tick does not push every later keepalive back.
            self._due += self._tick
            now = self._clock.seconds()
            if self._due < now - self.interval:
                self._due = now
            self._call = self._clock.callLater(max(0.0, self._due - now), self._fire)


class Deadlines:
    """
    One timer for the deadlines of many keys (for MCP, one per open stream:
    when its access token must be verified again, or expires).

    A delayed call per stream would cost what L{KeepaliveTimer} saves, so
    the deadlines sit in a heap behind a single delayed call armed for the
    earliest one.  Deadlines are rounded I{up} to C{granularity} seconds,
    so keys due about the same time are handled in one firing (with 10,000
    streams checked every 30 s, about one firing a second instead of 333);
    a deadline is thus met at most C{granularity} late, never early.
    Rescheduling or cancelling leaves the old heap entry behind to be
    skipped when it surfaces (the heap is rebuilt when such entries pile
    up).

    @param fire: called with each key whose deadline has come; the key is
        no longer scheduled then (C{fire} may schedule it again).
    """

    __slots__ = ("_clock", "_fire", "_granularity", "_heap", "_when", "_call", "_seq")

    def __init__(self, clock: IReactorTime, fire: Callable[[Hashable], None], granularity: float = 1.0) -> None:
        if granularity <= 0:
            raise ValueError("granularity must be positive")
        self._clock = clock
        self._fire = fire
        self._granularity = granularity
        self._heap: list[tuple[float, int, Hashable]] = []
        self._when: dict[Hashable, tuple[float, int]] = {}
        self._call: Optional[IDelayedCall] = None
        self._seq = 0

    def __len__(self) -> int:
        return len(self._when)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._when

    def when(self, key: Hashable) -> Optional[float]:
        """The (rounded) deadline of C{key}, or C{None}."""
        entry = self._when.get(key)
        return entry[0] if entry is not None else None

    def schedule(self, key: Hashable, when: float) -> None:
        """Call C{fire(key)} at C{when} (replacing any earlier deadline of C{key})."""
        if math.isinf(when):
            self.cancel(key)
            return
        when = math.ceil(when / self._granularity) * self._granularity
        self._seq += 1
        self._when[key] = (when, self._seq)
        # (when, seq) is unique, so keys themselves are never compared.
        heapq.heappush(self._heap, (when, self._seq, key))
        if len(self._heap) > 2 * len(self._when) + 64:
            self._heap = [(w, seq, k) for k, (w, seq) in self._when.items()]
            heapq.heapify(self._heap)
        self._arm()

    def cancel(self, key: Hashable) -> None:
        if self._when.pop(key, None) is not None and not self._when:
            self._heap = []
            self._arm()

    def _arm(self) -> None:
        heap = self._heap
        while heap and self._when.get(heap[0][2]) != heap[0][:2]:
            heapq.heappop(heap)
        if not heap:
            if self._call is not None and self._call.active():
                self._call.cancel()
            self._call = None
            return
        target = heap[0][0]
        if self._call is not None and self._call.active():
            if self._call.getTime() <= target:
                return
            self._call.cancel()
        self._call = self._clock.callLater(max(0.0, target - self._clock.seconds()), self._run)

    def _run(self) -> None:
        self._call = None
        now = self._clock.seconds()
        due = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            when, seq, key = heapq.heappop(heap)
            if self._when.get(key) == (when, seq):
                del self._when[key]
                due.append(key)
        for key in due:
            try:
                self._fire(key)
            except Exception:
                log.failure("deadline handler failed")
        self._arm()


@implementer(IPushProducer)
class SSEStream:
    """
    A C{text/event-stream} response.

    Idle streams are what a server holds by the thousand, so this keeps
    its footprint small: C{__slots__}, no queue until the client stops
    reading, and (given a L{KeepaliveTimer}) no timer of its own.

    @ivar done: return this from the Klein route after L{start}.
    @ivar closed: C{True} once the stream ended, whichever side ended it.
    """

    __slots__ = (
        "_request",
        "_clock",
        "_keepalive_interval",
        "_keepalive_timer",
        "_slot",
        "_max_queue",
        "_on_close",
        "_queue",
        "_paused",
        "_keepalive",
        "closed",
        "done",
    )

    def __init__(
        self,
        request: object,
        clock: IReactorTime,
        *,
        keepalive_interval: Optional[float] = 15.0,
        max_queue: int = 256,
        on_close: Optional[Callable[["SSEStream"], None]] = None,
        done: Optional[Deferred] = None,
        keepalive_timer: Optional[KeepaliveTimer] = None,
    ) -> None:
        """
        @param keepalive_timer: a timer shared by many streams; when given,
            its interval replaces C{keepalive_interval}.
        """
        self._request = request
        self._clock = clock
        self._keepalive_interval = keepalive_interval
        self._keepalive_timer = keepalive_timer
        self._slot = -1
        self._max_queue = max_queue
        self._on_close = on_close
        # Created when the client first stops reading.
        self._queue: Optional[deque[bytes]] = None
        self._paused = False
        self._keepalive: Optional[LoopingCall] = None
        self.closed = False
        # An owner that already returned a Deferred to Klein passes it as
        # `done`, and must call client_gone() from its canceller.
        self.done: Deferred = done if done is not None else Deferred(self._client_gone)

    def start(self, first: bytes = b": stream open\n\n", headers: Optional[dict[bytes, bytes]] = None) -> Deferred:
        """
        Send the headers and the first bytes (so the client sees the stream
        open at once), start keepalives.

        @return: L{done}, for the route to return.
        """
        request = self._request
        request.setResponseCode(200)  # type: ignore[attr-defined]
        request.setHeader(b"Content-Type", b"text/event-stream; charset=utf-8")  # type: ignore[attr-defined]
        # no-store: events carry tool results for one token's owner; no
        # cache (browser or proxy) may keep them.
        request.setHeader(b"Cache-Control", b"no-store, no-transform")  # type: ignore[attr-defined]
        # nginx and similar proxies buffer responses unless told otherwise.
        request.setHeader(b"X-Accel-Buffering", b"no")  # type: ignore[attr-defined]
        for name, value in (headers or {}).items():
            request.setHeader(name, value)  # type: ignore[attr-defined]
        request.registerProducer(self, True)  # type: ignore[attr-defined]
        request.write(first)  # type: ignore[attr-defined]
        shed(request)
        if self._keepalive_timer is not None:
            self._slot = self._keepalive_timer.add(self)
        elif self._keepalive_interval:
            self._keepalive = LoopingCall(self.comment, "keepalive")
            self._keepalive.clock = self._clock
            self._keepalive.start(self._keepalive_interval, now=False)
        return self.done

    def send(self, data: str, event: Optional[str] = None, event_id: Optional[str] = None) -> None:
        """Queue or write one event."""
        self._write(format_event(data, event, event_id))

    def comment(self, text: str) -> None:
        self._write(f": {_one_line(text)}\n\n".encode("utf-8"))

    def _write(self, frame: bytes) -> None:
        if self.closed:
            return
        if self._paused:
            if self._queue is None:
                self._queue = deque()
            self._queue.append(frame)
            if len(self._queue) > self._max_queue:
                log.warn("SSE client stopped reading; disconnecting it ({queued} events queued)", queued=len(self._queue))
                self.abort()
            return
        self._request.write(frame)  # type: ignore[attr-defined]

    def close(self) -> None:
        """End the stream from the server side (the response finishes)."""
        if self.closed:
            return
        self._cleanup()
        try:
            self._request.unregisterProducer()  # type: ignore[attr-defined]
        except Exception:
            pass
        if not self.done.called:
            self.done.callback(b"")

    def abort(self) -> None:
        """Drop the connection at once (a consumer that stopped reading)."""
        if self.closed:
            return
        self._cleanup()
        transport = getattr(getattr(self._request, "channel", None), "transport", None)
        # Klein notices the lost connection and cancels `done`; firing it
        # here would make Klein render an error page on a started response.
        if transport is not None and hasattr(transport, "abortConnection"):
            transport.abortConnection()
        elif transport is not None:
            transport.loseConnection()
        elif not self.done.called:
            self.done.callback(b"")

    def _client_gone(self, _: Deferred) -> None:
        # Klein cancels `done` when the connection is lost.
        self._cleanup()

    def client_gone(self) -> None:
        """The connection was lost (for owners of an external C{done})."""
        self._cleanup()

    def _cleanup(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._queue = None
        if self._slot >= 0 and self._keepalive_timer is not None:
            self._keepalive_timer.remove(self, self._slot)
            self._slot = -1
        if self._keepalive is not None and self._keepalive.running:
            self._keepalive.stop()
        if self._on_close is not None:
            callback, self._on_close = self._on_close, None
            callback(self)

    # IPushProducer: the transport tells us when the client is not reading.

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        while self._queue and not self._paused and not self.closed:
            self._request.write(self._queue.popleft())  # type: ignore[attr-defined]
        if not self._queue:
            self._queue = None

    def stopProducing(self) -> None:
        # The connection is going away; Klein will cancel `done`.
        self._cleanup()


@attr.s(frozen=True, auto_attribs=True)
class StreamOptions:
    """
    How one endpoint's streams are made: its clock, keepalive interval
    (and the one timer sending them, see L{KeepaliveTimer}), and how many
    events may queue for a client that stopped reading.
    """

    clock: IReactorTime
    keepalive_interval: float = 15.0
    max_queue: int = 256
    keepalive_timer: Optional[KeepaliveTimer] = attr.ib(default=None)

    @classmethod
    def shared(cls, clock: IReactorTime, keepalive_interval: float, max_queue: int) -> "StreamOptions":
        """Options whose streams share one keepalive timer."""
        timer = KeepaliveTimer(clock, keepalive_interval) if keepalive_interval else None
        return cls(clock, keepalive_interval, max_queue, timer)

    def stream(
        self,
        request: object,
        on_close: Optional[Callable[[SSEStream], None]] = None,
        done: Optional[Deferred] = None,
    ) -> SSEStream:
        return SSEStream(
            request,
            self.clock,
            keepalive_interval=self.keepalive_interval,
            keepalive_timer=self.keepalive_timer,
            max_queue=self.max_queue,
            on_close=on_close,
            done=done,
        )
