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
(L{_TAKE_BOTH_MANY_IN_MEMORY}).

Written once for both engines (C{CASE} rather than C{LEAST}/C{GREATEST}
or C{MIN}/C{MAX}, which only one of them has as scalar functions); the
server uses it on PostgreSQL, where several processes share a database.
Times are the callers' clocks, as POSIX seconds.
"""

from __future__ import annotations

import math
import re
from typing import Optional

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from zope.interface import implementer

from smeldr_oauth.db.database import Database, Transaction
from smeldr_oauth.db.migrations import Migration, Schema
from smeldr_oauth.oauth.ratelimit import IRateLimitStore
from smeldr_oauth.store.common import start_purging

#: Buckets deleted per purge transaction.
PURGE_BATCH = 1000
#: Seconds between purges: a bucket is deletable one window (a minute)
#: after its last use, so a table of keys seen in the last few minutes.
PURGE_INTERVAL = 300.0



def _level(row: str, now: str) -> str:
    """
    The SQL expression of a bucket's level at C{now}: refilled at its rate
    since its stamp (never for time before the stamp: clocks of different
    machines differ a little), up to its capacity.
    """
    elapsed = f"(CASE WHEN {now} > {row}.stamp THEN {now} - {row}.stamp ELSE 0 END)"
    refilled = f"({row}.tokens + {elapsed} * {row}.rate)"
    return f"(CASE WHEN {refilled} >= {row}.capacity THEN {row}.capacity ELSE {refilled} END)"


def _later(row: str, now: str) -> str:
    return f"(CASE WHEN {now} > {row}.stamp THEN {now} ELSE {row}.stamp END)"


_LEVEL = _level("b", "excluded.stamp")
_SPENT = f"(CASE WHEN {_LEVEL} >= 1 THEN 1 ELSE 0 END)"

#: Take one event: a new bucket is a full one less one; an existing one is
#: refilled, then spent from if it holds an event.  C{taken} says which.
_TAKE = (
    "INSERT INTO rate_limits AS b (name, key, tokens, stamp, capacity, rate, full_at, taken)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, 1)"
    " ON CONFLICT (name, key) DO UPDATE SET"
    f" taken = {_SPENT},"
    f" tokens = {_LEVEL} - {_SPENT},"
    f" full_at = {_later('b', 'excluded.stamp')}"
    f" + (excluded.capacity - ({_LEVEL} - {_SPENT})) / excluded.rate,"
    f" stamp = {_later('b', 'excluded.stamp')},"
    " capacity = excluded.capacity,"
    " rate = excluded.rate"
    " RETURNING taken, tokens"
)

#: Two takes in one statement, the second only if the first was spent
#: (PostgreSQL: an C{INSERT} in a C{WITH} can read the C{RETURNING} rows of
#: the one before).  The two buckets must differ.
_VALUES = " VALUES (?, ?, ?, ?, ?, ?, ?, 1)"
_TAKE_BOTH = (
    f"WITH first_take AS ({_TAKE}),"
    f" second_take AS ({_TAKE.replace(_VALUES, ' SELECT ?, ?, ?, ?, ?, ?, ?, 1 FROM first_take WHERE taken = 1')})"
    " SELECT f.taken, f.tokens, s.taken, s.tokens FROM first_take f LEFT JOIN second_take s ON TRUE"
)

def _take_in_function(prefix: str) -> str:
    """
    L{_TAKE} as a statement of C{smeldr_take_both_many}: the bucket from
    its C{prefix}ed arrays' element C{i}, the answer into its variables.
    """
    values = (
        f" VALUES ({prefix}_names[i], {prefix}_keys[i], {prefix}_capacities[i] - 1.0, nows[i],"
        f" {prefix}_capacities[i], {prefix}_rates[i], nows[i] + 1.0 / {prefix}_rates[i], 1)"
    )
    return _TAKE.replace(_VALUES, values) + f" INTO {prefix}_taken, {prefix}_tokens"


#: PostgreSQL: the take_both of many token requests in one statement (one
#: round trip, one thread hand-off), each as its own take_both would do
#: it, one after another in the given order, after the batch's existing
#: buckets are locked in one global order (see _take_both_many).
_TAKE_BOTH_MANY_FUNCTION = f"""
CREATE FUNCTION smeldr_take_both_many(
    first_names TEXT[], first_keys TEXT[], first_capacities DOUBLE PRECISION[], first_rates DOUBLE PRECISION[],
    second_names TEXT[], second_keys TEXT[], second_capacities DOUBLE PRECISION[], second_rates DOUBLE PRECISION[],
    nows DOUBLE PRECISION[]
)
RETURNS TABLE (
    first_taken INTEGER, first_tokens DOUBLE PRECISION, second_taken INTEGER, second_tokens DOUBLE PRECISION
)
LANGUAGE plpgsql VOLATILE AS $body$
BEGIN
    -- Lock the batch's existing buckets first, in the one order every
    -- caller uses (see _take_both_many): first buckets, then second ones,
    -- each by (name, key).  LockRows runs above the Sort, so the rows are
    -- locked in that order.
    PERFORM 1 FROM rate_limits b WHERE (b.name, b.key) IN (SELECT * FROM unnest(first_names, first_keys))
        ORDER BY b.name, b.key FOR UPDATE;
    PERFORM 1 FROM rate_limits b WHERE (b.name, b.key) IN (SELECT * FROM unnest(second_names, second_keys))
        ORDER BY b.name, b.key FOR UPDATE;
    FOR i IN 1 .. COALESCE(array_length(nows, 1), 0) LOOP
        second_taken := NULL;
        second_tokens := NULL;
        {_take_in_function("first")};
        IF first_taken = 1 THEN
            {_take_in_function("second")};
        END IF;
        RETURN NEXT;
    END LOOP;
