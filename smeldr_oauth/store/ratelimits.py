# -*- test-case-name: tests.test_store_ratelimits -*-
"""
L{IRateLimitStore} in SQL: the token buckets of
L{smeldr_oauth.oauth.ratelimit.SharedRateLimiter}, in the database every
process shares, so that N processes allow what one would.

One row per bucket (limiter name, hashed key).  Spending is one
statement, an C{INSERT ... ON CONFLICT DO UPDATE} that refills the bucket
for the time passed, takes an event if there is one, and says which it
did (C{RETURNING}): atomic on the row, with no read-then-write between
processes, whatever the isolation level.  A missing row is a full bucket,
so rows that have refilled completely are deleted in batches
(L{SQLRateLimitStore.purge_expired}) and the table stays the size of the
set of keys seen within one window.

On PostgreSQL the table is C{UNLOGGED} (migration 2): a statement that
writes only unlogged rows writes no WAL, so its commit does not wait for a
WAL flush.  Without that, every token request spent the one bucket of its
client address (behind a balancer, or in the bench, one address for
everyone) and held that row's lock until the flush: token requests of one
address went one flush at a time (the bench's refresh row: about 145/s on
PostgreSQL against about 450/s on SQLite, C{wait} in psycopg half of the
profile, the bucket statements more of it than the refresh itself).  What
that costs: a PostgreSQL crash (not a clean restart) empties the table,
that is refills every bucket, and standbys do not carry it, so a failover
does the same; both let a client have at most one window's worth more.

With group commit (the server's PostgreSQL database), the C{take_both}
calls of token requests that arrive while the database threads are busy
gather into one call of C{smeldr_take_both_many} (migration 3): one
statement, one thread hand-off, each request's buckets taken as its own
statement would, one after another in arrival order, after the batch's
existing buckets are locked in one global order (L{_take_both_many}: two
batches cannot deadlock on them).  Since migration 5 the function writes
each bucket once a batch, however many of its requests take it, and
finds every bucket by primary key in any plan PostgreSQL keeps for it
(L{smeldr_oauth.store.ratelimit_statements._TAKE_BOTH_MANY_IN_MEMORY}).

Written once for both engines (C{CASE} rather than C{LEAST}/C{GREATEST}
or C{MIN}/C{MAX}, which only one of them has as scalar functions); the
server uses it on PostgreSQL, where several processes share a database.
Times are the callers' clocks, as POSIX seconds.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from zope.interface import implementer

from smeldr_oauth.db.arrays import number_array, text_array
from smeldr_oauth.db.database import Before, Database, Transaction
from smeldr_oauth.db.migrations import Migration, Schema
from smeldr_oauth.oauth.ratelimit import IRateLimitStore
from smeldr_oauth.oauth.ratelimit_both import both_spent
from smeldr_oauth.store.common import start_purging
from smeldr_oauth.store.ratelimit_statements import (
    _REFUND,
    _TAKE,
    _TAKE_BOTH,
    _TAKE_BOTH_MANY_FUNCTION,
    _TAKE_BOTH_MANY_IN_MEMORY,
)

#: Buckets deleted per purge transaction.
PURGE_BATCH = 1000
#: Seconds between purges: a bucket is deletable one window (a minute)
#: after its last use, so a table of keys seen in the last few minutes.
PURGE_INTERVAL = 300.0


RATE_LIMITS_SCHEMA = Schema(
    "rate_limits",
    (
        Migration(
            1,
            (
                """
                CREATE TABLE rate_limits (
                    name TEXT NOT NULL,
                    key TEXT NOT NULL,
                    tokens DOUBLE PRECISION NOT NULL,
                    stamp DOUBLE PRECISION NOT NULL,
                    capacity DOUBLE PRECISION NOT NULL,
                    rate DOUBLE PRECISION NOT NULL,
                    full_at DOUBLE PRECISION NOT NULL,
                    taken INTEGER NOT NULL,
                    PRIMARY KEY (name, key)
                )
                """,
                "CREATE INDEX rate_limits_full_at ON rate_limits (full_at)",
            ),
        ),
        # PostgreSQL: no WAL for the buckets (see the module docstring).
        Migration(2, sqlite=(), postgresql=("ALTER TABLE rate_limits SET UNLOGGED",)),
        # PostgreSQL: many take_both in one statement (group commit's
        # batches; see _take_both_many), the batch's buckets locked in one
        # order first.  The function's statements are _TAKE as it is now:
        # once released, a change to _TAKE is a new migration replacing
        # the function.
        Migration(3, sqlite=(), postgresql=(_TAKE_BOTH_MANY_FUNCTION,)),
        # PostgreSQL: every take moves full_at, so while it was indexed no
        # take was a HOT update: each added an entry to both indexes, which
        # the next takes of that (hot) bucket walked past until vacuum
        # (the bench's refresh row: 18,057 updates, 1,015 HOT, 17,048 dead
        # rows in a table of four).  Without the index the purge reads the
        # table (one row per caller seen in the last few minutes, once
        # every PURGE_INTERVAL); the free space left on each page keeps a
        # bucket's new version on its page.  SQLite keeps the index.
        Migration(
            4,
            sqlite=(),
            postgresql=("DROP INDEX rate_limits_full_at", "ALTER TABLE rate_limits SET (fillfactor = 50)"),
        ),
        # PostgreSQL: smeldr_take_both_many writes each bucket once a batch
        # (see _TAKE_BOTH_MANY_IN_MEMORY).
        Migration(5, sqlite=(), postgresql=(_TAKE_BOTH_MANY_IN_MEMORY,)),
    ),
)

def _take(txn: Transaction, name: str, key: str, capacity: float, rate: float, now: float) -> tuple[bool, float]:
    row = txn.execute(_TAKE, _take_params((name, key, capacity, rate), now)).fetchone()
    return bool(row[0]), float(row[1])


#: A bucket as L{SQLRateLimitStore.take_both} takes it: limiter name, key,
#: capacity, rate.
Bucket = tuple[str, str, float, float]


def _take_params(bucket: Bucket, now: float) -> tuple[object, ...]:
    name, key, capacity, rate = bucket
    return (name, key, capacity - 1.0, now, capacity, rate, now + 1.0 / rate)


def _take_both(
    txn: Transaction, first: Bucket, second: Bucket, now: float
) -> tuple[tuple[bool, float], Optional[tuple[bool, float]]]:
    if txn.engine.single_writer:
        # SQLite (one process, calls in turn): the two statements.
        taken = _take(txn, *first, now)
        return taken, (_take(txn, *second, now) if taken[0] else None)
    row = txn.execute(_TAKE_BOTH, (*_take_params(first, now), *_take_params(second, now))).fetchone()
    if row[2] is None:
        return (bool(row[0]), float(row[1])), None
    return (bool(row[0]), float(row[1])), (bool(row[2]), float(row[3]))


def _take_both_many(
    txn: Transaction, calls: list[tuple[Bucket, Bucket, float]]
) -> list[tuple[tuple[bool, float], Optional[tuple[bool, float]]]]:
    """
    L{_take_both} for each of C{calls} in turn, in one statement on
    PostgreSQL.

    Locks: the statement is one transaction, and each take keeps its
    row's lock until it ends.  Taken in arrival order, batch A = [(X, c1),
    (Y, c2)] and batch B = [(Y, c3), (X, c4)] (two pool threads, or two
    processes) would lock X and Y in opposite orders: a deadlock, found
    only after C{deadlock_timeout} (1 s by default) and run again, every
    token request of both batches stalled meanwhile.  So
    C{smeldr_take_both_many} first locks every existing bucket the batch
    will touch in one global order: all first buckets by (name, key), then
    all second buckets by (name, key).  A single L{_take_both} locks its
    first bucket then its second, which is that order too, because no
    limiter is ever both: the one caller,
    L{smeldr_oauth.oauth.ratelimit.SharedRateLimiter.take_with}
    through C{spend_both}, takes C{token_address} first and
    C{token_client} second.  (Were one limiter used in both roles, no
    order of roles would do: a single take_both of (N, k1), (N, k2) and
    another of (N, k2), (N, k1) already lock in opposite orders; only
    ordering every call's two buckets by (name, key) would.)  A bucket
    seen for the first time has no row to lock beforehand: its C{INSERT}
    still happens in arrival order, so two batches each creating a key the
    other then touches can still deadlock; that needs two new keys within
    the same moment, rare, and PostgreSQL detects it and the call is run
    again (L{smeldr_oauth.db.database}).
    """
    if txn.engine.single_writer:
        return [_take_both(txn, *call) for call in calls]
    return _take_both_many_results(txn.execute(*_take_both_many_statement(calls)).fetchall())


#: How each of L{_take_both_many_statement}'s columns is sent, in its
#: order: the two buckets' name, key, capacity and rate, then the time.
_TAKE_BOTH_MANY_ARRAYS = (text_array, text_array, number_array, number_array) * 2 + (number_array,)


def _take_both_many_statement(calls: list[tuple[Bucket, Bucket, float]]) -> tuple[str, list[object]]:
    """
    L{_take_both_many}'s statement on PostgreSQL, its parameters array
    literals (L{smeldr_oauth.db.arrays}), which the simple protocol also
    takes (a batch of refreshes sends it in its C{BEGIN}'s round trip:
    L{Before.statement}).
    """
    columns: list[list[object]] = [[] for _ in range(9)]
    for first, second, now in calls:
        for index, value in enumerate((*first, *second, now)):
            columns[index].append(value)
    return (
        "SELECT * FROM smeldr_take_both_many(?::text[], ?::text[], ?::float8[], ?::float8[],"
        " ?::text[], ?::text[], ?::float8[], ?::float8[], ?::float8[])",
        [array(column) for array, column in zip(_TAKE_BOTH_MANY_ARRAYS, columns)],
    )


def _take_both_many_results(rows: list[Any]) -> list[tuple[tuple[bool, float], Optional[tuple[bool, float]]]]:
    """
    L{_take_both_many_statement}'s rows as L{_take_both}'s results.
    """
    # Unpacked, not indexed: a row's positions through Row.__getitem__
    # are a Python call each.
    return [
        ((bool(first_taken), float(first_tokens)), None if second_taken is None else (bool(second_taken), float(second_tokens)))
        for first_taken, first_tokens, second_taken, second_tokens in rows
    ]


def _refund(txn: Transaction, name: str, key: str, now: float) -> None:
    # _REFUNDED (with its level, twice) appears in tokens and in full_at;
    # then the two stamps: the parameters in statement order.
    level_params = (now, now, now, now)
    txn.execute(
        _REFUND,
        (*level_params, *level_params, now, now, *level_params, *level_params, now, now, name, key),
    )


def _purge(txn: Transaction, now: float, limit: int) -> int:
    txn.execute(
        "DELETE FROM rate_limits WHERE (name, key) IN"
        " (SELECT name, key FROM rate_limits WHERE full_at <= ? LIMIT ?)",
        (now, limit),
    )
    return txn.rowcount


@implementer(IRateLimitStore)
class SQLRateLimitStore:
    """
    Token buckets in a L{Database} (its C{rate_limits} table).

    @ivar database: shared with the other stores: it is not closed here.
    """

    def __init__(self, database: Database, clock: Optional[IReactorTime] = None) -> None:
        """
        @param clock: the default clock of L{start_purging}; the database's
            reactor when C{None}.
        """
        self.database = database
        self._clock: IReactorTime = clock if clock is not None else database.reactor

    # take and refund are one statement each, atomic on its own in the
    # connections' autocommit mode: run outside an explicit transaction
    # (Database.read), one round trip instead of BEGIN, statement, COMMIT.
    # Should a connection die after the server ran the statement, the call
    # is run again on a fresh one: an event spent twice, never one lost.

    def take(self, name: str, key: str, capacity: float, rate: float, now: float) -> "Deferred[tuple[bool, float]]":
        return self.database.read(
            RATE_LIMITS_SCHEMA, _take, name, key, capacity, rate, now, name="rate_limits.take"
        )

    def take_both(
        self, first: Bucket, second: Bucket, now: float
    ) -> "Deferred[tuple[tuple[bool, float], Optional[tuple[bool, float]]]]":
        """
        L{take} from C{first} and, if it was spent, from C{second} (another
        bucket), in one statement: a token request spends its address's and
        its client's buckets in one round trip and one trip to a database
        thread, not two.

        @return: C{first}'s answer, and C{second}'s (C{None} when it was
            not asked).
        """
        return self.database.read(
            RATE_LIMITS_SCHEMA,
            _take_both,
            first,
            second,
            now,
            name="rate_limits.take_both",
            together=_take_both_many,
        )

    def take_both_before(self, first: Bucket, second: Bucket, now: float) -> Before:
        """
        L{take_both} as a read that a grouped write of the same database
        carries (L{Before}): the same statement, gathered with the batch's
        other spends and committed on the write's pool thread just before
        the write (on PostgreSQL in the round trip of the batch's C{BEGIN},
        L{_take_both_many_statement}), which runs only when both buckets
        were spent.
        """
        return Before(
            RATE_LIMITS_SCHEMA,
            _take_both,
            (first, second, now),
            _take_both_many,
            "rate_limits.take_both",
            both_spent,
            _take_both_many_statement,
            _take_both_many_results,
        )

    def refund(self, name: str, key: str, capacity: float, rate: float, now: float) -> "Deferred[None]":
        return self.database.read(RATE_LIMITS_SCHEMA, _refund, name, key, now, name="rate_limits.refund")

    def purge_expired(self, now: float) -> "Deferred[int]":
        return Deferred.fromCoroutine(self._purge_all(now))

    async def _purge_all(self, now: float) -> int:
        removed = 0
        while True:
            count = await self.database.write(RATE_LIMITS_SCHEMA, _purge, now, PURGE_BATCH)
            removed += count
            if count < PURGE_BATCH:
                return removed

    def start_purging(self, clock: Optional[IReactorTime] = None, interval: float = PURGE_INTERVAL) -> LoopingCall:
        """
        Delete full buckets now and every C{interval} seconds: see
        L{smeldr_oauth.store.common.start_purging}.
        """
        return start_purging(self, clock if clock is not None else self._clock, interval, what="full rate-limit buckets")
