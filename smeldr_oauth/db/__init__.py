"""
The database layer every store is written on: a L{Database} over
L{twisted.enterprise.adbapi}, an engine for what differs between SQLite and
PostgreSQL (L{smeldr_oauth.db.sqlite}, L{smeldr_oauth.db.postgres}), one
migration scheme (L{smeldr_oauth.db.migrations}), engine-neutral errors,
and PostgreSQL C{LISTEN}/C{NOTIFY} on the reactor (L{smeldr_oauth.db.notify}).
"""

from __future__ import annotations

import os
from typing import Any, Optional

from twisted.internet.interfaces import IReactorTime

from smeldr_oauth.db.database import Database, Transaction, TransactionStats
from smeldr_oauth.db.errors import SchemaTooNew, StoreConflict, StoreUnavailable
from smeldr_oauth.db.migrations import Migration, Schema
from smeldr_oauth.db.postgres import PostgresEngine, is_postgres_url
from smeldr_oauth.db.sqlite import SQLiteEngine

#: Pool threads (and connections) of a PostgreSQL database when the caller
#: names none.  One process's refreshes are bounded by the transactions it
#: has in flight, each waiting on its round trips and its commit's flush
#: far longer than it runs: 8 refreshed about 1.5 times as fast as 4 on
#: the 2-core test machine for the same CPU per refresh, and 16 no faster
#: (docs/performance.md, round six).
POSTGRES_THREADS = 8
#: Of a SQLite database: its one writer, on a thread of its own.
SQLITE_THREADS = 1

__all__ = [
    "Database",
    "Migration",
    "PostgresEngine",
    "SQLiteEngine",
    "Schema",
    "SchemaTooNew",
    "StoreConflict",
    "StoreUnavailable",
    "Transaction",
    "TransactionStats",
    "is_postgres_url",
    "open_database",
]


def open_database(
    location: "str | os.PathLike[str]",
    reactor: Any = None,
    *,
    threads: Optional[int] = None,
    threadpool: Any = None,
    clock: Optional[IReactorTime] = None,
    group_commit: bool = False,
) -> Database:
    """
    A L{Database} for a C{--database} value: a C{postgresql://} URL, or the
    path of a SQLite file.  Nothing is opened until the first call.

    @param threads: 0 runs calls on the calling (reactor) thread; N on N
        pool threads (SQLite: at most 1).  Default: L{POSTGRES_THREADS} or
        L{SQLITE_THREADS}.
    @param group_commit: see L{Database}.
    """
    engine: Any
    if is_postgres_url(location):
        engine, default = PostgresEngine(str(location)), POSTGRES_THREADS
    else:
        engine, default = SQLiteEngine(location), SQLITE_THREADS
    return Database(
        engine,
        reactor,
        threads=default if threads is None else threads,
        threadpool=threadpool,
        clock=clock,
        group_commit=group_commit,
    )
