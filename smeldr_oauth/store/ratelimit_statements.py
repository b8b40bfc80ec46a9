# -*- test-case-name: tests.test_store_ratelimit_statements,tests.test_store_ratelimits -*-
"""
The SQL of the rate-limit store (L{smeldr_oauth.store.ratelimits}): a
bucket's take and refund as statements, written once for SQLite and
PostgreSQL, and the PostgreSQL functions that take the buckets of many
token requests in one statement (rate-limits migrations 3 and 5).

A module of its own because the functions are long texts built from the
take's expressions, which they must repeat exactly: one place for the
arithmetic of a bucket, whichever statement carries it out.
"""

from __future__ import annotations


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
