# -*- test-case-name: tests.test_mcp_state_postgres -*-
"""
The tables of the shared MCP session state, its constants, and the
serialiser of per-session calls.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.logger import Logger

from smeldr_oauth.db.migrations import Migration, Schema

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
#: The channel every process listens on for the application's changes.
CHANGES = "smeldr_mcp_changes"

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


class Serial:
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
