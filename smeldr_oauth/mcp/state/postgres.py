# -*- test-case-name: tests.test_mcp_state_postgres -*-
"""
MCP session state shared by every process on one PostgreSQL database:
any process serves any session, feeds any stream.

  - L{PostgresSessionStore}: session records in C{mcp_sessions}; the caps
    decided under one advisory lock, so concurrent processes admit exactly
    what one process would; activity (L{PostgresSessionStore.touch})
    written at most once per C{touch_interval} per process, as one
    statement for every session touched meanwhile.
  - L{PostgresDelivery}: each process has a random id, a row in
    C{mcp_processes} kept alive by a heartbeat (its lease), and a
    C{LISTEN} channel of its own (C{smeldr_mcp_<id>}).  A process holding
    live parts of a session has a row in C{mcp_session_holders} (with
    C{stream} set while it holds the session's own stream): a message for
    a session goes to the local sinks at once and, in one statement, as a
    C{NOTIFY} to every other holder.  Event-driven both ways; nothing
    polls.
  - L{PostgresEventLog}: the C{Last-Event-ID} log in C{mcp_events}, bounded
    per session, with ids from a per-session counter row.

L{PostgresSessionState} makes the three on one L{Database}, registers the
process, beats its heart, reaps the processes whose lease ran out (their
holder rows; the legacy sessions whose stream they held, which cannot
outlive it) and purges expired records in batches.

Calls on one session that must stay in order (events, holder claims,
routed messages) run one after another in this process (L{_Serial});
calls on different sessions run in parallel on the pool.
"""

from __future__ import annotations

import json
import math
import secrets
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Optional

import attr
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from smeldr_oauth.db.migrations import Migration, Schema
from smeldr_oauth.db.notify import NOTIFICATIONS_SCHEMA, NOTIFY_LIMIT, publish
from smeldr_oauth.mcp.jsonrpc import Response
from smeldr_oauth.mcp.state.interfaces import IEventLog, ISessionDelivery, ISessionSink, ISessionStore
from smeldr_oauth.mcp.state.memory import LocalDelivery
from smeldr_oauth.mcp.state.records import SessionLimits, SessionRecord, make_room

if TYPE_CHECKING:
    from smeldr_oauth.db.database import Database, Transaction

log = Logger()

#: How often a process writes the activity of its sessions (seconds): a
#: busy session costs at most one write per interval per process.
TOUCH_INTERVAL = 1.0
#: How often a process renews its lease (seconds).
HEARTBEAT = 5.0
#: A process whose heartbeat is older than this (seconds) is dead.
LEASE = 20.0
#: Expired records removed per statement.
PURGE_BATCH = 500
#: The advisory lock every admission takes (any constant of our own).
_ADMIT_LOCK = 0x736D5F61646D6974
#: Channel prefix: one channel per process.
CHANNEL_PREFIX = "smeldr_mcp_"

SESSIONS_SCHEMA = Schema(
    "mcp_sessions",
    (
        Migration(
            1,
            (),
            postgresql=(
                "CREATE TABLE mcp_sessions ("
                " session_id TEXT PRIMARY KEY,"
                " kind TEXT NOT NULL,"
                " subject TEXT NOT NULL,"
                " client_id TEXT,"
                " grant_id TEXT,"
                " grant_key TEXT NOT NULL,"
                " created DOUBLE PRECISION NOT NULL,"
                " last_active DOUBLE PRECISION NOT NULL,"
                " expires_at DOUBLE PRECISION NOT NULL,"
                " used BOOLEAN NOT NULL,"
                " protocol_version TEXT,"
                " client_capabilities TEXT NOT NULL,"
                " client_info TEXT NOT NULL,"
                " log_level TEXT,"
                " subscriptions TEXT NOT NULL)",
                "CREATE INDEX mcp_sessions_grant_key ON mcp_sessions (grant_key)",
                "CREATE INDEX mcp_sessions_subject ON mcp_sessions (subject)",
                "CREATE INDEX mcp_sessions_grant_id ON mcp_sessions (grant_id)",
                "CREATE INDEX mcp_sessions_expires_at ON mcp_sessions (expires_at)",
                "CREATE TABLE mcp_processes ("
                " process_id TEXT PRIMARY KEY,"
                " started_at TIMESTAMPTZ NOT NULL DEFAULT now(),"
                " heartbeat_at TIMESTAMPTZ NOT NULL DEFAULT now())",
                "CREATE TABLE mcp_session_holders ("
                " session_id TEXT NOT NULL,"
                " process_id TEXT NOT NULL REFERENCES mcp_processes ON DELETE CASCADE,"
                " stream BOOLEAN NOT NULL DEFAULT false,"
                " PRIMARY KEY (session_id, process_id))",
                "CREATE INDEX mcp_session_holders_process ON mcp_session_holders (process_id)",
                "CREATE TABLE mcp_event_heads ("
                " session_id TEXT PRIMARY KEY,"
                " last_id BIGINT NOT NULL,"
                " delivered BIGINT NOT NULL DEFAULT 0)",
                "CREATE TABLE mcp_events ("
                " session_id TEXT NOT NULL REFERENCES mcp_event_heads ON DELETE CASCADE,"
                " event_id BIGINT NOT NULL,"
                " data TEXT NOT NULL,"
                " PRIMARY KEY (session_id, event_id))",
            ),
        ),
    ),
    tables=("mcp_sessions", "mcp_processes", "mcp_session_holders", "mcp_event_heads", "mcp_events"),
)


