"""
Tests for L{smeldr_oauth.db.database}: the one database layer, on a real
SQLite file and on a real PostgreSQL database (L{tests.postgres}).
"""

from __future__ import annotations

import os
import sqlite3
import threading
from typing import Any

from twisted.internet import reactor as global_reactor
from twisted.internet.defer import DeferredList, inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase, TestCase

from smeldr_oauth.db import Database, Migration, Schema, open_database
from smeldr_oauth.db.database import Before, NoThreads, Transaction
from smeldr_oauth.db.errors import StoreConflict, StoreUnavailable
from smeldr_oauth.db.postgres import PostgresEngine
from smeldr_oauth.db.sqlite import SQLiteEngine
from tests import postgres
from tests.test_store_sqlite import InlineReactor, InlineThreadPool

SCHEMA = Schema(
    "things",
    (
        Migration(
            1,
            (
                "CREATE TABLE things (name TEXT PRIMARY KEY, size INTEGER NOT NULL)",
                "CREATE TABLE parts (thing TEXT NOT NULL REFERENCES things (name), part TEXT NOT NULL)",
            ),
        ),
    ),
)


def insert(txn: Any, name: str, size: int) -> None:
    txn.execute("INSERT INTO things (name, size) VALUES (?, ?)", (name, size))


def names(txn: Any) -> list[str]:
    return [row["name"] for row in txn.execute("SELECT name FROM things ORDER BY name")]


class DatabaseMixin:
    """
    What every engine does, in a L{SynchronousTestCase} with calls on the
    calling thread.
    """

    def location(self) -> str:
        raise NotImplementedError()

    def setUp(self) -> None:
        self.db = open_database(self.location(), InlineReactor(), threads=0)
        self.addCleanup(self.db.close)  # type: ignore[attr-defined]

    def ok(self, d: Any) -> Any:
        return self.successResultOf(d)  # type: ignore[attr-defined]

    def test_write_then_read(self) -> None:
        self.ok(self.db.write(SCHEMA, insert, "a", 1))
        self.assertEqual(self.ok(self.db.read(SCHEMA, names)), ["a"])  # type: ignore[attr-defined]

    def test_rows_by_name_and_position(self) -> None:
        self.ok(self.db.write(SCHEMA, insert, "a", 1))
        row = self.ok(self.db.read(SCHEMA, lambda txn: txn.execute("SELECT name, size FROM things").fetchone()))
        self.assertEqual((row["name"], row["size"], row[0], row[1], tuple(row)), ("a", 1, "a", 1, ("a", 1)))  # type: ignore[attr-defined]
        name, size = row
        self.assertEqual((name, size), ("a", 1))  # type: ignore[attr-defined]

    def test_literal_percent(self) -> None:
        """
        C{?} is the placeholder on every engine; a C{%} in the SQL is just
        a character.
        """
        self.ok(self.db.write(SCHEMA, insert, "50%", 1))
        self.ok(self.db.write(SCHEMA, insert, "50x", 2))
        found = self.ok(
            self.db.read(
                SCHEMA,
                lambda txn: [
                    row[0]
                    for row in txn.execute(
                        "SELECT name FROM things WHERE name LIKE '%\\%' ESCAPE '\\' AND size < ?", (5,)
                    )
                ],
            )
        )
        self.assertEqual(found, ["50%"])  # type: ignore[attr-defined]

    def test_write_rolls_back(self) -> None:
        def half(txn: Any) -> None:
            insert(txn, "a", 1)
            raise ValueError("stop")

        self.failureResultOf(self.db.write(SCHEMA, half), ValueError)  # type: ignore[attr-defined]
        self.assertEqual(self.ok(self.db.read(SCHEMA, names)), [])  # type: ignore[attr-defined]

    def test_conflict(self) -> None:
        """
        A broken uniqueness or reference rule is L{StoreConflict}, the
        whole call rolled back, and the message names no value.
        """
        self.ok(self.db.write(SCHEMA, insert, "a", 1))

        def twice(txn: Any) -> None:
            insert(txn, "b", 2)
            insert(txn, "a", 3)

        failure = self.failureResultOf(self.db.write(SCHEMA, twice), StoreConflict)  # type: ignore[attr-defined]
        self.assertNotIn("'a'", str(failure.value))  # type: ignore[attr-defined]
        self.assertEqual(self.ok(self.db.read(SCHEMA, names)), ["a"])  # type: ignore[attr-defined]

        def orphan(txn: Any) -> None:
            txn.execute("INSERT INTO parts (thing, part) VALUES (?, ?)", ("nothing", "x"))

        self.failureResultOf(self.db.write(SCHEMA, orphan), StoreConflict)  # type: ignore[attr-defined]

    def test_bug_is_not_hidden(self) -> None:
        """
        A statement that cannot run (a bug) fails with the engine's own
        error, not one of the database layer's.
        """
        failure = self.failureResultOf(  # type: ignore[attr-defined]
            self.db.read(SCHEMA, lambda txn: txn.execute("SELECT nothing FROM things").fetchall())
        )
        self.assertNotIsInstance(failure.value, (StoreConflict, StoreUnavailable))  # type: ignore[attr-defined]

    def test_stats(self) -> None:
        """
        Calls are counted by transaction name, C{component.function} unless
        named.
        """
        self.ok(self.db.write(SCHEMA, insert, "a", 1))
        self.ok(self.db.write(SCHEMA, insert, "b", 1, name="custom"))
        self.failureResultOf(self.db.write(SCHEMA, insert, "a", 1), StoreConflict)  # type: ignore[attr-defined]
        stats = self.db.transaction_stats()
        self.assertEqual((stats["things.insert"].count, stats["things.insert"].errors), (2, 1))  # type: ignore[attr-defined]
        self.assertEqual(stats["custom"].count, 1)  # type: ignore[attr-defined]
        self.assertEqual(stats["migrate"].count, 1)  # type: ignore[attr-defined]
        self.assertGreater(stats["things.insert"].seconds, 0)  # type: ignore[attr-defined]
        self.assertEqual(self.db.pool_stats(), {"connections": 1, "threads": 0, "in_flight": 0})  # type: ignore[attr-defined]

    def test_ensure_once(self) -> None:
        self.assertEqual(self.ok(self.db.ensure(SCHEMA)), 1)  # type: ignore[attr-defined]
        self.assertEqual(self.ok(self.db.ensure(SCHEMA)), 1)  # type: ignore[attr-defined]
        self.ok(self.db.read(SCHEMA, names))
        self.assertEqual(self.db.transaction_stats()["migrate"].count, 1)  # type: ignore[attr-defined]

    def test_failed_migration_retried(self) -> None:
        """
        A schema that cannot be applied fails the calls that need it, and
        the next call tries again.
        """
        broken = Schema("broken", (Migration(1, ("CREATE TABLE broken (", )),))
        self.assertIsNotNone(self.failureResultOf(self.db.read(broken, names)))  # type: ignore[attr-defined]
        self.assertIsNotNone(self.failureResultOf(self.db.read(broken, names)))  # type: ignore[attr-defined]
        self.assertEqual(self.db.transaction_stats()["migrate"].errors, 2)  # type: ignore[attr-defined]


