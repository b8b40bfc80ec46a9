# -*- test-case-name: tests.test_gateway_agent -*-
"""
One persistent HTTP/1.1 connection to an upstream, one exchange at a time:
the request goes out in one write; the status line and the headers are
parsed from the buffer in one pass; a C{Content-Length}, chunked or
read-until-close body is handed on as it arrives (an event stream can stay
open for hours).  L{smeldr_oauth.gateway.agent} pools these.

Bytes that are not a response this client accepts (a bad status line, a
header name that is not a token, conflicting lengths, an unknown transfer
coding, a bad chunk, anything after a complete response) fail the request
or end its body with C{ResponseFailed} and drop the connection: a
half-read connection never goes back to the pool, and an upstream's extra
bytes never answer the next request.  Sizes are capped (L{MAX_HEAD_BYTES},
L{MAX_HEADERS}, chunk lines and trailers).

Its tests are the agent's (C{tests/test_gateway_agent.py}): they drive
these connections through it byte by byte.
"""

from __future__ import annotations

import re
from typing import Any, Optional

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.internet.tcp import Client as _TCPClient
from twisted.python.failure import Failure
from twisted.web.client import PotentialDataLoss, ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.iweb import UNKNOWN_LENGTH

from smeldr_oauth.gateway.response import Response, ResponseHeaders

#: The status line and headers of one response, together.
MAX_HEAD_BYTES = 64 * 1024
#: Header lines in one response.
MAX_HEADERS = 200
#: A chunk-size line (with its extensions) or a trailer section.
_MAX_CHUNK_LINE = 4096
_MAX_TRAILERS = 16 * 1024

TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_STATUS = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: ([^\r\n]*))?\Z")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}\Z")
_BLANKS = (b" ", b"\t")
#: One header line: a token, a colon, the value (no CR or LF inside; its
#: leading blanks dropped here, the trailing ones by the loop); CRLF or a
#: bare LF ends it.
_FIELD = re.compile(rb"^([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*([^\r\n]*)\r?$", re.MULTILINE)
#: How every complete body ends (C{connectionLost} of the body's protocol):
#: one L{Failure}, made once.  Building one is some 3.5 us (warm), once a
#: relayed call, in the turn that sends its answer (docs/performance.md,
#: "Round ten (gateway)").  It carries no traceback, and the gateway's body
#: readers only check it.
BODY_DONE = Failure(ResponseDone("Response body fully received"))
#: Requests sent again once when a reused connection closes before answering.
_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})

# Connection states.
_IDLE, _HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILERS, _UNTIL_CLOSE, CLOSED = range(9)


def write_now(transport: Any, data: bytes) -> None:
    """
    Write C{data} to the socket now when nothing waits before it, else as
    C{transport.write} does.

    Why: a TCP transport's C{write} only queues the bytes and asks the
    reactor to watch the socket for writability; they go out at its next
    turn (an C{epoll_ctl} to watch, an C{epoll_wait}, the C{send}, an
    C{epoll_ctl} to stop watching).  A relayed call writes its request
    upstream once, on an idle connection whose buffer is empty: sent at
    once, the upstream starts on it a reactor turn earlier and the front
    makes four fewer system calls (docs/performance.md, round seven).
    Only a plain TCP transport (no TLS) with nothing queued qualifies;
    whatever the socket does not take at once (or any error, which the
    transport then meets and reports as usual) goes through C{write}.
    The transport's attributes read here are Twisted's
    (C{tests.test_gateway_agent} pins them); without them, C{write}.
    """
    if (
        type(transport) is _TCPClient
        and transport.connected
        and not transport.disconnecting
        and not transport.dataBuffer
        and not getattr(transport, "_tempDataBuffer", True)
    ):
        try:
            sent = transport.socket.send(data)
        except OSError:
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


class BadResponse(Exception):
    """The upstream's bytes are not an HTTP/1.1 response this agent accepts."""