class _Serial:
    """
    Runs the calls made for one key one after another, in the order they
    were made; calls for other keys are not held up.
    """

    def __init__(self) -> None:
        self._tails: dict[str, Deferred[None]] = {}

    def run(self, key: str, f: Callable[..., "Deferred[Any]"], *args: Any, **kw: Any) -> "Deferred[Any]":
        previous = self._tails.get(key)
        done: Deferred[None] = Deferred()
        self._tails[key] = done

        def start() -> "Deferred[Any]":
            def finished(result: Any) -> Any:
                if self._tails.get(key) is done:
                    del self._tails[key]
                done.callback(None)
                return result

            return maybeDeferred(f, *args, **kw).addBoth(finished)

        if previous is None:
            return start()
        outcome: Deferred[Any] = Deferred()

        def go(_: Any) -> None:
            start().chainDeferred(outcome)

        previous.addCallback(go)
        return outcome

    def wait(self, key: Optional[str] = None) -> "Deferred[None]":
        """Fires once every call made so far (for C{key}, or all) has finished."""

        def when(tail: "Deferred[None]") -> "Deferred[None]":
            d: Deferred[None] = Deferred()

            def fire(result: Any) -> Any:
                d.callback(None)
                return result

            tail.addBoth(fire)
            return d

        tails = list(self._tails.values()) if key is None else [t for k, t in self._tails.items() if k == key]
        return gatherResults([when(t) for t in tails]).addCallback(lambda _: None)


def _logged(message: str) -> Callable[[Failure], None]:
    def errback(failure: Failure) -> None:
        log.failure(message, failure)

    return errback


# -- records as rows -------------------------------------------------------------

_COLUMNS = (
    "s.session_id, s.kind, s.subject, s.client_id, s.grant_id, s.created, s.last_active,"
    " s.expires_at, s.used, s.protocol_version, s.client_capabilities, s.client_info,"
    " s.log_level, s.subscriptions,"
    " (SELECT h.process_id FROM mcp_session_holders h"
    "  WHERE h.session_id = s.session_id AND h.stream LIMIT 1)"
)


def _grant_key(record: SessionRecord) -> str:
    return json.dumps(list(record.grant_key))  # type: ignore[call-overload]


def _record(row: Any) -> SessionRecord:
    return SessionRecord(
        session_id=row[0],
        kind=row[1],
        subject=row[2],
        client_id=row[3],
        grant_id=row[4],
        created=row[5],
        last_active=row[6],
        expires_at=row[7],
        used=row[8],
        protocol_version=row[9],
        client_capabilities=json.loads(row[10]),
        client_info=json.loads(row[11]),
        log_level=row[12],
        subscriptions=json.loads(row[13]),
        stream_process=row[14],
    )


def _state(record: SessionRecord) -> tuple[Any, ...]:
    return (
        record.used,
        record.protocol_version,
        json.dumps(record.client_capabilities),
        json.dumps(record.client_info),
        record.log_level,
        json.dumps(sorted(record.subscriptions)),
    )


def _apply_touches(txn: "Transaction", touches: dict[str, tuple[float, float]]) -> None:
    if not touches:
        return
    values = ", ".join("(?, ?::float8, ?::float8)" for _ in touches)
    params = [value for session_id, (last, expires) in touches.items() for value in (session_id, last, expires)]
    txn.execute(
        "UPDATE mcp_sessions AS s SET last_active = GREATEST(s.last_active, v.last),"
        " expires_at = CASE WHEN v.last >= s.last_active THEN v.expires ELSE s.expires_at END"
        f" FROM (VALUES {values}) AS v(id, last, expires) WHERE s.session_id = v.id",
        params,
    )


