# -*- test-case-name: tests.test_gateway_sse -*-
"""
An incremental decoder for C{text/event-stream} bodies (the WHATWG
"server-sent events" parsing rules), for reading an upstream's streams.

Bytes arrive in arbitrary chunks; L{SSEDecoder.feed} returns the events
completed so far.  Memory is bounded: a line or an event larger than the
limit raises L{SSETooLarge} instead of growing a buffer (an upstream that
streams an endless line must not exhaust the gateway).
"""

from __future__ import annotations

from typing import Optional

import attr


class SSETooLarge(ValueError):
    """An event (or a line) exceeded the decoder's limit."""


@attr.s(frozen=True, auto_attribs=True)
class Event:
    """One dispatched event: C{event} defaults to C{"message"}."""

    data: str
    event: str = "message"
    id: Optional[str] = None


class SSEDecoder:
    """
    Decode a stream of SSE bytes.

    @ivar last_event_id: the last C{id} seen (what a reconnection sends as
        C{Last-Event-ID}).
    @ivar retry: the last C{retry} the server asked for, in milliseconds.
    """

    def __init__(self, max_event_bytes: int = 8 * 1024 * 1024) -> None:
        self.max_event_bytes = max_event_bytes
        self.last_event_id: Optional[str] = None
        self.retry: Optional[int] = None
        self._buffer = b""
        self._data: list[str] = []
        self._size = 0
        self._event: Optional[str] = None
        self._first = True
        self._pending_cr = False

    def feed(self, chunk: bytes) -> list[Event]:
        """
        Add bytes; return the events they complete.

        @raise SSETooLarge: a line or an event is over the limit.
        """
        if self._first and chunk:
            self._buffer += chunk
            if len(self._buffer) < 3 and b"\xef\xbb\xbf".startswith(self._buffer):
                return []
            if self._buffer.startswith(b"\xef\xbb\xbf"):
                self._buffer = self._buffer[3:]
            self._first = False
            chunk, self._buffer = self._buffer, b""
        if self._pending_cr and chunk.startswith(b"\n"):
            # The LF of a CRLF split across chunks: the line already ended.
            chunk = chunk[1:]
        self._pending_cr = False
        data = self._buffer + chunk
        events: list[Event] = []
        start = 0
        length = len(data)
        while start < length:
            cr = data.find(b"\r", start)
            lf = data.find(b"\n", start)
            if cr == -1 and lf == -1:
                break
            if cr == -1 or (lf != -1 and lf < cr):
                end, after = lf, lf + 1
            elif cr + 1 < length:
                end, after = cr, cr + 2 if data[cr + 1 : cr + 2] == b"\n" else cr + 1
            else:
                end, after = cr, cr + 1
                self._pending_cr = True
            event = self._line(data[start:end])
            if event is not None:
                events.append(event)
            start = after
        self._buffer = data[start:]
        if len(self._buffer) > self.max_event_bytes:
            raise SSETooLarge("SSE line too long")
        return events

    def _line(self, raw: bytes) -> Optional[Event]:
        if not raw:
            return self._dispatch()
        line = raw.decode("utf-8", "replace")
        if line.startswith(":"):
            return None
        field, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if field == "data":
            self._size += len(value) + 1
            if self._size > self.max_event_bytes:
                raise SSETooLarge("SSE event too large")
            self._data.append(value)
        elif field == "event":
            self._event = value
        elif field == "id":
            if "\0" not in value:
                self.last_event_id = value
        elif field == "retry":
            if value.isdigit():
                self.retry = int(value)
        return None

    def _dispatch(self) -> Optional[Event]:
        data, kind = self._data, self._event
        self._data, self._size, self._event = [], 0, None
        if not data:
            return None
        return Event("\n".join(data), kind or "message", self.last_event_id)
