# -*- test-case-name: tests.test_store_postgres -*-
"""
A batch of rotations' writes on PostgreSQL in one function call, planned
once a session: C{smeldr_write_rotations}, OAuth migration 10
(L{smeldr_oauth.store.schema}), called by
L{smeldr_oauth.store.refresh_batch}.

Why a function: the batch's writes were one C{WITH} statement of literals,
parsed and planned at every run (a prepared statement would keep a plan
made on a small table, and psycopg's kept re-planning anyway: C{unnest} of
a parameter counts 100 rows, so the server never found its generic plan
cheaper).  Planning it was 0.38-0.40 ms of PostgreSQL's CPU a batch of 17,
23 us a refresh (C{pg_stat_statements} with C{track_planning},
C{docs/performance.md}, "Round thirteen").  A PL/pgSQL function's
statements are planned on their first call in a session and kept
(C{force_generic_plan}); the call itself plans in microseconds.

A kept plan is safe only if every plan the planner can make reaches rows
by index at any table size (OAuth migration 5's trap: a generic plan made
on a small table is a sequential scan).  The inserts have no choice to
make; the two updates join an C{unnest} of parameters (10 rows to the
planner) to C{grants} and C{refresh_tokens}.  Joined on C{g.grant_id =
u.grant_id}, a plan made while C{grants} held a row or two read the whole
of C{grants_pkey} and rescanned the C{unnest} for each entry: an equality
is mergeable, so the index's order counts as useful and a scan of the
whole index is a path the planner weighs (sequential scans being off).
Joined on C{g.grant_id = ANY (ARRAY[u.grant_id])}, which no merge or hash
join can use, the one path left, with sequential scans, hash joins and
merge joins off for the function, is a nested loop over the parameters
with an index look-up of each (the grant's primary key; the token's
C{(grant_id, generation)}): C{tests.test_store_postgres}.

The rows to insert are JSON arrays of objects named by column; a column
missing from them is NULL (the tables have no defaults: a column given
one later needs this function replaced, or it is stored NULL here).  The check that
the spend spent every presented token, which the statement did with a
failing cast, is a C{RAISE}: the error ends the transaction before the
C{COMMIT} that rides in the same round trip.
"""

from __future__ import annotations

#: The function's parameters, in order: the access tokens' and refresh
#: tokens' rows (JSON), the grants whose use is recorded (now, grant_id),
#: the spends (token_hash, now, grant_id, generation), and the hashes the
#: spends must have spent.
WRITE_ROTATIONS = (
    "SELECT smeldr_write_rotations(?::json, ?::json, ?::float8[], ?::text[],"
    " ?::text[], ?::float8[], ?::text[], ?::int4[], ?::text[])"
)

#: The tables whose inserts the function takes.
TABLES = ("access_tokens", "refresh_tokens")

WRITE_ROTATIONS_FUNCTION = """
CREATE FUNCTION smeldr_write_rotations(
    access JSON, refresh JSON, use_now FLOAT8[], use_grant TEXT[],
    spend_hash TEXT[], spend_now FLOAT8[], spend_grant TEXT[], spend_generation INT4[],
    expected TEXT[]
) RETURNS INTEGER
LANGUAGE plpgsql VOLATILE
SET plan_cache_mode = force_generic_plan
SET enable_seqscan = off
SET enable_hashjoin = off
SET enable_mergejoin = off
AS $body$
DECLARE
    spent INTEGER;
BEGIN
    INSERT INTO access_tokens SELECT * FROM json_populate_recordset(NULL::access_tokens, access);
    INSERT INTO refresh_tokens SELECT * FROM json_populate_recordset(NULL::refresh_tokens, refresh);
    IF cardinality(use_grant) > 0 THEN
        UPDATE grants g SET last_used_at = u.now
            FROM unnest(use_now, use_grant) AS u(now, grant_id)
            WHERE g.grant_id = ANY (ARRAY[u.grant_id]);
    END IF;
    WITH s AS (
        UPDATE refresh_tokens t SET
            used_at = CASE WHEN t.token_hash = u.token_hash THEN u.now ELSE t.used_at END,
            revoked_at = CASE WHEN t.token_hash = u.token_hash THEN t.revoked_at ELSE u.now END
        FROM unnest(spend_hash, spend_now, spend_grant, spend_generation)
            AS u(token_hash, now, grant_id, generation)
        WHERE t.grant_id = ANY (ARRAY[u.grant_id]) AND t.generation = ANY (ARRAY[u.generation])
            AND t.used_at IS NULL AND t.revoked_at IS NULL
        RETURNING t.token_hash)
    SELECT count(*) INTO spent FROM s WHERE s.token_hash = ANY (expected);
    IF spent <> cardinality(expected) THEN
        RAISE EXCEPTION 'refresh token spent concurrently: % of %', spent, cardinality(expected);
    END IF;
    RETURN spent;
END
$body$
"""
