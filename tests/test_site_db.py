"""
Tests for L{smeldr_oauth.site.db}.
"""

from __future__ import annotations

import sqlite3

from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests import test_site_posts, test_site_tokens
from smeldr_oauth.site.db import (
    Migration,
    Schema,
    SchemaTooNew,
    SQLiteDatabase,
    migrate,
)

V1 = Migration(1, ("CREATE TABLE a (x INTEGER PRIMARY KEY)",))
V2 = Migration(
    2, ("CREATE TABLE b (a_x INTEGER REFERENCES a (x))", "INSERT INTO a VALUES (7)")
)


class MigrateTests(SynchronousTestCase):
    def connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(self.mktemp())
        self.addCleanup(connection.close)
        return connection

    def test_applies_in_order_once(self) -> None:
        connection = self.connect()
        self.assertEqual(migrate(connection, Schema("c", (V1,)), 1.0), 1)
        self.assertEqual(migrate(connection, Schema("c", (V2, V1)), 2.0), 2)
        self.assertEqual(migrate(connection, Schema("c", (V1, V2)), 3.0), 2)
        rows = connection.execute(
            "SELECT component, version, applied_at FROM schema_migrations ORDER BY version"
        ).fetchall()
        self.assertEqual(rows, [("c", 1, 1.0), ("c", 2, 2.0)])
        self.assertEqual(connection.execute("SELECT x FROM a").fetchall(), [(7,)])

    def test_failed_migration_rolls_back(self) -> None:
        connection = self.connect()
        broken = Migration(1, ("CREATE TABLE a (x)", "THIS IS NOT SQL"))
        self.assertRaises(
            sqlite3.OperationalError, migrate, connection, Schema("c", (broken,)), 1.0
        )
        self.assertEqual(
            connection.execute(
                "SELECT name FROM sqlite_master WHERE name = 'a'"
            ).fetchall(),
            [],
        )
        self.assertEqual(migrate(connection, Schema("c", (V1,)), 1.0), 1)

    def test_too_new(self) -> None:
        connection = self.connect()
        migrate(connection, Schema("c", (V1, V2)), 1.0)
        self.assertRaises(SchemaTooNew, migrate, connection, Schema("c", (V1,)), 1.0)

    def test_components_independent(self) -> None:
        connection = self.connect()
        migrate(connection, Schema("c", (V1,)), 1.0)
        self.assertEqual(
            migrate(
                connection, Schema("d", (Migration(1, ("CREATE TABLE d (y)",)),)), 1.0
            ),
            1,
        )


class DatabaseTests(TestCase):
    threads = 1

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.path = self.mktemp()
        self.db = SQLiteDatabase(self.path, reactor=reactor, clock=Clock(), threads=self.threads)
        self.addCleanup(self.db.close)
        self.schema = Schema("t", (V1, V2))

    @inlineCallbacks
    def test_pragmas(self):
        def pragmas(connection):
            return (
                connection.execute("PRAGMA journal_mode").fetchone()[0],
                connection.execute("PRAGMA foreign_keys").fetchone()[0],
            )

        result = yield self.db.read(self.schema, pragmas)
        self.assertEqual(result, ("wal", 1))

    @inlineCallbacks
    def test_foreign_keys_enforced(self):
        def bad(connection):
            connection.execute("INSERT INTO b VALUES (99)")

        yield self.assertFailure(
            self.db.write(self.schema, bad), sqlite3.IntegrityError
        )

    @inlineCallbacks
    def test_write_rolls_back_on_error(self):
        def half(connection):
            connection.execute("INSERT INTO a VALUES (1)")
            raise ValueError("stop")

        yield self.assertFailure(self.db.write(self.schema, half), ValueError)
        rows = yield self.db.read(
            self.schema, lambda c: c.execute("SELECT x FROM a ORDER BY x").fetchall()
        )
        self.assertEqual([tuple(r) for r in rows], [(7,)])

    @inlineCallbacks
    def test_write_commits(self):
        yield self.db.write(
            self.schema, lambda c: c.execute("INSERT INTO a VALUES (2)")
        )
        other = sqlite3.connect(self.path)
        self.addCleanup(other.close)
        self.assertEqual(
            other.execute("SELECT x FROM a ORDER BY x").fetchall(), [(2,), (7,)]
        )


class ReactorThreadDatabaseTests(DatabaseTests):
    """
    The same, with C{--db-threads 0}: SQLite on the reactor thread.
    """

    threads = 0

    def test_inline(self) -> None:
        import threading

        self.assertTrue(self.db.pool.inline)
        d = self.db.read(self.schema, lambda connection: threading.get_ident())
        self.assertEqual(self.successResultOf(d), threading.get_ident())

    def test_bad_threads(self) -> None:
        self.assertRaises(ValueError, SQLiteDatabase, self.mktemp(), threads=2)


class ReactorThreadPostStoreTests(test_site_posts.PostStoreTests):
    """
    Every post store test with the site database on the reactor thread.
    """

    def setUp(self) -> None:
        self.patch(SQLiteDatabase, "default_threads", 0)
        super().setUp()
        self.assertTrue(self.db.pool.inline)


class ReactorThreadSiteTokenStoreTests(test_site_tokens.SiteTokenStoreTests):
    """
    Every site token store test with the site database on the reactor thread.
    """

    def setUp(self) -> None:
        self.patch(SQLiteDatabase, "default_threads", 0)
        super().setUp()
        self.assertTrue(self.site.db.pool.inline)
