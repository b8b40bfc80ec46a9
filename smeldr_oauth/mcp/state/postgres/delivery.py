# -*- test-case-name: tests.test_mcp_state_postgres -*-
"""
Delivery between the processes sharing one database (L{PostgresDelivery}):
process identity and lease, holder rows, one C{NOTIFY} channel per process.
"""

from __future__ import annotations

import json
import math
import secrets
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Optional

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure
from zope.interface import implementer

from smeldr_oauth.db.notify import NOTIFICATIONS_SCHEMA, NOTIFY_LIMIT, publish
from smeldr_oauth.mcp.calls import logged
from smeldr_oauth.mcp.jsonrpc import Response
from smeldr_oauth.mcp.state.interfaces import IEventLog, ISessionDelivery, ISessionSink
from smeldr_oauth.mcp.state.memory import LocalDelivery, append_then_deliver
from smeldr_oauth.mcp.state.postgres.events import PostgresEventLog
from smeldr_oauth.mcp.state.postgres.schema import (
    CHANGES,
    CHANNEL_PREFIX,
    HEARTBEAT,
    LEASE,
    SESSIONS_SCHEMA,
    Serial,
    log,
)
from smeldr_oauth.mcp.state.records import SessionRecord

if TYPE_CHECKING:
    from smeldr_oauth.db.database import Database, Transaction

# -- delivery between processes -----------------------------------------------------


#: L{_route}'s statement for an inline payload, in PostgreSQL's own
#: parameters, for the listening connection (L{Listener.execute}); C{$1}
#: the channel prefix, C{$2} the payload, C{$3} the session, C{$4} this
#: process.
_ROUTE_INLINE = (
    "SELECT pg_notify($1 || process_id, $2) FROM mcp_session_holders WHERE session_id = $3 AND process_id <> $4"
)


def _route(txn: "Transaction", session_id: str, me: str, message: str, stream_only: bool) -> int:
    """
    NOTIFY the other processes holding C{session_id} (only the one holding
    its stream when C{stream_only}); how many.  Through the pool: used for
    payloads over the NOTIFY limit, and while the listening connection is
    down (else L{PostgresDelivery._send} sends L{_ROUTE_INLINE} on it).
    """
    where = "session_id = ? AND process_id <> ?" + (" AND stream" if stream_only else "")
    if len(message.encode("utf-8")) < NOTIFY_LIMIT:
        rows = txn.execute(
            f"SELECT pg_notify(? || process_id, ?) FROM mcp_session_holders WHERE {where}",
            (CHANNEL_PREFIX, "=" + message, session_id, me),
        ).fetchall()
        return len(rows)
    holders = txn.execute(f"SELECT process_id FROM mcp_session_holders WHERE {where}", (session_id, me)).fetchall()
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


