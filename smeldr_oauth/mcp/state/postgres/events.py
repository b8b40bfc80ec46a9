# -*- test-case-name: tests.test_mcp_state_postgres -*-
"""
The C{Last-Event-ID} log in PostgreSQL (L{PostgresEventLog}).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Optional

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from zope.interface import implementer

from smeldr_oauth.mcp.state.interfaces import IEventLog
from smeldr_oauth.mcp.calls import logged
from smeldr_oauth.mcp.state.postgres.schema import SESSIONS_SCHEMA, TOUCH_INTERVAL, Serial

if TYPE_CHECKING:
    from smeldr_oauth.db.database import Database, Transaction

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


#: L{_append} in PostgreSQL's own parameters, for the listening connection
#: (L{PostgresEventLog.append_direct}): C{$1} the session, C{$2} the data,
#: C{$3} the limit.  One statement, its own transaction.
_APPEND_DIRECT = (
    "WITH head AS (INSERT INTO mcp_event_heads (session_id, last_id) VALUES ($1, 1)"
    "  ON CONFLICT (session_id) DO UPDATE SET last_id = mcp_event_heads.last_id + 1 RETURNING last_id),"
    " added AS (INSERT INTO mcp_events (session_id, event_id, data)"
    "  SELECT $1, last_id, $2 FROM head RETURNING event_id),"
    " trimmed AS (DELETE FROM mcp_events WHERE session_id = $1"
    "  AND event_id <= (SELECT event_id FROM added) - $3::int)"
    " SELECT event_id FROM added"
)


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
        self._serial = Serial()
        self._delivered: dict[str, int] = {}
        self._dirty: dict[str, int] = {}
        self._flushing: Optional[IDelayedCall] = None
        #: Fires once this process's claims on a session so far are written
        #: (L{PostgresDelivery.settled}, wired by L{PostgresSessionState}).
        self.claims_settled: Optional[Callable[[str], "Deferred[None]"]] = None

    def append(self, session_id: str, data: str) -> "Deferred[int]":
        return self._serial.run(
            session_id, self._db.write, SESSIONS_SCHEMA, _append, session_id, data, self.limit, name="mcp_events.append"
        )

    def append_direct(self, session_id: str, data: str, listener: Any) -> "Deferred[int]":
        """
        L{append} as one autocommit statement on C{listener} (the listening
        connection, from the reactor thread: no database thread, no
        C{BEGIN}/C{COMMIT}), in order with this session's other appends.

        @return: fires with the event id; fails with L{ConnectionError}
            when the listening connection is down or went before the
            answer (the statement may have run).
        """

        def run() -> "Deferred[int]":
            return listener.execute(_APPEND_DIRECT, (session_id, data, str(self.limit))).addCallback(
                lambda rows: int(rows[0][0])
            )

        return self._serial.run(session_id, run)

    def replay(self, session_id: str, after: Optional[int] = None) -> "Deferred[list[tuple[int, str]]]":
        """
        The log is read once this process's claim on the session's stream
        is written (L{claims_settled}): an event logged before the claim
        is in what is read, one logged after it is routed here (its route
        looks for the holder after the event is committed).  Read at once,
        a concurrent event could be in neither.
        """
        seen = self._delivered.get(session_id, 0)

        def read() -> "Deferred[list[tuple[int, str]]]":
            return self._db.read(SESSIONS_SCHEMA, _replay, session_id, after, seen, name="mcp_events.replay")

        claims = self.claims_settled
        if claims is None:
            return self._serial.run(session_id, read)
        return claims(session_id).addCallback(lambda _: self._serial.run(session_id, read))

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
                logged("MCP event delivery marks could not be written")
            )

    def forget(self, session_id: str) -> None:
        self._delivered.pop(session_id, None)
        self._dirty.pop(session_id, None)
        self._serial.run(
            session_id, self._db.write, SESSIONS_SCHEMA, _forget, session_id, name="mcp_events.forget"
        ).addErrback(logged("MCP events of an ended session could not be removed"))
