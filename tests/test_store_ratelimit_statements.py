"""
Tests for L{smeldr_oauth.store.ratelimit_statements} on PostgreSQL:
C{smeldr_take_both_many} as rate-limits migration 5 leaves it, against the
real server of L{tests.postgres} (each test in a fresh database).
"""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from smeldr_oauth.db import open_database
from smeldr_oauth.store.ratelimits import RATE_LIMITS_SCHEMA
from tests import postgres
from tests.test_store_memory import T0
from tests.test_store_sqlite import InlineReactor


def _named(prefix: str, requests: list[tuple[Any, Any, float]]) -> list[tuple[Any, Any, float]]:
    """
    Token requests of (key, capacity, rate) pairs as C{take_both}'s
    buckets, the limiter names C{prefix}ed: one run of requests, twice, in
    one table.
    """
    return [
        ((f"{prefix}:address", a[0], a[1], a[2]), (f"{prefix}:client", c[0], c[1], c[2]), when)
        for a, c, when in requests
    ]


class PostgresTakeBothManyTests(SynchronousTestCase):
    """
    C{smeldr_take_both_many} (rate-limits migration 5 writes each bucket
    once a batch, deciding the batch's takes of buckets it has met in
    memory) answers each request, and leaves each bucket, exactly as
    L{_take_both}'s statement run for the requests one after another.
    """

    def setUp(self) -> None:
        import psycopg

        url = postgres.database_url(self)
        database = open_database(url, InlineReactor(), threads=0)
        self.addCleanup(database.close)
        self.successResultOf(database.ensure(RATE_LIMITS_SCHEMA))
        self.connection = psycopg.connect(url, autocommit=True)
        self.addCleanup(self.connection.close)

    def batch(self, requests: list[tuple[Any, Any, float]]) -> list[tuple[Any, ...]]:
        n = len(requests)
        columns: list[list[Any]] = [[] for _ in range(9)]
        for first, second, now in requests:
            for index, value in enumerate((*first, *second, now)):
                columns[index].append(value)
        rows = self.connection.execute(
            "SELECT * FROM smeldr_take_both_many(%s::text[], %s::text[], %s::float8[], %s::float8[],"
            " %s::text[], %s::text[], %s::float8[], %s::float8[], %s::float8[])",
            columns,
        ).fetchall()
        self.assertEqual(len(rows), n)
        return [tuple(row) for row in rows]

    def one_by_one(self, requests: list[tuple[Any, Any, float]]) -> list[tuple[Any, ...]]:
        from smeldr_oauth.store.ratelimit_statements import _TAKE_BOTH
        from smeldr_oauth.store.ratelimits import _take_params

        sql = _TAKE_BOTH.replace("?", "%s")
        return [
            tuple(self.connection.execute(sql, (*_take_params(first, now), *_take_params(second, now))).fetchone())
            for first, second, now in requests
        ]

    def buckets(self, prefix: str) -> list[tuple[Any, ...]]:
        rows = self.connection.execute(
            "SELECT substr(name, 3), key, tokens, stamp, capacity, rate, full_at, taken FROM rate_limits"
            " WHERE name LIKE %s ORDER BY 1, 2",
            (prefix + ":%",),
        ).fetchall()
        return [tuple(row) for row in rows]

    def test_each_bucket_written_once(self) -> None:
        """
        Eleven token requests of one address and one client: their two
        buckets are each updated once, not once a request (22 updates in
        migration 3's version), and the answers are those of the requests
        one after another.
        """
        requests = [(("m:address", "a", 30.0, 0.5), ("m:client", "c", 60.0, 1.0), T0 + index / 4) for index in range(11)]
        self.batch(requests[:1])
        with self.connection.transaction():
            answers = self.batch(requests[1:])
            updated = self.connection.execute(
                "SELECT pg_stat_get_xact_tuples_updated(c.oid) FROM pg_class c WHERE c.relname = 'rate_limits'"
            ).fetchone()[0]
        self.assertEqual(updated, 2)
        alone = [(("s:address", "a", 30.0, 0.5), ("s:client", "c", 60.0, 1.0), T0 + index / 4) for index in range(11)]
        self.one_by_one(alone[:1])
        self.assertEqual(self.one_by_one(alone[1:]), answers)
        self.assertEqual(self.buckets("m"), self.buckets("s"))

    def test_plans_kept_use_the_key(self) -> None:
        """
        The function's statements find each bucket through the primary key
        even with the plans PL/pgSQL keeps from a session's first calls,
        made when the table held a few rows: migration 3's version then
        read the whole table at every call once it had grown (its lock
        statements joined the arrays to a sequential scan).  Seen through
        C{auto_explain}'s plans of the function's statements, sent to the
        client as notices.
        """
        requests = [(("m:address", "a", 30.0, 0.5), ("m:client", "c", 60.0, 1.0), T0 + index) for index in range(3)]
        self.batch(requests)
        self.connection.execute("ANALYZE rate_limits")
        for _ in range(8):
            self.batch(requests)
        self.connection.execute(
            "INSERT INTO rate_limits (name, key, tokens, stamp, capacity, rate, full_at, taken)"
            " SELECT 'other', md5(i::text), 1, 1, 1, 1, 1, 1 FROM generate_series(1, 5000) i"
        )
        plans = postgres.nested_plans(self.connection)
        self.batch(requests)
        nested = [plan for plan in plans if "rate_limits" in plan and "smeldr_take_both_many" not in plan]
        self.assertGreaterEqual(len(nested), 4)
        for plan in nested:
            self.assertNotIn("Seq Scan on rate_limits", plan)
            self.assertIn("Index Cond", plan)

    def test_as_one_by_one(self) -> None:
        """
        Batches of random token requests over a few busy buckets and some
        new ones, with clocks that go back as well as forward, capacities
        and rates that change, and buckets run dry: every answer and every
        bucket's row are the same, to the last bit of each double.
        """
        import random

        chance = random.Random(20261204)
        now = T0
        for size in (1, 2, 5, 11, 25, 40, 3, 60):
            requests: list[tuple[Any, Any, float]] = []
            for _ in range(size):
                now += chance.choice((0.0, 0.001, 0.37, 1.0 / 3, -0.5, 2.0))
                address = f"addr{chance.randrange(3) if chance.random() < 0.9 else chance.randrange(1000)}"
                client = f"client{chance.randrange(2) if chance.random() < 0.9 else chance.randrange(1000)}"
                capacity = chance.choice((5.0, 5.0, 5.0, 3.0, 30.0))
                rate = chance.choice((5.0 / 60, 5.0 / 60, 0.7, 1.0 / 3))
                requests.append(((address, capacity, rate), (client, capacity * 2, rate * 1.5), now))

            self.assertEqual(self.batch(_named("m", requests)), self.one_by_one(_named("s", requests)))
            self.assertEqual(self.buckets("m"), self.buckets("s"))
        # Some went dry, some were refused, some refilled.
        answers = self.one_by_one([(("s:address", "addr0", 5.0, 5.0 / 60), ("s:client", "client0", 10.0, 0.125), now)])
        self.assertTrue(self.buckets("s"))
        self.assertIn(answers[0][0], (0, 1))
