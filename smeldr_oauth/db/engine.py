# -*- test-case-name: tests.test_db_database -*-
"""
The seam between the database layer and a database engine.

Stores are written once, in SQL that both engines accept (C{?}
placeholders, C{INSERT ... ON CONFLICT}, C{RETURNING}, primary-key deletes
rather than C{rowid}); an L{IDatabaseEngine} holds only what cannot be
written once: how to connect and set up a connection, how a write
transaction takes its locks, how placeholders are spelled, how an error is
classified, how a change is announced to other processes and watched for.
L{smeldr_oauth.db.sqlite.SQLiteEngine} and
L{smeldr_oauth.db.postgres.PostgresEngine} are the two implementations.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Hashable, Optional, Sequence

from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

    from smeldr_oauth.db.database import Database, Transaction

#: L{IDatabaseEngine.classify}: the error broke a uniqueness or reference
#: rule; the call becomes L{smeldr_oauth.db.errors.StoreConflict}.
CONFLICT = "conflict"
#: The database cannot be reached or cannot answer now; the call becomes
#: L{smeldr_oauth.db.errors.StoreUnavailable}.
UNAVAILABLE = "unavailable"
#: A deadlock or serialisation failure: the transaction was rolled back by
#: the server and is run again from the start.
RETRY = "retry"


class IWatch(Interface):
    """
    A subscription made by L{IDatabaseEngine.watch}.
    """

    running = Attribute("C{True} until L{stop} is called.")

    def stop() -> None:  # type: ignore[misc]
        """
        Stop calling the callback.
        """


class IDatabaseEngine(Interface):
    """
    What differs between SQLite and PostgreSQL, and nothing else.
    """

    name = Attribute(
        "C{'sqlite'} or C{'postgresql'}: the key of engine-specific migration statements."
    )
    dbapi_name = Attribute("The DB-API module adbapi imports (C{'sqlite3'}, C{'psycopg'}).")
    single_writer = Attribute(
        "C{True} when the engine serialises writers itself (SQLite's file lock): the pool"
        " then holds one connection on one thread, and C{BEGIN IMMEDIATE} takes the lock"
        " before the first read."
    )
    for_update = Attribute(
        "The clause that locks the rows a C{SELECT} reads until the transaction ends"
        " (C{' FOR UPDATE'}), or C{''} where the write transaction already holds a lock"
        " on the whole database."
    )

    def connect_arguments() -> tuple[tuple[Any, ...], dict[str, Any]]:  # type: ignore[misc]
        """
        The positional and keyword arguments of the DB-API C{connect}.
        """

    def prepare(connection: Any) -> None:  # type: ignore[misc]
        """
        Set up a new connection (adbapi's C{cp_openfun}): pragmas or session
        settings, the row type.
        """

    def begin(transaction: "Transaction") -> None:  # type: ignore[misc]
        """
        Open a write transaction.  Reads run without one: each of their
        statements is atomic on its own, and no store reads across several
        statements outside a write.
        """

    def combine(  # type: ignore[misc]
        statements: Sequence[tuple[str, Sequence[Any]]],
    ) -> list[tuple[str, Sequence[Any]]]:
        """
        Statements that do not depend on each other's effects, as few as
        the engine can run them in (PostgreSQL: one, chaining all but the
        last as data-modifying C{WITH} clauses, so one round trip; SQLite,
        where a statement costs no round trip: as they are).  The last
        statement's rows (its C{RETURNING}) are the result.
        """

    def convert(sql: str) -> str:  # type: ignore[misc]
        """
        A statement written with C{?} placeholders, in the engine's style.
        """

    def classify(error: BaseException) -> Optional[str]:  # type: ignore[misc]
        """
        L{CONFLICT}, L{UNAVAILABLE}, L{RETRY}, or C{None} for an error that
        means a bug (and propagates as it is).
        """

    def broken(connection: Any) -> bool:  # type: ignore[misc]
        """
        Whether a connection is unusable and must be replaced.
        """

    def lock_schema(transaction: "Transaction") -> None:  # type: ignore[misc]
        """
        Inside a migration's write transaction: wait until no other process
        is migrating the same database.
        """

    def notify(transaction: "Transaction", channel: str, payload: str) -> None:  # type: ignore[misc]
        """
        Announce C{payload} on C{channel} to every process watching it, when
        (and only if) the transaction commits.
        """

    def watch(  # type: ignore[misc]
        database: "Database",
        channel: str,
        callback: Callable[[Optional[str]], None],
        clock: "IReactorTime",
        interval: float,
    ) -> IWatch:
        """
        Call C{callback(payload)} for each announcement on C{channel} made by
        any process, and C{callback(None)} when announcements may have been
        missed (so the caller must assume anything changed).  An engine
        without announcements calls C{callback(None)} whenever another
        connection has committed, checking every C{interval} seconds.
        """

    def change_stamp(connection: Any) -> Optional[Hashable]:  # type: ignore[misc]
        """
        A value that differs from any earlier one the moment anything may
        have been committed to the database through C{connection} or
        through any other connection, asked on the calling thread without
        a round trip; C{None} if the engine cannot know that so cheaply
        (then nothing may be kept on the strength of it).
        """

    def describe() -> str:  # type: ignore[misc]
        """
        Where the database is, for log lines: never a password.
        """


def question_marks_to_format(sql: str) -> str:
    """
    C{?} placeholders as C{%s}, and literal C{%} doubled, for DB-API modules
    of the C{format} paramstyle.  The stores' SQL has no C{?} inside string
    literals.
    """
    return sql.replace("%", "%%").replace("?", "%s")
