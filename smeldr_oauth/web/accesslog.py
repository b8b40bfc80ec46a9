# -*- test-case-name: tests.test_web_accesslog -*-
"""
A faster writer for the access log, for C{twist}'s text log.

twisted.web writes each access-log line through the legacy log: one
C{twisted.logger} event per request, formatted by C{twist}'s file observer
(a local-time timestamp computed per line) and written with its own
C{write} and C{flush}, i.e. one system call per request.  Under load that
was a quarter to a third of a small request's CPU, more than Klein's
routing (see C{docs/performance.md}).

L{BufferedAccessLog} writes the same lines, in the same shape as C{twist
--log-format=text} writes them (C{<time> [twisted.python.log#info]
<line>}), but formats the timestamp once a second and writes the lines in
batches: at the reactor's next turn by default (every request finished in
one turn of the reactor shares one write, and the line is written before
the response leaves: twisted.web sends it when the socket next polls
writable, after the reactor's timed calls), when a batch reaches
C{PIPE_BUF} bytes, and when the site stops.  No line is dropped.

Each C{write} is at most C{PIPE_BUF} bytes (4096) and ends at a line, so
worker processes sharing one pipe never interleave inside a line.

Used only where the format is known: L{for_twist} returns one when C{twist}
writes text and lets C{info} through; otherwise (JSON logs, a raised log
level, the library mounted into someone else's site) the site keeps
twisted.web's own path.
"""

from __future__ import annotations

from typing import IO, Any, Callable, Optional

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import LogLevel, formatTime

#: The system C{twist}'s text observer prints for twisted.web's lines.
SYSTEM = "twisted.python.log#info"

#: POSIX guarantees writes up to this size on a pipe are not interleaved.
PIPE_BUF = 4096


class BufferedAccessLog:
    """
    Access-log lines, timestamped like C{twist}'s text log, written in
    batches.

    @param out: the text file to write to (C{twist}'s log file).
    @param clock: for the timestamps and the flush timer.
    @param interval: the longest a line waits before it is written; 0 (the
        default) writes at the reactor's next turn.
    """

    def __init__(self, out: IO[str], clock: IReactorTime, interval: float = 0.0) -> None:
        self._out = out
        self._clock = clock
        self._interval = interval
        self._lines: list[str] = []
        self._size = 0
        self._second = -1
        self._prefix = ""
        self._timer: Optional[IDelayedCall] = None

    def line(self, text: str) -> None:
        """
        Queue one line (without its newline).
        """
        now = self._clock.seconds()
        second = int(now)
        if second != self._second:
            self._second = second
            self._prefix = f"{formatTime(second)} [{SYSTEM}] "
        entry = self._prefix + text + "\n"
        self._lines.append(entry)
        self._size += len(entry)
        if self._size >= PIPE_BUF:
            self.flush()
        elif self._timer is None:
            self._timer = self._clock.callLater(self._interval, self._tick)

    def _tick(self) -> None:
        self._timer = None
        self.flush()

    def flush(self) -> None:
        """
        Write every queued line now, in writes of at most L{PIPE_BUF} bytes
        that each end at a line.
        """
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        lines, self._lines, self._size = self._lines, [], 0
        chunk: list[str] = []
        size = 0
        for entry in lines:
            if chunk and size + len(entry) > PIPE_BUF:
                self._write("".join(chunk))
                chunk, size = [], 0
            chunk.append(entry)
            size += len(entry)
        if chunk:
            self._write("".join(chunk))

    def _write(self, text: str) -> None:
        self._out.write(text)
        self._out.flush()


def for_twist(options: Any, clock: IReactorTime) -> Optional[BufferedAccessLog]:
    """
    A L{BufferedAccessLog} for the process C{twist} runs with C{options}
    (a plugin's options; their C{parent} is C{twist}'s), or C{None} where
    its lines would not look exactly like twisted.web's: JSON logs, or a
    log level above C{info} (which drops them).
    """
    from twisted.logger import textFileLogObserver

    parent = getattr(options, "parent", None)
    if parent is None:
        return None
    try:
        factory: Callable[..., Any] = parent["fileLogObserverFactory"]
        out = parent["logFile"]
        level = parent["logLevel"]
    except KeyError:
        return None
    if factory is not textFileLogObserver or level > LogLevel.info:
        return None
    return BufferedAccessLog(out, clock)
