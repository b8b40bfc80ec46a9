"""
Integrity checks of an OAuth database after a fault (a process killed with
C{kill -9} mid-request, the database restarted): rows that a half-finished
change, or a missed cascade, would leave behind.

Each check is one SQL query that should find nothing; L{problems} runs
them all (on SQLite or PostgreSQL, through the database layer) and
describes what each found, so a failing test says what is wrong.
"""

from __future__ import annotations

from typing import Any

from smeldr_oauth.store.schema import OAUTH_SCHEMA

#: (what is wrong, a query returning one row per instance); each C{?} is now.
CHECKS: tuple[tuple[str, str], ...] = (
    (
        # A client registered through DCR is a row; a CIMD client's id is
        # its document's URL and has no row.
        "grants of a registered client that does not exist",
        "SELECT g.grant_id FROM grants g LEFT JOIN clients c ON c.client_id = g.client_id"
        " WHERE c.client_id IS NULL AND g.client_id NOT LIKE 'http%'",
    ),
    (
        "codes without their grant",
        "SELECT x.code_hash FROM codes x LEFT JOIN grants g ON g.grant_id = x.grant_id"
        " WHERE g.grant_id IS NULL",
    ),
    # Access tokens without their grant, and unmarked access tokens of a
    # revoked grant, are no faults since the OAuth migration 4: access
    # tokens have no foreign key, a grant's revocation is not copied onto
    # them, and every look-up joins the grant, which refuses both (the store
    # contract's test_access_token_of_revoked_grant and ..._purged_grant).
    (
        "refresh tokens without their grant",
        "SELECT x.token_hash FROM refresh_tokens x LEFT JOIN grants g ON g.grant_id = x.grant_id"
        " WHERE g.grant_id IS NULL",
    ),
    (
        "live refresh tokens of revoked grants",
        "SELECT x.token_hash FROM refresh_tokens x JOIN grants g ON g.grant_id = x.grant_id"
        " WHERE g.revoked_at IS NOT NULL AND x.revoked_at IS NULL AND x.used_at IS NULL"
        " AND x.expires_at > ?",
    ),
    (
        # The exchange spends the code and stores the tokens in one
        # transaction: tokens beside an unspent code were half-written.
        "grants with tokens whose code was never spent",
        "SELECT g.grant_id FROM grants g JOIN codes x ON x.grant_id = g.grant_id"
        " WHERE x.used_at IS NULL AND EXISTS"
        " (SELECT 1 FROM access_tokens a WHERE a.grant_id = g.grant_id)",
    ),
    (
        # A rotation spends the token and revokes its unspent siblings in
        # one statement: an unspent token of an older generation than the
        # grant's newest was left behind by a half-done rotation.
        "unspent refresh tokens of a superseded generation",
        "SELECT x.token_hash FROM refresh_tokens x WHERE x.revoked_at IS NULL AND x.used_at IS NULL"
        " AND x.generation < (SELECT MAX(y.generation) FROM refresh_tokens y WHERE y.grant_id = x.grant_id)",
    ),
)


def _run(txn: Any, now: float) -> list[str]:
    found = []
    for what, sql in CHECKS:
        rows = list(txn.execute(sql, (now,) * sql.count("?")))
        if rows:
            found.append(f"{len(rows)} {what} (e.g. {str(rows[0][0])[:12]}…)")
    return found


def problems(database: Any, now: float) -> Any:
    """
    Run every check on C{database} (a L{smeldr_oauth.db.Database} holding
    the OAuth tables).

    @return: a L{Deferred} firing with one line per failed check; empty
        when the database is consistent.
    """
    return database.read(OAUTH_SCHEMA, _run, now)
