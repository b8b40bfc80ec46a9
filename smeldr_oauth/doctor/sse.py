# -*- test-case-name: tests.test_doctor_sse -*-
"""
Judging an event stream's delivery through whatever sits in front of the
server.

The server writes the stream's first bytes at once and a keepalive comment
every C{--keepalive} seconds.  A proxy that buffers responses holds those
bytes back (the client sees nothing, or everything at once when the stream
ends); a proxy with a read or idle timeout shorter than the keepalive
interval cuts the stream after exactly that timeout.  So the doctor keeps a
stream open a little longer than one keepalive interval, notes when each
complete event arrived, and L{judge} reads the timeline: a keepalive must
arrive within the interval (plus a slack), and the stream must stay open.

L{EventTimeline} is fed bytes and times by the fetcher; it and L{judge}
are pure, so the tests give them crafted timelines.
"""

from __future__ import annotations

from typing import Optional

import attr

from smeldr_oauth.doctor.model import Verdict, fail, ok, skip

#: How the stream ended, as L{StreamObservation.ended} says.
WATCHED = "watched"  # still open when the doctor stopped watching: good
CLOSED = "closed"  # the other side ended it
FAILED = "failed"  # no stream at all (see C{error})


def slack(interval: float) -> float:
    """
    How late a keepalive may be before it counts as held back: network
    and scheduling delays, and the server's keepalive timer ticks in
    twentieths of the interval.
    """
    return max(1.0, interval / 4)


def watch_time(interval: float) -> float:
    """
    How long to watch by default: long enough for one keepalive to be
    due and late.
    """
    return interval + slack(interval)


class EventTimeline:
    """
    Split a byte stream into SSE events (frames ended by a blank line) and
    note the time each complete one arrived.
    """

    def __init__(self, limit: int = 1 << 20) -> None:
        self._buffer = b""
        # A CR at the end of a chunk may be the first half of a CRLF.
        self._cr = False
        self._limit = limit
        self.events: list[tuple[float, str]] = []
        self.received = 0

    def feed(self, when: float, data: bytes) -> None:
        """
        @param when: seconds since the request was sent.
        """
        self.received += len(data)
        if self._cr:
            data = b"\r" + data
        self._cr = data.endswith(b"\r")
        if self._cr:
            data = data[:-1]
        self._buffer += data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        while b"\n\n" in self._buffer:
            frame, self._buffer = self._buffer.split(b"\n\n", 1)
            if frame.strip():
                self.events.append((when, _kind(frame)))
        if len(self._buffer) > self._limit:
            self._buffer = b""


def _kind(frame: bytes) -> str:
    """
    C{"comment"} for a frame of comments only (keepalives), else the
    event's type (C{"message"} when it names none).
    """
    lines = frame.split(b"\n")
    if all(line.startswith(b":") for line in lines if line):
        return "comment"
    for line in lines:
        if line.startswith(b"event:"):
            return line[6:].strip().decode("utf-8", "replace") or "message"
    return "message"


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class StreamObservation:
    """
    What watching one stream showed; times are seconds since the request
    was sent.

    @ivar url: the stream's URL.
    @ivar status: the response status, C{None} when none came.
    @ivar content_type: the response's media type.
    @ivar headers_at: when the response headers arrived.
    @ivar events: (time, kind) of each complete event.
    @ivar ended: L{WATCHED}, L{CLOSED} or L{FAILED}.
    @ivar ended_at: when the stream ended or watching stopped.
    @ivar error: for L{FAILED}, what happened.
    @ivar transport: C{"streamable-http"} or C{"sse"} (legacy).
    """

    url: str
    status: Optional[int] = None
    content_type: str = ""
    headers_at: Optional[float] = None
    events: tuple[tuple[float, str], ...] = ()
    ended: str = FAILED
    ended_at: float = 0.0
    error: Optional[str] = None
    transport: str = "streamable-http"


