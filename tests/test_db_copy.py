"""
Tests for L{smeldr_oauth.db.copy}: SQLite files copied into PostgreSQL in
one transaction, into empty tables only.  (The command that runs it,
C{smeldr-oauth-admin migrate}, is tested in C{tests.test_site_admin}.)
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from typing import Any

from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.trial.unittest import TestCase

from smeldr_oauth.db import StoreConflict, open_database
from smeldr_oauth.db.copy import SourceMissing, TargetNotEmpty, WrongSource, copy_from_sqlite
from smeldr_oauth.site.posts import SCHEMA as POSTS_SCHEMA
from smeldr_oauth.site.stores import open_site
from smeldr_oauth.site.tokens import SCHEMA as SITE_TOKENS_SCHEMA
from smeldr_oauth.store import open_store
from smeldr_oauth.store.schema import OAUTH_SCHEMA
from smeldr_oauth.store.sql import SQLStore
from tests import postgres
from tests.test_store_memory import T0, access, h, make_code, make_grant, refresh

TABLES = ("clients", "grants", "codes", "access_tokens", "refresh_tokens", "posts", "post_tags", "site_tokens")


def sources(oauth_db: str, site_db: str) -> list[Any]:
    return [(oauth_db, [OAUTH_SCHEMA]), (site_db, [POSTS_SCHEMA, SITE_TOKENS_SCHEMA])]


def counts(database: Any) -> "Deferred[dict[str, int]]":
    def count(txn: Any) -> dict[str, int]:
        return {table: int(txn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]) for table in TABLES}

    return database.read(OAUTH_SCHEMA, count)


class CopyTests(TestCase):
    @inlineCallbacks
    def setUp(self) -> Any:
        self.oauth_db = self.mktemp() + "-oauth.db"
        self.site_db = self.mktemp() + "-site.db"
        store = open_store(self.oauth_db, global_reactor)
        yield store.create_grant(make_grant("g1"), make_code("c1", "g1"))
        store.close()
        site = open_site(self.site_db, global_reactor)
        yield site.posts.create("First", body="hello", tags=["a", "b"])
        yield site.tokens.create("alice")
        site.close()
        self.target = open_database(postgres.database_url(self), global_reactor)
        self.addCleanup(self.target.close)

    @inlineCallbacks
    def test_copy(self) -> Any:
        copied = yield Deferred.fromCoroutine(
            copy_from_sqlite(self.target, sources(self.oauth_db, self.site_db), global_reactor)
        )
        self.assertEqual(
            copied,
            {"clients": 0, "grants": 1, "codes": 1, "access_tokens": 0, "refresh_tokens": 0,
             "posts": 1, "post_tags": 2, "site_tokens": 1},
        )
        found = yield counts(self.target)
        self.assertEqual(found, copied)

    @inlineCallbacks
    def test_hashes_copied_as_hex(self) -> Any:
        """
        The hashes SQLite keeps as bytes (OAuth migration 9) arrive in
        PostgreSQL as the hex it keeps, and the copied code and tokens
        answer there: the access token is looked up, the refresh token
        rotates, the code is spent once.
        """
        store = open_store(self.oauth_db, global_reactor)
        yield store.add_tokens("g1", access("a1"), refresh("r1"))
        store.close()
        yield Deferred.fromCoroutine(
            copy_from_sqlite(self.target, sources(self.oauth_db, self.site_db), global_reactor)
        )

        def keys(txn: Any) -> list[Any]:
            return [
                txn.execute(f"SELECT {key} FROM {table}").fetchone()[0]
                for table, key in (("codes", "code_hash"), ("access_tokens", "token_hash"), ("refresh_tokens", "token_hash"))
            ]

        self.assertEqual((yield self.target.read(OAUTH_SCHEMA, keys)), [h("c1"), h("a1"), h("r1")])
        copied = SQLStore(self.target)
        yield copied.ready
        info = yield copied.lookup_access_token(h("a1"), T0 + 1)
        self.assertEqual(info.grant_id, "g1")
        redemption = yield copied.redeem_refresh_token(h("r1"), T0 + 2, 10.0, None, access("a2", T0 + 2), refresh("r2", T0 + 2))
        self.assertEqual(redemption.status, "rotated")
        self.assertEqual((yield copied.consume_code(h("c1"), T0 + 3)).status, "ok")

    @inlineCallbacks
    def test_refuses_data(self) -> Any:
        """
        A second copy finds the tables full and changes nothing.
        """
        yield Deferred.fromCoroutine(
            copy_from_sqlite(self.target, sources(self.oauth_db, self.site_db), global_reactor)
        )
        before = yield counts(self.target)
        error = yield self.assertFailure(
            Deferred.fromCoroutine(
                copy_from_sqlite(self.target, sources(self.oauth_db, self.site_db), global_reactor)
            ),
            TargetNotEmpty,
        )
        self.assertEqual(error.table, "clients" if before["clients"] else "grants")
        after = yield counts(self.target)
        self.assertEqual(after, before)

    @inlineCallbacks
    def test_all_or_nothing(self) -> Any:
        """
        A row the target refuses (a code whose grant is missing, which a
        SQLite file written without foreign keys can hold) fails the copy,
        and nothing at all is kept, not even the tables copied before.
        """
        connection = sqlite3.connect(self.oauth_db)
        connection.execute(
            "INSERT INTO codes (code_hash, grant_id, client_id, redirect_uri, code_challenge,"
            " scopes, resource, expires_at, issue_refresh) VALUES ('h', 'gone', 'c', 'r', 'x', '[]', 'r', 0, 0)"
        )
        connection.commit()
        connection.close()
        yield self.assertFailure(
            Deferred.fromCoroutine(
                copy_from_sqlite(self.target, sources(self.oauth_db, self.site_db), global_reactor)
            ),
            StoreConflict,
        )
        found = yield counts(self.target)
        self.assertEqual(set(found.values()), {0})

    @inlineCallbacks
    def test_missing_source(self) -> Any:
        yield self.assertFailure(
            Deferred.fromCoroutine(
                copy_from_sqlite(self.target, sources(self.oauth_db, self.mktemp()), global_reactor)
            ),
            SourceMissing,
        )

    def tablesOf(self, path: str) -> set[str]:
        connection = sqlite3.connect(path)
        try:
            return {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            connection.close()

    @inlineCallbacks
    def test_swapped_sources(self) -> Any:
        """
        The site file given as the OAuth one and the reverse: refused
        before either file is written to (it used to migrate each file to
        the other's schema, copy nothing and succeed), the target empty.
        """
        before = (self.tablesOf(self.oauth_db), self.tablesOf(self.site_db))
        error = yield self.assertFailure(
            Deferred.fromCoroutine(
                copy_from_sqlite(self.target, sources(self.site_db, self.oauth_db), global_reactor)
            ),
            WrongSource,
        )
        self.assertIn(self.site_db + " holds none of the tables clients, grants", str(error))
        self.assertEqual((self.tablesOf(self.oauth_db), self.tablesOf(self.site_db)), before)

    @inlineCallbacks
    def test_not_a_database(self) -> Any:
        with open(self.site_db, "wb") as f:
            f.write(b"not sqlite at all, " * 100)
        error = yield self.assertFailure(
            Deferred.fromCoroutine(
                copy_from_sqlite(self.target, sources(self.oauth_db, self.site_db), global_reactor)
            ),
            WrongSource,
        )
        self.assertIn("is not a SQLite database", str(error))

    @inlineCallbacks
    def test_missing_table(self) -> Any:
        """
        A file that lost one of its tables (its migrations recorded as
        done): the table is named, and nothing at all is copied.
        """
        connection = sqlite3.connect(self.site_db)
        connection.execute("DROP TABLE site_tokens")
        connection.commit()
        connection.close()
        error = yield self.assertFailure(
            Deferred.fromCoroutine(
                copy_from_sqlite(self.target, sources(self.oauth_db, self.site_db), global_reactor)
            ),
            WrongSource,
        )
        self.assertEqual(str(error), f"{self.site_db} has no table site_tokens (a damaged or foreign file?); nothing was copied")
        found = yield counts(self.target)
        self.assertEqual(set(found.values()), {0})

    @inlineCallbacks
    def test_uri_characters_in_path(self) -> Any:
        """
        A file name with C{?}, C{#} and C{%} is read as itself (the
        read-only URI used to end the name at the C{?}, create an empty
        database there and fail).
        """
        directory = self.mktemp()
        os.makedirs(directory)
        odd = os.path.join(directory, "a?b#c%41.db")
        shutil.copy(self.oauth_db, odd)
        copied = yield Deferred.fromCoroutine(copy_from_sqlite(self.target, sources(odd, self.site_db), global_reactor))
        self.assertEqual((copied["grants"], copied["codes"], copied["posts"]), (1, 1, 1))
        self.assertEqual({name for name in os.listdir(directory) if not name.endswith(("-wal", "-shm"))}, {"a?b#c%41.db"})
