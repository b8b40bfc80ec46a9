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

#: SQLite's error names (C{sqlite3.DatabaseError.sqlite_errorname}) for a
#: file that is not a SQLite database, or a damaged one: no statement can
#: work, and no bug of ours made it so.  The operator's to mend, said in
#: one line as an unreachable database is (the server then does not start):
#: they were tracebacks, and a server that served on with 500s.
_UNUSABLE_FILE = ("SQLITE_NOTADB", "SQLITE_CORRUPT")


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
        if sqlite3.sqlite_version_info < (3, 41, 0):
            connection.create_function("unhex", 1, unhex, deterministic=True)

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
        if str(getattr(error, "sqlite_errorname", "")).startswith(_UNUSABLE_FILE):
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

    def change_stamp(self, connection: sqlite3.Connection) -> tuple[sqlite3.Connection, int, int]:
        """
        The connection, the rows it has changed (C{total_changes}: every
        C{INSERT}, C{UPDATE} or C{DELETE} through it, committed or not),
        and L{data_version} (every commit by another connection, another
        process's included): none of the three moves unless something may
        have changed.  About 2 µs: one C{PRAGMA}, no table read.
        """
        return connection, connection.total_changes, data_version(connection)

    def describe(self) -> str:
        return self.path


def unhex(text: Any) -> Optional[bytes]:
    """
    SQLite 3.41's C{unhex(X)} for older libraries (Debian 12 has 3.40): the
    bytes a string of hex digits spells, C{NULL} for anything else.  OAuth
    migration 9 converts hex keys with it (L{smeldr_oauth.store.hashkeys}).
    """
    if not isinstance(text, str) or len(text) % 2 or text.strip("0123456789abcdefABCDEF"):
        return None
    return bytes.fromhex(text)


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


#: How often L{Checkpointer} copies the WAL back into the database file.
CHECKPOINT_INTERVAL = 1.0

#: WAL frames (pages) past which L{Checkpointer} makes sure the WAL
#: restarts: 256 MiB of 4 KiB pages.  Each time, the grouped writes wait for
#: a second checkpoint (6-15 ms on a quiet bench box, 10-40 ms on a loaded
#: one: its two C{fsync}s), and every refresh that arrives meanwhile waits
#: with it.  At 16,384 frames (64 MiB) a busy server (4,000 refreshes a
#: second write 18,000-24,000 frames a second) held its writes every
#: second, 1.2-1.4% of the refreshes, and those were a third to three
#: quarters of the slowest 1% (C{docs/performance.md}, round nine).  At
#: 65,536 the hold comes about every 3 s at that rate, to about 0.4% of
#: the refreshes, below the 99th percentile; the WAL file stays under 256 MiB
#: and a second of writes, and is written over from its start again after
#: each restart.
RESTART_FRAMES = 65536

#: The longest L{Checkpointer} holds the grouped writes back, whatever its
#: thread does: seconds.
HOLD_LIMIT = 0.25


