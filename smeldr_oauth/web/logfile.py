# -*- test-case-name: tests.test_web_logfile -*-
"""
C{twist}'s log file, written in batches: the one place for the rule by
which the server's lines (its events and the access log) reach the file.

C{twist --log-format=text} formats each event with a local-time timestamp
computed per line and writes it with its own C{write} and C{flush}: one
system call per event.  Under load that is most of what an info line
costs (about 3% of a full OAuth flow, see C{docs/performance.md}).
L{BatchedWriter} keeps the lines of one turn of the reactor and writes
them together at the next turn (or after C{interval} seconds), when a
batch reaches C{PIPE_BUF} bytes, when the reactor shuts down and at
interpreter exit.  Each C{write} is at most C{PIPE_BUF} bytes (4096) and
ends at a line, so worker processes sharing one pipe never interleave
inside a line.  Nothing is dropped: a line that cannot wait for a turn of
the reactor (logged by another thread, or after the shutdown) is written at
once, after what is queued.

L{BufferedTextObserver} writes C{twist}'s text lines byte for byte
(C{formatEventAsClassicLogText}, the timestamp formatted once a second);
L{for_twist} puts it in place of C{twist}'s observer, and the access log
(L{smeldr_oauth.web.accesslog}) writes through the same writer, so the
two stay in order in the file.

It lives on the web edge, beside the access log it was first written for,
so that L{smeldr_oauth.web.accesslog} need not import the wiring
(C{service/}) above it; the wiring puts the event log on it.
"""

from __future__ import annotations

import atexit
import threading
from typing import IO, Any, Callable, Optional

from twisted.internet.interfaces import IDelayedCall, IReactorCore, IReactorTime
from twisted.logger import (
    ILogObserver,
    LogEvent,
    formatEventAsClassicLogText,
    formatTime,
    textFileLogObserver,
)
from zope.interface import implementer

#: POSIX guarantees writes up to this size on a pipe are not interleaved.
PIPE_BUF = 4096

#: Where L{for_twist} keeps the writer in C{twist}'s options, so that the
#: event log and the access log share one.
_WRITER = "smeldr_oauth.batched_writer"


class BatchedWriter:
    """
    Text for one file, written in batches.

    @param out: the text file (C{twist}'s log file).
    @param clock: schedules the flush.
    @param interval: the longest a line waits before it is written; 0 (the
        default) writes at the reactor's next turn.
    """

    def __init__(self, out: IO[str], clock: IReactorTime, interval: float = 0.0) -> None:
        self._out = out
        self._clock = clock
        self._interval = interval
        self._lines: list[str] = []
        self._size = 0
        self._timer: Optional[IDelayedCall] = None
        # Only the thread that made the writer (the reactor's) queues:
        # the queue and the timer are not for other threads to touch.
        self._thread = threading.get_ident()
        self._stopped = False

    def write(self, text: str) -> None:
        """
        Queue C{text}: one or more whole lines, each ending with a newline.
        """
        if self._stopped or threading.get_ident() != self._thread:
            # No turn of the reactor will come (or not ours to schedule):
            # write now, after what waits when we may touch the queue.
            if threading.get_ident() == self._thread:
                self.flush()
            self._write(text)
            return
        self._lines.append(text)
        self._size += len(text)
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

    def stop(self) -> None:
        """
        Write what waits; from now on every line is written at once (the
        reactor is shutting down: its timers will not run again).
        """
        self.flush()
        self._stopped = True

    def _write(self, text: str) -> None:
        self._out.write(text)
        self._out.flush()


@implementer(ILogObserver)
class BufferedTextObserver:
    """
    C{twist}'s text observer (L{textFileLogObserver}), through a
    L{BatchedWriter}: the same lines, the RFC 3339 timestamp formatted once
    per second rather than once per line.
    """

    def __init__(self, writer: BatchedWriter) -> None:
        self._writer = writer
        self._second: Optional[int] = None
        self._stamp = ""

    def _time(self, when: Optional[float]) -> str:
        if when is None:
            return formatTime(when)
        # The format has whole seconds: one per second is exact.
        second = int(when // 1)
        if second != self._second:
            self._second = second
            self._stamp = formatTime(second)
        return self._stamp

    def __call__(self, event: LogEvent) -> None:
        text = self._fast(event)
        if text is None:
            text = formatEventAsClassicLogText(event, formatTime=self._time)
        if text:
            self._writer.write(text)

    def _fast(self, event: LogEvent) -> Optional[str]:
        """
        The line of a plain event (a text format of C{{name}} fields, no
        failure), as L{formatEventAsClassicLogText} writes it, or C{None}
        for every other event (and whatever fails here): twisted's own
        path then writes it.  Twisted's path wraps each field in a
        call-aware mapping, and evaluates C{typing} constructs per event;
        C{str.format_map} gives the same text for these in about a third of
        the time (a test compares the two).
        """
        fmt = event.get("log_format")
        if type(fmt) is not str or "log_failure" in event or "log_flattened" in event:
            return None
        try:
            text = fmt.format_map(event)
            system = event.get("log_system")
            if system is None:
                level = event.get("log_level")
                system = f"{event.get('log_namespace', '-')}#{'-' if level is None else level.name}"
            elif type(system) is not str:
                return None
        except Exception:
            return None
        if not text:
            return None
        line = f"{self._time(event.get('log_time'))} [{system}] {text}"
        return line.replace("\n", "\n\t") + "\n"


def for_twist(options: Any, reactor: IReactorTime) -> Optional[BatchedWriter]:
    """
    Where C{twist} writes text (C{--log-format=text}, or a terminal): the
    L{BatchedWriter} for its log file, with C{twist}'s observer replaced by a
    L{BufferedTextObserver} on it (C{twist} starts its logging after the
    plugin made its service, from these options), flushed at the reactor's
    shutdown and at exit.  C{None} where C{twist} writes JSON or does not run
    this plugin (C{options} has no C{twist} parent).  Called again with the
    same options, it returns the same writer.

    @param options: the plugin's options; their C{parent} is C{twist}'s.
    """
    parent = getattr(options, "parent", None)
    if parent is None:
        return None
    writer: Optional[BatchedWriter] = parent.get(_WRITER)
    if writer is not None:
        return writer
    try:
        factory: Callable[..., Any] = parent["fileLogObserverFactory"]
        out = parent["logFile"]
    except KeyError:
        return None
    if factory is not textFileLogObserver:
        return None
    writer = BatchedWriter(out, reactor)
    parent[_WRITER] = writer
    parent["fileLogObserverFactory"] = lambda _out: BufferedTextObserver(writer)
    if IReactorCore.providedBy(reactor):
        reactor.addSystemEventTrigger("after", "shutdown", writer.stop)
    # A crash-exit through sys.exit or an exception still runs this.
    atexit.register(writer.flush)
    return writer
