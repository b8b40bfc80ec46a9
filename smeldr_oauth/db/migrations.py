# -*- test-case-name: tests.test_db_migrations -*-
"""
One migration scheme for every store and both engines.

Each store declares its tables as a L{Schema}: a component name (C{oauth},
C{posts}, C{site_tokens}, ...) and an ordered list of L{Migration}s.  The
database records what it has applied in one table::

    schema_migrations (component, version, applied_at)

and L{migrate} brings one component up to date inside one write transaction
(SQLite's C{BEGIN IMMEDIATE}, PostgreSQL's transactional DDL under an
advisory lock): all the steps a database lacks land together or not at
all, so a crash or a failing statement leaves the component at its
previous version, and two processes opening one database at once cannot
both apply a step (the second waits, then finds it applied).

Never edit a migration that has shipped: append a new one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

import attr

from smeldr_oauth.db.errors import SchemaTooNew

if TYPE_CHECKING:
    from smeldr_oauth.db.database import Transaction


@attr.s(frozen=True, auto_attribs=True)
class Migration:
    """
    One step of a component's schema.

    @ivar version: strictly increasing within a component, starting at 1.
    @ivar statements: SQL statements, run one by one inside the migration's
        transaction, on every engine without its own list below.
    @ivar sqlite: the statements for SQLite, when they differ.
    @ivar postgresql: the statements for PostgreSQL, when they differ (an
        identity column, a C{tsvector} index).
    """

    version: int
    statements: tuple[str, ...] = ()
    sqlite: Optional[tuple[str, ...]] = attr.ib(default=None, kw_only=True)
    postgresql: Optional[tuple[str, ...]] = attr.ib(default=None, kw_only=True)

    def statements_for(self, engine: str) -> tuple[str, ...]:
        specific: Optional[tuple[str, ...]] = getattr(self, engine, None)
        return self.statements if specific is None else specific


@attr.s(frozen=True, auto_attribs=True)
class Schema:
    """
    The tables of one store, as the migrations that build them.

    @ivar tables: the tables that hold the component's data, parents before
        children, for copying a database (C{smeldr-oauth-admin migrate}).
    @ivar legacy: for a component that once kept its version elsewhere: a
        function that, inside the migration transaction, returns the
        version recorded there (0 if none) and removes the old record; the
        versions up to it are then recorded as applied, not run again.
    """

    component: str
    migrations: tuple[Migration, ...]
    tables: tuple[str, ...] = attr.ib(default=(), kw_only=True)
    legacy: Optional[Callable[["Transaction"], int]] = attr.ib(
        default=None, kw_only=True, eq=False
    )

    @property
    def version(self) -> int:
        return max((m.version for m in self.migrations), default=0)


MIGRATIONS_TABLE = (
    "CREATE TABLE IF NOT EXISTS schema_migrations ("
    " component TEXT NOT NULL,"
    " version INTEGER NOT NULL,"
    " applied_at DOUBLE PRECISION NOT NULL,"
    " PRIMARY KEY (component, version))"
)


def current_version(txn: "Transaction", component: str) -> int:
    """
    The highest migration of C{component} applied (0 if none).
    """
    txn.execute(MIGRATIONS_TABLE)
    row = txn.execute(
        "SELECT MAX(version) FROM schema_migrations WHERE component = ?", (component,)
    ).fetchone()
    return int(row[0] or 0)


def _record(txn: "Transaction", component: str, version: int, now: float) -> None:
    txn.execute(
        "INSERT INTO schema_migrations (component, version, applied_at) VALUES (?, ?, ?)",
        (component, version, now),
    )


def migrate(txn: "Transaction", schema: Schema, now: float) -> int:
    """
    Bring C{schema} up to date inside the current write transaction and
    return the resulting version.

    @raise SchemaTooNew: the database holds a later version than C{schema}.
    """
    txn.engine.lock_schema(txn)
    have = current_version(txn, schema.component)
    if have == 0 and schema.legacy is not None:
        adopted = schema.legacy(txn)
        for version in range(1, adopted + 1):
            _record(txn, schema.component, version, now)
        have = adopted
    if have > schema.version:
        raise SchemaTooNew(
            f"{schema.component} schema is version {have}; this code knows {schema.version}"
        )
    for migration in sorted(schema.migrations, key=lambda m: m.version):
        if migration.version <= have:
            continue
        for statement in migration.statements_for(txn.engine.name):
            txn.execute(statement)
        _record(txn, schema.component, migration.version, now)
        have = migration.version
    return have