class Checkpointer:
    """
    WAL checkpoints off the commit path.

    By default SQLite checkpoints inside the C{COMMIT} that takes the WAL
    past 1,000 pages: on a busy server one refresh in about ninety paid for
    copying the whole WAL back into the database file (tens of
    milliseconds at times, on the reactor thread), and the profile counted
    the COMMIT at 14% of a refresh.  This turns that off on the database's
    own connection (C{PRAGMA wal_autocheckpoint=0}) and instead runs a
    C{PASSIVE} checkpoint every C{interval} seconds on a connection of its
    own, in a thread (SQLite releases the GIL while it copies), skipping a
    tick while the previous one still runs.  Pages written many times
    between two checkpoints are copied once.

    Durability is unchanged: a commit is durable when its WAL frames are
    written (C{synchronous=NORMAL} in WAL mode), before and after; a
    checkpoint only moves committed pages into the main file.  If the
    database's connection is replaced (it broke), the new one has SQLite's
    default automatic checkpoints again: slower, never unbounded.  L{stop}
    restores them too.

    The WAL restarts (the next commit writes from its start again instead
    of growing the file) only when a write transaction begins with every
    frame already copied back.  Under a steady load a commit always lands
    while the checkpoint runs (tens of milliseconds with its two
    C{fsync}s), so it never did: at 2,700 refreshes a second the WAL grew
    by 50 MB a second for as long as the load lasted (C{docs/performance.md},
    round seven).  So when the WAL is past L{RESTART_FRAMES}, a second,
    short checkpoint follows the first with the grouped writes held back
    (L{Database.hold_batches}, at most L{HOLD_LIMIT}): it copies only what
    was committed during the first, and the next commit restarts the WAL.

    @param run_in_thread: runs a function in a thread, returning a
        L{Deferred} of its result (tests run it inline).
    @param restart_frames: L{RESTART_FRAMES} (tests use less).
    """

    def __init__(
        self,
        database: "Database",
        clock: IReactorTime,
        run_in_thread: Callable[[Callable[[], Any]], "Deferred[Any]"],
        interval: float = CHECKPOINT_INTERVAL,
        restart_frames: int = RESTART_FRAMES,
    ) -> None:
        self._database = database
        self._run = run_in_thread
        self._path = database.engine.path  # type: ignore[attr-defined]
        self._connection: Optional[sqlite3.Connection] = None
        self._running = False
        #: The last checkpoint's (busy, WAL frames, frames checkpointed).
        self.last: Optional[tuple[int, int, int]] = None
        self._clock = clock
        self._loop = LoopingCall(self._tick)
        self._loop.clock = clock
        self._interval = interval
        self._restart_frames = restart_frames
        self._held_last: Optional[tuple[int, int, int]] = None

    def start(self) -> "Deferred[None]":
        """
        Turn the database connection's automatic checkpoints off, then
        checkpoint every interval.
        """

        def started(_: Any) -> None:
            self._loop.start(self._interval, now=False)

        return self._database.with_connection(_autocheckpoint, 0).addCallback(started)

    def stop(self) -> "Deferred[Any]":
        """
        Stop, checkpoint once more, and give the connection its automatic
        checkpoints back.
        """
        if self._loop.running:
            self._loop.stop()

        def close() -> None:
            if self._connection is not None:
                self._checkpoint()
                self._connection.close()
                self._connection = None

        def restored(_: Any) -> Any:
            return self._database.with_connection(_autocheckpoint, 1000)

        return self._run(close).addBoth(restored)

    def _tick(self) -> None:
        if self._running:
            return
        self._running = True

        def done(result: Any) -> None:
            self._running = False
            if isinstance(result, Failure):
                log.failure("WAL checkpoint failed", result)

        def copied(_: Any) -> Any:
            last = self.last
            if last is None or last[0] or last[1] < self._restart_frames or last[2] < last[1]:
                return None
            if last == self._held_last:
                return None  # nothing written since the last second pass (idle)
            # Everything the first pass saw is copied; what was committed
            # meanwhile is copied with no commit under way, so that the
            # next one restarts the WAL.
            release = self._database.hold_batches()
            limit = self._clock.callLater(HOLD_LIMIT, release)

            def released(result: Any) -> Any:
                if limit.active():
                    limit.cancel()
                release()
                self._held_last = self.last
                return result

            return self._run(self._checkpoint).addBoth(released)

        self._run(self._checkpoint).addCallback(copied).addBoth(done)

    def _checkpoint(self) -> None:
        if self._connection is None:
            self._connection = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None)
        row = self._connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        self.last = (int(row[0]), int(row[1]), int(row[2]))


def _autocheckpoint(connection: sqlite3.Connection, pages: int) -> None:
    connection.execute(f"PRAGMA wal_autocheckpoint={int(pages)}")