def _admit(
    txn: "Transaction", record: SessionRecord, limits: SessionLimits, is_idle: Callable[[SessionRecord], bool]
) -> list[SessionRecord]:
    txn.execute("SELECT pg_advisory_xact_lock(?)", (_ADMIT_LOCK,))
    key = _grant_key(record)
    rows = txn.execute(
        f"SELECT {_COLUMNS}, s.grant_key FROM mcp_sessions s WHERE s.grant_key = ? OR s.subject = ?",
        (key, record.subject),
    ).fetchall()
    found = [(_record(row), row[15]) for row in rows]
    total = txn.execute("SELECT count(*) FROM mcp_sessions").fetchone()[0]

    def idle(r: SessionRecord) -> bool:
        # A stream held anywhere keeps its session; is_idle knows what
        # runs in this process.
        return r.stream_process is None and is_idle(r)

    victims = make_room(
        record,
        limits,
        [r for r, k in found if k == key],
        [r for r, _ in found if r.subject == record.subject],
        int(total),
        idle,
    )
    if victims:
        txn.execute(
            "DELETE FROM mcp_sessions WHERE session_id = ANY(?)", ([v.session_id for v in victims],)
        )
    txn.execute(
        "INSERT INTO mcp_sessions (session_id, kind, subject, client_id, grant_id, grant_key, created,"
        " last_active, expires_at, used, protocol_version, client_capabilities, client_info, log_level,"
        " subscriptions) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            record.session_id,
            record.kind,
            record.subject,
            record.client_id,
            record.grant_id,
            key,
            record.created,
            record.last_active,
            record.expires_at,
            *_state(record),
        ),
    )
    return victims


def _get(txn: "Transaction", session_id: str) -> Optional[SessionRecord]:
    row = txn.execute(f"SELECT {_COLUMNS} FROM mcp_sessions s WHERE s.session_id = ?", (session_id,)).fetchone()
    return None if row is None else _record(row)


def _save(txn: "Transaction", record: SessionRecord) -> None:
    txn.execute(
        "UPDATE mcp_sessions SET used = ?, protocol_version = ?, client_capabilities = ?, client_info = ?,"
        " log_level = ?, subscriptions = ?, last_active = GREATEST(last_active, ?), expires_at = ?"
        " WHERE session_id = ?",
        (*_state(record), record.last_active, record.expires_at, record.session_id),
    )


def _remove(txn: "Transaction", session_id: str) -> bool:
    return txn.execute("DELETE FROM mcp_sessions WHERE session_id = ?", (session_id,)).rowcount > 0


def _remove_grant(txn: "Transaction", grant_id: str) -> list[str]:
    rows = txn.execute("DELETE FROM mcp_sessions WHERE grant_id = ? RETURNING session_id", (grant_id,))
    return [row[0] for row in rows]


def _count(txn: "Transaction") -> int:
    return int(txn.execute("SELECT count(*) FROM mcp_sessions").fetchone()[0])


def _purge(txn: "Transaction", now: float, batch: int) -> int:
    """Expired records nobody holds live, and event logs without a session."""
    removed = txn.execute(
        "DELETE FROM mcp_sessions WHERE session_id IN (SELECT s.session_id FROM mcp_sessions s"
        " WHERE s.expires_at < ? AND NOT EXISTS (SELECT 1 FROM mcp_session_holders h"
        " WHERE h.session_id = s.session_id) LIMIT ?)",
        (now, batch),
    ).rowcount
    txn.execute(
        "DELETE FROM mcp_event_heads WHERE session_id IN (SELECT e.session_id FROM mcp_event_heads e"
        " WHERE NOT EXISTS (SELECT 1 FROM mcp_sessions s WHERE s.session_id = e.session_id) LIMIT ?)",
        (batch,),
    )
    return int(removed)