END
$body$
"""


def _take_in_memory(prefix: str) -> str:
    """
    One take of C{smeldr_take_both_many}'s second version (migration 5):
    the bucket from its C{prefix}ed arrays' element C{i}.  A bucket the
    batch has not met yet is taken by L{_TAKE} itself (it may be new, or
    made meanwhile by another process), its row as the statement left it
    then kept in the function's arrays; a bucket met before (a busy
    address's, a busy client's: locked since) is taken in those arrays by
    L{_TAKE}'s own expressions, in the same order of float operations, so
    each answer and the row left behind are those of the statements one
    after another.  The answer goes into C{prefix_taken} and
    C{prefix_tokens}.
    """
    values = (
        f" VALUES ({prefix}_names[i], {prefix}_keys[i], {prefix}_capacities[i] - 1.0, nows[i],"
        f" {prefix}_capacities[i], {prefix}_rates[i], nows[i] + 1.0 / {prefix}_rates[i], 1)"
    )
    take = _TAKE.replace(_VALUES, values).replace(
        " RETURNING taken, tokens", " RETURNING taken, tokens, stamp, capacity, rate, full_at"
    )
    return f"""
        bucket := length({prefix}_names[i]) || ':' || {prefix}_names[i] || {prefix}_keys[i];
        at := array_position(ids, bucket);
        IF at IS NULL THEN
            {take} INTO {prefix}_taken, {prefix}_tokens, r_stamp, r_capacity, r_rate, r_full_at;
            ids := ids || bucket;
            s_names := s_names || {prefix}_names[i];
            s_keys := s_keys || {prefix}_keys[i];
            s_tokens := s_tokens || {prefix}_tokens;
            s_stamps := s_stamps || r_stamp;
            s_capacities := s_capacities || r_capacity;
            s_rates := s_rates || r_rate;
            s_full_ats := s_full_ats || r_full_at;
            s_taken := s_taken || {prefix}_taken;
            s_dirty := s_dirty || FALSE;
        ELSE
            -- The INSERT's own values, errors and all (a rate of 0).
            unused := {prefix}_capacities[i] - 1.0;
            unused := nows[i] + 1.0 / {prefix}_rates[i];
            later := (CASE WHEN nows[i] > s_stamps[at] THEN nows[i] ELSE s_stamps[at] END);
            level := (s_tokens[at] + (CASE WHEN nows[i] > s_stamps[at] THEN nows[i] - s_stamps[at] ELSE 0 END) * s_rates[at]);
            level := (CASE WHEN level >= s_capacities[at] THEN s_capacities[at] ELSE level END);
            spent := (CASE WHEN level >= 1 THEN 1 ELSE 0 END);
            s_taken[at] := spent;
            s_tokens[at] := level - spent;
            s_full_ats[at] := later + ({prefix}_capacities[i] - (level - spent)) / {prefix}_rates[i];
            s_stamps[at] := later;
            s_capacities[at] := {prefix}_capacities[i];
            s_rates[at] := {prefix}_rates[i];
            s_dirty[at] := TRUE;
            {prefix}_taken := spent;
            {prefix}_tokens := s_tokens[at];
        END IF;"""


_LOCK_AND_LOAD = """
    FOR wanted IN SELECT DISTINCT u.name, u.key FROM unnest({prefix}_names, {prefix}_keys) AS u(name, key)
        ORDER BY u.name, u.key
    LOOP
        bucket := length(wanted.name) || ':' || wanted.name || wanted.key;
        IF array_position(ids, bucket) IS NULL THEN
            SELECT b.tokens, b.stamp, b.capacity, b.rate, b.full_at, b.taken
                INTO r_tokens, r_stamp, r_capacity, r_rate, r_full_at, r_taken
                FROM rate_limits b WHERE b.name = wanted.name AND b.key = wanted.key FOR UPDATE;
            IF FOUND THEN
                ids := ids || bucket;
                s_names := s_names || wanted.name;
                s_keys := s_keys || wanted.key;
                s_tokens := s_tokens || r_tokens;
                s_stamps := s_stamps || r_stamp;
                s_capacities := s_capacities || r_capacity;
                s_rates := s_rates || r_rate;
                s_full_ats := s_full_ats || r_full_at;
                s_taken := s_taken || r_taken;
                s_dirty := s_dirty || FALSE;
            END IF;
        END IF;
    END LOOP;"""

#: PostgreSQL, rate-limits migration 5: smeldr_take_both_many with the
#: same arguments and answers, but each bucket written once a batch.  The
#: first version ran two INSERT ... ON CONFLICT statements a token request,
#: and behind one address (or in the bench, one client) every request of a
#: batch updated the same two rows again, each update a statement of its
#: own (36-43 us of backend CPU a request in batches of 11).  Now the
#: batch's existing buckets are locked in the same global order as before,
#: one look-up by primary key each, and read into arrays; each request is
#: decided there (_take_in_memory); the buckets it changed are written back
#: at the end, one UPDATE by primary key each (18-22 us a request).
_TAKE_BOTH_MANY_IN_MEMORY = f"""
CREATE OR REPLACE FUNCTION smeldr_take_both_many(
    first_names TEXT[], first_keys TEXT[], first_capacities DOUBLE PRECISION[], first_rates DOUBLE PRECISION[],
    second_names TEXT[], second_keys TEXT[], second_capacities DOUBLE PRECISION[], second_rates DOUBLE PRECISION[],
    nows DOUBLE PRECISION[]
)
RETURNS TABLE (
    first_taken INTEGER, first_tokens DOUBLE PRECISION, second_taken INTEGER, second_tokens DOUBLE PRECISION
)
LANGUAGE plpgsql VOLATILE
-- Its statements find one bucket each by its primary key.  PL/pgSQL keeps
-- a statement's plan for the session, after five calls a generic one made
-- from the table as the planner knew it: with a table of a few rows
-- analyzed, a sequential scan, kept while the table grows to one row per
-- caller of the last minute (migration 3's lock statements, which join
-- the arrays to the table, read 20,000 rows so: 2-4 ms a call).  Without
-- sequential scans a look-up by primary key is an index look-up in any
-- plan, generic or not, and nothing is planned again at each call.
SET enable_seqscan = off
AS $body$
DECLARE
    wanted RECORD;
    r_tokens DOUBLE PRECISION;
    r_taken INTEGER;
    bucket TEXT;
    at INTEGER;
    ids TEXT[] := '{{}}';
    s_names TEXT[] := '{{}}';
    s_keys TEXT[] := '{{}}';
    s_tokens DOUBLE PRECISION[] := '{{}}';
    s_stamps DOUBLE PRECISION[] := '{{}}';
    s_capacities DOUBLE PRECISION[] := '{{}}';
    s_rates DOUBLE PRECISION[] := '{{}}';
    s_full_ats DOUBLE PRECISION[] := '{{}}';
    s_taken INTEGER[] := '{{}}';
    s_dirty BOOLEAN[] := '{{}}';
    r_stamp DOUBLE PRECISION;
    r_capacity DOUBLE PRECISION;
    r_rate DOUBLE PRECISION;
    r_full_at DOUBLE PRECISION;
    later DOUBLE PRECISION;
    level DOUBLE PRECISION;
    spent INTEGER;
    unused DOUBLE PRECISION;
