# -*- test-case-name: tests.test_db_sqlite -*-
"""
The SQLite engine: one file, one writer.

One connection on one thread (or on the reactor thread itself): SQLite
serialises writers anyway, and a single writer never meets C{SQLITE_BUSY}
from itself.  The connection is in autocommit mode; a write transaction is
C{BEGIN IMMEDIATE}, which takes the file's write lock before the first
read, so a read-decide-write sequence (spending a code, rotating a refresh
token) cannot interleave with another process using the same file either
(it waits up to the busy timeout, then the call fails as
L{smeldr_oauth.db.errors.StoreUnavailable}).

WAL lets readers go on while the writer writes; C{synchronous=NORMAL} is
durable across application crashes in WAL mode and much cheaper than
C{FULL}; foreign keys are off by default in SQLite.

There are no announcements between processes: a watcher polls C{PRAGMA
data_version}, which changes when another connection commits to the file,
and only then.
"""

from __future__ import annotations

import os
import sqlite3
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from smeldr_oauth.db.engine import CONFLICT, UNAVAILABLE, IDatabaseEngine, IWatch

if TYPE_CHECKING:
    from smeldr_oauth.db.database import Database, Transaction

log = Logger()

#: Seconds a writer waits for another process's write lock before failing.
BUSY_TIMEOUT = 5.0

#: Words of C{sqlite3.OperationalError} messages that mean "not now"
#: rather than a bug (a syntax error or a missing table is an
#: OperationalError too).
_UNAVAILABLE_WORDS = ("locked", "busy", "unable to open", "disk i/o", "disk is full", "readonly")


@implementer(IDatabaseEngine)
class SQLiteEngine:
    """
    A SQLite file (or C{":memory:"}, which lives as long as the pool's one
    connection).
    """

    name = "sqlite"
    dbapi_name = "sqlite3"
    single_writer = True
    for_update = ""

    def __init__(self, path: "str | os.PathLike[str]", busy_timeout: float = BUSY_TIMEOUT) -> None:
        self.path = os.fspath(path)
        self.busy_timeout = busy_timeout

    def connect_arguments(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (self.path,), dict(
            check_same_thread=False, isolation_level=None, timeout=self.busy_timeout
        )

    def prepare(self, connection: sqlite3.Connection) -> None:
        connection.row_factory = sqlite3.Row
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        connection.execute("PRAGMA foreign_keys=ON")
        connection.execute(f"PRAGMA busy_timeout={int(self.busy_timeout * 1000)}")

    def begin(self, transaction: "Transaction") -> None:
        transaction.execute("BEGIN IMMEDIATE")

    def combine(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> list[tuple[str, Sequence[Any]]]:
        return list(statements)

    def convert(self, sql: str) -> str:
        return sql

    def classify(self, error: BaseException) -> Optional[str]:
        if isinstance(error, sqlite3.IntegrityError):
            return CONFLICT
        if isinstance(error, sqlite3.OperationalError):
            message = str(error).lower()
            if any(word in message for word in _UNAVAILABLE_WORDS):
                return UNAVAILABLE
        return None

    def broken(self, connection: Any) -> bool:
        return False

    def lock_schema(self, transaction: "Transaction") -> None:
        # BEGIN IMMEDIATE already excludes every other writer.
        pass

    def notify(self, transaction: "Transaction", channel: str, payload: str) -> None:
        # Nothing to send: watchers see the commit through data_version.
        pass

    def watch(
        self,
        database: "Database",
        channel: str,
        callback: Callable[[Optional[str]], None],
        clock: IReactorTime,
        interval: float,
    ) -> IWatch:
        return DataVersionWatch(database, callback, clock, interval)

    def describe(self) -> str:
        return self.path


def data_version(connection: sqlite3.Connection) -> int:
    """
    C{PRAGMA data_version} on C{connection}: it changes when I{another}
    connection commits to the file.
    """
    return int(connection.execute("PRAGMA data_version").fetchone()[0])


@implementer(IWatch)
class DataVersionWatch:
    """
    Polls C{PRAGMA data_version} on the database's own connection every
    C{interval} seconds and calls C{callback(None)} when another process
    has committed to the file (the server's own commits do not count).
    """

    def __init__(
        self,
        database: "Database",
        callback: Callable[[Optional[str]], None],
        clock: IReactorTime,
        interval: float,
    ) -> None:
        self._database = database
        self._callback = callback
        self._last: Optional[int] = None
        self._loop = LoopingCall(self._poll)
        self._loop.clock = clock
        self._loop.start(interval, now=True)

    @property
    def running(self) -> bool:
        return bool(self._loop.running)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def _poll(self) -> "Deferred[None]":
        def seen(version: int) -> None:
            if self._last is not None and version != self._last:
                self._callback(None)
            self._last = version

        def failed(f: Failure) -> None:
            log.failure("could not poll the database for outside changes", f)

        return self._database.with_connection(data_version).addCallbacks(seen, failed)
