# -*- test-case-name: tests.test_mcp_state_postgres -*-
"""
Session records in PostgreSQL (L{PostgresSessionStore}).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Callable, Optional

import attr
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from zope.interface import implementer

from smeldr_oauth.mcp.state.interfaces import ISessionStore
from smeldr_oauth.mcp.calls import logged
from smeldr_oauth.mcp.state.postgres.schema import _ADMIT_LOCK, PURGE_BATCH, SESSIONS_SCHEMA, TOUCH_INTERVAL
from smeldr_oauth.mcp.state.records import SessionLimits, SessionRecord, make_room

if TYPE_CHECKING:
    from smeldr_oauth.db.database import Database, Transaction

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
        self.flush().addErrback(logged("MCP session activity could not be written"))

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

        The activity noted here is written first: a record used since its
        stored expiry (which L{get} here already reports) is not removed
        on that stale figure.

        @return: a L{Deferred} firing with the number of records removed.
        """
        return self.flush().addCallback(
            lambda _: self._db.write(SESSIONS_SCHEMA, _purge, now, batch, name="mcp_sessions.purge")
        )