BEGIN
    -- The batch's existing buckets locked in the one order every caller
    -- uses (first buckets, then second ones, each by (name, key)), and read.
    {_LOCK_AND_LOAD.format(prefix="first")}
    {_LOCK_AND_LOAD.format(prefix="second")}
    FOR i IN 1 .. COALESCE(array_length(nows, 1), 0) LOOP
        second_taken := NULL;
        second_tokens := NULL;
        {_take_in_memory("first")}
        IF first_taken = 1 THEN
            {_take_in_memory("second")}
        END IF;
        RETURN NEXT;
    END LOOP;
    FOR at IN 1 .. COALESCE(array_length(ids, 1), 0) LOOP
        IF s_dirty[at] THEN
            UPDATE rate_limits b SET tokens = s_tokens[at], stamp = s_stamps[at], capacity = s_capacities[at],
                rate = s_rates[at], full_at = s_full_ats[at], taken = s_taken[at]
                WHERE b.name = s_names[at] AND b.key = s_keys[at];
        END IF;
    END LOOP;
END
$body$
"""

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

_REFUND_LEVEL = _level("rate_limits", "?")
_REFUNDED = (
    f"(CASE WHEN {_REFUND_LEVEL} + 1 >= rate_limits.capacity"
    f" THEN rate_limits.capacity ELSE {_REFUND_LEVEL} + 1 END)"
)

#: Give one event back (nothing to do for a missing, hence full, bucket).
_REFUND = (
    f"UPDATE rate_limits SET tokens = {_REFUNDED},"
    f" full_at = {_later('rate_limits', '?')} + (rate_limits.capacity - {_REFUNDED}) / rate_limits.rate,"
    f" stamp = {_later('rate_limits', '?')}"
    " WHERE name = ? AND key = ?"
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
    columns: list[list[object]] = [[] for _ in range(9)]
    for first, second, now in calls:
        for index, value in enumerate((*first, *second, now)):
            columns[index].append(value)
    rows = txn.execute(
        "SELECT * FROM smeldr_take_both_many(?::text[], ?::text[], ?::float8[], ?::float8[],"
        " ?::text[], ?::text[], ?::float8[], ?::float8[], ?::float8[])",
        [_array_literal(column) for column in columns],
    ).fetchall()
    # Unpacked, not indexed: a row's positions through Row.__getitem__
    # are a Python call each.
    return [
        ((bool(first_taken), float(first_tokens)), None if second_taken is None else (bool(second_taken), float(second_tokens)))
        for first_taken, first_tokens, second_taken, second_tokens in rows
    ]


#: Text an array literal may hold as it is: limiter names and the keys'
#: SHA-256 in hex (store_key) are words; anything else (a comma, a quote, a
#: brace, a backslash, a space, an empty string, C{NULL}) goes through
#: psycopg.
_WORDS = re.compile(r"\w+(?:,\w+)*\Z", re.ASCII)


def _array_literal(values: list[object]) -> object:
    """
    One column of L{_take_both_many} as a PostgreSQL array literal
    (C{{a,b,c}}), which the statement casts (C{?::text[]}, C{?::float8[]}),
    or the list itself when its values need quoting.

    Why: psycopg dumps a list element by element in Python, with a regular
    expression search for each text element to decide its quoting: for a
    batch of 11 token requests, nine lists cost 130-225 us of the server's
    CPU a statement against 65-97 us as literals (docs/performance.md,
    "Round nine").  A float is written as C{repr} writes it, the shortest
    text that reads back as the same double (PostgreSQL's C{float8in} reads
    C{inf} and C{nan} too, but they go through psycopg all the same).
    """
    kind = values[0].__class__ if values else None
    if kind is str:
        if all(value.__class__ is str for value in values):
            joined = ",".join(values)  # type: ignore[arg-type]
            # (An unquoted NULL, in any case, would be a null element.)
            if _WORDS.match(joined) and joined.count(",") == len(values) - 1 and "null" not in joined.lower():
                return "{" + joined + "}"
    elif kind is float and all(value.__class__ is float and math.isfinite(value) for value in values):  # type: ignore[arg-type]
        return "{" + ",".join(map(repr, values)) + "}"
    return values


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
