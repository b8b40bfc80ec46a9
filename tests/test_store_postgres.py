"""
Tests for L{smeldr_oauth.store.sql} on PostgreSQL, against the real server
of L{tests.postgres} (each test in a fresh database), and what both SQL
engines share: secrets at rest through the real paths, races between
connections and between processes, a crash in the middle of a code
exchange.
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Any, Optional

import attr
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from smeldr_oauth.db.database import Database, Transaction
from smeldr_oauth.db.postgres import PostgresEngine
from smeldr_oauth.oauth.config import Config
from smeldr_oauth.oauth.model import Approval
from smeldr_oauth.oauth.secrets import hash_secret
from smeldr_oauth.oauth.server import OAuthServer
from smeldr_oauth.site.stores import open_site
from smeldr_oauth.store import open_store
from smeldr_oauth.store.sql import SQLStore
from tests import postgres
from tests.test_store_memory import (
    GRACE,
    T0,
    StoreBehaviourMixin,
    accept,
    access,
    h,
    make_code,
    make_grant,
    refresh,
)
from tests.test_store_sqlite import (
    AccessTokensMigrationMixin,
    InlineReactor,
    InlineThreadPool,
    NoCallFromThreadReactor,
)

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pg_store(testcase: SynchronousTestCase, url: Optional[str] = None, **kwargs: Any) -> SQLStore:
    """
    A migrated SQL store on a fresh PostgreSQL database whose Deferreds
    fire synchronously (its calls run on the calling thread).
    """
    url = url or postgres.database_url(testcase)
    store = open_store(url, NoCallFromThreadReactor(), threads=0, **kwargs)
    testcase.addCleanup(store.close)
    testcase.assertIs(testcase.successResultOf(store.ready), store)
    return store


def rotated_at(testcase: SynchronousTestCase, url: str, schema: Any, version: int) -> None:
    """
    A database at C{url} made with C{schema}'s first C{version} migrations
    only, as an old server left it: grants C{g1} and C{g2}, each with its
    access token C{a-NAME} and refresh token C{r-NAME} rotated there to
    C{b-NAME} and C{s-NAME}.
    """
    old = pg_store(testcase, url, schema=attr.evolve(schema, migrations=schema.migrations[:version]))
    for name in ("g1", "g2"):
        testcase.successResultOf(old.create_grant(make_grant(name), make_code(f"code-{name}", name)))
        testcase.successResultOf(old.add_tokens(name, access(f"a-{name}"), refresh(f"r-{name}")))
        rotated = old.redeem_refresh_token(
            h(f"r-{name}"), T0 + 10, GRACE, None, access(f"b-{name}", T0 + 10), refresh(f"s-{name}", T0 + 10)
        )
        testcase.assertEqual(testcase.successResultOf(rotated).status, "rotated")
    old.close()


class PostgresStoreBehaviourTests(StoreBehaviourMixin, SynchronousTestCase):
    """
    The shared store contract, unchanged, on PostgreSQL (calls on the
    calling thread).
    """

    def make_store(self) -> SQLStore:
        return pg_store(self)


class PostgresThreadPoolBehaviourTests(StoreBehaviourMixin, SynchronousTestCase):
    """
    The shared store contract on PostgreSQL through the thread-pool path
    (C{threads=1}, a thread-less pool standing in).
    """

    def make_store(self) -> SQLStore:
        database = Database(
            PostgresEngine(postgres.database_url(self)),
            InlineReactor(),
            threads=1,
            threadpool=InlineThreadPool(),
        )
        store = SQLStore(database)
        self.addCleanup(store.close)
        self.assertIs(self.successResultOf(store.ready), store)
        return store


def issue_secrets(testcase: SynchronousTestCase, store: Any, site_location: str) -> list[str]:
    """
    Every kind of secret, made and stored through the real paths: a site
    token (the site token store), a confidential client's secret
    (registration), an authorization code (consent), an access and a
    refresh token (code exchange) and their successors (refresh).

    @return: the plaintexts.
    """
    clock = Clock()
    clock.advance(T0)
    site = open_site(site_location, InlineReactor(), clock=clock, threads=0)
    testcase.addCleanup(site.close)
    _, site_token = testcase.successResultOf(site.tokens.create("alice"))
    config = Config(issuer="https://as.example", verify_bearer=site.tokens.verify_bearer)
    server = OAuthServer(config, store, clock)

    def drive(coroutine: Any) -> Any:
        return testcase.successResultOf(Deferred.fromCoroutine(coroutine))

    registered = drive(
        server.register(
            {
                "redirect_uris": ["https://client.example/cb"],
                "token_endpoint_auth_method": "client_secret_post",
                "grant_types": ["authorization_code", "refresh_token"],
            }
        )
    )
    client_id, client_secret = registered["client_id"], registered["client_secret"]
    from smeldr_oauth.oauth import pkce

    verifier = "v" * 50
    request = drive(
        server.validate_authorization_request(
            {
                "response_type": ["code"],
                "client_id": [client_id],
                "redirect_uri": ["https://client.example/cb"],
                "code_challenge": [pkce.s256(verifier)],
                "code_challenge_method": ["S256"],
                "scope": ["offline_access"],
                "resource": ["https://as.example/mcp"],
            }
        )
    )
    approval = testcase.successResultOf(site.tokens.verify_bearer(site_token))
    testcase.assertEqual(approval, Approval(subject="alice", site_token_id=approval.site_token_id))
    location = drive(server.approve(request, approval))
    from urllib.parse import parse_qs, urlsplit

    code = parse_qs(urlsplit(location).query)["code"][0]
    secrets = {"client_secret": client_secret, "client_id": client_id}
    first = drive(
        server.token(
            {
                "grant_type": ["authorization_code"],
                "code": [code],
                "redirect_uri": ["https://client.example/cb"],
                "code_verifier": [verifier],
                **{k: [v] for k, v in secrets.items()},
            }
        )
    )
    second = drive(
        server.token(
            {
                "grant_type": ["refresh_token"],
                "refresh_token": [first["refresh_token"]],
                **{k: [v] for k, v in secrets.items()},
            }
        )
    )
    return [
        site_token,
        client_secret,
        code,
        first["access_token"],
        first["refresh_token"],
        second["access_token"],
        second["refresh_token"],
    ]


def dump(url: str) -> str:
    """
    Every row of every table of a PostgreSQL database, as text.
    """
    import psycopg

    with psycopg.connect(url) as connection:
        tables = [
            row[0]
            for row in connection.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
            )
        ]
        return "\n".join(
            str(row[0])
            for table in tables
            for row in connection.execute(f'SELECT t::text FROM "{table}" t')
        )


class PostgresAccessTokensMigrationTests(AccessTokensMigrationMixin, SynchronousTestCase):
    def setUp(self) -> None:
        self.url = postgres.database_url(self)

    def open_store(self, schema: Any) -> Any:
        return pg_store(self, self.url, schema=schema)

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        import psycopg

        with psycopg.connect(self.url) as connection:
            return connection.execute(sql).fetchall()

    def grant_id_index_and_key(self) -> tuple[set[str], int]:
        indexes = self.query(
            "SELECT indexname FROM pg_indexes WHERE tablename = 'access_tokens' AND indexname NOT LIKE '%_pkey'"
        )
        keys = self.query(
            "SELECT conname FROM pg_constraint WHERE conrelid = 'access_tokens'::regclass AND contype = 'f'"
        )
        return {name for (name,) in indexes}, len(keys)


class PostgresStoreTests(SynchronousTestCase):
    """
    What is particular to PostgreSQL: bytes at rest, schema records.
    """

    def test_hashes_only(self) -> None:
        """
        The database holds the hashes of the secrets, never the secrets,
        after storing them through the real paths.
        """
        url = postgres.database_url(self)
        store = pg_store(self, url)
        secrets = issue_secrets(self, store, url)
        store.close()
        rows = dump(url)
        for secret in secrets:
            self.assertNotIn(secret, rows)
            self.assertIn(hash_secret(secret), rows)

    def test_schema_recorded(self) -> None:
        import psycopg

        url = postgres.database_url(self)
        pg_store(self, url)
        pg_store(self, url)
        with psycopg.connect(url) as connection:
            rows = connection.execute(
                "SELECT component, version FROM schema_migrations ORDER BY component"
            ).fetchall()
        self.assertEqual(rows, [("notifications", 1)] + [("oauth", version) for version in range(1, 14)])

    def test_facts_columns(self) -> None:
        """
        Both facts functions return their columns by the names and in the
        order of C{refresh_facts.FACTS_COLUMNS}: the store reads their rows
        by position (C{refresh_facts.records}), so a function whose columns
        moved would make records of the wrong fields.
        """
        import psycopg

        from smeldr_oauth.store.refresh_facts import FACTS_COLUMNS

        url = postgres.database_url(self)
        pg_store(self, url)
        with psycopg.connect(url) as connection:
            for call in ("smeldr_refresh_facts('x')", "smeldr_refresh_facts_many('{x}'::text[])"):
                cursor = connection.execute(f"SELECT * FROM {call}")
                self.assertEqual(tuple(column.name for column in cursor.description), FACTS_COLUMNS, call)

    def test_spends_are_hot(self) -> None:
        """
        Spending a refresh token is a HOT update on PostgreSQL even when
        nothing can be pruned (OAuth migrations 6 and 13: refresh_tokens'
        pages keep room for it).  A rotation inserts the next token and
        spends the one presented, which on a busy server was inserted many
        rotations (of other grants) before: its page is long full, and
        without free space there the new row version goes to another page,
        with an entry in each of the table's three indexes.  Forty grants'
        chains rotated in turn, in one transaction (whose own counters say
        how each update was made, and which prunes nothing, as a busy
        server's other sessions' snapshots keep a page's dead versions):
        196 of 200 HOT with half of each page free (migration 13), 112 with
        30% (migration 6 alone), 7 with none.
        """
        from smeldr_oauth.store import transactions
        from smeldr_oauth.store.schema import OAUTH_SCHEMA

        store = pg_store(self)
        grants = [f"g{index}" for index in range(40)]
        for grant_id in grants:
            self.successResultOf(store.create_grant(make_grant(grant_id), make_code(grant_id + "-code", grant_id)))
            self.assertEqual(self.successResultOf(store.consume_code(h(grant_id + "-code"), T0 + 1)).status, "ok")
            self.successResultOf(store.add_tokens(grant_id, access(grant_id + "-a0"), refresh(grant_id + "-r0")))

        def rotations(txn: Transaction) -> tuple[int, int]:
            for round in range(1, 6):
                now = T0 + 2 + round
                for grant_id in grants:
                    result = transactions.redeem_refresh_token(
                        txn,
                        h(f"{grant_id}-r{round - 1}"),
                        now,
                        GRACE,
                        None,
                        access(f"{grant_id}-a{round}", now),
                        refresh(f"{grant_id}-r{round}", now),
                    )
                    assert result.status == "rotated", result.status
            row = txn.execute(
                "SELECT pg_stat_get_xact_tuples_updated(c.oid), pg_stat_get_xact_tuples_hot_updated(c.oid)"
                " FROM pg_class c WHERE c.relname = 'refresh_tokens'"
            ).fetchone()
            return int(row[0]), int(row[1])

        updated, hot = self.successResultOf(store.database.write(OAUTH_SCHEMA, rotations))
        self.assertEqual(updated, 200)
        self.assertGreaterEqual(hot, updated * 9 // 10, hot)

    def test_refresh_tokens_half_free(self) -> None:
        """
        OAuth migration 13 sets refresh_tokens' fillfactor to 50 on a
        database made before it (migration 6 left it at 70); the tokens
        rotated there go on rotating after it, through a server of the
        previous release still running (a rolling upgrade) and through
        the new one.
        """
        import psycopg

        from smeldr_oauth.store.schema import OAUTH_SCHEMA

        url = postgres.database_url(self)
        rotated_at(self, url, OAUTH_SCHEMA, 12)
        earlier = pg_store(self, url, schema=attr.evolve(OAUTH_SCHEMA, migrations=OAUTH_SCHEMA.migrations[:12]))
        query = "SELECT reloptions FROM pg_class WHERE relname = 'refresh_tokens'"
        with psycopg.connect(url) as connection:
            self.assertEqual(connection.execute(query).fetchone(), (["fillfactor=70"],))
        store = pg_store(self, url)
        with psycopg.connect(url) as connection:
            self.assertEqual(connection.execute(query).fetchone(), (["fillfactor=50"],))
        for name, server in (("g1", earlier), ("g2", store)):
            rotated = server.redeem_refresh_token(
                h(f"s-{name}"), T0 + 20, GRACE, None, access(f"c-{name}", T0 + 20), refresh(f"t-{name}", T0 + 20)
            )
            self.assertEqual(self.successResultOf(rotated).status, "rotated")
            rotated = store.redeem_refresh_token(
                h(f"t-{name}"), T0 + 30, GRACE, None, access(f"d-{name}", T0 + 30), refresh(f"u-{name}", T0 + 30)
            )
            self.assertEqual(self.successResultOf(rotated).status, "rotated")

    def test_refresh_tokens_without_foreign_key(self) -> None:
        """
        Refresh tokens have no foreign key to C{grants} on PostgreSQL (OAuth
        migration 8: its check looked up and locked again, at every
        rotation, the grant the rotation already holds); the tokens made
        before the migration are kept, and the grant is still required of
        C{add_tokens} (the store contract's C{test_add_tokens_unknown_grant}).
        """
        import psycopg

        from smeldr_oauth.store.schema import OAUTH_SCHEMA

        url = postgres.database_url(self)
        store = pg_store(self, url, schema=attr.evolve(OAUTH_SCHEMA, migrations=OAUTH_SCHEMA.migrations[:7]))
        self.successResultOf(store.create_grant(make_grant("g1"), make_code("g1-code", "g1")))
        self.successResultOf(store.add_tokens("g1", access("g1-a0"), refresh("g1-r0")))
        store.close()

        def keys() -> list[tuple[str]]:
            with psycopg.connect(url) as connection:
                return connection.execute(
                    "SELECT conname FROM pg_constraint WHERE conrelid = 'refresh_tokens'::regclass AND contype = 'f'"
                ).fetchall()

        self.assertEqual(keys(), [("refresh_tokens_grant_id_fkey",)])
        store = pg_store(self, url)
        self.assertEqual(keys(), [])
        result = self.successResultOf(
            store.redeem_refresh_token(h("g1-r0"), T0 + 1, GRACE, None, access("g1-a1", T0 + 1), refresh("g1-r1", T0 + 1))
        )
        self.assertEqual(result.status, "rotated")

    def test_refresh_facts_function(self) -> None:
        """
        The PL/pgSQL function a refresh reads its facts with (migration 2)
        answers what L{refresh_facts.REFRESH_FACTS} does, column for
        column: the two are written twice, and a column added to one alone
        (a new grant column, say) must fail here, not in production.
        """
        import psycopg
        from psycopg.rows import dict_row

        from smeldr_oauth.store.refresh_facts import REFRESH_FACTS

        url = postgres.database_url(self)
        store = pg_store(self, url)
        issue_secrets(self, store, url)
        store.close()
        with psycopg.connect(url, row_factory=dict_row) as connection:
            hashes = [r["token_hash"] for r in connection.execute("SELECT token_hash FROM refresh_tokens").fetchall()]
            self.assertTrue(hashes)
            for token_hash in hashes + ["unknown"]:
                plain = connection.execute(REFRESH_FACTS.replace("?", "%s"), (token_hash, token_hash)).fetchall()
                function = connection.execute("SELECT * FROM smeldr_refresh_facts(%s)", (token_hash,)).fetchall()
                self.assertEqual(function, plain)
                many = connection.execute(
                    "SELECT * FROM smeldr_refresh_facts_many(%s::text[])", ([token_hash],)
                ).fetchall()
                self.assertEqual(many, plain)
            every = connection.execute(
                "SELECT * FROM smeldr_refresh_facts_many(%s::text[]) ORDER BY token_hash", (hashes + ["unknown"],)
            ).fetchall()
            self.assertEqual(every, sorted(
                (connection.execute(REFRESH_FACTS.replace("?", "%s"), (t, t)).fetchone() for t in hashes),
                key=lambda row: row["token_hash"],
            ))


    def test_refresh_facts_planned_per_call(self) -> None:
        """
        The facts functions' plans never read C{refresh_tokens} whole once
        it has grown: a plan kept from the session's first calls, made
        when the table was small, would (migration 5 planned them at every
        call; migrations 7 and 8 write them so that every plan is an index
        look-up).  Seen through C{auto_explain}'s plans of the functions'
        statements, sent to the client as notices.
        """
        import psycopg

        url = postgres.database_url(self)
        store = pg_store(self, url)
        issue_secrets(self, store, url)
        store.close()
        with psycopg.connect(url, autocommit=True) as connection:
            hashes = [r[0] for r in connection.execute("SELECT token_hash FROM refresh_tokens").fetchall()]
            # A session's first calls, on a table of a few rows that the
            # planner knows is small (autovacuum analyzes a young table).
            connection.execute("ANALYZE refresh_tokens")
            for _ in range(8):
                connection.execute("SELECT * FROM smeldr_refresh_facts_many(%s::text[])", (hashes,)).fetchall()
                connection.execute("SELECT * FROM smeldr_refresh_facts(%s)", (hashes[0],)).fetchall()
            # The table grows (every rotation adds a row), not yet analyzed.
            connection.execute(
                "INSERT INTO refresh_tokens (token_hash, grant_id, scopes, generation, created_at, expires_at)"
                " SELECT md5(i::text), grant_id, scopes, -i, created_at, expires_at"
                " FROM refresh_tokens, generate_series(1, 5000) i WHERE token_hash = %s",
                (hashes[0],),
            )
            plans = postgres.nested_plans(connection)
            connection.execute("SELECT * FROM smeldr_refresh_facts_many(%s::text[])", (hashes,)).fetchall()
            connection.execute("SELECT * FROM smeldr_refresh_facts(%s)", (hashes[0],)).fetchall()
        nested = [plan for plan in plans if "refresh_tokens" in plan and "smeldr_refresh_facts" not in plan]
        self.assertGreaterEqual(len(nested), 4)
        for plan in nested:
            self.assertNotIn("Seq Scan on refresh_tokens", plan)


    def test_refresh_facts_many_planned_once(self) -> None:
        """
        The batch's facts function (migration 7) plans its statements once
        a session (generic plans, not one plan a call: planning was half
        its cost), and every one of those plans reaches C{refresh_tokens}
        and C{grants} through an index condition even when it was made
        while the tables were small: the trap of migration 5 (a few calls
        on an analyzed table of three rows, then thousands of rows more),
        after which the first version of this function read a whole index
        of C{refresh_tokens} with a filter at every call.  Seen through
        C{auto_explain}'s verbose plans of the function's statements.
        """
        import psycopg

        url = postgres.database_url(self)
        store = pg_store(self, url)
        issue_secrets(self, store, url)
        store.close()
        with psycopg.connect(url, autocommit=True) as connection:
            hashes = [r[0] for r in connection.execute("SELECT token_hash FROM refresh_tokens").fetchall()]
            connection.execute("ANALYZE grants")
            connection.execute("ANALYZE refresh_tokens")
            for _ in range(8):
                connection.execute("SELECT * FROM smeldr_refresh_facts_many(%s::text[])", (hashes,)).fetchall()
            connection.execute(
                "INSERT INTO grants (grant_id, client_id, subject, scopes, resource, created_at)"
                " SELECT 'other' || i, 'client-1', 'alice', '[]', 'r', 0 FROM generate_series(1, 2000) i"
            )
            connection.execute(
                "INSERT INTO refresh_tokens (token_hash, grant_id, scopes, generation, created_at, expires_at)"
                " SELECT 'other' || i || '-' || j, 'other' || i, '[]', j, 0, 1"
                " FROM generate_series(1, 2000) i, generate_series(1, 5) j"
            )
            plans = postgres.nested_plans(connection)
            connection.execute("SET auto_explain.log_verbose = on")
            rows = connection.execute("SELECT * FROM smeldr_refresh_facts_many(%s::text[])", (hashes,)).fetchall()
        self.assertEqual(len(rows), len(hashes))
        nested = [plan for plan in plans if "smeldr_refresh_facts_many" not in plan]
        self.assertEqual(len(nested), 2, plans)
        for plan in nested:
            # Generic: the presented hashes are a parameter, not constants.
            self.assertRegex(plan, r"unnest\(\$1\)")
            lines = [line.strip() for line in plan.splitlines()]
            scans = [n for n, line in enumerate(lines) if re.search(r"Scan.* on (public\.)?(refresh_tokens|grants) ", line)]
            self.assertTrue(scans)
            for n in scans:
                self.assertTrue(lines[n].startswith(("-> Index", "->  Index", "Index")), lines[n])
                following = [line for line in lines[n + 1 : n + 4] if line.startswith(("Index Cond", "Filter"))]
                self.assertTrue(following and following[0].startswith("Index Cond"), "\n".join(lines[n : n + 4]))

    def test_refresh_facts_planned_once(self) -> None:
        """
        The single refresh's facts function (migration 8) plans its
        statements once a session, and every plan reaches C{refresh_tokens}
        and C{grants} by an index condition though it was made on tables
        of three rows and is used once they hold thousands (the trap of
        migration 5).  Seen through C{auto_explain}'s verbose plans: the
        presented hash is the parameter C{$1}, not a constant (planned at
        every call, it would be the constant).
        """
        import psycopg

        url = postgres.database_url(self)
        store = pg_store(self, url)
        issue_secrets(self, store, url)
        store.close()
        with psycopg.connect(url, autocommit=True) as connection:
            hashes = [r[0] for r in connection.execute("SELECT token_hash FROM refresh_tokens").fetchall()]
            connection.execute("ANALYZE grants")
            connection.execute("ANALYZE refresh_tokens")
            for _ in range(8):
                connection.execute("SELECT * FROM smeldr_refresh_facts(%s)", (hashes[0],)).fetchall()
            connection.execute(
                "INSERT INTO grants (grant_id, client_id, subject, scopes, resource, created_at)"
                " SELECT 'other' || i, 'client-1', 'alice', '[]', 'r', 0 FROM generate_series(1, 2000) i"
            )
            connection.execute(
                "INSERT INTO refresh_tokens (token_hash, grant_id, scopes, generation, created_at, expires_at)"
                " SELECT 'other' || i || '-' || j, 'other' || i, '[]', j, 0, 1"
                " FROM generate_series(1, 2000) i, generate_series(1, 5) j"
            )
            plans = postgres.nested_plans(connection)
            connection.execute("SET auto_explain.log_verbose = on")
            rows = connection.execute("SELECT * FROM smeldr_refresh_facts(%s)", (hashes[0],)).fetchall()
        self.assertEqual([row[10] for row in rows], [hashes[0]])
        nested = [plan for plan in plans if "smeldr_refresh_facts" not in plan]
        self.assertEqual(len(nested), 2, plans)
        for plan in nested:
            self.assertRegex(plan, r"token_hash = \$1\)")
            self.assertNotIn(hashes[0], plan)
            lines = [line.strip() for line in plan.splitlines()]
            scans = [n for n, line in enumerate(lines) if re.search(r"Scan.* on (public\.)?(refresh_tokens|grants) ", line)]
            self.assertTrue(scans)
            for n in scans:
                self.assertTrue(lines[n].startswith(("-> Index", "->  Index", "Index")), lines[n])
                following = [line for line in lines[n + 1 : n + 4] if line.startswith(("Index Cond", "Filter"))]
                self.assertTrue(following and following[0].startswith("Index Cond"), "\n".join(lines[n : n + 4]))

    def test_refresh_facts_lock_the_grant_only(self) -> None:
        """
        A single refresh (C{smeldr_refresh_facts}) waiting for a grant that
        a batch of another process holds does not hold the presented
        token's row meanwhile, so the batch's spend of that generation goes
        on and commits, and the single refresh then reads the token spent.
        Migration 2's function locked the token's row, then waited for the
        grant: the batch's spend waited for the token in turn, and
        PostgreSQL's deadlock detector failed it.
        """
        import threading

        import psycopg

        url = postgres.database_url(self)
        store = pg_store(self, url)
        issue_secrets(self, store, url)
        store.close()
        with psycopg.connect(url, autocommit=True) as setup:
            token_hash, grant_id, generation = setup.execute(
                "SELECT token_hash, grant_id, generation FROM refresh_tokens WHERE used_at IS NULL AND revoked_at IS NULL LIMIT 1"
            ).fetchone()
        batch = psycopg.connect(url)
        self.addCleanup(batch.close)
        single = psycopg.connect(url)
        self.addCleanup(single.close)
        single_pid = single.info.backend_pid
        batch.execute("SET deadlock_timeout = '20ms'")
        batch.execute("SELECT * FROM smeldr_refresh_facts_many(%s::text[])", ([token_hash],)).fetchall()
        read: list[Any] = []
        thread = threading.Thread(
            target=lambda: read.extend(
                single.execute("SELECT used_at FROM smeldr_refresh_facts(%s)", (token_hash,)).fetchall()
            )
        )
        thread.start()
        self.addCleanup(thread.join)
        # Should the test fail with the batch's transaction open, the
        # thread waits no longer than the batch's connection lives.
        self.addCleanup(batch.close)
        with psycopg.connect(url, autocommit=True) as watcher:
            # The single refresh is waiting for a lock (the grant's).
            while thread.is_alive() and not watcher.execute(
                "SELECT 1 FROM pg_stat_activity WHERE pid = %s AND wait_event_type = 'Lock'", (single_pid,)
            ).fetchone():
                pass
        spent = batch.execute(
            "UPDATE refresh_tokens SET used_at = 5 WHERE grant_id = %s AND generation = %s"
            " AND used_at IS NULL AND revoked_at IS NULL RETURNING token_hash",
            (grant_id, generation),
        ).fetchall()
        batch.commit()
        thread.join()
        single.commit()
        self.assertEqual(spent, [(token_hash,)])
        self.assertEqual(read, [(5.0,)])


def round_trips(case: SynchronousTestCase) -> list[str]:
    """
    Count what a store sends to PostgreSQL through its connections from
    now until C{case} ends (psycopg's C{execute} of either cursor, and a
    C{commit} with a transaction to end): one entry a round trip, its
    first words.
    """
    import psycopg

    sent: list[str] = []
    # (psycopg.ClientCursor and the engine's cursor are subclasses.)
    execute = psycopg.Cursor.execute

    def counted(cursor: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
        sent.append(" ".join(str(query).split()[:3]))
        return execute(cursor, query, *args, **kwargs)

    case.patch(psycopg.Cursor, "execute", counted)
    commit = psycopg.Connection.commit

    def committed(connection: Any) -> None:
        if connection.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            sent.append("COMMIT")
        commit(connection)

    case.patch(psycopg.Connection, "commit", committed)
    return sent


class PostgresGroupCommitStoreTests(SynchronousTestCase):
    """
    Refreshes with group commit on PostgreSQL (the server's setting): the
    refreshes that arrive together share one transaction, and each one's
    outcome is what it would be alone.
    """

    def setUp(self) -> None:
        self.reactor = InlineReactor()
        self.url = postgres.database_url(self)
        database = Database(
            PostgresEngine(self.url),
            self.reactor,
            threads=1,
            threadpool=InlineThreadPool(),
            group_commit=True,
        )
        self.store = SQLStore(database)
        self.addCleanup(self.store.close)
        self.assertIs(self.successResultOf(self.store.ready), self.store)
        self.commits = 0
        import smeldr_oauth.db.database as module

        real = module._commit

        def counted(connection: Any) -> None:
            self.commits += 1
            real(connection)

        self.patch(module, "_commit", counted)
        # Why a batch was abandoned (its calls then run alone, silently):
        # a statement timeout under load, say, rather than only a count of
        # commits that is off.
        self.abandoned: list[BaseException] = []
        in_transaction = module._Batch._in_transaction

        def recorded(batch: Any, connection: Any, txn: Any, *rest: Any) -> Any:
            try:
                return in_transaction(batch, connection, txn, *rest)
            except BaseException as error:
                self.abandoned.append(error)
                raise

        self.patch(module._Batch, "_in_transaction", recorded)

    def grant(self, name: str) -> None:
        d = self.store.create_grant(make_grant(name), make_code(f"code-{name}", name))
        self.reactor.advance(0)
        self.successResultOf(d)
        self.successResultOf(self.store.add_tokens(name, access(f"a-{name}"), refresh(f"r-{name}")))

    def redeem(self, token: str, n: int, grace: float = GRACE) -> Any:
        return self.store.redeem_refresh_token(
            h(token), T0 + 100, grace, None, access(f"x{n}", T0 + 100), refresh(f"y{n}", T0 + 100)
        )

    def test_different_grants_one_commit(self) -> None:
        """
        Refreshes of three grants made in one turn: one transaction, three
        rotations, each new token usable.
        """
        for name in ("g1", "g2", "g3"):
            self.grant(name)
        self.commits = 0
        calls = [self.redeem(f"r-{name}", n) for n, name in enumerate(("g1", "g2", "g3"))]
        for d in calls:
            self.assertNoResult(d)
        self.reactor.advance(0)
        self.assertEqual([self.successResultOf(d).status for d in calls], ["rotated"] * 3)
        self.assertEqual(self.commits, 1)
        for n in range(3):
            self.assertIsNotNone(self.successResultOf(self.store.lookup_access_token(h(f"x{n}"), T0 + 101)))

    def test_two_round_trips(self) -> None:
        """
        A batch of refreshes is two round trips whatever its size: C{BEGIN}
        with the facts of all, then every rotation's writes with the
        C{COMMIT} (round seven: two a refresh; round eleven: four a batch).
        """
        for name in ("g1", "g2", "g3", "g4"):
            self.grant(name)
        sent = round_trips(self)
        calls = [self.redeem(f"r-{name}", n) for n, name in enumerate(("g1", "g2", "g3", "g4"))]
        self.reactor.advance(0)
        self.assertEqual([self.successResultOf(d).status for d in calls], ["rotated"] * 4)
        self.assertEqual(len(sent), 2, sent)
        for n in range(4):
            self.assertIsNotNone(self.successResultOf(self.store.lookup_access_token(h(f"x{n}"), T0 + 101)))

    def test_connection_lost_with_the_commit(self) -> None:
        """
        A connection lost in the round trip that carries the batch's
        C{COMMIT} (here: after the server committed) may or may not have
        committed: every call is L{StoreUnavailable}, as when the
        C{COMMIT} went alone, and none runs again.
        """
        import psycopg

        from smeldr_oauth.db.errors import StoreUnavailable

        for name in ("g1", "g2"):
            self.grant(name)
        # (Patched on psycopg.Cursor, whose subclass ClientCursor is.)
        execute = psycopg.Cursor.execute
        losing = [True]

        def lost(cursor: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
            result = execute(cursor, query, *args, **kwargs)
            if losing and str(query).endswith("; COMMIT"):
                cursor.connection.close()
                raise psycopg.OperationalError("the connection went away")
            return result

        self.patch(psycopg.Cursor, "execute", lost)
        calls = [self.redeem(f"r-{name}", n) for n, name in enumerate(("g1", "g2"))]
        self.reactor.advance(0)
        for d in calls:
            self.failureResultOf(d, StoreUnavailable)
        # It had committed; nothing ran again (a second run would have
        # rotated within the grace period and issued more tokens).
        losing.clear()
        for n in range(2):
            self.assertIsNotNone(self.successResultOf(self.store.lookup_access_token(h(f"x{n}"), T0 + 101)))
        d = self.store.list_grants()
        self.reactor.advance(0)
        self.assertEqual(len(self.successResultOf(d)), 2)

    def test_spent_by_another_refused_in_the_database(self) -> None:
        """
        A presented token spent by someone else between the batch's facts
        and its writes (nothing in the store does that: its grant is locked;
        a stand-in for a bug) fails the writes statement in the database,
        so the C{COMMIT} sent with it never runs: nothing of the batch is
        committed, and each refresh runs again alone, the spent one then a
        reuse.
        """
        import psycopg
        import smeldr_oauth.store.refresh_batch as module

        for name in ("g1", "g2"):
            self.grant(name)
        real = module._write_batch

        def spend_first(txn: Any, *args: Any, **kwargs: Any) -> Any:
            with psycopg.connect(self.url, autocommit=True) as other:
                other.execute("UPDATE refresh_tokens SET used_at = %s WHERE token_hash = %s", (T0 + 50, h("r-g1")))
            return real(txn, *args, **kwargs)

        self.patch(module, "_write_batch", spend_first)
        calls = [self.redeem(f"r-{name}", n) for n, name in enumerate(("g1", "g2"))]
        self.reactor.advance(0)
        self.assertEqual(len(self.abandoned), 1)
        self.assertIn("refresh token spent concurrently", str(self.abandoned[0]))
        self.assertEqual([self.successResultOf(d).status for d in calls], ["reused", "rotated"])
        self.assertIsNone(self.successResultOf(self.store.lookup_access_token(h("x0"), T0 + 101)))
        self.assertIsNotNone(self.successResultOf(self.store.lookup_access_token(h("x1"), T0 + 101)))

    def test_writes_one_text(self) -> None:
        """
        A batch's writes are one call of C{smeldr_write_rotations} (OAuth
        migration 10) whose text is the same whatever the batch's size
        (its rows travel as JSON and array parameters): PostgreSQL parses
        one short statement and plans nothing but the call, the function's
        statements being planned once a session.  What it wrote is what
        each rotation alone writes (the tests above, and the access tokens
        work).
        """
        from smeldr_oauth.store.rotation_writes import WRITE_ROTATIONS

        for name in ("g1", "g2", "g3", "g4", "g5"):
            self.grant(name)
        writes: list[tuple[str, Any]] = []
        real = Transaction.execute

        def recorded(txn: Any, sql: str, params: Any = (), **kwargs: Any) -> Any:
            if sql.startswith("WITH") or "smeldr_write_rotations" in sql:
                writes.append((sql, kwargs.get("simple")))
            return real(txn, sql, params, **kwargs)

        self.patch(Transaction, "execute", recorded)
        for first, batch in ((0, ("g1", "g2")), (2, ("g3", "g4", "g5"))):
            calls = [self.redeem(f"r-{name}", n) for n, name in enumerate(batch, first)]
            self.reactor.advance(0)
            self.assertEqual([self.successResultOf(d).status for d in calls], ["rotated"] * len(batch))
        self.assertEqual(writes, [(WRITE_ROTATIONS, True)] * 2)
        for n in range(5):
            self.assertIsNotNone(self.successResultOf(self.store.lookup_access_token(h(f"x{n}"), T0 + 101)))
        # Each grant's first refresh recorded its use; the presented
        # tokens are spent (a second presentation, past grace, is a reuse).
        d = self.store.list_grants()
        self.reactor.advance(0)
        self.assertEqual(sorted(g.last_used_at for g in self.successResultOf(d)), [T0 + 100] * 5)
        late = self.store.redeem_refresh_token(
            h("r-g1"), T0 + 100 + GRACE + 1, GRACE, None, access("x9", T0 + 200), refresh("y9", T0 + 200)
        )
        self.reactor.advance(0)
        self.assertEqual(self.successResultOf(late).status, "reused")

    def test_writes_planned_once_by_index(self) -> None:
        """
        The batch's writes function (migration 10) plans its statements
        once a session (generic plans: no planning at each batch), and
        every one of those plans reaches C{grants} and C{refresh_tokens}
        through an index condition even when it was made while the tables
        were small and analyzed (migration 5's trap: then 5,000 rows more,
        a size at which a plan taking the C{unnest} for 100 rows read both
        tables whole).  Seen through C{auto_explain}'s verbose plans of the
        function's statements.
        """
        import psycopg

        self.grant("g1")
        call = (
            "SELECT smeldr_write_rotations(" + "'{}', " * 14 + "%s::float8[], %s::text[],"
            " %s::text[], %s::float8[], %s::text[], %s::int4[], '{}')"
        )
        args = (
            [T0, T0], ["g1", "nobody"],
            ["nothing-1", "nothing-2"], [T0, T0], ["g1", "nobody"], [7, 7],
        )
        with psycopg.connect(self.url, autocommit=True) as connection:
            connection.execute("ANALYZE grants")
            connection.execute("ANALYZE refresh_tokens")
            for _ in range(8):
                connection.execute(call, args)
            connection.execute(
                "INSERT INTO grants (grant_id, client_id, subject, scopes, resource, created_at)"
                " SELECT 'other' || i, 'client-1', 'alice', '[]', 'r', 0 FROM generate_series(1, 5000) i"
            )
            connection.execute(
                "INSERT INTO refresh_tokens (token_hash, grant_id, scopes, generation, created_at, expires_at)"
                " SELECT 'other' || i, 'other' || i, '[]', 0, 0, 1 FROM generate_series(1, 5000) i"
            )
            plans = postgres.nested_plans(connection)
            connection.execute("SET auto_explain.log_verbose = on")
            self.assertEqual(connection.execute(call, args).fetchone(), (0,))
        updates = [plan for plan in plans if re.search(r"Update on (public\.)?(grants|refresh_tokens)", plan)]
        self.assertEqual(len(updates), 2, plans)
        for plan in updates:
            # Generic: the arrays are parameters, not constants.
            self.assertRegex(plan, r"unnest\(\$\d+")
            lines = [line.strip() for line in plan.splitlines() if not line.strip().startswith("Output:")]
            scans = [n for n, line in enumerate(lines) if re.search(r"Scan.* on (public\.)?(refresh_tokens|grants) ", line)]
            self.assertTrue(scans, plan)
            for n in scans:
                self.assertTrue(lines[n].startswith(("-> Index", "->  Index", "Index")), lines[n])
                following = [line for line in lines[n + 1 : n + 4] if line.startswith(("Index Cond", "Filter"))]
                self.assertTrue(following and following[0].startswith("Index Cond"), "\n".join(lines[n : n + 4]))

    def test_writes_after_migration(self) -> None:
        """
        A database made before OAuth migration 10 keeps every token
        working once migrated: tokens issued and rotated before it rotate
        in a batch through the new function, and the tokens that batch
        issued rotate and authorize in turn.
        """
        self.writes_after_migration(9)

    def test_writes_after_migration_12(self) -> None:
        """
        The same across migration 12 (the function's rows as arrays a
        column): a database made at migration 11, its tokens rotated there
        through the JSON function, rotates them through the new one.
        """
        self.writes_after_migration(11)

    def writes_after_migration(self, version: int) -> None:
        from smeldr_oauth.store.schema import OAUTH_SCHEMA

        url = postgres.database_url(self)
        rotated_at(self, url, OAUTH_SCHEMA, version)
        database = Database(PostgresEngine(url), self.reactor, threads=1, threadpool=InlineThreadPool(), group_commit=True)
        store = SQLStore(database)
        self.addCleanup(store.close)
        self.reactor.advance(0)
        self.assertIs(self.successResultOf(store.ready), store)
        for n, (presented, issued) in enumerate((("s", "y"), ("y", "z"))):
            calls = [
                store.redeem_refresh_token(
                    h(f"{presented}-{name}"), T0 + 100 + n, GRACE, None,
                    access(f"x{n}-{name}", T0 + 100 + n), refresh(f"{issued}-{name}", T0 + 100 + n),
                )
                for name in ("g1", "g2")
            ]
            self.commits = 0
            self.reactor.advance(0)
            self.assertEqual([self.successResultOf(d).status for d in calls], ["rotated"] * 2)
            self.assertEqual(self.commits, 1)
        self.assertEqual(self.abandoned, [])
        for name in ("g1", "g2"):
            self.assertIsNotNone(self.successResultOf(store.lookup_access_token(h(f"x1-{name}"), T0 + 102)))

    def test_writes_quoted_values(self) -> None:
        """
        The batch's updates take their columns as array literals, every
        text element quoted (L{smeldr_oauth.db.arrays}): grant ids with a
        comma, a quote, a brace, a backslash, a space, or spelled C{NULL}
        rotate and record their use like any other.
        """
        names = ("g,1", 'g"2', "g{3}", "g\\4", "g 5", "NULL", "")
        for name in names:
            self.grant(name)
        calls = [self.redeem(f"r-{name}", n) for n, name in enumerate(names)]
        self.commits = 0
        self.reactor.advance(0)
        self.assertEqual([self.successResultOf(d).status for d in calls], ["rotated"] * len(names))
        self.assertEqual(self.commits, 1)
        d = self.store.list_grants()
        self.reactor.advance(0)
        self.assertEqual(
            sorted((g.grant_id, g.last_used_at) for g in self.successResultOf(d)),
            sorted((name, T0 + 100) for name in names),
        )
        for n in range(len(names)):
            self.assertIsNotNone(self.successResultOf(self.store.lookup_access_token(h(f"x{n}"), T0 + 101)))

    def test_writes_beside_the_earlier_function(self) -> None:
        """
        The writes function takes the new tokens' rows as typed arrays a
        column (OAuth migration 12), beside migration 10's, which takes
        them as JSON: a server of the earlier release, still running
        during a rolling upgrade, goes on writing through it, and neither
        call is ambiguous (this store's calls are every other test's).
        """
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as connection:
            found = sorted(
                row[0]
                for row in connection.execute(
                    "SELECT pg_get_function_identity_arguments(oid) FROM pg_proc"
                    " WHERE proname = 'smeldr_write_rotations'"
                ).fetchall()
            )
            self.assertEqual(len(found), 2, found)
            self.assertIn("a_token_hash text[]", " ".join(found))
            self.assertIn("json", " ".join(found))
            # The earlier release's call, as it sends it (an empty batch).
            connection.execute(
                "SELECT smeldr_write_rotations('[]'::json, '[]'::json, '{}'::float8[], '{}'::text[],"
                " '{}'::text[], '{}'::float8[], '{}'::text[], '{}'::int4[], '{}'::text[])"
            )

    def test_writes_values_as_given(self) -> None:
        """
        The batch's new rows go as array literals: values with a quote, a
        backslash, a comma, braces, a space, spelled C{NULL} or empty, and
        C{None}, are stored exactly as given, whole numbers and floats
        too.
        """
        from smeldr_oauth.store.refresh_batch import _write_batch
        from smeldr_oauth.store.schema import OAUTH_SCHEMA
        from smeldr_oauth.store.token_rows import _ACCESS_INSERT, _REFRESH_INSERT

        self.grant("g1")
        odd = ['["a\\"b", "c\\\\d"]', "{x,y}", "NULL", "", " a b ", "ü\u00fc"]
        writes: list[tuple[str, Any]] = []
        for n, text in enumerate(odd):
            writes.append((_ACCESS_INSERT, (f"ah{n}", "g1", text, text, T0 + n + 0.1)))
            writes.append((_REFRESH_INSERT, (f"rh{n}", "g1", text, n, T0 + 1e-7, 1e16, None if n % 2 else 2.5)))

        def write(txn: Transaction) -> Any:
            _write_batch(txn, writes, [])
            return (
                txn.execute(
                    "SELECT token_hash, scopes, resource, expires_at, revoked_at FROM access_tokens"
                    " WHERE token_hash LIKE 'ah%'"
                ).fetchall(),
                txn.execute(
                    "SELECT token_hash, scopes, generation, created_at, expires_at, used_at, revoked_at FROM refresh_tokens"
                    " WHERE token_hash LIKE 'rh%'"
                ).fetchall(),
            )

        d = self.store.database.write(OAUTH_SCHEMA, write)
        self.reactor.advance(0)
        accessed, refreshed = self.successResultOf(d)
        self.assertEqual(
            sorted(tuple(row) for row in accessed), [(f"ah{n}", t, t, T0 + n + 0.1, None) for n, t in enumerate(odd)]
        )
        self.assertEqual(
            sorted(tuple(row) for row in refreshed),
            [(f"rh{n}", t, n, T0 + 1e-7, 1e16, None if n % 2 else 2.5, None) for n, t in enumerate(odd)],
        )

    def test_writes_scrub_nul(self) -> None:
        """
        A NUL in a text value of the batch's JSON rows is stored as U+FFFD,
        as in any text parameter (PostgreSQL refuses C{\\u0000} in text),
        not an error that fails the whole batch.
        """
        from smeldr_oauth.store.refresh_batch import _write_batch
        from smeldr_oauth.store.schema import OAUTH_SCHEMA
        from smeldr_oauth.store.transactions import _access_row
        from smeldr_oauth.store.hashkeys import key_for

        self.grant("g1")
        row = _access_row(access("n1"), "g1", ["read\x00x"], "https://r\x00", key_for("postgresql"))

        def write(txn: Transaction) -> Any:
            _write_batch(txn, [row], [])
            return txn.execute("SELECT scopes, resource FROM access_tokens WHERE token_hash = ?", (h("n1"),)).fetchone()

        d = self.store.database.write(OAUTH_SCHEMA, write)
        self.reactor.advance(0)
        scopes, resource = self.successResultOf(d)
        # The scopes are JSON text already (with its escapes, kept as they are).
        self.assertEqual((scopes, resource), (row[1][2], "https://r\ufffd"))
        self.assertIn("\\u0000", scopes)

    def test_same_token_in_one_batch(self) -> None:
        """
        Two refreshes of one token in one batch: the first rotates, the
        second is what it is alone after the first (inside the grace
        window a sibling; without grace a reuse that ends the grant).
        """
        self.grant("g1")
        self.grant("g2")
        calls = [self.redeem("r-g1", 0), self.redeem("r-g1", 1), self.redeem("r-g2", 2, grace=0), self.redeem("r-g2", 3, grace=0)]
        self.commits = 0
        self.reactor.advance(0)
        self.assertEqual(
            [self.successResultOf(d).status for d in calls], ["rotated", "grace", "rotated", "reused"]
        )
        self.assertEqual(self.commits, 1)
        grants = self.successResultOf(self.store.list_grants())
        self.assertEqual([grant.grant_id for grant in grants], ["g1"])

    #: Refreshes of distinct grants in one turn: their rotations' writes
    #: (18 to 20 bind parameters each) would be more than libpq's 65,535
    #: in one statement.
    MANY = 4_000

    def many_grants(self) -> None:
        created = [
            self.store.create_grant(make_grant(f"g{n}"), make_code(f"code-g{n}", f"g{n}")) for n in range(self.MANY)
        ]
        self.reactor.advance(0)
        for d in created:
            self.successResultOf(d)
        for n in range(self.MANY):
            self.successResultOf(self.store.add_tokens(f"g{n}", access(f"a-g{n}"), refresh(f"r-g{n}")))

    def redeem_many(self) -> list[Any]:
        self.commits = 0
        calls = [self.redeem(f"r-g{n}", n) for n in range(self.MANY)]
        self.reactor.advance(0)
        self.assertEqual(self.abandoned, [], "a batch was abandoned, its calls run alone")
        self.assertEqual({self.successResultOf(d).status for d in calls}, {"rotated"})
        return calls

    def test_batches_capped(self) -> None:
        """
        Thousands of refreshes arriving together (what gathers while the
        database stalls) commit as batches of at most C{batch_limit}
        calls, every one rotated: one batch of them all failed on libpq's
        parameter limit, and every call then ran again alone.
        """
        self.many_grants()
        self.redeem_many()
        limit = self.store.database.batch_limit
        self.assertEqual(self.commits, -(-self.MANY // limit))

    def test_writes_in_bounded_statements(self) -> None:
        """
        A batch whose rotations' writes need more than C{MAX_PARAMETERS}
        bind parameters (here with no batch cap) sends them in several
        statements, in its one transaction, every refresh rotated.
        """
        self.many_grants()
        self.store.database.batch_limit = self.MANY
        self.redeem_many()
        self.assertEqual(self.commits, 1)
        self.assertIsNotNone(self.successResultOf(self.store.lookup_access_token(h(f"x{self.MANY - 1}"), T0 + 101)))


# Races: real threads and real processes against one database.


def _statuses(results: list[Any]) -> list[str]:
    return sorted(result.status for _, result in results)


class RaceTests(TestCase):
    """
    Many connections (one store each, on real threads) racing for the same
    code and the same refresh token: exactly one winner, and the outcomes
    exactly those of the same requests made one after another.
    """

    RACERS = 8

    def location(self) -> str:
        return postgres.database_url(self)

    @inlineCallbacks
    def stores(self) -> Any:
        location = self.location()
        stores = []
        for _ in range(self.RACERS):
            store = open_store(location, global_reactor, threads=1)
            self.addCleanup(store.close)
            yield store.ready
            stores.append(store)
        return stores

    @inlineCallbacks
    def test_consume_code(self) -> Any:
        stores = yield self.stores()
        yield stores[0].create_grant(make_grant(), make_code("code"))
        results = yield DeferredList(
            [store.consume_code(h("code"), T0 + 1) for store in stores], fireOnOneErrback=True
        )
        self.assertEqual(_statuses(results), ["ok"] + ["replayed"] * (self.RACERS - 1))
        grants = yield stores[0].list_grants()
        self.assertEqual(grants, [])

    @inlineCallbacks
    def test_exchange_code(self) -> Any:
        """
        Of concurrent exchanges one stores tokens, every other is a replay,
        and the replays revoked the winner's tokens.
        """
        stores = yield self.stores()
        yield stores[0].create_grant(make_grant(), make_code("code"))
        results = yield DeferredList(
            [
                store.exchange_code(h("code"), T0 + 1, accept, access(f"a{n}"), refresh(f"r{n}"))
                for n, store in enumerate(stores)
            ],
            fireOnOneErrback=True,
        )
        self.assertEqual(_statuses(results), ["ok"] + ["replayed"] * (self.RACERS - 1))
        for n in range(self.RACERS):
            info = yield stores[0].lookup_access_token(h(f"a{n}"), T0 + 2)
            self.assertIsNone(info)

    @inlineCallbacks
    def race_refresh(self, grace: float) -> Any:
        stores = yield self.stores()
        yield stores[0].create_grant(make_grant(), make_code("code"))
        yield stores[0].add_tokens("g1", access("a0"), refresh("r0"))
        results = yield DeferredList(
            [
                store.redeem_refresh_token(
                    h("r0"), T0 + 100, grace, None, access(f"x{n}", T0 + 100), refresh(f"y{n}", T0 + 100)
                )
                for n, store in enumerate(stores)
            ],
            fireOnOneErrback=True,
        )
        return stores, _statuses(results)

    @inlineCallbacks
    def test_refresh_with_grace(self) -> Any:
        """
        As alone: the first rotates, the next replays inside the grace
        window get siblings up to the cap, the rest are refused without
        ending the grant.
        """
        stores, statuses = yield self.race_refresh(GRACE)
        self.assertEqual(statuses, ["grace"] * 3 + ["grace_exhausted"] * (self.RACERS - 4) + ["rotated"])
        grants = yield stores[0].list_grants()
        self.assertEqual(len(grants), 1)

    @inlineCallbacks
    def test_refresh_without_grace(self) -> Any:
        """
        As alone: one rotation, one reuse that ends the grant, and every
        later attempt finds the grant ended.
        """
        stores, statuses = yield self.race_refresh(0)
        self.assertEqual(statuses, ["reused"] + ["revoked"] * (self.RACERS - 2) + ["rotated"])
        grants = yield stores[0].list_grants()
        self.assertEqual(grants, [])


class SQLiteRaceTests(RaceTests):
    """
    The same races on one SQLite file (one connection per store).
    """

    def location(self) -> str:
        return self.mktemp() + ".db"


#: What the child processes below share: a synchronous stand-in reactor
#: (the store runs on the calling thread) and a way to read a fired
#: Deferred.
CHILD_PRELUDE = """
import json, os, sys
from twisted.internet.task import Clock
from smeldr_oauth.store import open_store
from tests.test_store_memory import T0, access, h, refresh

class Reactor(Clock):
    def callFromThread(self, f, *a, **k): f(*a, **k)
    def callWhenRunning(self, f, *a, **k): f(*a, **k)
    def addSystemEventTrigger(self, *a, **k): return object()
    def removeSystemEventTrigger(self, i): pass

def result(d):
    box = []
    d.addBoth(box.append)
    if hasattr(box[0], "raiseException"):
        box[0].raiseException()
    return box[0]
"""

#: What each racing process runs: open the store, say "ready", wait for
#: "go", make its one call, print the status as JSON.
RACER = CHILD_PRELUDE + """
location, kind, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
store = open_store(location, Reactor(), threads=0)
result(store.ready)
result(store.count_clients())
print("ready", flush=True)
sys.stdin.readline()
if kind == "code":
    d = store.consume_code(h("code"), T0 + 1)
else:
    d = store.redeem_refresh_token(
        h("r0"), T0 + 100, 10.0, None, access(f"x{n}", T0 + 100), refresh(f"y{n}", T0 + 100)
    )
print(json.dumps(result(d).status), flush=True)
store.close()
"""


class _Racer(ProcessProtocol):
    """
    A child process: its output, and Deferreds for its "ready" line and
    its exit code.
    """

    def __init__(self) -> None:
        self.ready: Deferred[None] = Deferred()
        self.output = b""
        self.errors = b""
        self.ended: Deferred[Any] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data
        if not self.ready.called and b"ready\n" in self.output:
            self.ready.callback(None)

    def errReceived(self, data: bytes) -> None:
        self.errors += data

    def processEnded(self, reason: Any) -> None:
        if not self.ready.called:
            self.ready.errback(RuntimeError(self.errors.decode("utf-8", "replace")))
        self.ended.callback(reason.value.exitCode)


class ProcessRaceTests(TestCase):
    """
    Several OS processes racing for one code and one refresh token on
    PostgreSQL (and on one SQLite file): exactly one winner, outcomes as
    alone.
    """

    PROCESSES = 5

    def location(self) -> str:
        return postgres.database_url(self)

    @inlineCallbacks
    def race(self, location: str, kind: str) -> Any:
        env = dict(os.environ, PYTHONPATH=CHECKOUT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        racers = []
        for n in range(self.PROCESSES):
            protocol = _Racer()
            transport = global_reactor.spawnProcess(
                protocol, sys.executable, [sys.executable, "-c", RACER, location, kind, str(n)], env=env
            )
            racers.append((protocol, transport))
        yield DeferredList([p.ready for p, _ in racers], fireOnOneErrback=True)
        for _, transport in racers:
            transport.write(b"go\n")
        codes = yield DeferredList([p.ended for p, _ in racers])
        self.assertEqual([code for _, code in codes], [0] * self.PROCESSES, [p.errors for p, _ in racers])
        return sorted(json.loads(p.output.split(b"ready\n", 1)[1]) for p, _ in racers)

    @inlineCallbacks
    def test_code_processes(self) -> Any:
        location = self.location()
        store = open_store(location, global_reactor, threads=1)
        self.addCleanup(store.close)
        yield store.ready
        yield store.create_grant(make_grant("g1"), make_code("code", "g1"))
        statuses = yield self.race(location, "code")
        self.assertEqual(statuses, ["ok"] + ["replayed"] * (self.PROCESSES - 1))
        grants = yield store.list_grants()
        self.assertEqual(grants, [])

    @inlineCallbacks
    def test_refresh_processes(self) -> Any:
        location = self.location()
        store = open_store(location, global_reactor, threads=1)
        self.addCleanup(store.close)
        yield store.ready
        yield store.create_grant(make_grant("g1"), make_code("code", "g1"))
        yield store.add_tokens("g1", access("a0"), refresh("r0"))
        statuses = yield self.race(location, "refresh")
        self.assertEqual(statuses, ["grace"] * 3 + ["grace_exhausted"] * (self.PROCESSES - 4) + ["rotated"])


class SQLiteProcessRaceTests(ProcessRaceTests):
    def location(self) -> str:
        return self.mktemp() + ".db"


#: A process that dies in the middle of a code exchange: after the code is
#: spent, before the tokens are stored.
CRASHER = CHILD_PRELUDE + """
def die(code):
    sys.stdout.flush()
    os._exit(17)

store = open_store(sys.argv[1], Reactor(), threads=0)
store.exchange_code(h("code"), T0 + 1, die, access("t1-a"), refresh("t1-r"))
"""


class CrashTests(TestCase):
    """
    A process killed half-way through a code exchange leaves nothing half
    done: the code is unspent and no token is stored.
    """

    def location(self) -> str:
        return postgres.database_url(self)

    @inlineCallbacks
    def test_crash_in_exchange(self) -> Any:
        location = self.location()
        store = open_store(location, global_reactor, threads=1)
        self.addCleanup(store.close)
        yield store.ready
        yield store.create_grant(make_grant(), make_code("code"))
        env = dict(os.environ, PYTHONPATH=CHECKOUT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        protocol = _Racer()
        protocol.ready.addErrback(lambda _: None)
        global_reactor.spawnProcess(protocol, sys.executable, [sys.executable, "-c", CRASHER, location], env=env)
        code = yield protocol.ended
        self.assertEqual(code, 17, protocol.errors)
        info = yield store.lookup_access_token(h("t1-a"), T0 + 2)
        self.assertIsNone(info)
        result = yield store.exchange_code(h("code"), T0 + 2, accept, access("t2-a"), refresh("t2-r"))
        self.assertEqual(result.status, "ok")


class SQLiteCrashTests(CrashTests):
    def location(self) -> str:
        return self.mktemp() + ".db"