@implementer(ISessionStore)
class PostgresSessionStore:
    """
    Session records in PostgreSQL.

    C{admit} runs C{is_idle} on a database thread, on records it read:
    the registry's answer only reads attributes of this process's live
    sessions.

    @ivar touch_interval: see L{TOUCH_INTERVAL}.
    """

    def __init__(self, database: "Database", clock: IReactorTime, *, touch_interval: float = TOUCH_INTERVAL) -> None:
        self._db = database
        self._clock = clock
        self.touch_interval = touch_interval
        self._touches: dict[str, tuple[float, float]] = {}
        self._flushing: Optional[IDelayedCall] = None

    def admit(
        self, record: SessionRecord, limits: SessionLimits, is_idle: Callable[[SessionRecord], bool]
    ) -> "Deferred[list[SessionRecord]]":
        # Activity first (a failed admission must not lose it), so the
        # least recently active session is chosen on current figures.
        return self.flush().addCallback(
            lambda _: self._db.write(SESSIONS_SCHEMA, _admit, record, limits, is_idle, name="mcp_sessions.admit")
        )

    def get(self, session_id: str) -> "Deferred[Optional[SessionRecord]]":
        def merged(record: Optional[SessionRecord]) -> Optional[SessionRecord]:
            touched = self._touches.get(session_id)
            if record is None or touched is None or touched[0] < record.last_active:
                return record
            return attr.evolve(record, last_active=touched[0], expires_at=touched[1])

        return self._db.read(SESSIONS_SCHEMA, _get, session_id, name="mcp_sessions.get").addCallback(merged)

    def save(self, record: SessionRecord) -> "Deferred[None]":
        return self._db.write(SESSIONS_SCHEMA, _save, record, name="mcp_sessions.save")

    def touch(self, session_id: str, last_active: float, expires_at: float) -> None:
        self._touches[session_id] = (last_active, expires_at)
        if self._flushing is None:
            self._flushing = self._clock.callLater(self.touch_interval, self._flush_later)

    def _flush_later(self) -> None:
        self._flushing = None
        self.flush().addErrback(_logged("MCP session activity could not be written"))

    def flush(self) -> "Deferred[None]":
        """Write the activity noted since the last flush now."""
        if self._flushing is not None and self._flushing.active():
            self._flushing.cancel()
        self._flushing = None
        touches, self._touches = self._touches, {}
        if not touches:
            return succeed(None)
        return self._db.write(SESSIONS_SCHEMA, _apply_touches, touches, name="mcp_sessions.touch")

    def remove(self, session_id: str) -> "Deferred[bool]":
        self._touches.pop(session_id, None)
        return self._db.write(SESSIONS_SCHEMA, _remove, session_id, name="mcp_sessions.remove")

    def remove_grant(self, grant_id: str) -> "Deferred[list[str]]":
        return self._db.write(SESSIONS_SCHEMA, _remove_grant, grant_id, name="mcp_sessions.remove_grant")

    def count(self) -> "Deferred[int]":
        return self._db.read(SESSIONS_SCHEMA, _count, name="mcp_sessions.count")

    def purge(self, now: float, batch: int = PURGE_BATCH) -> "Deferred[int]":
        """
        Remove up to C{batch} records expired before C{now} that no live
        process holds (a held one is ended by its holder's idle timer),
        and event logs left without a session.

        @return: a L{Deferred} firing with the number of records removed.
        """
        return self._db.write(SESSIONS_SCHEMA, _purge, now, batch, name="mcp_sessions.purge")


# -- the resumption log -------------------------------------------------------------


def _append(txn: "Transaction", session_id: str, data: str, limit: int) -> int:
    row = txn.execute(
        "WITH head AS (INSERT INTO mcp_event_heads (session_id, last_id) VALUES (?, 1)"
        "  ON CONFLICT (session_id) DO UPDATE SET last_id = mcp_event_heads.last_id + 1 RETURNING last_id),"
        " added AS (INSERT INTO mcp_events (session_id, event_id, data)"
        "  SELECT ?, last_id, ? FROM head RETURNING event_id),"
        " trimmed AS (DELETE FROM mcp_events WHERE session_id = ?"
        "  AND event_id <= (SELECT event_id FROM added) - ?)"
        " SELECT event_id FROM added",
        (session_id, session_id, data, session_id, limit),
    ).fetchone()
    return int(row[0])


def _replay(txn: "Transaction", session_id: str, after: Optional[int], seen: int) -> list[tuple[int, str]]:
    if after is None:
        row = txn.execute("SELECT delivered FROM mcp_event_heads WHERE session_id = ?", (session_id,)).fetchone()
        after = max(seen, int(row[0]) if row is not None else 0)
    rows = txn.execute(
        "SELECT event_id, data FROM mcp_events WHERE session_id = ? AND event_id > ? ORDER BY event_id",
        (session_id, after),
    )
    return [(int(r[0]), r[1]) for r in rows]