class SQLiteDatabaseTests(DatabaseMixin, SynchronousTestCase):
    def location(self) -> str:
        return self.mktemp() + ".db"

    def test_locked(self) -> None:
        """
        Another process holding the write lock beyond the busy timeout:
        L{StoreUnavailable}, nothing written.
        """
        path = self.mktemp() + ".db"
        db = Database(SQLiteEngine(path, busy_timeout=0.05), InlineReactor(), threads=0)
        self.addCleanup(db.close)
        self.ok(db.ensure(SCHEMA))
        other = sqlite3.connect(path, isolation_level=None)
        self.addCleanup(other.close)
        other.execute("BEGIN IMMEDIATE")
        failure = self.failureResultOf(db.write(SCHEMA, insert, "a", 1), StoreUnavailable)
        self.assertIn("locked", str(failure.value))
        self.assertEqual(failure.value.retry_after, 1)
        other.execute("ROLLBACK")
        self.ok(db.write(SCHEMA, insert, "a", 1))

    def test_thread_pool_path(self) -> None:
        """
        With a thread pool, calls made before the schema is current wait
        for it, and run in the order they were made.
        """
        threadpool = InlineThreadPool()
        queued: list[Any] = []
        threadpool.callInThreadWithCallback = lambda *args, **kw: queued.append((args, kw))  # type: ignore[method-assign]
        db = Database(SQLiteEngine(self.mktemp() + ".db"), InlineReactor(), threads=1, threadpool=threadpool)
        self.addCleanup(db.close)
        first = db.write(SCHEMA, insert, "a", 1)
        second = db.read(SCHEMA, names)
        self.assertNoResult(first)
        self.assertNoResult(second)
        while queued:
            (args, kw) = queued.pop(0)
            InlineThreadPool().callInThreadWithCallback(*args, **kw)
        self.ok(first)
        self.assertEqual(self.ok(second), ["a"])

    def test_one_writer(self) -> None:
        self.assertRaises(ValueError, Database, SQLiteEngine(":memory:"), InlineReactor(), threads=2)

    def test_change_stamp(self) -> None:
        """
        The change stamp stays the same across reads and moves with every
        write: this process's (committed or rolled back) and another
        connection's commit.  With database threads there is none.
        """
        path = self.mktemp() + ".db"
        db = Database(SQLiteEngine(path), InlineReactor(), threads=0)
        self.addCleanup(db.close)
        self.ok(db.write(SCHEMA, insert, "a", 1))
        stamp = db.change_stamp()
        self.assertIsNotNone(stamp)
        self.ok(db.read(SCHEMA, names))
        self.assertEqual(db.change_stamp(), stamp)
        self.ok(db.write(SCHEMA, insert, "b", 2))
        self.assertNotEqual(db.change_stamp(), stamp)
        stamp = db.change_stamp()

        def undone(txn: Any) -> None:
            insert(txn, "c", 3)
            raise ValueError("stop")

        self.failureResultOf(db.write(SCHEMA, undone), ValueError)
        self.assertNotEqual(db.change_stamp(), stamp)
        stamp = db.change_stamp()
        other = sqlite3.connect(path, isolation_level=None)
        self.addCleanup(other.close)
        other.execute("SELECT COUNT(*) FROM things").fetchone()
        self.assertEqual(db.change_stamp(), stamp)
        other.execute("UPDATE things SET size = 5 WHERE name = 'a'")
        self.assertNotEqual(db.change_stamp(), stamp)
        threaded = Database(SQLiteEngine(path), InlineReactor(), threads=1, threadpool=InlineThreadPool())
        self.addCleanup(threaded.close)
        self.assertIsNone(threaded.change_stamp())


def fail_unavailable(txn: Any) -> None:
    """
    A call whose error SQLite may answer by ending the whole transaction.
    """
    insert(txn, "unavailable", 0)
    raise sqlite3.OperationalError("disk I/O error")


def bug(txn: Any) -> None:
    insert(txn, "bug", 0)
    raise ZeroDivisionError("a bug")


#: A process that queues two grouped writes and dies (SIGKILL) inside the
#: second, after the first has run in the batch's transaction.
KILLED_IN_BATCH = """
import os, signal, sys
from tests.test_db_database import SCHEMA, insert
from tests.test_store_sqlite import InlineReactor
from smeldr_oauth.db import open_database

def die(txn):
    insert(txn, "second", 2)
    os.kill(os.getpid(), signal.SIGKILL)

reactor = InlineReactor()
db = open_database(sys.argv[1], reactor, threads=0, group_commit=True)
db.ensure(SCHEMA)
answered = []
db.write(SCHEMA, insert, "first", 1, group=True).addBoth(answered.append)
db.write(SCHEMA, die, group=True).addBoth(answered.append)
reactor.advance(0)
print("survived", answered)
"""


class CountsBegins:
    """
    For group-commit tests: C{self.begins} counts the transactions the
    database began (its engine's C{begin}, or PostgreSQL's C{begin_later}
    for a batch) after L{count_begins}.
    """

    db: Any
    begins: int

    def count_begins(self) -> None:
        self.begins = 0
        for method in ("begin", "begin_later"):
            real = getattr(self.db.engine, method, None)
            if real is not None:
                self.patch(self.db.engine, method, self._counted(real))

    def _counted(self, begin: Any) -> Any:
        def counted(txn: Any) -> None:
            self.begins += 1
            begin(txn)

        return counted


