# -*- test-case-name: tests.test_store_postgres -*-
"""
A batch of rotations' writes on PostgreSQL in one function call, planned
once a session: C{smeldr_write_rotations}, OAuth migration 10, its new
tokens' rows as typed arrays a column since migration 12
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

Why arrays a column (migration 12), not JSON rows (migration 10): the
JSON was read twice, checked by C{json_in} when the literal was cast and
parsed again by C{json_populate_recordset}, which also matches every
value's key by name: 56,000 instructions a refresh of a live backend's
324,000 under callgrind (a store loop, batches of 10).  Arrays cost
C{array_in} instead; the rows are read from them by subscript over
C{generate_subscripts} (PL/pgSQL keeps its array arguments expanded, so a
subscript is a look-up), not C{unnest(a, b, ...)}, which fills a
tuplestore per array: 316,900 instructions a refresh with C{unnest},
308,400 with subscripts (C{JSONB} instead of JSON: more, not fewer;
C{docs/performance.md}, "Round fourteen: PostgreSQL's CPU a refresh").
Each table's columns are L{COLUMNS}, all of them, in order: a column an
insert does not give is NULL (the tables have no defaults: a column given
one later needs this function replaced, or it is stored NULL here).  The
check that the spend spent every presented token, which the statement
did with a failing cast, is a C{RAISE}: the error ends the transaction
before the C{COMMIT} that rides in the same round trip.
"""

from __future__ import annotations

from typing import Any

from smeldr_oauth.db.arrays import typed_array

#: The tables whose inserts the function takes, and each one's columns
#: with their types: one array parameter a column, in this order.
COLUMNS: dict[str, tuple[tuple[str, str], ...]] = {
    "access_tokens": (
        ("token_hash", "text"), ("grant_id", "text"), ("scopes", "text"), ("resource", "text"),
        ("expires_at", "float8"), ("revoked_at", "float8"),
    ),
    "refresh_tokens": (
        ("token_hash", "text"), ("grant_id", "text"), ("scopes", "text"), ("generation", "int4"),
        ("created_at", "float8"), ("expires_at", "float8"), ("used_at", "float8"), ("revoked_at", "float8"),
    ),
}

#: The tables whose inserts the function takes.
TABLES = tuple(COLUMNS)

#: The function's parameters, in order: each table's columns
#: (L{COLUMNS}), the grants whose use is recorded (now, grant_id), the
#: spends (token_hash, now, grant_id, generation), and the hashes the
#: spends must have spent.
WRITE_ROTATIONS = (
    "SELECT smeldr_write_rotations("
    + ", ".join(f"?::{kind}[]" for table in TABLES for _, kind in COLUMNS[table])
    + ", ?::float8[], ?::text[], ?::text[], ?::float8[], ?::text[], ?::int4[], ?::text[])"
)


def columns(table: str, rows: list[dict[str, Any]]) -> list[Any]:
    """
    The parameters of the inserts into C{table} (one of L{TABLES}): its
    rows, dicts by column, as one array a column of L{COLUMNS} (a column
    no row gives, all NULL).  Rows made by one insert text have their
    columns in one order, so they are turned into columns at once.
    """
    if len(set(map(tuple, rows))) == 1:
        given = dict(zip(rows[0], zip(*map(dict.values, rows))))
        nulls = [None] * len(rows)
        found = [given.get(name, nulls) for name, _ in COLUMNS[table]]
    else:
        found = [[row.get(name) for row in rows] for name, _ in COLUMNS[table]]
    return [typed_array(kind, values) for values, (_, kind) in zip(found, COLUMNS[table])]


def _signature(table: str, prefix: str) -> str:
    return ", ".join(f"{prefix}_{name} {kind.upper()}[]" for name, kind in COLUMNS[table])


def _insert(table: str, prefix: str) -> str:
    names = [name for name, _ in COLUMNS[table]]
    elements = ", ".join(f"{prefix}_{name}[i]" for name in names)
    return (
        f"INSERT INTO {table} ({', '.join(names)}) SELECT {elements}"
        f" FROM generate_subscripts({prefix}_{names[0]}, 1) AS i;"
    )


def _function(parameters: str, inserts: str) -> str:
    """
    The writes function's C{CREATE} with these parameters (before the
    ones it always takes) and these inserts: the updates, the spend and
    its check are the same in every version.
    """
    return f"""
CREATE FUNCTION smeldr_write_rotations(
    {parameters}use_now FLOAT8[], use_grant TEXT[],
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
    {inserts}
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


#: OAuth migration 12's function: migration 10's, the new tokens' rows
#: taken as arrays a column.
WRITE_ROTATIONS_FUNCTION = _function(
    f"{_signature('access_tokens', 'a')},\n    {_signature('refresh_tokens', 'r')},\n    ",
    f"{_insert('access_tokens', 'a')}\n    {_insert('refresh_tokens', 'r')}",
)

#: OAuth migration 10's function, as it shipped (the same text): the rows
#: as JSON (C{json_populate_recordset}); kept beside migration 12's for a server
#: of the earlier release during a rolling upgrade (see the migration).
WRITE_ROTATIONS_JSON_FUNCTION = _function(
    "access JSON, refresh JSON, ",
    "INSERT INTO access_tokens SELECT * FROM json_populate_recordset(NULL::access_tokens, access);\n"
    "    INSERT INTO refresh_tokens SELECT * FROM json_populate_recordset(NULL::refresh_tokens, refresh);",
)