def _mark_delivered(txn: "Transaction", marks: dict[str, int]) -> None:
    values = ", ".join("(?, ?::bigint)" for _ in marks)
    params = [value for item in marks.items() for value in item]
    txn.execute(
        "UPDATE mcp_event_heads AS h SET delivered = GREATEST(h.delivered, v.id)"
        f" FROM (VALUES {values}) AS v(session, id) WHERE h.session_id = v.session",
        params,
    )


def _forget(txn: "Transaction", session_id: str) -> None:
    txn.execute("DELETE FROM mcp_event_heads WHERE session_id = ?", (session_id,))


@implementer(IEventLog)
class PostgresEventLog:
    """
    Each session's last C{limit} events in PostgreSQL.

    Appends of one session run one after another, so ids and Deferreds
    come in the order the appends were made.  What reached a stream
    (L{delivered}) is written at most once per C{interval}: a client that
    reconnects elsewhere I{without} C{Last-Event-ID} may see up to that
    much again (clients send the header; it is exact).
    """

    def __init__(self, database: "Database", clock: IReactorTime, limit: int = 256, *, interval: float = TOUCH_INTERVAL) -> None:
        self._db = database
        self._clock = clock
        self.limit = limit
        self.interval = interval
        self._serial = _Serial()
        self._delivered: dict[str, int] = {}
        self._dirty: dict[str, int] = {}
        self._flushing: Optional[IDelayedCall] = None

    def append(self, session_id: str, data: str) -> "Deferred[int]":
        return self._serial.run(
            session_id, self._db.write, SESSIONS_SCHEMA, _append, session_id, data, self.limit, name="mcp_events.append"
        )

    def replay(self, session_id: str, after: Optional[int] = None) -> "Deferred[list[tuple[int, str]]]":
        seen = self._delivered.get(session_id, 0)
        return self._serial.run(
            session_id, self._db.read, SESSIONS_SCHEMA, _replay, session_id, after, seen, name="mcp_events.replay"
        )

    def delivered(self, session_id: str, event_id: int) -> None:
        if event_id <= self._delivered.get(session_id, 0):
            return
        self._delivered[session_id] = self._dirty[session_id] = event_id
        if self._flushing is None:
            self._flushing = self._clock.callLater(self.interval, self._flush)

    def _flush(self) -> None:
        self._flushing = None
        marks, self._dirty = self._dirty, {}
        if marks:
            self._db.write(SESSIONS_SCHEMA, _mark_delivered, marks, name="mcp_events.delivered").addErrback(
                _logged("MCP event delivery marks could not be written")
            )

    def forget(self, session_id: str) -> None:
        self._delivered.pop(session_id, None)
        self._dirty.pop(session_id, None)
        self._serial.run(
            session_id, self._db.write, SESSIONS_SCHEMA, _forget, session_id, name="mcp_events.forget"
        ).addErrback(_logged("MCP events of an ended session could not be removed"))


# -- delivery between processes -----------------------------------------------------


def _route(txn: "Transaction", session_id: str, me: str, message: str) -> int:
    """NOTIFY every other process holding C{session_id}; how many."""
    if len(message.encode("utf-8")) < NOTIFY_LIMIT:
        rows = txn.execute(
            "SELECT pg_notify(? || process_id, ?) FROM mcp_session_holders WHERE session_id = ? AND process_id <> ?",
            (CHANNEL_PREFIX, "=" + message, session_id, me),
        ).fetchall()
        return len(rows)
    holders = txn.execute(
        "SELECT process_id FROM mcp_session_holders WHERE session_id = ? AND process_id <> ?", (session_id, me)
    ).fetchall()
    for (process_id,) in holders:
        publish(txn, CHANNEL_PREFIX + process_id, message)
    return len(holders)


def _register(txn: "Transaction", me: str, held: dict[str, bool]) -> None:
    txn.execute(
        "INSERT INTO mcp_processes (process_id) VALUES (?)"
        " ON CONFLICT (process_id) DO UPDATE SET heartbeat_at = now()",
        (me,),
    )
    for session_id, stream in held.items():
        _hold(txn, session_id, me, stream)