class GroupCommitTests(CountsBegins, SynchronousTestCase):
    """
    Group commit (L{Database} C{group_commit}, SQLite on the calling
    thread): grouped writes of one reactor turn share one transaction,
    each outcome exactly as alone.
    """

    def setUp(self) -> None:
        self.path = self.mktemp() + ".db"
        self.reactor = InlineReactor()
        self.db = open_database(self.path, self.reactor, threads=0, group_commit=True)
        self.addCleanup(self.db.close)
        self.successResultOf(self.db.ensure(SCHEMA))
        self.count_begins()

    def committed(self) -> list[str]:
        other = sqlite3.connect(self.path)
        try:
            return [row[0] for row in other.execute("SELECT name FROM things ORDER BY name")]
        finally:
            other.close()

    def test_one_transaction_after_the_turn(self) -> None:
        """
        Grouped writes wait for the end of the reactor turn, then run in
        one transaction; no result is given before its commit.
        """
        calls = [self.db.write(SCHEMA, insert, name, 1, group=True) for name in ("a", "b", "c")]
        for d in calls:
            self.assertNoResult(d)
        self.assertEqual(self.committed(), [])
        self.reactor.advance(0)
        for d in calls:
            self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.committed(), ["a", "b", "c"])
        self.assertEqual(self.begins, 1)
        self.assertEqual(self.db.transaction_stats()["things.insert"].count, 3)

    def test_batch_limit(self) -> None:
        """
        A batch holds at most C{batch_limit} calls; the calls after them
        start further batches, which commit after it, in order, at the
        end of the turn.
        """
        self.db.batch_limit = 2
        calls = [self.db.write(SCHEMA, insert, name, 1, group=True) for name in "abcde"]
        seen = self.db.write(SCHEMA, names, group=True)
        self.reactor.advance(0)
        for d in calls:
            self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.successResultOf(seen), ["a", "b", "c", "d", "e"])
        self.assertEqual(self.begins, 3)

    def test_held_batches_wait_for_the_release(self) -> None:
        """
        Grouped writes made while a hold lasts, and those already waiting
        for the end of the turn, commit together on the turn after the
        last release; a second call of a release does nothing.
        """
        early = self.db.write(SCHEMA, insert, "a", 1, group=True)
        first = self.db.hold_batches()
        second = self.db.hold_batches()
        late = self.db.write(SCHEMA, insert, "b", 1, group=True)
        self.reactor.advance(0)
        self.assertNoResult(early)
        self.assertEqual(self.committed(), [])
        first()
        first()
        self.reactor.advance(0)
        self.assertNoResult(late)
        second()
        self.reactor.advance(0)
        self.assertIsNone(self.successResultOf(early))
        self.assertIsNone(self.successResultOf(late))
        self.assertEqual((self.committed(), self.begins), (["a", "b"], 1))

    def test_close_runs_a_held_batch(self) -> None:
        """Closing commits what a hold kept waiting: nothing is lost."""
        self.db.hold_batches()
        d = self.db.write(SCHEMA, insert, "a", 1, group=True)
        self.db.close()
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.committed(), ["a"])

    def test_close_runs_the_batch(self) -> None:
        """
        Closing the database runs and commits the grouped writes still
        waiting for the end of the turn; the turn's end then has nothing
        to do.
        """
        d = self.db.write(SCHEMA, insert, "a", 1, group=True)
        self.db.close()
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.committed(), ["a"])
        self.reactor.advance(0)
        self.assertEqual(self.begins, 1)

    def test_not_without_group(self) -> None:
        """
        A write not asked to be grouped runs at once, alone; and without
        C{group_commit} (or with threads, on SQLite) nothing is grouped.
        """
        self.successResultOf(self.db.write(SCHEMA, insert, "a", 1))
        self.assertEqual(self.committed(), ["a"])
        plain = open_database(self.mktemp() + ".db", InlineReactor(), threads=0)
        self.addCleanup(plain.close)
        self.assertFalse(plain.group_commit)
        self.successResultOf(plain.write(SCHEMA, insert, "a", 1, group=True))
        threaded = open_database(self.mktemp() + ".db", InlineReactor(), threads=1, group_commit=True)
        self.addCleanup(threaded.close)
        self.assertFalse(threaded.group_commit)

    def test_sees_earlier_calls(self) -> None:
        """
        Each call sees what the calls before it in the batch did, as it
        would had they committed first: a duplicate fails as a conflict.
        """
        first = self.db.write(SCHEMA, insert, "a", 1, group=True)
        second = self.db.write(SCHEMA, insert, "a", 2, group=True)
        seen = self.db.write(SCHEMA, names, group=True)
        self.reactor.advance(0)
        self.successResultOf(first)
        self.failureResultOf(second, StoreConflict)
        self.assertEqual(self.successResultOf(seen), ["a"])
        self.assertEqual(self.begins, 1)

    def test_one_failing(self) -> None:
        """
        A call that fails (a conflict half-way, a bug) is rolled back alone,
        with the error it would have had alone; the others are committed.
        """

        def half(txn: Any) -> None:
            insert(txn, "half", 1)
            insert(txn, "a", 2)

        calls = [
            self.db.write(SCHEMA, insert, "a", 1, group=True),
            self.db.write(SCHEMA, half, group=True),
            self.db.write(SCHEMA, bug, group=True),
            self.db.write(SCHEMA, insert, "b", 1, group=True),
        ]
        self.reactor.advance(0)
        self.successResultOf(calls[0])
        conflict = self.failureResultOf(calls[1], StoreConflict)
        alone = self.failureResultOf(self.db.write(SCHEMA, insert, "a", 3), StoreConflict)
        self.assertEqual(str(conflict.value), str(alone.value))
        self.failureResultOf(calls[2], ZeroDivisionError)
        self.successResultOf(calls[3])
        self.assertEqual(self.committed(), ["a", "b"])
        self.assertEqual(self.begins, 2)
        stats = self.db.transaction_stats()
        self.assertEqual((stats["things.half"].errors, stats["things.bug"].errors), (1, 1))

    def test_together_without_savepoints(self) -> None:
        """
        Calls given a C{together} run in the batch without a savepoint each
        (on SQLite a savepoint has every page a call changes first copied
        to the statement journal), one after another, each seeing the ones
        before it; a call without one keeps its savepoint.
        """
        statements: list[str] = []
        self.db.pool.connect().set_trace_callback(statements.append)

        def both(txn: Any, calls: list[Any]) -> list[Any]:
            return [insert(txn, *args) for args in calls]

        calls = [self.db.write(SCHEMA, insert, name, 1, group=True, together=both) for name in ("a", "b")]
        calls.append(self.db.write(SCHEMA, insert, "c", 1, group=True))
        calls.append(self.db.write(SCHEMA, names, group=True, together=lambda txn, calls: []))
        self.reactor.advance(0)
        self.assertEqual([self.successResultOf(d) for d in calls], [None, None, None, ["a", "b", "c"]])
        self.assertEqual(self.committed(), ["a", "b", "c"])
        self.assertEqual(self.begins, 1)
        self.assertEqual(
            [s for s in statements if s.split()[0] in ("SAVEPOINT", "RELEASE", "ROLLBACK")],
            ["SAVEPOINT grouped", "RELEASE grouped"],
        )

    def test_together_failing(self) -> None:
        """
        An error in a call given a C{together} has no savepoint to go back
        to: it abandons the batch, and every call runs again alone, each
        with the outcome it has alone (the conflict's message as alone),
        nothing twice.
        """

        def both(txn: Any, calls: list[Any]) -> list[Any]:
            return [insert(txn, *args) for args in calls]

        calls = [
            self.db.write(SCHEMA, insert, "a", 1, group=True),
            self.db.write(SCHEMA, insert, "b", 1, group=True, together=both),
            self.db.write(SCHEMA, insert, "a", 2, group=True, together=both),
            self.db.write(SCHEMA, insert, "c", 1, group=True),
        ]
        self.reactor.advance(0)
        self.successResultOf(calls[0])
        self.successResultOf(calls[1])
        conflict = self.failureResultOf(calls[2], StoreConflict)
        alone = self.failureResultOf(self.db.write(SCHEMA, insert, "a", 3), StoreConflict)
        self.assertEqual(str(conflict.value), str(alone.value))
        self.successResultOf(calls[3])
        self.assertEqual(self.committed(), ["a", "b", "c"])
        # The batch, then each of the four alone, then the last conflict.
        self.assertEqual(self.begins, 6)

    def test_transaction_ending_error(self) -> None:
        """
        An error after which SQLite may have ended the whole transaction
        abandons the batch: every call runs again alone, with the outcome
        it has alone, and nothing runs twice.
        """
        calls = [
            self.db.write(SCHEMA, insert, "a", 1, group=True),
            self.db.write(SCHEMA, fail_unavailable, group=True),
            self.db.write(SCHEMA, insert, "b", 1, group=True),
        ]
        self.reactor.advance(0)
        self.successResultOf(calls[0])
        self.failureResultOf(calls[1], StoreUnavailable)
        self.successResultOf(calls[2])
        self.assertEqual(self.committed(), ["a", "b"])
        # The batch, then each of the three alone.
        self.assertEqual(self.begins, 4)
        self.assertEqual(self.db.transaction_stats()["things.insert"].count, 2)

    def test_commit_fails(self) -> None:
        """
        A failing C{COMMIT} gives no call a result from the batch: all of
        them run again alone.
        """
        commits: list[bool] = []
        import smeldr_oauth.db.database as module

        real = module._commit

        def failing_once(connection: Any) -> None:
            if not commits:
                commits.append(False)
                raise sqlite3.OperationalError("disk I/O error")
            commits.append(True)
            real(connection)

        self.patch(module, "_commit", failing_once)
        calls = [self.db.write(SCHEMA, insert, name, 1, group=True) for name in ("a", "b")]
        self.reactor.advance(0)
        for d in calls:
            self.successResultOf(d)
        self.assertEqual(commits, [False, True, True])
        self.assertEqual(self.committed(), ["a", "b"])

    def test_killed_in_the_middle(self) -> None:
        """
        A process killed half-way through a batch leaves the file as it was
        before the batch, and answered nothing.
        """
        import os
        import signal
        import subprocess
        import sys

        path = os.path.abspath(self.mktemp() + ".db")
        before = open_database(path, InlineReactor(), threads=0)
        self.successResultOf(before.write(SCHEMA, insert, "before", 0))
        before.close()
        checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        done = subprocess.run(
            [sys.executable, "-c", KILLED_IN_BATCH, path],
            cwd=checkout,
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertEqual(done.returncode, -signal.SIGKILL, done.stderr)
        self.assertNotIn("survived", done.stdout)
        other = sqlite3.connect(path)
        self.addCleanup(other.close)
        self.assertEqual([row[0] for row in other.execute("SELECT name FROM things")], ["before"])
        self.assertEqual(other.execute("PRAGMA integrity_check").fetchone()[0], "ok")


class PostgresDatabaseTests(DatabaseMixin, SynchronousTestCase):
    def location(self) -> str:
        return postgres.database_url(self)

    def test_unreachable(self) -> None:
        """
        No server: L{StoreUnavailable}, saying where, never the password.
        """
        url = "postgresql://someone:hunter2@/nothing?host=/nonexistent-socket-dir&port=1"
        db = open_database(url, InlineReactor(), threads=0)
        self.addCleanup(db.close)
        failure = self.failureResultOf(db.read(SCHEMA, names), StoreUnavailable)
        self.assertIn("postgresql database nothing on /nonexistent-socket-dir:1", str(failure.value))
        self.assertNotIn("hunter2", str(failure.value))

    def test_no_change_stamp(self) -> None:
        """
        PostgreSQL gives no change stamp: only the server knows, and asking
        is a round trip.
        """
        self.ok(self.db.write(SCHEMA, insert, "a", 1))
        self.assertIsNone(self.db.change_stamp())

    #: Texts a simple-protocol statement binds into its text: quotes,
    #: backslashes (a batch's JSON rows hold one before each nested quote),
    #: non-ASCII, dollar quotes, a comment's start.
    QUOTED = ("a'b", "c\\d", '{"scopes": "[\\"mcp\\"]"}', "\u00e9'\u00fc\\", "", "$$", "x'';--")

    def test_simple_texts_quoted_by_doubling(self) -> None:
        """
        The simple cursor writes a text as C{'...'} with its quotes doubled
        (the server's C{standard_conforming_strings} is on): no C{E'...'}
        with each backslash doubled, as libpq's C{PQescapeLiteral} wrote
        it; the texts come back as they were sent.
        """

        def run(txn: Any) -> Any:
            marks = ", ".join("?" for _ in self.QUOTED)
            row = txn.execute(f"SELECT {marks}", self.QUOTED, simple=True).fetchone()
            sent = txn.engine.simple_cursor(txn._cursor).mogrify("SELECT %s, %s", self.QUOTED[1:3])
            return tuple(row), sent

        row, sent = self.ok(self.db.write(SCHEMA, run))
        self.assertEqual(row, self.QUOTED)
        self.assertEqual(sent, 'SELECT \'c\\d\', \'{"scopes": "[\\"mcp\\"]"}\'')

    def test_simple_texts_escaped_without_standard_strings(self) -> None:
        """
        In a session where a backslash escapes (C{standard_conforming_strings}
        off), the texts are quoted by psycopg as before, and come back as
        they were sent.
        """

        def run(txn: Any) -> Any:
            txn.execute("SET LOCAL standard_conforming_strings = off")
            marks = ", ".join("?" for _ in self.QUOTED)
            return tuple(txn.execute(f"SELECT {marks}", self.QUOTED, simple=True).fetchone())

        self.assertEqual(self.ok(self.db.write(SCHEMA, run)), self.QUOTED)

    def test_simple_statements_not_counted_for_preparing(self) -> None:
        """
        A simple-protocol statement (its values in its text, never
        prepared) is not counted in psycopg's table of statements to
        prepare, which took each one's whole text as a key: hashed at
        every batch, and kept, up to a hundred texts, when one statement.
        """

        def run(txn: Any) -> Any:
            counts = txn._cursor.connection._prepared._counts
            before = len(counts)
            for index in range(3):
                txn.execute("SELECT ?", (f"text {index}",), simple=True)
            return before, len(counts), [tuple(row) for row in txn.fetchall()]

        before, after, rows = self.ok(self.db.write(SCHEMA, run))
        self.assertEqual((after, rows), (before, [("text 2",)]))

    def test_connection_lost_half_way(self) -> None:
        """
        A connection that breaks in the middle of a write: the write is
        L{StoreUnavailable}, nothing of it is kept, and the next call gets a
        fresh connection.
        """
        self.ok(self.db.write(SCHEMA, insert, "a", 1))

        def broken(txn: Any) -> None:
            insert(txn, "b", 2)
            txn.execute("SELECT pg_terminate_backend(pg_backend_pid())")

        self.failureResultOf(self.db.write(SCHEMA, broken), StoreUnavailable)
        self.assertEqual(self.ok(self.db.read(SCHEMA, names)), ["a"])


class HeldThreadPool:
    """
    A thread pool whose work waits until the test lets it run
    (L{run_next}), on the caller's thread: a batch that is "running" on a
    pool thread while the reactor goes on.
    """

    def __init__(self) -> None:
        self.queued: list[Any] = []

    def start(self) -> None:
        pass

    def stop(self) -> None:
        while self.queued:
            self.run_next()

    def callInThreadWithCallback(self, onResult: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        self.queued.append((onResult, f, args, kwargs))

    def run_next(self) -> None:
        onResult, f, args, kwargs = self.queued.pop(0)
        NoThreads().callInThreadWithCallback(onResult, f, *args, **kwargs)


class TransactionCommitTests(SynchronousTestCase):
    """
    A statement may carry the transaction's C{COMMIT} only where the
    batch allows it (its last call) and only in the simple protocol: a
    C{COMMIT} sent from the middle of a batch would commit the calls
    before it and leave the rest in autocommit.
    """

    def test_commit_only_where_allowed(self) -> None:
        txn = Transaction(object(), PostgresEngine("postgresql:///nowhere"), None)
        self.assertRaises(ValueError, txn.execute, "SELECT 1", (), simple=True, commit=True)
        self.assertRaises(ValueError, txn.execute, "SELECT 1", (), commit=True)
        self.assertFalse(txn.committing)


class PostgresGroupCommitTests(CountsBegins, SynchronousTestCase):
    """
    Group commit on PostgreSQL with pool threads: the grouped writes that
    arrive while the batch threads are busy leave together, as one call of
    one pool thread, in one transaction (no savepoints); each outcome is
    exactly what it would be alone.
    """

    def setUp(self) -> None:
        self.url = postgres.database_url(self)
        self.reactor = InlineReactor()
        self.pool = HeldThreadPool()
        self.db = Database(
            PostgresEngine(self.url), self.reactor, threads=2, threadpool=self.pool, group_commit=True
        )
        self.addCleanup(self.db.close)
        d = self.db.ensure(SCHEMA)
        self.pool.run_next()
        self.successResultOf(d)
        self.count_begins()

    def committed(self) -> list[str]:
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as other:
            return [row[0] for row in other.execute("SELECT name FROM things ORDER BY name")]

    def drain(self) -> None:
        while self.pool.queued:
            self.pool.run_next()

    def test_one_transaction(self) -> None:
        """
        Grouped writes of one turn leave at its end as one pool call, run
        in one transaction; no result before its commit.
        """
        self.assertTrue(self.db.group_commit)
        calls = [self.db.write(SCHEMA, insert, name, 1, group=True) for name in ("a", "b", "c")]
        self.assertEqual(self.pool.queued, [])
        self.reactor.advance(0)
        self.assertEqual(len(self.pool.queued), 1)
        for d in calls:
            self.assertNoResult(d)
        self.pool.run_next()
        for d in calls:
            self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.committed(), ["a", "b", "c"])
        self.assertEqual(self.begins, 1)
        self.assertEqual(self.db.transaction_stats()["things.insert"].count, 3)

    def test_gathers_while_busy(self) -> None:
        """
        While C{batches_at_once} batches run, the grouped writes of later
        turns gather into one batch, which leaves when one of them is done.
        """
        running = []
        for name in ("a", "b"):
            running.append(self.db.write(SCHEMA, insert, name, 1, group=True))
            self.reactor.advance(0)
        self.assertEqual(len(self.pool.queued), 2)
        waiting = []
        for name in ("c", "d", "e"):
            waiting.append(self.db.write(SCHEMA, insert, name, 1, group=True))
            self.reactor.advance(0)
        self.assertEqual(len(self.pool.queued), 2)
        self.pool.run_next()
        self.successResultOf(running[0])
        self.assertEqual(len(self.pool.queued), 2)
        self.drain()
        for d in running + waiting:
            self.successResultOf(d)
        self.assertEqual(self.committed(), ["a", "b", "c", "d", "e"])
        self.assertEqual(self.begins, 3)

    def test_batch_limit(self) -> None:
        """
        A batch holds at most C{batch_limit} calls: the calls after them
        start another batch, queued behind it, and the batches leave in
        order, C{batches_at_once} at a time.
        """
        self.db.batch_limit = 2
        calls = [self.db.write(SCHEMA, insert, name, 1, group=True) for name in "abcde"]
        self.reactor.advance(0)
        self.assertEqual(len(self.pool.queued), 2)
        self.pool.run_next()
        self.assertEqual([self.successResultOf(d) for d in calls[:2]], [None, None])
        self.assertEqual(self.committed(), ["a", "b"])
        # The third batch left as the first was done.
        self.assertEqual(len(self.pool.queued), 2)
        self.drain()
        for d in calls:
            self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.committed(), ["a", "b", "c", "d", "e"])
        self.assertEqual(self.begins, 3)

    def test_sees_earlier_calls(self) -> None:
        """
        Each call sees what the calls before it did, as had they committed
        first.
        """
        first = self.db.write(SCHEMA, insert, "a", 1, group=True)
        seen = self.db.write(SCHEMA, names, group=True)
        self.reactor.advance(0)
        self.drain()
        self.successResultOf(first)
        self.assertEqual(self.successResultOf(seen), ["a"])
        self.assertEqual(self.begins, 1)

    def test_one_failing(self) -> None:
        """
        A call that fails ends PostgreSQL's transaction: the batch is
        rolled back and every call runs again alone, each with the outcome
        it has alone (the conflict's message as alone), nothing twice.
        """
        calls = [
            self.db.write(SCHEMA, insert, "a", 1, group=True),
            self.db.write(SCHEMA, insert, "a", 2, group=True),
            self.db.write(SCHEMA, bug, group=True),
            self.db.write(SCHEMA, insert, "b", 1, group=True),
        ]
        self.reactor.advance(0)
        self.drain()
        self.successResultOf(calls[0])
        conflict = self.failureResultOf(calls[1], StoreConflict)
        alone = self.db.write(SCHEMA, insert, "a", 3)
        self.drain()
        self.assertEqual(str(conflict.value), str(self.failureResultOf(alone, StoreConflict).value))
        self.failureResultOf(calls[2], ZeroDivisionError)
        self.successResultOf(calls[3])
        self.assertEqual(self.committed(), ["a", "b"])
        # The batch, each of the four alone, the last conflict.
        self.assertEqual(self.begins, 6)

    def test_together(self) -> None:
        """
        Consecutive calls of one function given a C{together} run as one
        call of it, with every call's arguments; its results are theirs.
        A batch of one runs the function itself; a wrong count of results
        abandons the batch (each call then runs alone).
        """
        seen: list[Any] = []

        def both(txn: Any, calls: list[Any]) -> list[Any]:
            seen.append(calls)
            for args in calls:
                insert(txn, *args)
            return [f"together {args[0]}" for args in calls]

        calls = [self.db.write(SCHEMA, insert, name, 1, group=True, together=both) for name in ("a", "b")]
        calls.append(self.db.write(SCHEMA, names, group=True))
        calls.append(self.db.write(SCHEMA, insert, "c", 1, group=True, together=both))
        self.reactor.advance(0)
        self.drain()
        self.assertEqual(
            [self.successResultOf(d) for d in calls], ["together a", "together b", ["a", "b"], None]
        )
        self.assertEqual(seen, [[("a", 1), ("b", 1)]])
        self.assertEqual(self.begins, 1)
        alone = self.db.write(SCHEMA, insert, "d", 1, group=True, together=both)
        self.reactor.advance(0)
        self.drain()
        self.assertIsNone(self.successResultOf(alone))

        def short(txn: Any, calls: list[Any]) -> list[Any]:
            return []

        calls = [self.db.write(SCHEMA, insert, name, 1, group=True, together=short) for name in ("e", "f")]
        self.reactor.advance(0)
        self.drain()
        self.assertEqual([self.successResultOf(d) for d in calls], [None, None])
        self.assertEqual(self.committed(), ["a", "b", "c", "d", "e", "f"])

    def test_reads_together(self) -> None:
        """
        Reads given a C{together} leave as one call of it at the end of the
        turn; while C{batches_at_once} such calls run, later ones gather
        into one; its results are theirs, its failure is every call's.
        """

        def plus_one(txn: Any, n: int) -> int:
            raise AssertionError("run alone")

        def many(txn: Any, calls: list[Any]) -> list[int]:
            if any(n < 0 for n, in calls):
                raise ZeroDivisionError("a bug")
            return [row[0] for row in txn.execute("SELECT unnest(?::int[]) + 1", ([n for n, in calls],))]

        def read(n: int) -> Any:
            return self.db.read(SCHEMA, plus_one, n, together=many)

        first = [read(1), read(2)]
        self.assertEqual(self.pool.queued, [])
        self.reactor.advance(0)
        second = [read(3)]
        self.reactor.advance(0)
        third = [read(4)]
        self.reactor.advance(0)
        third.append(read(5))
        self.reactor.advance(0)
        self.assertEqual(len(self.pool.queued), 2)
        self.drain()
        self.assertEqual([self.successResultOf(d) for d in first + second + third], [2, 3, 4, 5, 6])
        self.assertEqual(self.db.transaction_stats()["things.plus_one"].count, 3)
        failing = [read(6), read(-1)]
        self.reactor.advance(0)
        self.drain()
        for d in failing:
            self.failureResultOf(d, ZeroDivisionError)

    def test_reads_of_two_functions(self) -> None:
        """
        Read batches of different C{together} functions share the
        C{batches_at_once} slots: when one is done, another function's
        batch, which gathered meanwhile, leaves.
        """
        self.db.batches_at_once = 1

        def alone(txn: Any, n: int) -> int:
            raise AssertionError("run alone")

        def first(txn: Any, calls: list[Any]) -> list[int]:
            return [n for n, in calls]

        def second(txn: Any, calls: list[Any]) -> list[int]:
            return [-n for n, in calls]

        one = self.db.read(SCHEMA, alone, 1, together=first)
        self.reactor.advance(0)
        two = self.db.read(SCHEMA, alone, 2, together=second)
        self.reactor.advance(0)
        self.assertEqual(len(self.pool.queued), 1)
        self.pool.run_next()
        self.assertEqual(self.successResultOf(one), 1)
        self.assertEqual(len(self.pool.queued), 1)
        self.pool.run_next()
        self.assertEqual(self.successResultOf(two), -2)

    def four_writes(self, before: Any) -> list[Any]:
        """
        Grouped inserts of a, b, c and d, all but c carrying C{before(n)}:
        1, -1 and 2.
        """
        return [
            self.db.write(SCHEMA, insert, "a", 1, group=True, before=before(1)),
            self.db.write(SCHEMA, insert, "b", 1, group=True, before=before(-1)),
            self.db.write(SCHEMA, insert, "c", 1, group=True),
            self.db.write(SCHEMA, insert, "d", 1, group=True, before=before(2)),
        ]

    def test_before(self) -> None:
        """
        Grouped writes carrying reads (L{Before}): the batch is one
        hand-off to a pool thread; the reads run first, as one call of
        their C{together}, counted once; a call's write runs only if
        C{proceed} says so of its read, and a carrying call gets C{(read,
        written)} (C{written} C{None} when it did not run); a call without
        one, its result as before.
        """
        seen: list[Any] = []

        def alone(txn: Any, n: int) -> int:
            raise AssertionError("run alone")

        def many(txn: Any, calls: list[Any]) -> list[int]:
            seen.append(calls)
            return [row[0] for row in txn.execute("SELECT unnest(?::int[]) * 10", ([n for n, in calls],))]

        def before(n: int) -> Before:
            return Before(SCHEMA, alone, (n,), many, "things.many", lambda result: result > 0)

        calls = self.four_writes(before)
        self.reactor.advance(0)
        self.assertEqual(len(self.pool.queued), 1)
        self.pool.run_next()
        self.assertEqual(self.pool.queued, [])
        self.assertEqual([self.successResultOf(d) for d in calls], [(10, None), (-10, None), None, (20, None)])
        self.assertEqual(seen, [[(1,), (-1,), (2,)]])
        self.assertEqual(self.committed(), ["a", "c", "d"])
        self.assertEqual(self.begins, 1)
        self.assertEqual(self.db.transaction_stats()["things.many"].count, 1)
        self.assertEqual(self.db.transaction_stats()["things.insert"].count, 3)

    def test_before_kept_when_the_batch_runs_alone(self) -> None:
        """
        The reads run in autocommit: what they write stands whatever the
        writes then do; a batch abandoned for a failing write runs its
        writes again alone, never the reads.  A failing read is its calls'
        (as C{read}), and stops their writes.
        """
        seen: list[Any] = []

        def alone(txn: Any, name: str) -> None:
            raise AssertionError("run alone")

        def many(txn: Any, calls: list[Any]) -> list[bool]:
            seen.append(calls)
            for name, in calls:
                insert(txn, name, 0)
            return [True for _ in calls]

        def before(name: str) -> Before:
            return Before(SCHEMA, alone, (name,), many, "things.many", bool)

        calls = [
            self.db.write(SCHEMA, insert, "a", 1, group=True, before=before("r1")),
            self.db.write(SCHEMA, insert, "a", 2, group=True, before=before("r2")),
        ]
        self.reactor.advance(0)
        self.drain()
        first, second = (self.successResultOf(d) for d in calls)
        self.assertEqual(first, (True, None))
        self.assertEqual(second[0], True)
        second[1].trap(StoreConflict)
        self.assertEqual(len(seen), 1)
        self.assertEqual(self.committed(), ["a", "r1", "r2"])
        # The batch, then each write alone.
        self.assertEqual(self.begins, 3)
        failing = self.db.write(SCHEMA, insert, "b", 1, group=True, before=before("r1"))
        self.reactor.advance(0)
        self.drain()
        read, written = self.successResultOf(failing)
        read.trap(StoreConflict)
        self.assertIsNone(written)
        self.assertEqual(self.committed(), ["a", "r1", "r2"])

    def test_before_carried(self) -> None:
        """
        Reads that give their statement (L{Before.statement}), in a batch
        of more than one call, go in the round trip of the batch's
        C{BEGIN}, before it (L{Transaction.carry}), also when the batch's
        first statement is not a simple-protocol one (here the inserts):
        the reads' statement, its C{COMMIT} and the C{BEGIN} alone then.
        What they wrote stands though a refusal then ends that
        transaction; the writes they let proceed run as a batch of their
        own, the refused one's never.
        """

        def alone(txn: Any, n: int) -> int:
            raise AssertionError("run alone")

        def many(txn: Any, calls: list[Any]) -> list[int]:
            raise AssertionError("run apart")

        def statement(calls: list[Any]) -> tuple[str, list[Any]]:
            return (
                "INSERT INTO things (name, size) SELECT 'r' || n, n FROM unnest(?::int[]) AS n RETURNING size",
                [[n for n, in calls]],
            )

        def before(n: int) -> Before:
            return Before(
                SCHEMA, alone, (n,), many, "things.many", lambda size: size > 0, statement, lambda rows: [r[0] for r in rows]
            )

        sent: list[str] = []
        real = Transaction._execute_simple

        def simple(txn: Any, sql: str, *args: Any) -> Any:
            sent.append(sql)
            return real(txn, sql, *args)

        self.patch(Transaction, "_execute_simple", simple)
        calls = self.four_writes(before)
        self.reactor.advance(0)
        self.drain()
        self.assertEqual([self.successResultOf(d) for d in calls], [(1, None), (-1, None), None, (2, None)])
        self.assertEqual(sent, [""])
        self.assertEqual(self.committed(), ["a", "c", "d", "r-1", "r1", "r2"])
        # The carrying batch, rolled back at the refusal; then the others'.
        self.assertEqual(self.begins, 2)
        self.assertEqual(self.db.transaction_stats()["things.many"].count, 1)
        # None refused: one transaction.
        self.begins = 0
        calls = [self.db.write(SCHEMA, insert, name, 1, group=True, before=before(n)) for n, name in ((3, "e"), (4, "f"))]
        self.reactor.advance(0)
        self.drain()
        self.assertEqual([self.successResultOf(d) for d in calls], [(3, None), (4, None)])
        self.assertEqual(self.begins, 1)
        self.assertEqual(self.committed(), ["a", "c", "d", "e", "f", "r-1", "r1", "r2", "r3", "r4"])

    def test_before_outside_a_batch(self) -> None:
        """
        Without group commit a carried read and its write still take one
        hand-off: the read, then the write in its own transaction.
        """
        self.db.group_commit = False

        def alone(txn: Any, n: int) -> int:
            return int(txn.execute("SELECT ? + 1", (n,)).fetchone()[0])

        def many(txn: Any, calls: list[Any]) -> list[int]:
            raise AssertionError("run together")

        calls = [
            self.db.write(SCHEMA, insert, "a", 1, group=True, before=Before(SCHEMA, alone, (1,), many, "things.one", bool)),
            self.db.write(SCHEMA, insert, "b", 1, group=True, before=Before(SCHEMA, alone, (-1,), many, "things.one", bool)),
        ]
        self.assertEqual(len(self.pool.queued), 2)
        self.drain()
        self.assertEqual([self.successResultOf(d) for d in calls], [(2, None), (0, None)])
        self.assertEqual(self.committed(), ["a"])

    def test_connection_lost_in_commit(self) -> None:
        """
        A connection lost during the batch's C{COMMIT} may or may not have
        committed: every call is L{StoreUnavailable}, none runs again.
        """
        import smeldr_oauth.db.database as module

        def lost(connection: Any) -> None:
            connection.close()
            raise StoreUnavailable("the connection went away")

        self.patch(module, "_commit", lost)
        calls = [self.db.write(SCHEMA, insert, name, 1, group=True) for name in ("a", "b")]
        self.reactor.advance(0)
        self.drain()
        for d in calls:
            self.failureResultOf(d, StoreUnavailable)
        self.assertEqual(self.begins, 1)
        self.assertEqual(self.committed(), [])


