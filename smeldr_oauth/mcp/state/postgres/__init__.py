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
routed messages) run one after another in this process (L{schema.Serial});
calls on different sessions run in parallel on the pool.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from smeldr_oauth.mcp.state.postgres.delivery import PostgresDelivery
from smeldr_oauth.mcp.state.postgres.events import PostgresEventLog
from smeldr_oauth.mcp.state.postgres.schema import (
    CHANGES,
    CHANNEL_PREFIX,
    HEARTBEAT,
    LEASE,
    PURGE_BATCH,
    SESSIONS_SCHEMA,
    TOUCH_INTERVAL,
)
from smeldr_oauth.mcp.state.postgres.store import PostgresSessionStore

if TYPE_CHECKING:
    from smeldr_oauth.db.database import Database

__all__ = [
    "CHANGES",
    "CHANNEL_PREFIX",
    "HEARTBEAT",
    "LEASE",
    "PURGE_BATCH",
    "SESSIONS_SCHEMA",
    "TOUCH_INTERVAL",
    "PostgresDelivery",
    "PostgresEventLog",
    "PostgresSessionState",
    "PostgresSessionStore",
]


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
        self.events.claims_settled = self.delivery.settled
        self.purged = 0

    def figures(self) -> dict[str, float]:
        """
        This process's counters, for metrics: messages routed out and in,
        the one-way latency of the last routed ones (p50, p99, seconds),
        changes relayed, stream claims taken over, dead processes reaped,
        legacy sessions ended with them, expired records purged.
        """
        delivery = self.delivery
        latencies = sorted(delivery.latencies)

        def at(q: float) -> float:
            return latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else 0.0

        return {
            "routed_out": delivery.routed_out,
            "routed_in": delivery.routed_in,
            "route_latency_p50": at(0.5),
            "route_latency_p99": at(0.99),
            "changes_out": delivery.changes_out,
            "changes_in": delivery.changes_in,
            "streams_taken_over": delivery.streams_taken_over,
            "processes_reaped": delivery.processes_reaped,
            "legacy_sessions_reaped": delivery.legacy_sessions_reaped,
            "purged": self.purged,
        }

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
