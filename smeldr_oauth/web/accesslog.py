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
<line>}), but formats the timestamp once a second and hands the lines to
the log file's L{BatchedWriter} (L{smeldr_oauth.web.logfile}, the one
place for the batching rule, shared with the server's own events): every
request finished in one turn of the reactor shares one write, at the next
turn, before the response leaves (twisted.web sends it when the socket next
polls writable, after the reactor's timed calls).  No line is dropped.

Used only where the format is known: L{for_twist} returns one when C{twist}
writes text and lets C{info} through; otherwise (JSON logs, a raised log
level, the library mounted into someone else's site) the site keeps
twisted.web's own path.
"""

from __future__ import annotations

from typing import Any, Optional, Union

from twisted.internet import address
from twisted.internet.interfaces import IReactorTime
from twisted.logger import LogLevel, formatTime
from twisted.web.http import _escape, _XForwardedForAddress

from smeldr_oauth.web import logfile
from smeldr_oauth.web.logfile import BatchedWriter

#: The system C{twist}'s text observer prints for twisted.web's lines.
SYSTEM = "twisted.python.log#info"


class BufferedAccessLog:
    """
    Access-log lines, timestamped like C{twist}'s text log, written in
    batches.

    @param writer: the log file's writer.
    @param clock: for the timestamps.
    """

    def __init__(self, writer: BatchedWriter, clock: IReactorTime) -> None:
        self._writer = writer
        self._clock = clock
        self._second = -1
        self._prefix = ""

    def line(self, text: str) -> None:
        """
        Queue one line (without its newline).
        """
        second = int(self._clock.seconds())
        if second != self._second:
            self._second = second
            self._prefix = f"{formatTime(second)} [{SYSTEM}] "
        self._writer.write(self._prefix + text + "\n")

    def flush(self) -> None:
        """Write every queued line now."""
        self._writer.flush()


#: Escaped fields of access-log lines, by their raw value (see L{combined}).
_ESCAPED: dict[Union[bytes, str], str] = {}
#: Most values remembered; the cache starts afresh when full.
_MAX_ESCAPED = 1024
#: Longer values (a long query string) are escaped every time, not kept.
_LONGEST_KEPT = 256


def _escaped(value: Union[bytes, str]) -> str:
    """
    twisted.web's C{_escape} of C{value}, remembered: the fields of an
    access-log line (address, method, path, protocol, referrer, user
    agent) repeat from line to line, and escaping them (a C{repr} and two
    replacements each, six a line) was most of formatting one.
    """
    text = _ESCAPED.get(value)
    if text is None:
        text = _escape(value)
        if len(value) <= _LONGEST_KEPT:
            if len(_ESCAPED) >= _MAX_ESCAPED:
                _ESCAPED.clear()
            _ESCAPED[value] = text
    return text


def combined(timestamp: str, request: Any) -> str:
    """
    The access-log line of C{request}: exactly twisted.web's
    C{combinedLogFormatter} (the "combined" log format, which log
    collectors parse), with each field's escaping remembered
    (L{_escaped}).  Its CPU was 1.4-2.5% of a refresh's samples and a
    larger share of the cheapest answers (docs/performance.md, round six).
    """
    client = request.getClientAddress()
    if isinstance(client, (address.IPv4Address, address.IPv6Address, _XForwardedForAddress)):
        ip = client.host
    else:
        ip = b"-"
    return '"%s" - - %s "%s %s %s" %d %s "%s" "%s"' % (
        _escaped(ip),
        timestamp,
        _escaped(request.method),
        _escaped(request.uri),
        _escaped(request.clientproto),
        request.code,
        request.sentLength or "-",
        _escaped(request.getHeader(b"referer") or b"-"),
        _escaped(request.getHeader(b"user-agent") or b"-"),
    )


def for_twist(options: Any, clock: IReactorTime) -> Optional[BufferedAccessLog]:
    """
    A L{BufferedAccessLog} for the process C{twist} runs with C{options}
    (a plugin's options; their C{parent} is C{twist}'s), writing through
    the log file's L{BatchedWriter}, or C{None} where its lines would not
    look exactly like twisted.web's: JSON logs, or a log level above
    C{info} (which drops them).
    """
    writer = logfile.for_twist(options, clock)
    if writer is None or options.parent.get("logLevel", LogLevel.critical) > LogLevel.info:
        return None
    return BufferedAccessLog(writer, clock)