class PostgresThreadTests(TestCase):
    """
    PostgreSQL on real threads: deadlocks are run again, and a server
    restart costs the calls made while it is down, nothing else.
    """

    @inlineCallbacks
    def test_deadlock_retried(self) -> Any:
        """
        Two transactions locking two rows in opposite orders: the server
        kills one, which runs again and succeeds; both calls succeed.
        """
        db = Database(PostgresEngine(postgres.database_url(self)), global_reactor, threads=2)
        self.addCleanup(db.close)
        yield db.write(SCHEMA, insert, "a", 1)
        yield db.write(SCHEMA, insert, "b", 1)
        locked = {"a": threading.Event(), "b": threading.Event()}

        def lock_both(txn: Any, first: str, second: str) -> None:
            txn.execute("UPDATE things SET size = size + 1 WHERE name = ?", (first,))
            locked[first].set()
            locked[second].wait(10)
            txn.execute("UPDATE things SET size = size + 1 WHERE name = ?", (second,))

        yield DeferredList(
            [db.write(SCHEMA, lock_both, "a", "b"), db.write(SCHEMA, lock_both, "b", "a")],
            fireOnOneErrback=True,
        )
        sizes = yield db.read(SCHEMA, lambda txn: [tuple(r) for r in txn.execute("SELECT name, size FROM things ORDER BY name")])
        self.assertEqual(sizes, [("a", 3), ("b", 3)])
        self.assertGreaterEqual(db.transaction_stats()["things.lock_both"].retries, 1)

    @inlineCallbacks
    def test_outage(self) -> Any:
        """
        While the server is down, calls fail with L{StoreUnavailable}; once
        it is back they work again, on new connections, by themselves.
        """
        cluster = postgres.cluster()
        db = Database(PostgresEngine(postgres.database_url(self)), global_reactor, threads=2)
        self.addCleanup(db.close)
        yield db.write(SCHEMA, insert, "a", 1)
        self.addCleanup(cluster.start)
        cluster.stop()
        yield self.assertFailure(db.read(SCHEMA, names), StoreUnavailable)
        yield self.assertFailure(db.write(SCHEMA, insert, "b", 2), StoreUnavailable)
        cluster.start()
        found = yield db.read(SCHEMA, names)
        self.assertEqual(found, ["a"])
        yield db.write(SCHEMA, insert, "b", 2)
        # The pooled connections that died with the server were replaced
        # without failing a call.
        cluster.restart()
        found = yield db.read(SCHEMA, names)
        self.assertEqual(found, ["a", "b"])

    @inlineCallbacks
    def test_calls_on_threads(self) -> Any:
        """
        A PostgreSQL database opened without a thread count runs calls on
        8 threads, each with its own connection: one process's refreshes
        are bounded by how many transactions it has in flight (round trips,
        commit flushes), and 8 refreshed about 1.5 times as fast as 4 on
        the 2-core test machine for the same CPU per refresh, 16 no faster
        (docs/performance.md, round six).
        """
        db = open_database(postgres.database_url(self), global_reactor)
        self.addCleanup(db.close)
        self.assertEqual((db.threads, db.pool.max), (8, 8))
        yield DeferredList(
            [db.write(SCHEMA, insert, f"n{n}", n) for n in range(20)], fireOnOneErrback=True
        )
        found = yield db.read(SCHEMA, names)
        self.assertEqual(len(found), 20)
        self.assertEqual(db.pool_stats()["in_flight"], 0)
        self.assertLessEqual(db.pool_stats()["connections"], 8)