def _hold(txn: "Transaction", session_id: str, me: str, stream: bool) -> int:
    txn.execute(
        "INSERT INTO mcp_session_holders (session_id, process_id, stream) VALUES (?, ?, ?)"
        " ON CONFLICT (session_id, process_id) DO UPDATE SET stream = excluded.stream",
        (session_id, me, stream),
    )
    if not stream:
        return 0
    # The stream is here now: any other claim is stale (the client
    # reconnected here; the other process may be dead).
    return txn.execute(
        "UPDATE mcp_session_holders SET stream = false WHERE session_id = ? AND process_id <> ? AND stream",
        (session_id, me),
    ).rowcount


def _let_go(txn: "Transaction", session_id: str, me: str) -> None:
    txn.execute("DELETE FROM mcp_session_holders WHERE session_id = ? AND process_id = ?", (session_id, me))


def _heartbeat(txn: "Transaction", me: str, lease: float) -> tuple[bool, list[str], int]:
    """
    Renew this process's lease; reap the processes whose lease ran out.

    @return: whether this process's row was still there, the dead
        process ids, and how many legacy sessions died with them.
    """
    alive = txn.execute("UPDATE mcp_processes SET heartbeat_at = now() WHERE process_id = ?", (me,)).rowcount > 0
    expired = "heartbeat_at < now() - make_interval(secs => ?)"
    legacy = txn.execute(
        "DELETE FROM mcp_sessions WHERE kind = 'legacy' AND session_id IN (SELECT h.session_id"
        " FROM mcp_session_holders h JOIN mcp_processes p USING (process_id)"
        f" WHERE h.stream AND p.{expired})",
        (lease,),
    ).rowcount
    dead = txn.execute(f"DELETE FROM mcp_processes WHERE {expired} RETURNING process_id", (lease,)).fetchall()
    return alive, [row[0] for row in dead], int(legacy)


def _leave(txn: "Transaction", me: str) -> None:
    txn.execute(
        "DELETE FROM mcp_sessions WHERE kind = 'legacy' AND session_id IN"
        " (SELECT session_id FROM mcp_session_holders WHERE process_id = ? AND stream)",
        (me,),
    )
    txn.execute("DELETE FROM mcp_processes WHERE process_id = ?", (me,))


