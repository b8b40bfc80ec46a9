# -*- test-case-name: tests.test_facts_postgres -*-
"""
The refresh facts functions as OAuth migration 11 writes them
(L{smeldr_oauth.store.facts_functions}), on a real PostgreSQL: a grant's
live generation and its count read in one backward index scan bounded by
the presented token's generation, with the answers of the plain facts
query, and a database made before the migration working after it.
"""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from smeldr_oauth.store.refresh_facts import REFRESH_FACTS
from smeldr_oauth.store.schema import OAUTH_SCHEMA
from tests import postgres
from tests.test_store_memory import GRACE, T0, access, h, refresh
from tests.test_store_postgres import pg_store, rotated_at

#: A grant's chain: generation 0 spent, generation 1 two siblings (a
#: rotation in the grace period) both spent, generation 2 live; and a
#: second grant whose only token is at generation 0 (its rows interleave
#: nowhere with the first's).
CHAIN = (
    ("h0", "g1", 0, 1.0, None),
    ("h1a", "g1", 1, 2.0, None),
    ("h1b", "g1", 1, 2.0, None),
    ("h2", "g1", 2, None, None),
    ("k0", "g2", 0, None, None),
)


def _chain(url: str) -> Any:
    import psycopg

    connection = psycopg.connect(url, autocommit=True)
    for grant_id in ("g1", "g2"):
        connection.execute(
            "INSERT INTO grants (grant_id, client_id, subject, scopes, resource, created_at)"
            " VALUES (%s, 'client-1', 'alice', '[]', 'r', 0)",
            (grant_id,),
        )
    for token_hash, grant_id, generation, used_at, revoked_at in CHAIN:
        connection.execute(
            "INSERT INTO refresh_tokens (token_hash, grant_id, scopes, generation, created_at, expires_at,"
            " used_at, revoked_at) VALUES (%s, %s, '[]', %s, 0, 1, %s, %s)",
            (token_hash, grant_id, generation, used_at, revoked_at),
        )
    return connection


class FactsFunctionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.url = postgres.database_url(self)
        pg_store(self, self.url).close()
        self.connection = _chain(self.url)
        self.addCleanup(self.connection.close)

    def test_live_generation_as_the_plain_query(self) -> None:
        """
        Both functions answer, for a token of every generation of a chain
        (spent, a sibling, live) and an unknown hash, the rows of the plain
        facts query (L{REFRESH_FACTS}, SQLite's, which counts the live
        generation over the whole grant): the bound by the token's own
        generation changes no answer.
        """
        connection = self.connection
        hashes = [row[0] for row in CHAIN]
        for token_hash in hashes + ["unknown"]:
            plain = connection.execute(REFRESH_FACTS.replace("?", "%s"), (token_hash, token_hash)).fetchall()
            self.assertEqual(connection.execute("SELECT * FROM smeldr_refresh_facts(%s)", (token_hash,)).fetchall(), plain)
            self.assertEqual(
                connection.execute("SELECT * FROM smeldr_refresh_facts_many(%s::text[])", ([token_hash],)).fetchall(),
                plain,
            )
        every = connection.execute(
            "SELECT token_hash, live_generation, live_siblings FROM smeldr_refresh_facts_many(%s::text[])"
            " ORDER BY token_hash",
            (hashes + ["unknown"],),
        ).fetchall()
        self.assertEqual(
            every, [("h0", 2, 1), ("h1a", 2, 1), ("h1b", 2, 1), ("h2", 2, 1), ("k0", 0, 1)]
        )
        # Two live siblings (the grace period's second rotation of h1).
        connection.execute(
            "INSERT INTO refresh_tokens (token_hash, grant_id, scopes, generation, created_at, expires_at)"
            " VALUES ('h2b', 'g1', '[]', 2, 0, 1)"
        )
        self.assertEqual(
            connection.execute(
                "SELECT live_generation, live_siblings FROM smeldr_refresh_facts(%s)", ("h1a",)
            ).fetchall(),
            [(2, 2)],
        )

    def test_live_generation_one_bounded_scan(self) -> None:
        """
        The kept (generic) plan of each function's facts statement reads
        the live generation and its count in one backward scan of the
        C{(grant_id, generation)} index with both columns in its index
        condition (the grant, and the presented token's generation as the
        lower bound), grouped in index order, with no sort: made while the
        tables held a few analyzed rows and used once the grant's chain
        holds 5,000 tokens more (migration 5's trap).  Migrations 7 and 8
        read it as C{MAX} and then C{COUNT}: two scans, the first with no
        bound but the grant.
        """
        connection = self.connection
        connection.execute("ANALYZE grants")
        connection.execute("ANALYZE refresh_tokens")
        for _ in range(8):
            connection.execute("SELECT * FROM smeldr_refresh_facts_many(%s::text[])", (["h2"],)).fetchall()
            connection.execute("SELECT * FROM smeldr_refresh_facts(%s)", ("h2",)).fetchall()
        connection.execute(
            "INSERT INTO refresh_tokens (token_hash, grant_id, scopes, generation, created_at, expires_at, used_at)"
            " SELECT 'old-' || i, 'g1', '[]', -i, 0, 1, 1 FROM generate_series(1, 5000) i"
        )
        plans = postgres.nested_plans(connection)
        for call, args in (
            ("SELECT * FROM smeldr_refresh_facts_many(%s::text[])", (["h2"],)),
            ("SELECT * FROM smeldr_refresh_facts(%s)", ("h2",)),
        ):
            del plans[:]
            rows = connection.execute(call, args).fetchall()
            self.assertEqual([(row[10], row[17], row[18]) for row in rows], [("h2", 2, 1)])
            facts = [plan for plan in plans if "smeldr_refresh_facts" not in plan and "live.generation" in plan]
            self.assertEqual(len(facts), 1, plans)
            plan = facts[0]
            lines = [line.strip() for line in plan.splitlines()]
            live = [n for n, line in enumerate(lines) if "refresh_tokens_grant_id" in line]
            self.assertEqual(len(live), 1, plan)
            self.assertIn("Index Only Scan Backward using refresh_tokens_grant_id", lines[live[0]])
            condition = next(line for line in lines[live[0] + 1 :] if line.startswith("Index Cond"))
            self.assertRegex(condition, r"grant_id = .*generation >= ", plan)
            # Grouped as the scan yields them, the first group taken: no
            # sort, no hash of the whole chain, no second scan.
            self.assertEqual(
                [line.split("(")[0].strip() for line in lines[live[0] - 3 : live[0]]],
                ["->  Limit", "->  GroupAggregate", "Group Key: r.generation"],
                plan,
            )
            self.assertNotRegex(plan, r"\bSort\b|SubPlan|InitPlan")


class FactsMigrationTests(SynchronousTestCase):
    def test_old_database_migrated(self) -> None:
        """
        A database made at OAuth migration 10, its tokens rotated there,
        keeps working once migrated to 11: its tokens rotate again (the
        single refresh's function) and what that rotation issued
        authorizes; a token spent before the migration is a reuse.
        """
        url = postgres.database_url(self)
        rotated_at(self, url, OAUTH_SCHEMA, 10)
        store = pg_store(self, url)
        rotated = store.redeem_refresh_token(
            h("s-g1"), T0 + 20, GRACE, None, access("c-g1", T0 + 20), refresh("t-g1", T0 + 20)
        )
        self.assertEqual(self.successResultOf(rotated).status, "rotated")
        self.assertIsNotNone(self.successResultOf(store.lookup_access_token(h("c-g1"), T0 + 21)))
        reused = store.redeem_refresh_token(
            h("r-g2"), T0 + 100, GRACE, None, access("d-g2", T0 + 100), refresh("u-g2", T0 + 100)
        )
        self.assertNotEqual(self.successResultOf(reused).status, "rotated")
