"""
Tests for L{smeldr_oauth.db.migrations}: the one migration scheme, on
SQLite and on PostgreSQL.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor as global_reactor
from twisted.internet.defer import DeferredList, inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase, TestCase

from smeldr_oauth.db import Migration, Schema, SchemaTooNew, open_database
from tests import postgres
from tests.test_store_sqlite import InlineReactor

V1 = Migration(1, ("CREATE TABLE a (x INTEGER PRIMARY KEY)",))
V2 = Migration(2, ("CREATE TABLE b (a_x INTEGER REFERENCES a (x))", "INSERT INTO a VALUES (7)"))


def applied(txn: Any) -> list[tuple[Any, ...]]:
    """
    What the migrations table records, but for the engine's own schemas.
    """
    return [
        tuple(row)
        for row in txn.execute(
            "SELECT component, version, applied_at FROM schema_migrations"
            " WHERE component != 'notifications' ORDER BY component, version"
        )
    ]


def table_exists(txn: Any, name: str) -> bool:
    try:
        txn.execute(f"SELECT COUNT(*) FROM {name}").fetchone()
    except Exception:
        return False
    return True


class MigrationsMixin:
    def location(self) -> str:
        raise NotImplementedError()

    def open(self, now: float = 1.0) -> Any:
        reactor = InlineReactor()
        reactor.advance(now)
        db = open_database(self.location_value, reactor, threads=0)
        self.addCleanup(db.close)  # type: ignore[attr-defined]
        return db

    def setUp(self) -> None:
        self.location_value = self.location()

    def ok(self, d: Any) -> Any:
        return self.successResultOf(d)  # type: ignore[attr-defined]

    def test_applies_in_order_once(self) -> None:
        self.assertEqual(self.ok(self.open(1.0).ensure(Schema("c", (V1,)))), 1)  # type: ignore[attr-defined]
        db = self.open(2.0)
        self.assertEqual(self.ok(db.ensure(Schema("c", (V2, V1)))), 2)  # type: ignore[attr-defined]
        self.assertEqual(self.ok(self.open(3.0).ensure(Schema("c", (V1, V2)))), 2)  # type: ignore[attr-defined]
        self.assertEqual(self.ok(db.read(Schema("c", (V1, V2)), applied)), [("c", 1, 1.0), ("c", 2, 2.0)])  # type: ignore[attr-defined]
        rows = self.ok(db.read(Schema("c", (V1, V2)), lambda txn: [tuple(r) for r in txn.execute("SELECT x FROM a")]))
        self.assertEqual(rows, [(7,)])  # type: ignore[attr-defined]

    def test_failed_migration_rolls_back(self) -> None:
        """
        Bringing a component up to date is one transaction: a migration
        that fails half-way leaves no trace of itself nor of the steps
        before it in the same call (PostgreSQL's DDL is transactional too).
        """
        self.ok(self.open().ensure(Schema("c", (V1,))))
        broken = Migration(3, ("CREATE TABLE c (y INTEGER)", "INSERT INTO nowhere VALUES (1)"))
        self.assertIsNotNone(self.failureResultOf(self.open().ensure(Schema("c", (V1, V2, broken)))))  # type: ignore[attr-defined]
        db = self.open()
        schema = Schema("c", (V1,))
        self.assertEqual([row[:2] for row in self.ok(db.read(schema, applied))], [("c", 1)])  # type: ignore[attr-defined]
        self.assertFalse(self.ok(db.read(schema, table_exists, "b")))  # type: ignore[attr-defined]
        self.assertFalse(self.ok(db.read(schema, table_exists, "c")))  # type: ignore[attr-defined]
        self.assertEqual(self.ok(db.ensure(Schema("c", (V1, V2)))), 2)  # type: ignore[attr-defined]

    def test_too_new(self) -> None:
        self.ok(self.open().ensure(Schema("c", (V1, V2))))
        self.failureResultOf(self.open().ensure(Schema("c", (V1,))), SchemaTooNew)  # type: ignore[attr-defined]

    def test_components_independent(self) -> None:
        db = self.open()
        self.ok(db.ensure(Schema("c", (V1,))))
        self.assertEqual(  # type: ignore[attr-defined]
            self.ok(db.ensure(Schema("d", (Migration(1, ("CREATE TABLE d (y INTEGER)",)),)))), 1
        )

    def test_engine_statements(self) -> None:
        """
        A migration may say what to run on each engine.
        """
        specific = Migration(
            1,
            ("CREATE TABLE generic (x INTEGER)",),
            sqlite=("CREATE TABLE on_sqlite (x INTEGER)",),
            postgresql=("CREATE TABLE on_postgresql (x INTEGER)",),
        )
        db = self.open()
        schema = Schema("e", (specific,))
        self.ok(db.ensure(schema))
        name = db.engine.name
        self.assertTrue(self.ok(db.read(schema, table_exists, f"on_{name}")))  # type: ignore[attr-defined]
        self.assertFalse(self.ok(db.read(schema, table_exists, "generic")))  # type: ignore[attr-defined]

    def test_legacy(self) -> None:
        """
        A component that kept its version elsewhere is taken over at that
        version: the migrations up to it are recorded, not run.
        """
        db = self.open()
        self.ok(db.ensure(Schema("c", (V1,))))
        seen: list[int] = []

        def legacy(txn: Any) -> int:
            seen.append(1)
            return 1

        schema = Schema("old", (V1, Migration(2, ("CREATE TABLE old2 (y INTEGER)",))), legacy=legacy)
        self.assertEqual(self.ok(self.open(5.0).ensure(schema)), 2)  # type: ignore[attr-defined]
        self.assertEqual(self.ok(self.open(6.0).ensure(schema)), 2)  # type: ignore[attr-defined]
        self.assertEqual(seen, [1])  # type: ignore[attr-defined]
        self.assertIn(("old", 1, 5.0), self.ok(db.read(schema, applied)))  # type: ignore[attr-defined]
        self.assertTrue(self.ok(db.read(schema, table_exists, "old2")))  # type: ignore[attr-defined]


class SQLiteMigrationsTests(MigrationsMixin, SynchronousTestCase):
    def location(self) -> str:
        return self.mktemp() + ".db"


class PostgresMigrationsTests(MigrationsMixin, SynchronousTestCase):
    def location(self) -> str:
        return postgres.database_url(self)


class ConcurrentMigrationTests(TestCase):
    """
    Several processes' pools opening one new database at once: each
    migration is applied once, and every opener ends up current.
    """

    @inlineCallbacks
    def test_concurrent(self) -> Any:
        url = postgres.database_url(self)
        schema = Schema("c", (V1, V2))
        databases = []
        for _ in range(4):
            db = open_database(url, global_reactor, threads=1)
            self.addCleanup(db.close)
            databases.append(db)
        results = yield DeferredList([db.ensure(schema) for db in databases], fireOnOneErrback=True)
        self.assertEqual([version for _, version in results], [2, 2, 2, 2])
        rows = yield databases[0].read(schema, applied)
        self.assertEqual([row[:2] for row in rows if row[0] == "c"], [("c", 1), ("c", 2)])
