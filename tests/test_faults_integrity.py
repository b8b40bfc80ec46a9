"""
Tests for L{tests.integrity}: each check finds the fault it names, and a
consistent database passes them all (on a real SQLite file and on
PostgreSQL).
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.trial.unittest import SynchronousTestCase

from smeldr_oauth.db import open_database
from smeldr_oauth.store.schema import OAUTH_SCHEMA
from tests import integrity, postgres
from tests.test_store_sqlite import InlineReactor

NOW = 1_700_000_000.0
LATER = NOW + 3600


def _baseline(txn: Any) -> None:
    """
    One registered client with one grant: its code spent, an access token,
    a refresh token rotated once (generation 1 spent, generation 2 live).
    """
    txn.execute(
        "INSERT INTO clients (client_id, redirect_uris, token_endpoint_auth_method, grant_types, kind, created_at)"
        " VALUES ('c1', '[]', 'none', '[]', 'dcr', ?)",
        (NOW,),
    )
    _grant(txn, "g1", "c1")
    txn.execute(
        "INSERT INTO codes (code_hash, grant_id, client_id, redirect_uri, code_challenge, scopes, resource,"
        " expires_at, issue_refresh, used_at) VALUES ('k1', 'g1', 'c1', 'r', 'x', 'read', 'r', ?, 1, ?)",
        (LATER, NOW),
    )
    _access(txn, "a1", "g1")
    _refresh(txn, "r1", "g1", 1, used=True)
    _refresh(txn, "r2", "g1", 2)


def _grant(txn: Any, grant_id: str, client_id: str, revoked: bool = False) -> None:
    txn.execute(
        "INSERT INTO grants (grant_id, client_id, subject, scopes, resource, created_at, revoked_at)"
        " VALUES (?, ?, 'alice', 'read', 'r', ?, ?)",
        (grant_id, client_id, NOW, NOW if revoked else None),
    )


def _access(txn: Any, token: str, grant_id: str) -> None:
    txn.execute(
        "INSERT INTO access_tokens (token_hash, grant_id, scopes, resource, expires_at) VALUES (?, ?, 'read', 'r', ?)",
        (token, grant_id, LATER),
    )


def _refresh(txn: Any, token: str, grant_id: str, generation: int, used: bool = False) -> None:
    txn.execute(
        "INSERT INTO refresh_tokens (token_hash, grant_id, scopes, generation, created_at, expires_at, used_at)"
        " VALUES (?, ?, 'read', ?, ?, ?, ?)",
        (token, grant_id, generation, NOW, LATER, NOW if used else None),
    )


#: A fault planted on the baseline, and the words of the check that finds it.
FAULTS: dict[str, tuple[Callable[[Any], Any], str]] = {
    "orphan grant": (lambda txn: _grant(txn, "g2", "gone"), "grants of a registered client that does not exist"),
    "revoked grant, live refresh token": (
        lambda txn: (_grant(txn, "g4", "c1", revoked=True), _refresh(txn, "r4", "g4", 1)),
        "live refresh tokens of revoked grants",
    ),
    "unspent code": (
        lambda txn: txn.execute("UPDATE codes SET used_at = NULL"),
        "grants with tokens whose code was never spent",
    ),
    "half-done rotation": (
        lambda txn: txn.execute("UPDATE refresh_tokens SET used_at = NULL WHERE token_hash = 'r1'"),
        "unspent refresh tokens of a superseded generation",
    ),
}


class IntegrityMixin:
    def location(self) -> str:
        raise NotImplementedError()

    def check(self, fault: Any = None) -> list[str]:
        database = open_database(self.location(), InlineReactor(), threads=0)
        self.addCleanup(database.close)  # type: ignore[attr-defined]
        ok = self.successResultOf  # type: ignore[attr-defined]

        def plant(txn: Any) -> None:
            _baseline(txn)
            if fault is not None:
                fault(txn)

        ok(database.write(OAUTH_SCHEMA, plant))
        return ok(integrity.problems(database, NOW))  # type: ignore[no-any-return]

    def test_consistent(self) -> None:
        self.assertEqual(self.check(), [])  # type: ignore[attr-defined]

    def test_faults_found(self) -> None:
        for name, (fault, words) in FAULTS.items():
            found = self.check(fault)
            self.assertEqual(len(found), 1, (name, found))  # type: ignore[attr-defined]
            self.assertIn(words, found[0], name)  # type: ignore[attr-defined]


class SQLiteIntegrityTests(IntegrityMixin, SynchronousTestCase):
    def location(self) -> str:
        return self.mktemp() + ".db"


class PostgresIntegrityTests(IntegrityMixin, SynchronousTestCase):
    def location(self) -> str:
        return postgres.database_url(self)