@implementer(ISessionDelivery)
class PostgresDelivery:
    """
    Delivery between the processes sharing one PostgreSQL database.

    Operations counters (plain attributes, for metrics):

    @ivar routed_out: messages sent to other processes (one per receiving
        process).
    @ivar routed_in: messages received from other processes.
    @ivar latencies: the last one-way latencies (seconds, from the
        sender's wall clock to the receiver's) of routed messages.
    @ivar streams_taken_over: stream claims moved here from another
        process (a client reconnected here; its old process may be dead).
    @ivar processes_reaped: dead processes whose lease this one ended.
    """

    def __init__(
        self,
        database: "Database",
        clock: IReactorTime,
        *,
        process_id: Optional[str] = None,
        heartbeat: float = HEARTBEAT,
        lease: float = LEASE,
    ) -> None:
        self._db = database
        self._clock = clock
        self.process_id = process_id or secrets.token_hex(8)
        self.channel = CHANNEL_PREFIX + self.process_id
        self.heartbeat = heartbeat
        self.lease = lease
        self._local = LocalDelivery()
        self._streams: set[str] = set()
        self._serial = _Serial()
        self._gate: Optional[Deferred[None]] = Deferred()
        self._subscription: Any = None
        self._beating: Optional[LoopingCall] = None
        self.routed_out = 0
        self.routed_in = 0
        self.latencies: deque[float] = deque(maxlen=1024)
        self.streams_taken_over = 0
        self.processes_reaped = 0
        self.legacy_sessions_reaped = 0
        self.on_heartbeat: Optional[Callable[[], Any]] = None

    # -- the process --------------------------------------------------------------

    def start(self) -> "Deferred[None]":
        """
        Register this process and listen on its channel; calls made
        before wait for it.  Then beat the heart every C{heartbeat}
        seconds.
        """
        listener = self._db.engine.listener(self._db)  # type: ignore[attr-defined]
        self._subscription = listener.listen(self.channel, self._received, resync=self._resync)

        def registered(_: Any) -> "Deferred[None]":
            return self._subscription.ready

        def ready(_: Any) -> None:
            gate, self._gate = self._gate, None
            log.info("MCP sessions shared through the database as process {id}", id=self.process_id)
            self._beating = LoopingCall(self._beat)
            self._beating.clock = self._clock
            self._beating.start(self.heartbeat, now=False).addErrback(_logged("MCP heartbeat stopped"))
            if gate is not None:
                gate.callback(None)

        d = self._db.ensure(NOTIFICATIONS_SCHEMA).addCallback(
            lambda _: self._db.write(SESSIONS_SCHEMA, _register, self.process_id, {}, name="mcp_processes.register")
        )
        return d.addCallback(registered).addCallback(ready)

    def settled(self, session_id: Optional[str] = None) -> "Deferred[None]":
        """
        Fires once every claim and message so far (of C{session_id}, or of
        every session) has been written.
        """
        return self._serial.wait(session_id)

    def stop(self) -> "Deferred[None]":
        """
        Leave: this process's claims go (its legacy sessions end with
        their streams; Streamable HTTP records stay for the others).
        """
        if self._beating is not None and self._beating.running:
            self._beating.stop()
        if self._subscription is not None:
            self._subscription.stop()
        if self._gate is not None:
            # Never started: nothing of ours is in the database.
            return succeed(None)
        return self.settled().addCallback(
            lambda _: self._db.write(SESSIONS_SCHEMA, _leave, self.process_id, name="mcp_processes.leave")
        )

    def _beat(self) -> "Deferred[None]":
        def beaten(outcome: tuple[bool, list[str], int]) -> Any:
            alive, dead, legacy = outcome
            if dead:
                self.processes_reaped += len(dead)
                self.legacy_sessions_reaped += legacy
                log.warn(
                    "MCP processes {dead} missed their lease: their streams are free, {legacy} legacy sessions ended",
                    dead=", ".join(dead),
                    legacy=legacy,
                )
            if not alive:
                log.warn("MCP process {id} lost its lease (stalled?): registering again", id=self.process_id)
                held = {s: s in self._streams for s in self._local_sessions()}
                return self._db.write(SESSIONS_SCHEMA, _register, self.process_id, held, name="mcp_processes.register")
            return None

        d: Deferred[Any] = self._db.write(
            SESSIONS_SCHEMA, _heartbeat, self.process_id, self.lease, name="mcp_processes.heartbeat"
        )
        d.addCallback(beaten)
        hook = self.on_heartbeat
        if hook is not None:
            d.addCallback(lambda _: hook())
        # A failed beat (the database restarting) is logged; the next one tries again.
        return d.addErrback(_logged("MCP heartbeat failed"))

    def _local_sessions(self) -> list[str]:
        return list(self._local._sinks)

    def _later(self, session_id: str, f: Callable[..., "Deferred[Any]"], *args: Any, **kw: Any) -> "Deferred[Any]":
        """C{f(*args)} after this process registered, in order for C{session_id}."""

        def run() -> "Deferred[Any]":
            if self._gate is None:
                return f(*args, **kw)
            d: Deferred[Any] = Deferred()

            def go(_: Any) -> None:
                f(*args, **kw).chainDeferred(d)

            self._gate.addCallback(go)
            return d

        return self._serial.run(session_id, run)

    # -- sinks here -----------------------------------------------------------------

    def attach(self, session_id: str, sink: ISessionSink) -> None:
        first = not self._local.holds(session_id)
        self._local.attach(session_id, sink)
        if first:
            self._later(
                session_id, self._db.write, SESSIONS_SCHEMA, _hold, session_id, self.process_id, False,
                name="mcp_sessions.hold",
            ).addErrback(_logged("MCP session claim failed"))

    def detach(self, session_id: str, sink: ISessionSink) -> None:
        self._local.detach(session_id, sink)
        if not self._local.holds(session_id):
            self._streams.discard(session_id)
            self._later(
                session_id, self._db.write, SESSIONS_SCHEMA, _let_go, session_id, self.process_id,
                name="mcp_sessions.let_go",
            ).addErrback(_logged("MCP session release failed"))

    def holds(self, session_id: str) -> bool:
        return self._local.holds(session_id)

    def stream_held(self, session_id: str, held: bool) -> None:
        if held == (session_id in self._streams) or not self._local.holds(session_id):
            return
        if held:
            self._streams.add(session_id)
        else:
            self._streams.discard(session_id)

        def claim() -> "Deferred[None]":
            return self._db.write(
                SESSIONS_SCHEMA, _hold, session_id, self.process_id, held, name="mcp_sessions.hold"
            ).addCallbacks(claimed, _logged("MCP stream claim failed"))

        def claimed(moved: int) -> None:
            self.streams_taken_over += moved

        self._later(session_id, claim)

    # -- messages ---------------------------------------------------------------------

    def _send(self, session_id: str, kind: str, **body: Any) -> None:
        message = json.dumps({"k": kind, "s": session_id, "t": time.time(), **body}, separators=(",", ":"))

        def route() -> "Deferred[None]":
            return self._db.read(
                SESSIONS_SCHEMA, _route, session_id, self.process_id, message, name="mcp_sessions.route"
            ).addCallbacks(sent, _logged("MCP message could not be routed to another process"))

        def sent(count: int) -> None:
            self.routed_out += count

        self._later(session_id, route)

    def deliver(self, session_id: str, data: str, event_id: Optional[int] = None) -> None:
        self._local.deliver(session_id, data, event_id)
        self._send(session_id, "d", d=data, e=event_id)

    def end(self, session_id: str) -> None:
        self._local.end(session_id)
        self._send(session_id, "e")

    def refresh(self, session_id: str, record: SessionRecord) -> None:
        self._local.refresh(session_id, record)
        values = record.to_json()
        values["expires_at"] = None if math.isinf(record.expires_at) else record.expires_at
        self._send(session_id, "r", r=values)

    def expect_reply(self, session_id: str, request_id: str, resolve: Callable[[Response], None]) -> None:
        self._local.expect_reply(session_id, request_id, resolve)

    def forget_reply(self, session_id: str, request_id: str) -> None:
        self._local.forget_reply(session_id, request_id)

    def route_reply(self, session_id: str, response: Response) -> bool:
        """
        The reply resolves here if this process waits for it; else it goes
        to the session's other holders (the process that sent the request
        holds the session while its call runs), and C{False} says it was
        not known here.
        """
        if self._local.route_reply(session_id, response):
            return True
        self._send(session_id, "a", id=response.id, result=response.result, error=response.error)
        return False

    def _received(self, payload: str) -> None:
        try:
            message = json.loads(payload)
            kind, session_id = message["k"], message["s"]
        except (ValueError, KeyError, TypeError):
            log.warn("MCP message from another process not understood")
            return
        self.routed_in += 1
        sent = message.get("t")
        if isinstance(sent, (int, float)):
            self.latencies.append(max(0.0, time.time() - sent))
        if kind == "d":
            self._local.deliver(session_id, message["d"], message.get("e"))
        elif kind == "e":
            self._local.end(session_id)
        elif kind == "r":
            values = message["r"]
            if values.get("expires_at") is None:
                values["expires_at"] = math.inf
            self._local.refresh(session_id, SessionRecord.from_json(values))
        elif kind == "a":
            self._local.route_reply(session_id, Response(message["id"], message.get("result"), message.get("error")))

    def _resync(self) -> None:
        # Notifications sent while the listening connection was down are
        # lost: a stream's events are in the log (the client resumes), a
        # state change is in the record (taken up on the next restore).
        log.warn("MCP routing connection re-established; messages meanwhile may be lost")

    @property
    def attached(self) -> int:
        """Sessions with a sink here."""
        return self._local.attached


