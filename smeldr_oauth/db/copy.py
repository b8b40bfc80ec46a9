# -*- test-case-name: tests.test_db_copy -*-
"""
Copying SQLite databases into another database (PostgreSQL): what
C{smeldr-oauth-admin migrate --from-sqlite} does.

The rules, chosen so that no grant can be lost or duplicated:

  - each source file is first brought to the current schema (as the
    server would on start-up), then read in one snapshot;
  - the whole copy is one transaction on the target: it lands completely
    or not at all;
  - the target's tables must be empty: a copy never merges into, nor
    overwrites, data that is already there.  Running the command again
    after it succeeded is therefore refused (and changes nothing); after it
    failed, it simply runs again.

Stop the servers using the SQLite files first: a copy reflects the files
as they were when it began, and writes made to them afterwards are not
carried over.
"""

from __future__ import annotations

import os
import sqlite3
from typing import Any, Sequence
from urllib.request import pathname2url

from twisted.internet.defer import Deferred

from smeldr_oauth.db.database import Database, Transaction
from smeldr_oauth.db.migrations import Schema
from smeldr_oauth.db.sqlite import SQLiteEngine

#: Rows per batch while copying a table.
BATCH = 500


class TargetNotEmpty(Exception):
    """
    A table of the target already holds rows: nothing was copied.
    """

    def __init__(self, table: str, rows: int) -> None:
        super().__init__(
            f"the target database already holds data (table {table}: {rows} row(s)); "
            "the copy goes only into empty tables, so nothing was copied"
        )
        self.table = table


class SourceMissing(Exception):
    """
    A source file does not exist: nothing was copied.
    """


class WrongSource(Exception):
    """
    A source file is not the database its place on the command line says
    (the two files swapped, another SQLite file, one that lost a table):
    nothing was copied, and the file was not changed.
    """


async def copy_from_sqlite(
    target: Database, sources: Sequence[tuple[str, Sequence[Schema]]], reactor: Any
) -> dict[str, int]:
    """
    Copy the tables of C{schemas} from each SQLite file into C{target}.

    @param sources: C{(path, schemas)} pairs, e.g. the OAuth file with the
        OAuth schema, the site file with the posts and site-token schemas.
    @param reactor: runs the sources' migrations (on the calling thread).
    @return: rows copied, by table.
    @raise SourceMissing: a file does not exist.
    @raise WrongSource: a file holds none of its schemas' tables (checked
        before anything is written to it), or lacks one once migrated.
    @raise TargetNotEmpty: a target table holds rows.
    """
    for path, _ in sources:
        if not os.path.exists(path):
            raise SourceMissing(f"no SQLite database at {path}")
    for path, schemas in sources:
        # Before any migration writes to it: migrating the site file as the
        # OAuth one (the arguments swapped) would add empty tables to both
        # files and "copy" nothing, successfully.
        wanted = [table for schema in schemas for table in schema.tables]
        if not set(wanted) & _tables_in(path):
            raise WrongSource(
                f"{path} holds none of the tables {', '.join(wanted)}: is it the right file "
                "(the server's --oauth-db first, its --site-db second)? Nothing was copied"
            )
    for path, schemas in sources:
        source = Database(SQLiteEngine(path), reactor, threads=0)
        try:
            for schema in schemas:
                await source.ensure(schema)
        finally:
            source.close()
    for _, schemas in sources:
        for schema in schemas:
            await target.ensure(schema)
    counts: dict[str, int] = await _copy(target, sources)
    return counts


def _copy(target: Database, sources: Sequence[tuple[str, Sequence[Schema]]]) -> "Deferred[dict[str, int]]":
    # The schemas are current by now; the transaction is named after them all.
    any_schema = sources[0][1][0]
    return target.write(any_schema, _copy_all, sources, name="copy_from_sqlite")


def _copy_all(txn: Transaction, sources: Sequence[tuple[str, Sequence[Schema]]]) -> dict[str, int]:
    for _, schemas in sources:
        for schema in schemas:
            for table in schema.tables:
                rows = int(txn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
                if rows:
                    raise TargetNotEmpty(table, rows)
    counts: dict[str, int] = {}
    for path, schemas in sources:
        connection = sqlite3.connect(_read_only(path), uri=True, isolation_level=None)
        try:
            # One snapshot of the whole file.
            connection.execute("BEGIN")
            for schema in schemas:
                for table in schema.tables:
                    counts[table] = _copy_table(connection, txn, table, path)
            connection.execute("COMMIT")
        finally:
            connection.close()
    _restart_identities(txn, [table for _, schemas in sources for s in schemas for table in s.tables])
    return counts


def _read_only(path: str) -> str:
    """
    The URI that opens C{path} read-only: percent-encoded, so that a name
    with C{?}, C{#} or C{%} opens that file (not a new, empty one named by
    the part before the C{?}).
    """
    return "file:" + pathname2url(os.path.abspath(path)) + "?mode=ro"


def _tables_in(path: str) -> set[str]:
    """
    The tables of the SQLite file at C{path}, read without writing to it.

    @raise WrongSource: it is not a SQLite database.
    """
    try:
        connection = sqlite3.connect(_read_only(path), uri=True)
        try:
            return {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            connection.close()
    except sqlite3.DatabaseError as e:
        raise WrongSource(f"{path} is not a SQLite database ({e}); nothing was copied")


def _copy_table(source: sqlite3.Connection, txn: Transaction, table: str, path: str) -> int:
    columns = [row[1] for row in source.execute(f"PRAGMA table_info({table})")]
    if not columns:
        # Raised inside the target's transaction: nothing is kept.
        raise WrongSource(f"{path} has no table {table} (a damaged or foreign file?); nothing was copied")
    names = ", ".join(columns)
    insert = f"INSERT INTO {table} ({names}) VALUES ({', '.join('?' for _ in columns)})"
    cursor = source.execute(f"SELECT {names} FROM {table} ORDER BY rowid")
    # SQLite keeps the hashes of codes and tokens as their bytes (OAuth
    # migration 9, smeldr_oauth.store.hashkeys), every other engine as
    # their hex (TEXT), and no column of any copied table holds other bytes.
    convert = txn.engine.name != "sqlite"
    copied = 0
    while True:
        rows = cursor.fetchmany(BATCH)
        if not rows:
            return copied
        if convert:
            rows = [tuple(v.hex() if isinstance(v, bytes) else v for v in row) for row in rows]
        txn.executemany(insert, rows)
        copied += len(rows)


def _restart_identities(txn: Transaction, tables: Sequence[str]) -> None:
    """
    PostgreSQL: identity columns were given explicit values by the copy, so
    move their sequences past the largest one.
    """
    if txn.engine.name != "postgresql":
        return
    for table in tables:
        identities = txn.execute(
            "SELECT column_name FROM information_schema.columns"
            " WHERE table_schema = current_schema() AND table_name = ? AND is_identity = 'YES'",
            (table,),
        ).fetchall()
        for (column,) in identities:
            txn.execute(
                f"SELECT setval(pg_get_serial_sequence(?, ?), COALESCE(MAX({column}), 0) + 1, false)"
                f" FROM {table}",
                (table, column),
            )