_BUFFERING_FIX = (
    "Something between the client and the server buffers responses: turn it off for the MCP path "
    "(nginx: proxy_buffering off, and do not set proxy_ignore_headers X-Accel-Buffering; "
    "disable response compression for text/event-stream; CDNs: bypass caching for /mcp)."
)


def judge(observation: Optional[StreamObservation], interval: float, reason: str = "") -> Verdict:
    """
    The stream check's verdict.

    @param interval: the server's keepalive interval (C{--keepalive}).
    @param reason: why there is no observation (no credentials).
    """
    if observation is None:
        return skip("stream", reason or "needs a token: give --site-token-file or --access-token-file")
    o = observation
    late = interval + slack(interval)
    where = f"GET {o.url}"
    if o.ended == FAILED and o.status is None:
        if o.error and "timed out" in o.error:
            return fail(
                "stream",
                f"{where}: not even the response headers within {o.ended_at:.1f} s: something buffers "
                "the stream",
                _BUFFERING_FIX,
                interval=interval,
            )
        return fail("stream", f"{where}: {o.error or 'no answer'}", "The MCP URL must reach the server.")
    if o.status != 200 or not o.content_type.startswith("text/event-stream"):
        return fail(
            "stream",
            f"{where} answered {o.status} {o.content_type or 'without a content type'}, not an event stream",
            "Let GET requests with Accept: text/event-stream reach the server unchanged.",
            status=o.status,
        )
    start = o.headers_at if o.headers_at is not None else 0.0
    times = [start] + [t for t, _ in o.events]
    keepalives = sum(1 for _, kind in o.events[1:] if kind == "comment")
    details = {
        "interval": interval,
        "events": [[round(t, 3), kind] for t, kind in o.events],
        "ended": o.ended,
        "ended_at": round(o.ended_at, 3),
        "transport": o.transport,
    }
    if o.ended == CLOSED:
        lifetime = o.ended_at - start
        burst = len(o.events) > 1 and all(o.ended_at - t < 0.25 for t, _ in o.events) and lifetime > late
        if burst or (not o.events and lifetime > late):
            return fail(
                "stream",
                f"nothing arrived for {lifetime:.1f} s, then the stream closed: a proxy buffered it",
                _BUFFERING_FIX,
                **details,
            )
        if not keepalives:
            return fail(
                "stream",
                f"the stream was closed after {lifetime:.1f} s, before the first keepalive "
                f"(sent every {interval:g} s): an idle or read timeout in front of the server",
                "Raise the proxy's timeout for /mcp above the keepalive interval, to an hour or more "
                "(HAProxy: timeout server / timeout tunnel; nginx: proxy_read_timeout), or lower "
                "--keepalive below it.",
                **details,
            )
        return fail(
            "stream",
            f"the stream was closed after {lifetime:.1f} s although keepalives arrived: a limit on how "
            "long a response may last",
            "Raise the proxy's or platform's maximum response duration for /mcp (clients reconnect, "
            "but every cut loses the events in flight).",
            **details,
        )
    times.append(o.ended_at)
    gap = max(b - a for a, b in zip(times, times[1:]))
    if gap > late or not o.events:
        return fail(
            "stream",
            f"no event for {gap:.1f} s on an open stream (a keepalive is sent every {interval:g} s): "
            "something buffers the stream",
            _BUFFERING_FIX,
            **details,
        )
    if not keepalives:
        return fail(
            "stream",
            f"no keepalive in {o.ended_at - start:.1f} s (sent every {interval:g} s)",
            "If the server runs with a longer --keepalive, give it to doctor (--keepalive); "
            "else something holds the stream back. " + _BUFFERING_FIX,
            **details,
        )
    return ok(
        "stream",
        f"{keepalives} keepalive(s) in {o.ended_at - start:.1f} s, longest silence {gap:.1f} s "
        f"({o.transport})",
        **details,
    )
