"""
Tests for L{smeldr_oauth.store.ratelimits} (token buckets in SQL, on a real
SQLite file and a real PostgreSQL database) and for
L{smeldr_oauth.oauth.ratelimit.SharedRateLimiter} on it: several limiters
(several processes' pools, and real processes) on one database allow what
one would.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from typing import Any, Optional

from twisted.internet import reactor as global_reactor
from twisted.internet.defer import DeferredList, fail, inlineCallbacks
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from smeldr_oauth.db import open_database
from smeldr_oauth.db.errors import StoreUnavailable
from smeldr_oauth.oauth.errors import RateLimited
from smeldr_oauth.oauth.ratelimit import (
    IRateLimiter,
    IRateLimitStore,
    Limits,
    RateLimiter,
    SharedRateLimiter,
    spend,
    spend_both,
    store_key,
)
from smeldr_oauth.store.ratelimits import RATE_LIMITS_SCHEMA, SQLRateLimitStore, _take
from tests import postgres
from tests.test_store_postgres import CHECKOUT, _Racer
from tests.test_store_sqlite import InlineReactor

T0 = 1_700_000_000.0


class StoreMixin:
    """
    The store's contract, on one engine, with calls on the calling thread.
    """

    def location(self) -> str:
        raise NotImplementedError()

    def setUp(self) -> None:
        self.database = open_database(self.location(), InlineReactor(), threads=0)
        self.addCleanup(self.database.close)  # type: ignore[attr-defined]
        self.store = SQLRateLimitStore(self.database)

    def ok(self, d: Any) -> Any:
        return self.successResultOf(d)  # type: ignore[attr-defined]

    def take(self, key: str = "k", now: float = T0, capacity: float = 3.0, rate: float = 0.05) -> tuple[bool, float]:
        return self.ok(self.store.take("test", key, capacity, rate, now))  # type: ignore[no-any-return]

    def rows(self) -> int:
        return int(self.ok(self.database.read(RATE_LIMITS_SCHEMA, _count)))

    def test_interface(self) -> None:
        self.assertTrue(verifyObject(IRateLimitStore, self.store))  # type: ignore[attr-defined]

    def test_take_until_empty(self) -> None:
        """
        A new bucket starts full; each take spends one and says how many
        are left; an empty bucket spends nothing.
        """
        self.assertEqual([self.take() for _ in range(4)], [(True, 2.0), (True, 1.0), (True, 0.0), (False, 0.0)])
        self.assertEqual(self.take("other"), (True, 2.0))

    def test_refill(self) -> None:
        """
        Buckets refill at their rate (one every 20 s here), up to their
        capacity, never for time before their last use.
        """
        for _ in range(3):
            self.take()
        self.assertEqual(self.take(now=T0 + 10), (False, 0.5))
        self.assertEqual(self.take(now=T0 + 20), (True, 0.0))
        # A clock behind the bucket's (another machine's) refills nothing.
        self.assertEqual(self.take(now=T0 + 5), (False, 0.0))
        self.assertEqual(self.take(now=T0 + 3600), (True, 2.0))

    def test_refund(self) -> None:
        for _ in range(3):
            self.take()
        self.ok(self.store.refund("test", "k", 3.0, 0.05, T0))
        self.assertEqual(self.take(), (True, 0.0))
        for _ in range(5):
            self.ok(self.store.refund("test", "k", 3.0, 0.05, T0))
        self.assertEqual(self.take(), (True, 2.0))
        # Nothing to give back to a bucket that does not exist (it is full).
        self.ok(self.store.refund("test", "never", 3.0, 0.05, T0))
        self.assertEqual(self.take("never"), (True, 2.0))

    def test_take_both(self) -> None:
        """
        Two buckets in one call: the second is taken only when the first
        was spent, each as L{take} would.
        """
        first, second = ("test", "a", 2.0, 0.05), ("other", "b", 3.0, 0.05)
        both = lambda now=T0: self.ok(self.store.take_both(first, second, now))  # noqa: E731
        self.assertEqual(both(), ((True, 1.0), (True, 2.0)))
        self.assertEqual(both(), ((True, 0.0), (True, 1.0)))
        self.assertEqual(both(), ((False, 0.0), None))
        self.assertEqual(self.ok(self.store.take("other", "b", 3.0, 0.05, T0)), (True, 0.0))
        self.assertEqual(both(T0 + 20), ((True, 0.0), (True, 0.0)))
        self.assertEqual(both(T0 + 40), ((True, 0.0), (True, 0.0)))
        self.assertEqual(both(T0 + 50), ((False, 0.5), None))

    def test_names_apart(self) -> None:
        for _ in range(3):
            self.take()
        self.assertEqual(self.ok(self.store.take("another", "k", 3.0, 0.05, T0)), (True, 2.0))

    def test_purge(self) -> None:
        """
        A bucket is deleted once it has refilled completely (a missing
        bucket is a full one), and not before.
        """
        self.take("a")
        for _ in range(3):
            self.take("b")
        self.assertEqual(self.rows(), 2)
        self.assertEqual(self.ok(self.store.purge_expired(T0 + 19)), 0)
        self.assertEqual(self.ok(self.store.purge_expired(T0 + 20)), 1)
        self.assertEqual(self.rows(), 1)
        self.assertEqual(self.ok(self.store.purge_expired(T0 + 60)), 1)
        self.assertEqual(self.rows(), 0)

    def test_purging_loop(self) -> None:
        clock = Clock()
        clock.advance(T0)
        self.take()
        loop = self.store.start_purging(clock, interval=300)
        self.addCleanup(loop.stop)  # type: ignore[attr-defined]
        self.assertEqual(self.rows(), 1)
        clock.advance(300)
        self.assertEqual(self.rows(), 0)


def _count(txn: Any) -> int:
    return int(txn.execute("SELECT COUNT(*) FROM rate_limits").fetchone()[0])


class SQLiteStoreTests(StoreMixin, SynchronousTestCase):
    def location(self) -> str:
        return self.mktemp() + ".db"


class PostgresStoreTests(StoreMixin, SynchronousTestCase):
    def location(self) -> str:
        return postgres.database_url(self)

    def test_unlogged(self) -> None:
        """
        The buckets are an C{UNLOGGED} table: spending one writes no WAL
        record that a commit must wait to flush (a hot bucket's row lock
        would otherwise be held for a flush per request).
        """
        self.take()
        persistence = self.ok(
            self.database.read(
                RATE_LIMITS_SCHEMA,
                lambda txn: txn.execute(
                    "SELECT relpersistence FROM pg_class WHERE relname = 'rate_limits'"
                ).fetchone()[0],
            )
        )
        self.assertEqual(persistence, "u")

    def test_takes_are_hot(self) -> None:
        """
        Spending from a bucket is a HOT update on PostgreSQL (the new row
        version stays on its page and no index gets an entry): no indexed
        column changes, although every take moves C{full_at}, and the page
        has room.  A hot bucket (one address behind a balancer) would
        otherwise leave an index entry per take for the next takes to walk
        past; the purge still finds full buckets (L{test_purge}).
        """

        def takes(txn: Any) -> tuple[int, int]:
            for index in range(40):
                _take(txn, "test", "k", 1000.0, 0.05, T0 + index)
            row = txn.execute(
                "SELECT pg_stat_get_xact_tuples_updated(c.oid), pg_stat_get_xact_tuples_hot_updated(c.oid)"
                " FROM pg_class c WHERE c.relname = 'rate_limits'"
            ).fetchone()
            return int(row[0]), int(row[1])

        self.assertEqual(self.ok(self.database.write(RATE_LIMITS_SCHEMA, takes)), (39, 39))

    def test_keys_not_kept(self) -> None:
        """
        Addresses and client ids are kept only as hashes.
        """
        clock = Clock()
        limiter = SharedRateLimiter(self.store, "paste", clock, 3)
        self.ok(limiter.take("192.0.2.7"))
        keys = self.ok(self.database.read(RATE_LIMITS_SCHEMA, lambda txn: [r[0] for r in txn.execute("SELECT key FROM rate_limits")]))
        self.assertEqual(keys, [store_key("192.0.2.7")])
        self.assertNotIn("192.0.2", keys[0])


class PostgresGroupedTakeTests(SynchronousTestCase):
    """
    With group commit (the server's PostgreSQL database), the C{take_both}
    calls that arrive together leave as one statement
    (C{smeldr_take_both_many}, one thread hand-off), each answered as it
    would be alone, one after another.
    """

    def setUp(self) -> None:
        from smeldr_oauth.db.database import Database
        from smeldr_oauth.db.postgres import PostgresEngine
        from tests.test_store_sqlite import InlineThreadPool

        self.reactor = InlineReactor()
        self.database = Database(
            PostgresEngine(postgres.database_url(self)),
            self.reactor,
            threads=1,
            threadpool=InlineThreadPool(),
            group_commit=True,
        )
        self.addCleanup(self.database.close)
        self.successResultOf(self.database.ensure(RATE_LIMITS_SCHEMA))
        self.store = SQLRateLimitStore(self.database)

    def test_one_statement(self) -> None:
        from smeldr_oauth.db.database import Transaction

        statements: list[str] = []
        real = Transaction.execute

        def counted(txn: Any, sql: str, params: Any = ()) -> Any:
            statements.append(sql)
            return real(txn, sql, params)

        self.patch(Transaction, "execute", counted)
        first, second = ("test", "a", 2.0, 0.05), ("other", "b", 3.0, 0.05)
        calls = [self.store.take_both(first, second, T0) for _ in range(3)]
        calls.append(self.store.take_both(("third", "c", 1.0, 0.05), second, T0))
        for d in calls:
            self.assertNoResult(d)
        self.reactor.advance(0)
        self.assertEqual(
            [self.successResultOf(d) for d in calls],
            [((True, 1.0), (True, 2.0)), ((True, 0.0), (True, 1.0)), ((False, 0.0), None), ((True, 0.0), (True, 0.0))],
        )
        self.assertEqual(len(statements), 1)
        self.assertIn("smeldr_take_both_many", statements[0])
        # The next turn's batch starts from the buckets as this one left them.
        later = self.store.take_both(("third", "c", 1.0, 0.05), second, T0)
        self.reactor.advance(0)
        self.assertEqual(self.successResultOf(later), ((False, 0.0), None))


    def sent(self) -> list[Any]:
        """
        Record the parameters of every statement the store sends.
        """
        from smeldr_oauth.db.database import Transaction

        params: list[Any] = []
        real = Transaction.execute

        def recorded(txn: Any, sql: str, values: Any = ()) -> Any:
            params.append(list(values))
            return real(txn, sql, values)

        self.patch(Transaction, "execute", recorded)
        return params

    def test_array_literals(self) -> None:
        """
        The batch's columns of limiter names, hashed keys and finite floats
        (every token request's) travel as array literals
        (L{smeldr_oauth.db.arrays}), not as lists that psycopg would dump
        element by element in Python.
        """
        params = self.sent()
        first = ("token_address", store_key("192.0.2.7"), 30.0, 0.5)
        second = ("token_client", store_key("client-1"), 60.0, 1.0)
        calls = [self.store.take_both(first, second, T0 + index / 8) for index in range(3)]
        self.reactor.advance(0)
        self.assertEqual(
            [self.successResultOf(d) for d in calls],
            [((True, 29.0), (True, 59.0)), ((True, 28.0625), (True, 58.125)), ((True, 27.125), (True, 57.25))],
        )
        self.assertEqual(len(params), 1)
        self.assertEqual(
            params[0],
            [
                '{"token_address","token_address","token_address"}',
                '{"' + '","'.join([store_key("192.0.2.7")] * 3) + '"}',
                "{30.0,30.0,30.0}",
                "{0.5,0.5,0.5}",
                '{"token_client","token_client","token_client"}',
                '{"' + '","'.join([store_key("client-1")] * 3) + '"}',
                "{60.0,60.0,60.0}",
                "{1.0,1.0,1.0}",
                "{%r,%r,%r}" % (T0, T0 + 0.125, T0 + 0.25),
            ],
        )

    def test_values_quoted(self) -> None:
        """
        Keys a literal has to quote (a comma, a quote, a brace, a
        backslash, a space, an empty or non-ASCII key, C{NULL}) go quoted
        in it, a float that is not finite as a list, and every bucket is
        still its own: the answers are those of the calls one by one.
        """
        params = self.sent()
        keys = ["a,b", 'q"uote', "{brace}", "back\\slash", "with space", "", "caf\u00e9", "NULL"]
        calls = [self.store.take_both(("name", key, 2.0, 0.05), ("other", key + "x", 3.0, 0.05), T0) for key in keys]
        calls.append(self.store.take_both(("name", "a,b", 2.0, 0.05), ("other", "y", float("inf"), 0.05), T0))
        self.reactor.advance(0)
        self.assertEqual(
            [self.successResultOf(d) for d in calls],
            [((True, 1.0), (True, 2.0))] * len(keys) + [((True, 0.0), (True, float("inf")))],
        )
        self.assertEqual(params[0][1], '{"a,b","q\\"uote","{brace}","back\\\\slash","with space","","caf\u00e9","NULL","a,b"}')
        self.assertEqual(params[0][6], [3.0] * len(keys) + [float("inf")])
        self.assertEqual(params[0][0], '{"' + '","'.join(["name"] * (len(keys) + 1)) + '"}')
        # Words all, but an unquoted NULL in a literal is a null element.
        words = [self.store.take_both(("name", key, 2.0, 0.05), ("other", "z", 3.0, 0.05), T0) for key in ("null", "nullx")]
        self.reactor.advance(0)
        self.assertEqual([self.successResultOf(d)[0] for d in words], [(True, 1.0), (True, 1.0)])
        self.assertEqual(params[1][1], '{"null","nullx"}')
        rows = self.successResultOf(
            self.database.read(RATE_LIMITS_SCHEMA, lambda txn: txn.execute("SELECT name, key FROM rate_limits").fetchall())
        )
        self.assertEqual(
            sorted(tuple(row) for row in rows),
            sorted(
                [("name", key) for key in keys + ["null", "nullx"]]
                + [("other", key + "x") for key in keys]
                + [("other", "y"), ("other", "z")]
            ),
        )


class PostgresLockOrderTests(SynchronousTestCase):
    """
    Two batches of token requests taking the same buckets in opposite
    orders (two pool threads, or two processes): C{smeldr_take_both_many}
    first locks the batch's existing buckets in one order, so the batches
    wait for each other instead of deadlocking.
    """

    def setUp(self) -> None:
        self.url = postgres.database_url(self)
        database = open_database(self.url, InlineReactor(), threads=0)
        self.addCleanup(database.close)
        store = SQLRateLimitStore(database)
        # Every bucket exists: a new key's row cannot be locked beforehand.
        for name, key in [("token_address", "x"), ("token_address", "y")] + [
            ("token_client", f"c{n}") for n in range(1, 5)
        ]:
            self.successResultOf(store.take(name, key, 100.0, 1.0, T0))

    def connect(self) -> Any:
        import psycopg

        connection = psycopg.connect(self.url)
        self.addCleanup(connection.close)
        return connection

    def take(self, connection: Any, *requests: tuple[str, str]) -> list[Any]:
        """
        C{smeldr_take_both_many} of token requests, each an (address key,
        client key), as the server sends it.
        """
        n = len(requests)
        return connection.execute(
            "SELECT * FROM smeldr_take_both_many(%s::text[], %s::text[], %s::float8[], %s::float8[],"
            " %s::text[], %s::text[], %s::float8[], %s::float8[], %s::float8[])",
            (
                ["token_address"] * n, [address for address, _ in requests], [100.0] * n, [1.0] * n,
                ["token_client"] * n, [client for _, client in requests], [100.0] * n, [1.0] * n,
                [T0] * n,
            ),
        ).fetchall()

    def test_opposite_orders(self) -> None:
        """
        Batch A = [(X, c1), (Y, c2)] holds X; batch B = [(Y, c3), (X, c4)]
        then waits for X, holding nothing (in arrival order it would hold
        Y); A then takes Y, and both finish, every bucket spent.
        """
        a, b, watcher = self.connect(), self.connect(), self.connect()
        b.autocommit = watcher.autocommit = True
        pid = b.info.backend_pid
        # A's batch, as though stopped between its two requests: one
        # transaction, X's lock held.
        first = self.take(a, ("x", "c1"))
        outcome: list[Any] = []

        def run_b() -> None:
            try:
                outcome.append(self.take(b, ("y", "c3"), ("x", "c4")))
            except Exception as error:
                outcome.append(error)

        thread = threading.Thread(target=run_b)
        thread.start()
        try:
            # Until B waits for a lock (A's, on X).
            while thread.is_alive() and not watcher.execute(
                "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = %s", (pid,)
            ).fetchone()[0]:
                pass
            self.assertEqual(outcome, [])
            second = self.take(a, ("y", "c2"))
            a.commit()
        finally:
            a.rollback()
            thread.join(30)
        self.assertFalse(thread.is_alive())
        self.assertEqual([row[0::2] for row in first + second], [(1, 1), (1, 1)])
        [rows] = outcome
        if isinstance(rows, Exception):
            raise rows
        self.assertEqual([row[0::2] for row in rows], [(1, 1), (1, 1)])


class SpendBothTests(SynchronousTestCase):
    """
    L{spend_both}: two shared limiters on one store, in one call of its
    C{take_both} when both must ask it, with the outcomes of L{spend} on
    each in turn.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        database = open_database(self.mktemp() + ".db", InlineReactor(), threads=0)
        self.addCleanup(database.close)
        self.store = SQLRateLimitStore(database)
        self.calls: list[str] = []
        for method in ("take", "take_both"):
            self.patch(self.store, method, self.counted(method, getattr(self.store, method)))
        self.address = SharedRateLimiter(self.store, "token_address", self.clock, 4)
        self.client = SharedRateLimiter(self.store, "token_client", self.clock, 3, addresses=False)

    def counted(self, name: str, f: Any) -> Any:
        def call(*args: Any) -> Any:
            self.calls.append(name)
            return f(*args)

        return call

    def spend(self) -> Any:
        d = spend_both(self.address, "192.0.2.1", self.client, "client", "token", "token request")
        failure = self.failureResultOf(d, RateLimited) if d.called and not isinstance(d.result, type(None)) else None
        if failure is None:
            self.successResultOf(d)
            return None
        return failure.value.retry_after

    def left(self, name: str, key: str) -> tuple[bool, float]:
        return self.successResultOf(SQLRateLimitStore.take(self.store, name, store_key(key), 100.0, 0.05, T0))  # type: ignore[no-any-return]

    def test_outcomes(self) -> None:
        self.assertEqual([self.spend(), self.spend()], [None, None])
        self.assertEqual(self.calls, ["take_both"] * 2)
        # Another process spends what is left of the client's bucket.
        other = SharedRateLimiter(self.store, "token_client", self.clock, 3, addresses=False)
        self.successResultOf(other.take("client"))
        del self.calls[:]
        with capturedLogs() as events:
            # Refused by the store for the client, the address's spent.
            self.assertEqual(self.spend(), 20)
            self.assertEqual(self.calls, ["take_both"])
            # The client now refused here: the address's asked alone.
            self.assertEqual(self.spend(), 20)
            self.assertEqual(self.calls[1:], ["take"])
            # This process spent the address's bucket: refused without a
            # statement.
            self.assertEqual(self.spend(), 15)
            self.assertEqual(self.calls[2:], [])
        self.assertEqual(
            [(e["smeldr_event"], e["address"]) for e in events if e.get("smeldr_event")],
            [("rate_limited", "client"), ("rate_limited", "client"), ("rate_limited", "192.0.2.1")],
        )
        self.assertEqual(self.left("token_address", "192.0.2.1"), (False, 0.0))
        self.assertEqual(self.left("token_client", "client"), (False, 0.0))

    def test_address_refused_first(self) -> None:
        """
        When the address's bucket is empty in the store, the client's is
        not spent.
        """
        other = SharedRateLimiter(self.store, "token_address", self.clock, 4)
        for _ in range(4):
            self.successResultOf(other.take("192.0.2.1"))
        self.assertEqual(self.spend(), 15)
        self.assertEqual(self.calls[-1], "take_both")
        self.assertEqual([self.successResultOf(self.client.take("client")) for _ in range(4)], [None] * 3 + [20])

    def test_store_failure_refunds_both(self) -> None:
        """
        When the store cannot answer, neither limiter's local pre-check
        keeps the event it spent: the failures, however many, leave both
        to the store's judgement once it is back.
        """
        take_both = self.store.take_both
        self.patch(self.store, "take_both", lambda *args: fail(StoreUnavailable("down")))
        for _ in range(5):
            self.failureResultOf(
                spend_both(self.address, "192.0.2.1", self.client, "client", "token", "token request"),
                StoreUnavailable,
            )
        self.patch(self.store, "take_both", take_both)
        self.assertEqual([self.spend() for _ in range(3)], [None] * 3)

    def test_in_memory(self) -> None:
        """
        Limiters in memory are spent in turn, at once: nothing to await
        when both were spent, L{RateLimited} raised when one was not.
        """
        address = RateLimiter(self.clock, 1)
        client = RateLimiter(self.clock, 5, addresses=False)
        self.assertIsNone(spend_both(address, "192.0.2.1", client, "c", "token", "token request"))
        self.assertRaises(RateLimited, spend_both, address, "192.0.2.1", client, "c", "token", "token request")
        self.assertEqual([client.hit("c") for _ in range(5)], [True] * 4 + [False])


class SharedLimiterTests(SynchronousTestCase):
    """
    L{SharedRateLimiter}: the bucket is the store's; a refusal and the
    local pre-check decide without it.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        database = open_database(self.mktemp() + ".db", InlineReactor(), threads=0)
        self.addCleanup(database.close)
        self.store = CountingStore(SQLRateLimitStore(database))
        self.a = SharedRateLimiter(self.store, "paste", self.clock, 3)
        self.b = SharedRateLimiter(self.store, "paste", self.clock, 3)

    def take(self, limiter: SharedRateLimiter, key: str = "192.0.2.1") -> Any:
        return self.successResultOf(limiter.take(key))

    def test_interface(self) -> None:
        self.assertTrue(verifyObject(IRateLimiter, self.a))
        self.assertTrue(verifyObject(IRateLimiter, RateLimiter(self.clock, 1)))

    def test_shared(self) -> None:
        """
        Two limiters (two processes) on one store allow the capacity
        between them, not each.
        """
        self.assertEqual([self.take(self.a), self.take(self.b), self.take(self.a)], [None, None, None])
        self.assertEqual(self.take(self.b), 20)
        self.assertEqual(self.take(self.a), 20)

    def test_refusal_decided_locally(self) -> None:
        """
        Once the store has refused a key, the limiter refuses it without
        asking until the bucket can have refilled one event.
        """
        for _ in range(3):
            self.take(self.a)
        self.assertEqual(self.take(self.a), 20)
        asked = self.store.takes
        self.clock.advance(15)
        self.assertEqual([self.take(self.a) for _ in range(10)], [5] * 10)
        self.assertEqual(self.store.takes, asked)
        self.clock.advance(5)
        self.assertIsNone(self.take(self.a))
        self.assertEqual(self.store.takes, asked + 1)

    def test_local_precheck(self) -> None:
        """
        When this process alone has used the whole capacity, it refuses
        without asking the store (which cannot have more left).
        """
        for _ in range(3):
            self.take(self.a)
        asked = self.store.takes
        self.assertEqual(self.take(self.a), 20)
        self.assertEqual(self.store.takes, asked)

    def test_refund(self) -> None:
        for _ in range(3):
            self.take(self.a)
        self.assertEqual(self.take(self.b), 20)
        self.a.refund("192.0.2.1")
        # The refund reaches the shared bucket; b's remembered refusal is
        # its own business and runs out on its own.
        self.assertIsNone(self.take(self.a))
        self.assertEqual(self.take(self.a), 20)

    def test_ipv6_per_64(self) -> None:
        for n in range(3):
            self.assertIsNone(self.take(self.a, f"2001:db8::{n + 1}"))
        self.assertEqual(self.take(self.b, "2001:db8::ffff"), 20)

    def test_unavailable(self) -> None:
        """
        A store that cannot be reached fails the take (closed, not open),
        and the local pre-check does not count it.
        """
        self.store.broken = True
        for _ in range(5):
            self.failureResultOf(self.a.take("192.0.2.1"), StoreUnavailable)
        self.store.broken = False
        self.assertEqual([self.take(self.a) for _ in range(4)], [None, None, None, 20])

    def test_spend(self) -> None:
        """
        L{spend} refuses with L{RateLimited} and its C{Retry-After}.
        """
        for _ in range(3):
            self.successResultOf(spend(self.a, "192.0.2.1", "grants", "paste"))
        failure = self.failureResultOf(spend(self.b, "192.0.2.1", "grants", "paste"), RateLimited)
        self.assertEqual(failure.value.retry_after, 20)

    def test_from_config(self) -> None:
        from smeldr_oauth.oauth.config import Config

        config = Config(issuer="https://example.com", verify_bearer=lambda t: False, registrations_per_minute=2)
        shared = Limits.from_config(config, self.clock, store=self.store)
        local = Limits.from_config(config, self.clock)
        self.assertIsInstance(shared.registration, SharedRateLimiter)
        self.assertIsInstance(local.registration, RateLimiter)
        names = {getattr(shared, f).name for f in ("paste", "registration", "cimd_fetch", "token_per_address", "token_per_client")}
        self.assertEqual(len(names), 5)
        for _ in range(2):
            self.successResultOf(shared.registration.take("192.0.2.9"))
        self.assertEqual(self.successResultOf(shared.registration.take("192.0.2.9")), 30)


class CountingStore:
    """
    A store wrapper that counts takes and can pretend to be unreachable.
    """

    def __init__(self, store: SQLRateLimitStore) -> None:
        self.store = store
        self.takes = 0
        self.broken = False

    def take(self, *args: Any) -> Any:
        self.takes += 1
        if self.broken:
            from twisted.internet.defer import fail

            return fail(StoreUnavailable("down"))
        return self.store.take(*args)

    def refund(self, *args: Any) -> Any:
        return self.store.refund(*args)

    def purge_expired(self, now: float) -> Any:
        return self.store.purge_expired(now)


#: A process that takes from one shared bucket as fast as it can, on the
#: go line, and prints how many it was allowed.
TAKER = """
import json, sys
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred, DeferredList
from smeldr_oauth.db import open_database
from smeldr_oauth.oauth.ratelimit import SharedRateLimiter
from smeldr_oauth.store.ratelimits import SQLRateLimitStore

database = open_database(sys.argv[1], reactor, threads=4)
limiter = SharedRateLimiter(SQLRateLimitStore(database), "registration", reactor, int(sys.argv[2]), window=3600)

async def main():
    await limiter.take("warm-up-" + sys.argv[3])
    print("ready", flush=True)
    await ensureDeferred(wait())
    results = await DeferredList([limiter.take("192.0.2.1") for _ in range(int(sys.argv[2]))])
    print(json.dumps(sum(1 for ok, r in results if ok and r is None)), flush=True)

def wait():
    from twisted.internet.defer import Deferred
    d = Deferred()
    reactor.addReader(Stdin(d))
    return d

class Stdin:
    def __init__(self, d): self.d = d
    def fileno(self): return 0
    def doRead(self):
        reactor.removeReader(self)
        self.d.callback(None)
    def logPrefix(self): return "stdin"
    def connectionLost(self, reason): pass

def run():
    d = ensureDeferred(main())
    d.addBoth(lambda r: (database.close(), reactor.stop(), r)[-1])

reactor.callWhenRunning(run)
reactor.run()
"""


class ProcessesTests(TestCase):
    """
    Real processes, each with its own pool, spending from one bucket at
    once: together they are allowed the capacity, exactly.
    """

    PROCESSES = 3
    CAPACITY = 20

    @inlineCallbacks
    def test_processes_share_the_limit(self) -> Any:
        url = postgres.database_url(self)
        env = dict(os.environ, PYTHONPATH=CHECKOUT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        takers = []
        for n in range(self.PROCESSES):
            protocol = _Racer()
            transport = global_reactor.spawnProcess(
                protocol, sys.executable, [sys.executable, "-c", TAKER, url, str(self.CAPACITY), str(n)], env=env
            )
            takers.append((protocol, transport))
        yield DeferredList([p.ready for p, _ in takers], fireOnOneErrback=True)
        for _, transport in takers:
            transport.write(b"go\n")
        codes = yield DeferredList([p.ended for p, _ in takers])
        self.assertEqual([code for _, code in codes], [0] * self.PROCESSES, [p.errors for p, _ in takers])
        allowed = [json.loads(p.output.split(b"ready\n", 1)[1]) for p, _ in takers]
        self.assertEqual(sum(allowed), self.CAPACITY, allowed)


class CountedPool:
    """
    L{tests.test_db_database.HeldThreadPool} that counts the hand-offs to
    its threads (C{callInThreadWithCallback}, the pool's interface).
    """

    def __init__(self) -> None:
        from tests.test_db_database import HeldThreadPool

        self.held = HeldThreadPool()
        self.handed = 0

    def start(self) -> None:
        pass

    def stop(self) -> None:
        self.held.stop()

    def callInThreadWithCallback(self, onResult: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        self.handed += 1
        self.held.callInThreadWithCallback(onResult, f, *args, **kwargs)


class PostgresCarriedSpendTests(SynchronousTestCase):
    """
    The refresh grant on PostgreSQL with shared token limits (the server's
    setting): the request's rate-limit spend rides in its redemption's
    hand-off to a database thread (L{smeldr_oauth.db.database.Before}),
    and refuses exactly as before, across processes.
    """

    def setUp(self) -> None:
        from smeldr_oauth.db.database import Database
        from smeldr_oauth.db.postgres import PostgresEngine
        from smeldr_oauth.oauth.config import Config
        from smeldr_oauth.oauth.model import Client
        from smeldr_oauth.oauth.server import OAuthServer
        from smeldr_oauth.store.sql import SQLStore
        from tests.test_store_memory import T0, access, make_code, make_grant, refresh

        self.url = postgres.database_url(self)
        self.clock = InlineReactor()
        self.clock.advance(T0)
        self.pool = CountedPool()
        database = Database(PostgresEngine(self.url), self.clock, threads=2, threadpool=self.pool, group_commit=True)
        self.store = SQLStore(database)
        self.addCleanup(self.store.close)
        self.settle(self.store.ready)
        self.rates = SQLRateLimitStore(database, self.clock)
        self.settle(database.ensure(RATE_LIMITS_SCHEMA))
        self.config = Config(
            issuer="https://example.com",
            resource="https://example.com/mcp",
            verify_bearer=lambda t: None,
            token_requests_per_minute_per_client=2,
            refresh_grace=0,
        )
        self.server = OAuthServer(
            self.config, self.store, self.clock, limits=Limits.from_config(self.config, self.clock, store=self.rates)
        )
        self.settle(self.store.save_client(Client(client_id="client-1", client_name=None, redirect_uris=())))
        for name in ("g1", "g2", "g3"):
            self.settle(self.store.create_grant(make_grant(name), make_code(f"code-{name}", name)))
            self.settle(self.store.add_tokens(name, access(f"a-{name}"), refresh(f"r-{name}")))
        # The client known to this process, as after its first request.
        self.settle(self.server.resolve_client("client-1"))

    def drain(self) -> None:
        """
        Run the reactor's turns and the pool's work until nothing is left.
        """
        for _ in range(20):
            self.clock.advance(0)
            while self.pool.held.queued:
                self.pool.held.run_next()

    def settle(self, d: Any) -> Any:
        self.drain()
        return self.successResultOf(d)

    def token(self, refresh_token: str, address: str = "192.0.2.1", **extra: str) -> Any:
        from twisted.internet.defer import Deferred

        params = {"grant_type": ["refresh_token"], "refresh_token": [refresh_token], "client_id": ["client-1"]}
        params.update({key: [value] for key, value in extra.items()})
        d = Deferred.fromCoroutine(self.server.tokens.token(params, None, address))
        self.drain()
        return d

    def spent(self) -> list[Any]:
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as other:
            return [tuple(row) for row in other.execute("SELECT name, tokens FROM rate_limits ORDER BY name")]

    def test_one_hand_off(self) -> None:
        """
        A refresh takes one hand-off to a database thread, its spend and
        its redemption; both buckets are spent in the shared table.
        """
        self.pool.handed = 0
        body = self.successResultOf(self.token("secret-r-g1"))
        self.assertIn("access_token", body)
        self.assertEqual(self.pool.handed, 1)
        self.assertEqual(self.spent(), [("token_address", 599.0), ("token_client", 1.0)])

    def test_batch_of_refreshes_one_hand_off(self) -> None:
        """
        Refreshes of one turn: one hand-off for the batch (it was two: the
        spends' batch, then the refreshes').
        """
        self.pool.handed = 0
        calls = []
        from twisted.internet.defer import Deferred

        for name, address in (("g1", "192.0.2.1"), ("g2", "192.0.2.2")):
            params = {"grant_type": ["refresh_token"], "refresh_token": [f"secret-r-{name}"], "client_id": ["client-1"]}
            calls.append(Deferred.fromCoroutine(self.server.tokens.token(params, None, address)))
        self.clock.advance(0)
        self.assertEqual(self.pool.handed, 1)
        self.drain()
        for d in calls:
            self.assertIn("access_token", self.successResultOf(d))
        self.assertEqual(self.pool.handed, 1)

    def test_refused_across_processes(self) -> None:
        """
        A bucket drained by another process: the carried spend is refused
        by the store (429, logged as a refusal), and the refresh token is
        not redeemed: it still works once the bucket has refilled.
        """
        other = Limits.from_config(self.config, self.clock, store=self.rates)
        for _ in range(2):
            self.assertEqual(self.settle(other.token_per_client.take("client-1")), None)
        self.pool.handed = 0
        with capturedLogs() as events:
            failure = self.failureResultOf(self.token("secret-r-g1"), RateLimited)
        self.assertEqual(self.pool.handed, 1)
        self.assertEqual(failure.value.retry_after, 30)
        self.assertEqual([e.get("smeldr_event") for e in events], ["rate_limited"])
        self.clock.advance(31)
        self.assertIn("access_token", self.successResultOf(self.token("secret-r-g1")))

    def test_refusal_before_a_bad_request(self) -> None:
        """
        A request that fails a check (an unknown scope) goes the usual way:
        its spend first, so a refused one is a 429, not the check's 400.
        """
        from smeldr_oauth.oauth.errors import OAuthError

        other = Limits.from_config(self.config, self.clock, store=self.rates)
        for _ in range(2):
            self.settle(other.token_per_client.take("client-1"))
        self.failureResultOf(self.token("secret-r-g1", scope="nonsense"), RateLimited)
        self.clock.advance(31)
        self.failureResultOf(self.token("secret-r-g1", scope="nonsense"), OAuthError)
        self.clock.advance(31)
        self.assertIn("access_token", self.successResultOf(self.token("secret-r-g1")))

    def test_redemption_refused_after_the_spend(self) -> None:
        """
        A refresh token used twice: the second request's spend is taken,
        then its redemption refuses it as before (the grant revoked).
        """
        from smeldr_oauth.oauth.errors import OAuthError

        self.successResultOf(self.token("secret-r-g3"))
        failure = self.failureResultOf(self.token("secret-r-g3", address="192.0.2.9"), OAuthError)
        self.assertEqual(failure.value.error, "invalid_grant")
        self.assertEqual(self.spent(), [("token_address", 599.0), ("token_address", 599.0), ("token_client", 0.0)])

    def batch(self, *tokens: tuple[str, str]) -> list[Any]:
        """
        Token requests of one turn (a refresh token and an address each),
        run as one batch.
        """
        from twisted.internet.defer import Deferred

        calls = []
        for token, address in tokens:
            params = {"grant_type": ["refresh_token"], "refresh_token": [token], "client_id": ["client-1"]}
            calls.append(Deferred.fromCoroutine(self.server.tokens.token(params, None, address)))
        self.drain()
        return calls

    def redeemed_once(self, calls: Optional[list[Any]] = None) -> None:
        """
        Refreshes of g1 and g2 in one batch (two addresses; C{calls}, or
        made now): both redeemed, each request's buckets spent once.
        """
        if calls is None:
            calls = self.batch(("secret-r-g1", "192.0.2.1"), ("secret-r-g2", "192.0.2.2"))
        for d in calls:
            self.assertIn("access_token", self.successResultOf(d))
        self.assertEqual(self.spent(), [("token_address", 599.0), ("token_address", 599.0), ("token_client", 0.0)])
        self.assertEqual(self.unused(), ["g3"])

    def unused(self) -> list[str]:
        """
        The grants whose first refresh token is still unspent.
        """
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as other:
            rows = other.execute(
                "SELECT grant_id FROM refresh_tokens WHERE generation = 0 AND used_at IS NULL ORDER BY grant_id"
            )
            return [row[0] for row in rows]

    def test_batch_two_round_trips(self) -> None:
        """
        A batch of refreshes carrying their spends is two round trips: the
        spends, their C{COMMIT}, C{BEGIN} and the facts in one simple query
        (C{docs/performance.md}, round thirteen; it was three, the spends
        alone first), then the writes with the C{COMMIT}.
        """
        from tests.test_store_postgres import round_trips

        sent = round_trips(self)
        calls = self.batch(("secret-r-g1", "192.0.2.1"), ("secret-r-g2", "192.0.2.2"))
        self.assertEqual(len(sent), 2, sent)
        self.redeemed_once(calls)

    def test_older_way_without_kept_results(self) -> None:
        """
        With a psycopg whose C{ClientCursor} has no C{_check_results} (where
        the simple cursor keeps what ran before a failing statement), the
        batch does not carry its spends (a failure after their C{COMMIT}
        would look like theirs, and they would run twice): three round
        trips, each request spent once.
        """
        import psycopg

        from tests.test_store_postgres import round_trips

        from smeldr_oauth.db.postgres import _simple_cursor_class

        # The simple cursor the writes use is made first, from the real
        # class; only the check sees a psycopg without the method.
        _simple_cursor_class()
        self.patch(psycopg, "ClientCursor", type("ClientCursor", (), {}))
        sent = round_trips(self)
        calls = self.batch(("secret-r-g1", "192.0.2.1"), ("secret-r-g2", "192.0.2.2"))
        self.assertEqual(len(sent), 3, sent)
        self.redeemed_once(calls)

    def test_refused_in_a_batch(self) -> None:
        """
        A batch whose second spend is refused (the client's bucket holds
        one): that request is a 429, logged as a refusal, and nothing of
        its refresh is written (its refresh token still unspent, usable
        once the bucket refills); the other is redeemed.  The facts were
        asked for both: the refused one's transaction is rolled back and
        the other runs as a batch of its own.
        """
        other = Limits.from_config(self.config, self.clock, store=self.rates)
        self.assertIsNone(self.settle(other.token_per_client.take("client-1")))
        with capturedLogs() as events:
            first, second = self.batch(("secret-r-g1", "192.0.2.1"), ("secret-r-g2", "192.0.2.2"))
        self.assertIn("access_token", self.successResultOf(first))
        failure = self.failureResultOf(second, RateLimited)
        self.assertEqual(failure.value.retry_after, 30)
        self.assertEqual([e.get("smeldr_event") for e in events].count("rate_limited"), 1)
        self.assertEqual(self.unused(), ["g2", "g3"])
        self.clock.advance(31)
        self.assertIn("access_token", self.successResultOf(self.token("secret-r-g2")))
        self.assertEqual(self.unused(), ["g3"])

    def test_spends_failing_told_apart(self) -> None:
        """
        The spends' statement failing stops its query string before the
        C{BEGIN}: nothing of it stands, and the batch goes the old way, the
        spends alone (now working), then the refreshes: each spent once.
        """
        import smeldr_oauth.store.ratelimits as module

        real = module._take_both_many_statement
        failing = [True]

        def statement(calls: Any) -> Any:
            sql, params = real(calls)
            if failing:
                failing.clear()
                return sql.replace("smeldr_take_both_many", "smeldr_no_such_function"), params
            return sql, params

        self.patch(module, "_take_both_many_statement", statement)
        self.redeemed_once()
        self.assertFalse(failing)

    def test_facts_failing_after_the_spends(self) -> None:
        """
        A failure after the C{BEGIN} (the facts' statement, here made to
        fail) leaves the spends committed and their answers known: the
        batch is abandoned and each refresh runs alone, as when its writes
        fail; the spends are not run again (twice would have emptied the
        client's bucket of two and refused both).
        """
        from smeldr_oauth.db.database import Transaction

        real = Transaction._execute_simple
        failing = [True]

        def facts_fail(txn: Any, sql: str, *args: Any) -> Any:
            if failing and "smeldr_refresh_facts_many" in sql:
                failing.clear()
                sql = "SELECT 1 / 0"
                args = ((), *args[1:])
            return real(txn, sql, *args)

        self.patch(Transaction, "_execute_simple", facts_fail)
        self.redeemed_once()
        self.assertFalse(failing)

    def test_connection_lost_with_the_spends(self) -> None:
        """
        A connection lost in the round trip that carries the spends (here:
        after the server ran all of it) may or may not have committed
        them: every request of the batch is L{StoreUnavailable}, nothing of
        the refreshes is written, and nothing runs again (the spends
        counted once: twice would have refused both).
        """
        import psycopg

        execute = psycopg.Cursor.execute
        losing = [True]

        def lost(cursor: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
            result = execute(cursor, query, *args, **kwargs)
            if losing and "smeldr_take_both_many" in str(query):
                losing.clear()
                cursor.connection.close()
                raise psycopg.OperationalError("the connection went away")
            return result

        self.patch(psycopg.Cursor, "execute", lost)
        calls = self.batch(("secret-r-g1", "192.0.2.1"), ("secret-r-g2", "192.0.2.2"))
        self.assertFalse(losing)
        for d in calls:
            self.failureResultOf(d, StoreUnavailable)
        self.assertEqual(self.spent(), [("token_address", 599.0), ("token_address", 599.0), ("token_client", 0.0)])
        self.assertEqual(self.unused(), ["g1", "g2", "g3"])

    def test_connection_ended_while_idle(self) -> None:
        """
        A pooled connection the server ended while it was idle (a restart,
        here C{pg_terminate_backend}) does not carry the spends (a lost
        carrying round trip would fail the batch): the batch goes the
        older way, which replaces the connection without failing a call.
        """
        import psycopg

        database = self.store.database
        pids = [connection.info.backend_pid for connection in database.pool.connections.values()]
        self.assertTrue(pids)
        with psycopg.connect(self.url, autocommit=True) as other:
            other.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", (pids,))
            # Until the backends are gone (they say so to their clients first).
            for _ in range(10_000):
                if not other.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", (pids,)).fetchone()[0]:
                    break
        self.redeemed_once()
