# -*- test-case-name: tests.test_site_db -*-
"""
The site database: one SQLite file, reached through an adbapi pool.

The site stores (posts, site tokens) share this file, which is separate from
the OAuth database so that an operator can back it up, move it or throw it
away on its own.  SQLite allows one writer at a time, so the pool holds a
single connection (one thread): statements run in the order they were
submitted, which also means no two transactions of this process ever wait
on each other.  Another process (the admin CLI) may write to the same file;
WAL lets readers go on meanwhile, and the busy timeout plus C{BEGIN
IMMEDIATE} make writers queue instead of failing half way.

Each store declares its tables as a L{Schema}: a component name and an
ordered list of migrations.  The first call that touches a component
applies whatever migrations its file lacks, inside one transaction, and
records them in C{schema_migrations}.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import attr
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from smeldr_oauth.store.sqlite import SQLiteConnectionPool, thread_pool_for

log = Logger()

T = TypeVar("T")

#: Seconds a writer waits for another process's write lock before failing.
BUSY_TIMEOUT = 10.0


@attr.s(frozen=True, auto_attribs=True)
class Migration:
    """
    One step of a component's schema.

    @ivar version: strictly increasing within a component, starting at 1.
    @ivar statements: SQL statements, run one by one (not as a script, so
        that they stay inside the migration's transaction).
    """

    version: int
    statements: tuple[str, ...]


@attr.s(frozen=True, auto_attribs=True)
class Schema:
    """
    The tables of one store, as the migrations that build them.
    """

    component: str
    migrations: tuple[Migration, ...]

    @property
    def version(self) -> int:
        return max((m.version for m in self.migrations), default=0)


class SchemaTooNew(Exception):
    """
    The file was migrated by a newer smeldr-oauth than this one: refuse to
    touch it rather than misread it.
    """


class SecondsClock(Protocol):
    """
    What the stores need of a clock: L{IReactorTime.seconds}.  A reactor or
    a L{twisted.internet.task.Clock} fits.
    """

    def seconds(self) -> float: ...


class _WallClock:
    """
    The default clock of the stores when none is injected.
    """

    def seconds(self) -> float:
        return time.time()


def wall_clock() -> SecondsClock:
    """
    A L{SecondsClock} reading the wall clock.
    """
    return _WallClock()


def _prepare(connection: sqlite3.Connection) -> None:
    """
    Per-connection setup (adbapi's C{cp_openfun}): rows by name, WAL,
    foreign keys, and the durability level WAL makes safe.
    """
    connection.row_factory = sqlite3.Row
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA foreign_keys=ON")
    connection.execute("PRAGMA synchronous=NORMAL")


MIGRATIONS_TABLE = (
    "CREATE TABLE IF NOT EXISTS schema_migrations ("
    " component TEXT NOT NULL,"
    " version INTEGER NOT NULL,"
    " applied_at REAL NOT NULL,"
    " PRIMARY KEY (component, version))"
)


def current_version(connection: Any, component: str) -> int:
    """
    The highest migration of C{component} applied to this file (0 if none).
    """
    connection.execute(MIGRATIONS_TABLE)
    row = connection.execute(
        "SELECT MAX(version) FROM schema_migrations WHERE component = ?", (component,)
    ).fetchone()
    return int(row[0] or 0)


def migrate(connection: Any, schema: Schema, now: float) -> int:
    """
    Bring C{schema} up to date on C{connection}, atomically, and return the
    resulting version.  Runs in the pool's thread.

    @raise SchemaTooNew: the file holds a later version than C{schema}.
    """
    if connection.in_transaction:
        connection.commit()
    connection.execute("BEGIN IMMEDIATE")
    try:
        have = current_version(connection, schema.component)
        if have > schema.version:
            raise SchemaTooNew(
                f"{schema.component} schema is version {have}; this code knows {schema.version}"
            )
        for migration in sorted(schema.migrations, key=lambda m: m.version):
            if migration.version <= have:
                continue
            for statement in migration.statements:
                connection.execute(statement)
            connection.execute(
                "INSERT INTO schema_migrations (component, version, applied_at) VALUES (?, ?, ?)",
                (schema.component, migration.version, now),
            )
            have = migration.version
        connection.commit()
    except BaseException:
        connection.rollback()
        raise
    return have


class SQLiteDatabase:
    """
    A SQLite file behind a one-connection adbapi pool, with helpers that run
    a function in a read or write transaction after making sure its
    component's schema is current.

    @ivar path: the file.
    @ivar pool: the L{adbapi.ConnectionPool}; closed by L{close}.
    @cvar default_threads: C{threads} when the caller gives none (a class
        attribute so that tests can run every store in either mode).
    """

    default_threads = 1

    def __init__(
        self,
        path: str | os.PathLike[str],
        reactor: Any | None = None,
        clock: SecondsClock | None = None,
        threads: int | None = None,
    ) -> None:
        """
        @param reactor: the reactor the pool's thread reports back to
            (adbapi uses the global one if C{None}: only the service-wiring
            layer should rely on that).
        @param clock: the time source for C{applied_at}.
        @param threads: 1 runs SQLite on the pool's own thread; 0 on the
            calling (reactor) thread, whose Deferreds have fired on return
            (C{--db-threads}; see L{smeldr_oauth.store.sqlite.ReactorThreadPool}).
        """
        self.path = os.fspath(path)
        self.clock = clock if clock is not None else wall_clock()
        self.pool = SQLiteConnectionPool(
            "sqlite3",
            self.path,
            timeout=BUSY_TIMEOUT,
            check_same_thread=False,
            cp_min=1,
            cp_max=1,
            cp_openfun=_prepare,
            cp_reactor=reactor,
            cp_noisy=False,
            threadpool=thread_pool_for(self.default_threads if threads is None else threads),
        )
        # Touched only from the pool's single thread (or the reactor's).
        self._current: set[str] = set()

    def _ensure(self, connection: Any, schema: Schema) -> None:
        if schema.component in self._current:
            return
        version = migrate(connection, schema, self.clock.seconds())
        log.info(
            "site database {path} component {component} at schema version {version}",
            path=self.path,
            component=schema.component,
            version=version,
        )
        self._current.add(schema.component)

    def read(self, schema: Schema, func: Callable[..., T], *args: Any) -> Deferred[T]:
        """
        Run C{func(connection, *args)} in the pool's thread.
        """

        def interaction(connection: Any) -> T:
            self._ensure(connection, schema)
            return func(connection, *args)

        return self.pool.runWithConnection(interaction)

    def write(self, schema: Schema, func: Callable[..., T], *args: Any) -> Deferred[T]:
        """
        Run C{func(connection, *args)} in an immediate transaction: committed
        if it returns, rolled back if it raises.
        """

        def interaction(connection: Any) -> T:
            self._ensure(connection, schema)
            if connection.in_transaction:
                connection.commit()
            connection.execute("BEGIN IMMEDIATE")
            return func(connection, *args)

        return self.pool.runWithConnection(interaction)

    def close(self) -> None:
        """
        Stop the pool's thread and close its connection.
        """
        self.pool.close()