class Exchange:
    """One request on one connection: what to send, who waits for the response."""

    __slots__ = ("target", "data", "method", "result", "connection", "connecting", "reused", "retried")

    def __init__(self, target: Any, data: bytes, method: bytes) -> None:
        self.target = target
        self.data = data
        self.method = method
        self.result: Deferred = Deferred(self._cancel)
        self.connection: Optional[Connection] = None
        self.connecting: Optional[Deferred] = None
        self.reused = False
        self.retried = False

    def _cancel(self, _: Deferred) -> None:
        if self.connecting is not None:
            connecting, self.connecting = self.connecting, None
            connecting.cancel()
        elif self.connection is not None:
            self.connection.abort()


class Connection(Protocol):
    """One persistent connection to an upstream origin: one exchange at a time."""

    def __init__(self, agent: Any, origin: Any) -> None:
        self.agent = agent
        self.origin = origin
        self.state = _IDLE
        self.exchange: Optional[Exchange] = None
        self.response: Optional[Response] = None
        self.idle_since = 0.0
        #: An incomplete head or line (see L{dataReceived}), and how much of it was scanned.
        self._pending: Optional[bytearray] = None
        self._scanned = 0
        self._line = 0
        self._remaining = 0
        self._persistent = False
        self._head_request = False
        self._received = False

    # -- sending ---------------------------------------------------------------

    def send(self, exchange: Exchange) -> None:
        self.exchange = exchange
        exchange.connection = self
        self.state = _HEAD
        self._received = False
        self._head_request = exchange.method == b"HEAD"
        assert self.transport is not None
        write_now(self.transport, exchange.data)

    def close(self) -> None:
        """
        Close the connection cleanly (an idle one, or one whose response
        said so): no exchange runs on it again.
        """
        if self.state == CLOSED:
            return
        self.state = CLOSED
        if self.transport is not None:
            self.transport.loseConnection()

    def abort(self) -> None:
        """Drop the connection now (a cancelled request, a stopped body, bad bytes)."""
        if self.state == CLOSED:
            return
        self.state = CLOSED
        self.agent.forget(self)
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def abort_body(self) -> None:
        exchange, response = self.exchange, self.response
        self.exchange = self.response = None
        self.abort()
        if response is not None and exchange is not None:
            response._end(Failure(ResponseFailed([Failure(CancelledError("the body was stopped"))])))

    # -- receiving ---------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        self._received = True
        scanned = 0
        pending = self._pending
        if pending is not None:
            # An incomplete head or line waits in a bytearray: the new bytes
            # are appended to it (amortised linear) and its reader resumes
            # its scan where the last one stopped, not from the start (a
            # head trickled in byte by byte was quadratic below its bound).
            self._pending = None
            scanned = self._scanned
            pending += data
            data = pending  # type: ignore[assignment]
        try:
            while data and self.state != CLOSED:
                data = _READERS[self.state](self, data, scanned)
                scanned = 0
        except BadResponse as error:
            self._bad(error)

    def _wait(self, data: bytes, scanned: int) -> bytes:
        """
        Keep an incomplete head or line for the next read; C{scanned}
        bytes of it are known not to hold what its reader looks for.
        """
        self._pending = data if type(data) is bytearray else bytearray(data)
        self._scanned = scanned
        return b""

    def _unexpected(self, data: bytes, scanned: int) -> bytes:
        # Bytes nobody asked for: this connection cannot be trusted.
        raise BadResponse("data after the response")

    def _until_close(self, data: bytes, scanned: int) -> bytes:
        self._body(data)
        return b""

    def _head(self, data: bytes, scanned: int) -> bytes:
        # The first C{scanned} bytes hold neither end (the last read's
        # scan): a match can start at most 3 (or 1) bytes before them.
        end = data.find(b"\r\n\r\n", max(0, scanned - 3))
        after = end + 4
        # A bare LF ends a line too (RFC 9112 2.2), if it comes first.
        bare = data.find(b"\n\n", max(0, scanned - 1), end if end != -1 else len(data))
        if bare != -1:
            end, after = bare, bare + 2
        if end == -1:
            if len(data) > MAX_HEAD_BYTES:
                raise BadResponse("response head too large")
            return self._wait(data, len(data))
        if type(data) is bytearray:
            data = bytes(data)
        if end > MAX_HEAD_BYTES:
            raise BadResponse("response head too large")
        first = data.find(b"\n", 0, end)
        status = _STATUS.match(data[: end if first == -1 else first].rstrip(b"\r"))
        if status is None:
            raise BadResponse("bad status line")
        raw: dict[bytes, list[bytes]] = {}
        if first != -1:
            # Every header line at once (one scan in C, not a loop of
            # partitions): a line the pattern skips is one that is not a
            # header, and makes the counts differ.
            block = data[first + 1 : end]
            fields = _FIELD.findall(block)
            if len(fields) != block.count(b"\n") + 1:
                raise BadResponse("bad header line")
            if len(fields) > MAX_HEADERS:
                raise BadResponse("too many headers")
            for name, value in fields:
                if value[-1:] in _BLANKS:
                    value = value.rstrip(b" \t")
                key = name.lower()
                known = raw.get(key)
                if known is None:
                    raw[key] = [value]
                else:
                    known.append(value)
        code = int(status.group(2))
        rest = data[after:]
        if 100 <= code < 200:
            if code == 101:
                raise BadResponse("unexpected protocol switch")
            return rest  # informational: the real response follows
        minor = int(status.group(1))
        connection = b",".join(raw.get(b"connection", ())).lower()
        self._persistent = minor == 1 and b"close" not in connection
        length: Any = UNKNOWN_LENGTH
        encodings = raw.get(b"transfer-encoding")
        if self._head_request or code in (204, 304):
            length, after_state = 0, _IDLE
        elif encodings is not None:
            codings = [c.strip().lower() for c in b",".join(encodings).split(b",")]
            if codings[-1] != b"chunked":
                raise BadResponse("unsupported transfer coding")
            if len(codings) > 1:
                # A coding this agent does not undo, under chunked: refuse.
                raise BadResponse("unsupported transfer coding")
            if b"content-length" in raw:
                self._persistent = False  # RFC 9112 6.3: never reuse after both
            after_state = _CHUNK_SIZE
        elif b"content-length" in raw:
            values = {v.strip() for v in b",".join(raw[b"content-length"]).split(b",")}
            if len(values) != 1:
                raise BadResponse("conflicting content lengths")
            value = values.pop()
            if not value.isdigit() or len(value) > 18:
                raise BadResponse("bad content length")
            length = int(value)
            self._remaining = length
            after_state = _LENGTH if length else _IDLE
        else:
            self._persistent = False
            after_state = _UNTIL_CLOSE
        exchange = self.exchange
        assert exchange is not None
        response = Response(self, (b"HTTP", 1, minor), code, (status.group(3) or b""), ResponseHeaders(raw), length)
        self.response = response
        self.state = after_state
        if after_state == _IDLE:
            rest = self._finished(rest)
        result = exchange.result
        if not result.called:
            result.callback(response)
        return rest

    def _body(self, data: bytes) -> None:
        response = self.response
        if response is not None:
            response._data(data)

    def _length(self, data: bytes, scanned: int) -> bytes:
        remaining = self._remaining
        if len(data) < remaining:
            self._remaining = remaining - len(data)
            self._body(data)
            return b""
        self._body(data[:remaining] if len(data) > remaining else data)
        if self.state == _LENGTH:
            return self._finished(data[remaining:])
        return b""

    def _chunk_size(self, data: bytes, scanned: int) -> bytes:
        end = data.find(b"\n", scanned)
        if end == -1:
            if len(data) > _MAX_CHUNK_LINE:
                raise BadResponse("chunk size line too long")
            return self._wait(data, len(data))
        if type(data) is bytearray:
            data = bytes(data)
        line = data[:end].rstrip(b"\r").split(b";", 1)[0].strip(b" \t")
        if _HEX.match(line) is None:
            raise BadResponse("bad chunk size")
        size = int(line, 16)
        if size == 0:
            self.state = _TRAILERS
        else:
            self._remaining = size
            self.state = _CHUNK_DATA
        return data[end + 1 :]

    def _chunk_data(self, data: bytes, scanned: int) -> bytes:
        remaining = self._remaining
        if len(data) <= remaining:
            self._remaining = remaining - len(data)
            if self._remaining == 0:
                self.state = _CHUNK_END
            self._body(data)
            return b""
        self.state = _CHUNK_END
        self._body(data[:remaining])
        return data[remaining:]

    def _chunk_end(self, data: bytes, scanned: int) -> bytes:
        if type(data) is bytearray:
            data = bytes(data)  # a lone CR and what followed it
        if data.startswith(b"\r\n"):
            rest = data[2:]
        elif data.startswith(b"\n"):
            rest = data[1:]
        elif data == b"\r":
            return self._wait(data, 0)
        else:
            raise BadResponse("chunk not followed by CRLF")
        self.state = _CHUNK_SIZE
        return rest

    def _trailers(self, data: bytes, scanned: int) -> bytes:
        # Trailers are read and dropped; the section ends with an empty
        # line.  After a wait, the incomplete line began at C{_line} and
        # the bytes before C{scanned} hold no LF after it.
        start = self._line if scanned else 0
        position = max(start, scanned)
        while True:
            end = data.find(b"\n", position)
            if end == -1:
                if len(data) > _MAX_TRAILERS:
                    raise BadResponse("trailers too large")
                self._line = start
                return self._wait(data, len(data))
            if data[start:end].rstrip(b"\r") == b"":
                return self._finished(bytes(data[end + 1 :]))
            start = position = end + 1
            if start > _MAX_TRAILERS:
                raise BadResponse("trailers too large")

    def _finished(self, rest: bytes) -> bytes:
        """
        The response is complete: back to the pool (or closed), then its
        body ends.  Bytes after a response are never the start of the next
        request's answer: with any, the connection is closed instead.
        """
        response = self.response
        self.response = self.exchange = None
        if self._persistent and not rest:
            self.state = _IDLE
            self.agent.release(self)
        else:
            self.agent.forget(self)
            self.close()
        if response is not None:
            response._end(BODY_DONE)
        return b""

    def _bad(self, error: BadResponse) -> None:
        exchange, response = self.exchange, self.response
        self.exchange = self.response = None
        self.abort()
        failure = Failure(ResponseFailed([Failure(error)]))
        if response is not None:
            response._end(failure)
        elif exchange is not None and not exchange.result.called:
            exchange.result.errback(failure)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        state = self.state
        self.state = CLOSED
        self.agent.forget(self)
        exchange, response = self.exchange, self.response
        self.exchange = self.response = None
        if response is not None:
            if state == _UNTIL_CLOSE and reason is not None and reason.check(ConnectionDone):
                response._end(Failure(PotentialDataLoss()))
            else:
                response._end(Failure(ResponseFailed([reason])))
        elif exchange is not None and not exchange.result.called:
            if (
                exchange.reused
                and not self._received
                and not exchange.retried
                and exchange.method in _IDEMPOTENT
                and not self.agent.closed
            ):
                # The upstream closed an idle connection as we reused it
                # (and the agent still opens connections).
                exchange.retried = True
                exchange.connection = None
                self.agent.connect(exchange)
                return
            exchange.result.errback(Failure(ResponseNeverReceived([reason])))


#: Each state's reader, by state number: it takes the bytes (and how many
#: of them an earlier read already scanned) and returns those it leaves.
_READERS = (
    Connection._unexpected,  # _IDLE
    Connection._head,
    Connection._length,
    Connection._chunk_size,
    Connection._chunk_data,
    Connection._chunk_end,
    Connection._trailers,
    Connection._until_close,
)