class CheckpointerTests(SynchronousTestCase):
    """
    L{Checkpointer}: the database connection's automatic checkpoints off,
    WAL checkpoints on a timer instead (inline here), every write still
    there.
    """

    def setUp(self) -> None:
        from twisted.internet.defer import maybeDeferred

        from smeldr_oauth.db.sqlite import Checkpointer

        self.path = self.mktemp() + ".db"
        self.clock = InlineReactor()
        self.db = Database(SQLiteEngine(self.path), self.clock, threads=0)
        self.addCleanup(self.db.close)
        self.successResultOf(self.db.ensure(SCHEMA))
        self.checkpoints = Checkpointer(self.db, self.clock, maybeDeferred, interval=1.0)

    def autocheckpoint(self) -> int:
        return int(self.successResultOf(
            self.db.with_connection(lambda c: c.execute("PRAGMA wal_autocheckpoint").fetchone()[0])
        ))

    def test_off_the_commit_path(self) -> None:
        """
        Once started, commits leave the WAL alone however long it grows;
        the next tick copies every frame back; stopping checkpoints once
        more and restores SQLite's default.
        """
        self.assertEqual(self.autocheckpoint(), 1000)
        self.successResultOf(self.checkpoints.start())
        self.assertEqual(self.autocheckpoint(), 0)
        for i in range(1500):
            self.successResultOf(self.db.write(SCHEMA, insert, f"n{i:04d}", i))
        self.assertIsNone(self.checkpoints.last)
        self.clock.advance(1.0)
        assert self.checkpoints.last is not None
        busy, frames, copied = self.checkpoints.last
        # Past 1,000 pages: SQLite's own checkpoint would have run inside a
        # commit and restarted the WAL.
        self.assertGreater(frames, 1000)
        self.assertEqual((busy, copied), (0, frames))
        self.successResultOf(self.db.write(SCHEMA, insert, "last", 1))
        self.successResultOf(self.checkpoints.stop())
        self.assertEqual(self.autocheckpoint(), 1000)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        other = sqlite3.connect(self.path)
        self.addCleanup(other.close)
        self.assertEqual(other.execute("SELECT COUNT(*) FROM things").fetchone()[0], 1501)

    def wal_bytes(self) -> int:
        """The WAL file's size: it grows only while the WAL does not restart."""
        return os.path.getsize(self.path + "-wal")

    def test_the_wal_restarts_under_a_steady_load(self) -> None:
        """
        A commit lands while every checkpoint runs (as under a steady
        load, the checkpoint being in a thread): a second, short
        checkpoint with the grouped writes held lets the next commit
        restart the WAL, so that the file stays as long as what is written
        between two ticks instead of growing tick after tick.
        """
        from twisted.internet.defer import maybeDeferred

        from smeldr_oauth.db.sqlite import Checkpointer

        db = Database(SQLiteEngine(self.path), self.clock, threads=0, group_commit=True)
        self.addCleanup(db.close)
        other = sqlite3.connect(self.path, isolation_level=None)
        self.addCleanup(other.close)
        count = [0]
        held: list[bool] = []

        def write(rows: int) -> None:
            for _ in range(rows):
                count[0] += 1
                db.write(SCHEMA, insert, f"n{count[0]:06d}", count[0], group=True)
            self.clock.advance(0)

        def run(f: Any) -> Any:
            count[0] += 1
            d = db.write(SCHEMA, insert, f"n{count[0]:06d}", 0, group=True)
            self.clock.advance(0)
            if not d.called:
                # Grouped writes are held: the second pass.
                held.append(True)
                return maybeDeferred(f)
            # The first pass: a transaction begun before it ends commits
            # after it.
            other.execute("BEGIN IMMEDIATE")
            other.executemany("INSERT INTO things VALUES (?, 1)", [(f"o{count[0]}-{i}",) for i in range(50)])
            count[0] += 50
            result = maybeDeferred(f)
            other.execute("COMMIT")
            return result

        checkpoints = Checkpointer(db, self.clock, run, interval=1.0, restart_frames=10)
        self.successResultOf(checkpoints.start())
        sizes = []
        for _ in range(6):
            write(500)
            self.clock.advance(1.0)
            write(1)
            sizes.append(self.wal_bytes())
        # Without the restarts it grows by about a tick's writes a tick
        # (the file is as long as the WAL ever was: a page or so more when
        # one tick writes a little more than those before).
        self.assertLess(sizes[-1] - sizes[1], sizes[0] / 4, sizes)
        self.assertEqual(held, [True] * 6)

    def test_no_second_pass_when_idle(self) -> None:
        """
        Once the WAL has had its second pass, ticks with nothing written
        since hold nothing back: one pass each.
        """
        from twisted.internet.defer import maybeDeferred

        from smeldr_oauth.db.sqlite import Checkpointer

        db = Database(SQLiteEngine(self.path), self.clock, threads=0, group_commit=True)
        self.addCleanup(db.close)
        runs = [0]

        def run(f: Any) -> Any:
            runs[0] += 1
            return maybeDeferred(f)

        checkpoints = Checkpointer(db, self.clock, run, interval=1.0, restart_frames=1)
        self.successResultOf(checkpoints.start())
        for i in range(100):
            db.write(SCHEMA, insert, f"n{i:06d}", i, group=True)
        self.clock.advance(0)
        self.clock.advance(1.0)
        self.assertEqual(runs[0], 2)
        for _ in range(3):
            self.clock.advance(1.0)
        self.assertEqual(runs[0], 5)
        self.successResultOf(checkpoints.stop())

    def test_a_hung_second_pass_holds_writes_for_a_limited_time(self) -> None:
        """
        Whatever the thread does, the grouped writes wait at most
        L{HOLD_LIMIT} for the second pass.
        """
        from twisted.internet.defer import Deferred, maybeDeferred

        from smeldr_oauth.db.sqlite import HOLD_LIMIT, Checkpointer

        db = Database(SQLiteEngine(self.path), self.clock, threads=0, group_commit=True)
        self.addCleanup(db.close)
        hung: list[Deferred[Any]] = []

        calls = [0]

        def run(f: Any) -> Any:
            calls[0] += 1
            if calls[0] == 2:  # the second pass
                hung.append(Deferred())
                return hung[-1]
            return maybeDeferred(f)

        checkpoints = Checkpointer(db, self.clock, run, interval=1.0, restart_frames=1)
        self.successResultOf(checkpoints.start())
        for i in range(100):
            db.write(SCHEMA, insert, f"n{i:06d}", i, group=True)
        self.clock.advance(0)
        self.clock.advance(1.0)
        self.assertEqual(len(hung), 1)
        d = db.write(SCHEMA, insert, "held", 1, group=True)
        self.clock.advance(HOLD_LIMIT / 2)
        self.assertNoResult(d)
        self.clock.advance(HOLD_LIMIT / 2)
        self.assertIsNone(self.successResultOf(d))
        hung[0].callback(None)
        self.successResultOf(checkpoints.stop())

    def test_restart_threshold(self) -> None:
        """
        L{RESTART_FRAMES} is several seconds of a busy server's writes
        (18,000-24,000 frames a second at 4,000-5,000 refreshes a
        second on the bench box): at 16,384 the writes were held every
        second, 1.2-1.4% of the refreshes, and those were a third to three
        quarters of the slowest 1% (docs/performance.md, round nine).
        """
        from smeldr_oauth.db.sqlite import RESTART_FRAMES

        self.assertGreaterEqual(RESTART_FRAMES, 3 * 20_000)
        # Still bounded: 256 MiB of 4 KiB pages at most.
        self.assertLessEqual(RESTART_FRAMES * 4096, 256 * 1024 * 1024)

    def test_skips_while_running(self) -> None:
        """
        A tick while the previous checkpoint still runs starts no other.
        """
        from twisted.internet.defer import Deferred

        from smeldr_oauth.db.sqlite import Checkpointer

        calls: list[Deferred[Any]] = []

        def run(f: Any) -> Deferred[Any]:
            calls.append(Deferred())
            return calls[-1]

        checkpoints = Checkpointer(self.db, self.clock, run, interval=1.0)
        self.successResultOf(checkpoints.start())
        self.clock.advance(1.0)
        self.clock.advance(1.0)
        self.assertEqual(len(calls), 1)
        calls[0].callback(None)
        self.clock.advance(1.0)
        self.assertEqual(len(calls), 2)
        calls[1].callback(None)
        d = checkpoints.stop()
        calls[2].callback(None)
        self.successResultOf(d)
