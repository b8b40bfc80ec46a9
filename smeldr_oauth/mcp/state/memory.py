# -*- test-case-name: tests.test_mcp_state -*-
"""
The in-process session state: every seam of L{smeldr_oauth.mcp.state}
implemented with dictionaries, for one process (the default, on SQLite).

Their Deferreds have already fired, so a request on a local session costs
what it cost before the seams existed: a dictionary lookup, no reactor
turn.  Idle legacy streams are held by the thousand, so the per-session
entries are slotted and made on first use.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Hashable, Optional

import attr
from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from smeldr_oauth.mcp.jsonrpc import Response
from smeldr_oauth.mcp.state.interfaces import IEventLog, ISessionDelivery, ISessionSink, ISessionStore
from smeldr_oauth.mcp.state.records import SessionLimitReached, SessionLimits, SessionRecord, make_room


class _Entry:
    """A record and its activity, which changes on every request."""

    __slots__ = ("record", "last_active", "expires_at")

    def __init__(self, record: SessionRecord) -> None:
        self.record = record
        self.last_active = record.last_active
        self.expires_at = record.expires_at

    def current(self) -> SessionRecord:
        return attr.evolve(self.record, last_active=self.last_active, expires_at=self.expires_at)


@implementer(ISessionStore)
class MemorySessionStore:
    """Session records in this process's memory."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        # The sessions of each grant and of each subject, for the caps.
        self._by_grant: dict[Hashable, dict[str, None]] = {}
        self._by_subject: dict[str, dict[str, None]] = {}

    def admit(
        self, record: SessionRecord, limits: SessionLimits, is_idle: Callable[[SessionRecord], bool]
    ) -> "Deferred[list[SessionRecord]]":
        def current(bucket: Optional[dict[str, None]], cap: int) -> list[SessionRecord]:
            # Below its cap a bucket makes no room whatever it holds, so
            # its records are not built: one caller holding thousands of
            # streams (a benchmark, a busy service account) would pay
            # for all of them at every new session.
            if bucket is None or len(bucket) < cap:
                return []
            return [self._entries[s].current() for s in bucket]

        try:
            removed = make_room(
                record,
                limits,
                current(self._by_grant.get(record.grant_key), limits.per_grant),
                current(self._by_subject.get(record.subject), limits.per_subject),
                len(self._entries),
                is_idle,
            )
        except SessionLimitReached:
            return fail()
        for victim in removed:
            self._pop(victim.session_id)
        self._entries[record.session_id] = _Entry(record)
        self._by_grant.setdefault(record.grant_key, {})[record.session_id] = None
        self._by_subject.setdefault(record.subject, {})[record.session_id] = None
        return succeed(removed)

    def get(self, session_id: str) -> "Deferred[Optional[SessionRecord]]":
        entry = self._entries.get(session_id)
        return succeed(entry.current() if entry is not None else None)

    def save(self, record: SessionRecord) -> "Deferred[None]":
        entry = self._entries.get(record.session_id)
        if entry is not None:
            entry.record = record
            entry.last_active = max(entry.last_active, record.last_active)
            entry.expires_at = record.expires_at
        return succeed(None)

    def touch(self, session_id: str, last_active: float, expires_at: float) -> None:
        entry = self._entries.get(session_id)
        if entry is not None:
            entry.last_active = last_active
            entry.expires_at = expires_at

    def remove(self, session_id: str) -> "Deferred[bool]":
        return succeed(self._pop(session_id))

    def remove_grant(self, grant_id: str) -> "Deferred[list[str]]":
        removed = list(self._by_grant.get(("grant", grant_id), ()))
        for session_id in removed:
            self._pop(session_id)
        return succeed(removed)

    def count(self) -> "Deferred[int]":
        return succeed(len(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def _pop(self, session_id: str) -> bool:
        entry = self._entries.pop(session_id, None)
        if entry is None:
            return False
        record = entry.record
        indexes: tuple[tuple[dict[Any, dict[str, None]], Hashable], ...] = (
            (self._by_grant, record.grant_key),
            (self._by_subject, record.subject),
        )
        for index, key in indexes:
            bucket = index.get(key)
            if bucket is not None:
                bucket.pop(session_id, None)
                if not bucket:
                    del index[key]
        return True


def append_then_deliver(delivery: ISessionDelivery, session_id: str, data: str, events: IEventLog) -> "Deferred[int]":
    """L{ISessionDelivery.deliver_logged} in two steps: append, then deliver with the id."""

    def appended(event_id: int) -> int:
        delivery.deliver(session_id, data, event_id)
        return event_id

    return events.append(session_id, data).addCallback(appended)


@implementer(ISessionDelivery)
class LocalDelivery:
    """
    Delivery within one process: each session's sinks in a dictionary.

    A session has one sink here unless several local objects share it
    (tests run two MCP endpoints on one delivery to stand for two
    processes); the common case stores the sink itself, not a list.
    """

    #: Everything runs in this one process.
    process_id = None

    def __init__(self) -> None:
        self._sinks: dict[str, Any] = {}
        self._replies: dict[tuple[str, str], Callable[[Response], None]] = {}

    def _each(self, session_id: str) -> tuple[Any, ...]:
        found = self._sinks.get(session_id)
        if found is None:
            return ()
        return found if isinstance(found, tuple) else (found,)

    def attach(self, session_id: str, sink: ISessionSink) -> None:
        found = self._each(session_id)
        if sink not in found:
            self._sinks[session_id] = sink if not found else found + (sink,)

    def holds(self, session_id: str) -> bool:
        """Whether a sink of C{session_id} is attached here."""
        return session_id in self._sinks

    def stream_held(self, session_id: str, held: bool) -> None:
        # One process: the sink that holds the stream is the only one.
        pass

    def detach(self, session_id: str, sink: ISessionSink) -> None:
        rest = tuple(s for s in self._each(session_id) if s is not sink)
        if not rest:
            self._sinks.pop(session_id, None)
        else:
            self._sinks[session_id] = rest if len(rest) > 1 else rest[0]

    def deliver(self, session_id: str, data: str, event_id: Optional[int] = None) -> None:
        for sink in self._each(session_id):
            sink.send(data, event_id)

    def deliver_logged(self, session_id: str, data: str, events: IEventLog) -> "Deferred[int]":
        return append_then_deliver(self, session_id, data, events)

    def end(self, session_id: str) -> None:
        for sink in self._each(session_id):
            sink.end()

    def settled(self, session_id: str) -> "Deferred[None]":
        return succeed(None)

    def share_changes(
        self, here: Callable[[str, str, frozenset[str]], None]
    ) -> Optional[Callable[[str, str], None]]:
        return None

    def refresh(self, session_id: str, record: SessionRecord) -> None:
        for sink in self._each(session_id):
            sink.refresh(record)

    def expect_reply(self, session_id: str, request_id: str, resolve: Callable[[Response], None]) -> None:
        self._replies[(session_id, request_id)] = resolve

    def forget_reply(self, session_id: str, request_id: str) -> None:
        self._replies.pop((session_id, request_id), None)

    def route_reply(self, session_id: str, response: Response) -> bool:
        resolve = self._replies.pop((session_id, str(response.id)), None)
        if resolve is None:
            return False
        resolve(response)
        return True

    @property
    def attached(self) -> int:
        """Sessions with a sink here."""
        return len(self._sinks)


class _Log:
    __slots__ = ("events", "next_id", "last_delivered")

    def __init__(self) -> None:
        self.events: deque[tuple[int, str]] = deque()
        self.next_id = 0
        self.last_delivered = 0


@implementer(IEventLog)
class MemoryEventLog:
    """Each session's last C{limit} events, in memory (made on first use)."""

    def __init__(self, limit: int = 256) -> None:
        self.limit = limit
        self._logs: dict[str, _Log] = {}

    def append(self, session_id: str, data: str) -> "Deferred[int]":
        log = self._logs.get(session_id)
        if log is None:
            log = self._logs[session_id] = _Log()
        log.next_id += 1
        log.events.append((log.next_id, data))
        while len(log.events) > self.limit:
            log.events.popleft()
        return succeed(log.next_id)

    def replay(self, session_id: str, after: Optional[int] = None) -> "Deferred[list[tuple[int, str]]]":
        log = self._logs.get(session_id)
        if log is None:
            return succeed([])
        start = log.last_delivered if after is None else after
        return succeed([(event_id, data) for event_id, data in log.events if event_id > start])

    def delivered(self, session_id: str, event_id: int) -> None:
        log = self._logs.get(session_id)
        if log is not None and event_id > log.last_delivered:
            log.last_delivered = event_id

    def forget(self, session_id: str) -> None:
        self._logs.pop(session_id, None)