class PostgresSessionState:
    """
    The three seams on one PostgreSQL database, and this process's part
    in sharing them: L{start} it before serving, L{stop} it after.
    """

    def __init__(
        self,
        database: "Database",
        clock: IReactorTime,
        *,
        resume_buffer: int = 256,
        heartbeat: float = HEARTBEAT,
        lease: float = LEASE,
        touch_interval: float = TOUCH_INTERVAL,
        process_id: Optional[str] = None,
    ) -> None:
        self.clock = clock
        self.store = PostgresSessionStore(database, clock, touch_interval=touch_interval)
        self.events = PostgresEventLog(database, clock, resume_buffer, interval=touch_interval)
        self.delivery = PostgresDelivery(database, clock, process_id=process_id, heartbeat=heartbeat, lease=lease)
        self.delivery.on_heartbeat = self._purge
        self.purged = 0

    def seams(self) -> dict[str, Any]:
        """C{store}, C{delivery} and C{events}, as L{MCPHTTP} takes them."""
        return {"store": self.store, "delivery": self.delivery, "events": self.events}

    def start(self) -> "Deferred[None]":
        return self.delivery.start()

    def stop(self) -> "Deferred[None]":
        return self.store.flush().addBoth(lambda _: self.delivery.stop())

    def _purge(self) -> "Deferred[None]":
        def counted(removed: int) -> None:
            self.purged += removed

        return self.store.purge(self.clock.seconds()).addCallback(counted)
