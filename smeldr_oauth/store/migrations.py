# -*- test-case-name: tests.test_store_sqlite -*-
"""
The SQLite schema, as an ordered list of migrations.

Migration I{n} (counting from 1) takes the database from version I{n-1} to
version I{n}; the version lives in the one-row table C{schema_version}.
Each migration runs in its own C{BEGIN IMMEDIATE} transaction that also
bumps the version, so a crash or a failing statement leaves the database at
the previous version, and two processes opening one file at once cannot
both apply the same step (the second waits for the write lock, then sees the
new version and skips it).

Never edit a migration that has shipped: append a new one.
"""

from __future__ import annotations

import sqlite3
from typing import Sequence

MIGRATIONS: tuple[str, ...] = (
    # 1: the initial schema.  Scopes and lists are JSON arrays; times are
    # POSIX seconds (REAL); secrets are hex SHA-256 only.
    """
    CREATE TABLE clients (
        client_id TEXT PRIMARY KEY,
        client_name TEXT,
        redirect_uris TEXT NOT NULL,
        token_endpoint_auth_method TEXT NOT NULL,
        grant_types TEXT NOT NULL,
        scope TEXT,
        kind TEXT NOT NULL,
        client_secret_hash TEXT,
        created_at REAL NOT NULL,
        client_uri TEXT,
        logo_uri TEXT
    );

    CREATE TABLE grants (
        grant_id TEXT PRIMARY KEY,
        client_id TEXT NOT NULL,
        subject TEXT NOT NULL,
        scopes TEXT NOT NULL,
        resource TEXT NOT NULL,
        created_at REAL NOT NULL,
        site_token_id TEXT,
        client_name TEXT,
        last_used_at REAL,
        revoked_at REAL
    );
    CREATE INDEX grants_site_token_id ON grants (site_token_id);
    CREATE INDEX grants_subject ON grants (subject);

    CREATE TABLE codes (
        code_hash TEXT PRIMARY KEY,
        grant_id TEXT NOT NULL REFERENCES grants (grant_id) ON DELETE CASCADE,
        client_id TEXT NOT NULL,
        redirect_uri TEXT NOT NULL,
        code_challenge TEXT NOT NULL,
        scopes TEXT NOT NULL,
        resource TEXT NOT NULL,
        expires_at REAL NOT NULL,
        issue_refresh INTEGER NOT NULL,
        used_at REAL
    );
    CREATE INDEX codes_grant_id ON codes (grant_id);
    CREATE INDEX codes_expires_at ON codes (expires_at);

    CREATE TABLE access_tokens (
        token_hash TEXT PRIMARY KEY,
        grant_id TEXT NOT NULL REFERENCES grants (grant_id) ON DELETE CASCADE,
        scopes TEXT NOT NULL,
        resource TEXT NOT NULL,
        expires_at REAL NOT NULL,
        revoked_at REAL
    );
    CREATE INDEX access_tokens_grant_id ON access_tokens (grant_id);
    CREATE INDEX access_tokens_expires_at ON access_tokens (expires_at);

    CREATE TABLE refresh_tokens (
        token_hash TEXT PRIMARY KEY,
        grant_id TEXT NOT NULL REFERENCES grants (grant_id) ON DELETE CASCADE,
        scopes TEXT NOT NULL,
        generation INTEGER NOT NULL,
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        used_at REAL,
        revoked_at REAL
    );
    CREATE INDEX refresh_tokens_grant_id ON refresh_tokens (grant_id, generation);
    CREATE INDEX refresh_tokens_expires_at ON refresh_tokens (expires_at);
    """,
)


def split_script(script: str) -> list[str]:
    """
    Cut a script into single statements.

    L{sqlite3.Cursor.executescript} would do this, but it commits any open
    transaction first, which would break one-transaction-per-migration.
    L{sqlite3.complete_statement} knows about quoted semicolons.
    """
    statements: list[str] = []
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            if pending.strip().rstrip(";").strip():
                statements.append(pending.strip())
            pending = ""
    if pending.strip():
        raise ValueError("migration ends with an incomplete statement")
    return statements


def schema_version(cursor: sqlite3.Cursor) -> int:
    """
    The version of the database behind C{cursor} (0 for a new file).
    """
    cursor.execute(
        "CREATE TABLE IF NOT EXISTS schema_version ("
        " lock INTEGER PRIMARY KEY CHECK (lock = 0), version INTEGER NOT NULL)"
    )
    cursor.execute("INSERT OR IGNORE INTO schema_version (lock, version) VALUES (0, 0)")
    cursor.execute("SELECT version FROM schema_version")
    (version,) = cursor.fetchone()
    return int(version)


def migrate(connection: sqlite3.Connection, migrations: Sequence[str] = MIGRATIONS) -> int:
    """
    Bring the database up to C{len(migrations)}; returns the final version.

    C{connection} must be in autocommit mode (C{isolation_level=None}) so
    that the explicit transactions here are the only ones.  A database newer
    than this code is refused rather than silently used.
    """
    cursor = connection.cursor()
    try:
        for target, script in enumerate(migrations, start=1):
            cursor.execute("BEGIN IMMEDIATE")
            try:
                current = schema_version(cursor)
                if current < target:
                    for statement in split_script(script):
                        cursor.execute(statement)
                    cursor.execute("UPDATE schema_version SET version = ?", (target,))
                cursor.execute("COMMIT")
            except BaseException:
                # Some errors (a full disk) end the transaction themselves.
                if connection.in_transaction:
                    cursor.execute("ROLLBACK")
                raise
        cursor.execute("BEGIN")
        try:
            current = schema_version(cursor)
        finally:
            cursor.execute("COMMIT")
        if current > len(migrations):
            raise RuntimeError(
                f"database schema version {current} is newer than this code "
                f"({len(migrations)}); refusing to use it"
            )
        return current
    finally:
        cursor.close()