def _heartbeat(txn: "Transaction", me: str, lease: float) -> tuple[bool, list[str], list[str]]:
    """
    Renew this process's lease; reap the processes whose lease ran out.

    @return: whether this process's row was still there, the dead
        process ids, and the legacy sessions that died with them.
    """
    alive = txn.execute("UPDATE mcp_processes SET heartbeat_at = now() WHERE process_id = ?", (me,)).rowcount > 0
    expired = "heartbeat_at < now() - make_interval(secs => ?)"
    legacy = txn.execute(
        "DELETE FROM mcp_sessions WHERE kind = 'legacy' AND session_id IN (SELECT h.session_id"
        " FROM mcp_session_holders h JOIN mcp_processes p USING (process_id)"
        f" WHERE h.stream AND p.{expired}) RETURNING session_id",
        (lease,),
    ).fetchall()
    dead = txn.execute(f"DELETE FROM mcp_processes WHERE {expired} RETURNING process_id", (lease,)).fetchall()
    return alive, [row[0] for row in dead], [row[0] for row in legacy]


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
        self._serial = Serial()
        self._gate: Optional[Deferred[None]] = Deferred()
        self._subscription: Any = None
        self._listener: Any = None
        self._beating: Optional[LoopingCall] = None
        self._beats_over: Optional[Deferred[Any]] = None  # fires once the heartbeat stopped
        self.routed_out = 0
        self.routed_in = 0
        self.latencies: deque[float] = deque(maxlen=1024)
        self.streams_taken_over = 0
        self.processes_reaped = 0
        self.legacy_sessions_reaped = 0
        self.on_heartbeat: Optional[Callable[[], Any]] = None
        self._here: Optional[Callable[[str, str, frozenset[str]], None]] = None
        self._changes: Any = None
        self.changes_out = 0
        self.changes_in = 0

    # -- the process --------------------------------------------------------------

    def start(self) -> "Deferred[None]":
        """
        Register this process and listen on its channel; calls made
        before wait for it.  Then beat the heart every C{heartbeat}
        seconds.
        """
        listener = self._listener = self._db.engine.listener(self._db)  # type: ignore[attr-defined]
        self._subscription = listener.listen(self.channel, self._received, resync=self._resync)
        self._changes = listener.listen(CHANGES, self._changed)

        def registered(_: Any) -> "Deferred[None]":
            return gatherResults([self._subscription.ready, self._changes.ready]).addCallback(lambda _: None)

        def ready(_: Any) -> None:
            gate, self._gate = self._gate, None
            log.info("MCP sessions shared through the database as process {id}", id=self.process_id)
            self._beating = LoopingCall(self._beat)
            self._beating.clock = self._clock
            self._beats_over = self._beating.start(self.heartbeat, now=False).addErrback(logged("MCP heartbeat stopped"))
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
        their streams; Streamable HTTP records stay for the others), once
        a beat running (heartbeat, purge) is over: it would register again.
        """
        if self._beating is not None and self._beating.running:
            self._beating.stop()
        over, self._beats_over = self._beats_over or succeed(None), None
        for subscription in (self._subscription, self._changes):
            if subscription is not None:
                subscription.stop()
        if self._gate is not None:
            # Never started: nothing of ours is in the database.
            return succeed(None)
        return over.addCallback(lambda _: self.settled()).addCallback(
            lambda _: self._db.write(SESSIONS_SCHEMA, _leave, self.process_id, name="mcp_processes.leave")
        )

    def _beat(self) -> "Deferred[None]":
        def beaten(outcome: tuple[bool, list[str], list[str]]) -> Any:
            alive, dead, legacy = outcome
            if dead:
                self.processes_reaped += len(dead)
                self.legacy_sessions_reaped += len(legacy)
                log.warn(
                    "MCP processes {dead} missed their lease: their streams are free, {legacy} legacy sessions ended",
                    dead=", ".join(dead),
                    legacy=len(legacy),
                )
            for session_id in legacy:
                # Their stream died with its process: the copies elsewhere go.
                self.end(session_id)
            if not alive:
                log.warn("MCP process {id} lost its lease (stalled?): registering again", id=self.process_id)
                held = {s: s in self._streams for s in self._local_sessions()}
                return self._db.write(SESSIONS_SCHEMA, _register, self.process_id, held, name="mcp_processes.register")
            return None

        d: Deferred[Any] = self._db.write(SESSIONS_SCHEMA, _heartbeat, self.process_id, self.lease, name="mcp_processes.heartbeat")
        d.addCallback(beaten)
        hook = self.on_heartbeat
        if hook is not None:
            d.addCallback(lambda _: hook())
        # A failed beat (the database restarting) is logged; the next one tries again.
        return d.addErrback(logged("MCP heartbeat failed"))

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
            ).addErrback(logged("MCP session claim failed"))

    def detach(self, session_id: str, sink: ISessionSink) -> None:
        self._local.detach(session_id, sink)
        if not self._local.holds(session_id):
            self._streams.discard(session_id)
            self._later(
                session_id, self._db.write, SESSIONS_SCHEMA, _let_go, session_id, self.process_id,
                name="mcp_sessions.let_go",
            ).addErrback(logged("MCP session release failed"))

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
            ).addCallbacks(claimed, logged("MCP stream claim failed"))

        def claimed(moved: int) -> None:
            self.streams_taken_over += moved

        self._later(session_id, claim)

    # -- messages ---------------------------------------------------------------------

    def _send(self, session_id: str, kind: str, **body: Any) -> None:
        message = json.dumps({"k": kind, "s": session_id, "t": time.time(), **body}, separators=(",", ":"))
        # A message for the stream matters only where the stream is; the
        # other copies drop it.
        stream_only = kind == "d"

        def pooled(_: Any = None) -> "Deferred[int]":
            return self._db.read(
                SESSIONS_SCHEMA, _route, session_id, self.process_id, message, stream_only, name="mcp_sessions.route"
            )

        def route() -> "Deferred[None]":
            listener = self._listener
            if listener is None or not listener.connected or len(message.encode("utf-8")) >= NOTIFY_LIMIT:
                d = pooled()
            else:
                # One autocommit statement on the listening connection, from
                # the reactor thread: no pool thread hand-off, no psycopg
                # cursor, no BEGIN/COMMIT.  If that connection goes before
                # the answer, the pool sends it (possibly twice: a JSON-RPC
                # client drops an answer it already has; a lost one would
                # hang it).
                d = listener.execute(
                    _ROUTE_INLINE + (" AND stream" if stream_only else ""),
                    (CHANNEL_PREFIX, "=" + message, session_id, self.process_id),
                ).addCallbacks(len, lambda failure: pooled() if failure.check(ConnectionError) else failure)
            return d.addCallbacks(sent, logged("MCP message could not be routed to another process"))

        def sent(count: int) -> None:
            self.routed_out += count

        self._later(session_id, route)

    def deliver(self, session_id: str, data: str, event_id: Optional[int] = None) -> None:
        self._local.deliver(session_id, data, event_id)
        self._send(session_id, "d", d=data, e=event_id)

    def deliver_logged(self, session_id: str, data: str, events: IEventLog) -> "Deferred[int]":
        """
        On this process's own database, with the listening connection up:
        the event is logged by one autocommit statement on that connection
        (L{PostgresEventLog.append_direct}), then delivered and routed as
        L{deliver} does (the route, another statement on that connection).
        Otherwise, or if the connection goes mid-way, logged through the
        pool (the statement may have run: the message is then logged
        twice).

        Logging and routing stay two statements, the route after the
        append committed: a process taking the stream over claims it, then
        reads the log; an event whose route looked for the holder before
        that claim was committed must be in what it reads.  One statement
        doing both would choose the holders from a snapshot taken before
        its own commit, and an event could fall between the claim and the
        read.
        """
        listener = self._listener
        if (
            not isinstance(events, PostgresEventLog)
            or events._db is not self._db
            or listener is None
            or not listener.connected
        ):
            return append_then_deliver(self, session_id, data, events)

        def appended(event_id: int) -> int:
            self.deliver(session_id, data, event_id)
            return event_id

        def failed(failure: Failure) -> "Deferred[int]":
            failure.trap(ConnectionError)
            return append_then_deliver(self, session_id, data, events)

        return events.append_direct(session_id, data, listener).addCallbacks(appended, failed)

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

    # -- the application's changes ------------------------------------------------

    def share_changes(
        self, here: Callable[[str, str, frozenset[str]], None]
    ) -> Optional[Callable[[str, str], None]]:
        self._here = here
        return self._relay

    def _relay(self, change: str, value: str) -> None:
        # The sessions with live copies here were told by them.
        message = json.dumps(
            {"p": self.process_id, "c": change, "v": value, "skip": sorted(self._local._sinks)},
            separators=(",", ":"),
        )

        def send() -> "Deferred[None]":
            return self._db.write(
                SESSIONS_SCHEMA, publish, CHANGES, message, name="mcp_sessions.change"
            ).addCallbacks(sent, logged("MCP change could not be relayed to the other processes"))

        def sent(_: Any) -> None:
            self.changes_out += 1

        self._later(CHANGES, send)

    def _changed(self, payload: str) -> None:
        try:
            message = json.loads(payload)
            origin, change, value, skip = message["p"], message["c"], message["v"], frozenset(message["skip"])
        except (ValueError, KeyError, TypeError):
            log.warn("MCP change from another process not understood")
            return
        if origin == self.process_id or self._here is None:
            return
        self.changes_in += 1
        self._here(change, value, skip)

    def _resync(self) -> None:
        # Notifications sent while the listening connection was down are
        # lost: a stream's events are in the log (the client resumes), a
        # state change is in the record (taken up on the next restore).
        log.warn("MCP routing connection re-established; messages meanwhile may be lost")

    @property
    def attached(self) -> int:
        """Sessions with a sink here."""
        return self._local.attached
