# -*- test-case-name: tests.test_store_sqlite -*-
"""
The OAuth tables, as the C{oauth} component of the one migration scheme
(L{smeldr_oauth.db.migrations}), the same on SQLite and PostgreSQL.

Scopes and lists are JSON arrays in C{TEXT}; times are POSIX seconds in
C{DOUBLE PRECISION} (SQLite gives the name REAL affinity, as C{REAL}, which
the first SQLite files were created with: the two are the same thing
there); secrets are SHA-256 only: hex TEXT, but on SQLite the codes' and
tokens' hashes are BLOBs of 32 bytes since migration 9 (L{hashkeys}).

Never edit a migration that has shipped: append a new one.
"""

from __future__ import annotations

from smeldr_oauth.db.database import Transaction
from smeldr_oauth.db.migrations import Migration, Schema
from smeldr_oauth.store import hashkeys
from smeldr_oauth.store.facts_functions import REFRESH_FACTS_FUNCTION, REFRESH_FACTS_MANY_FUNCTION
from smeldr_oauth.store.rotation_writes import WRITE_ROTATIONS_FUNCTION, WRITE_ROTATIONS_JSON_FUNCTION


def _legacy_version(txn: Transaction) -> int:
    """
    OAuth databases made before the one migration scheme kept their version
    in a one-row table C{schema_version}: take it over (and drop the table).
    """
    if txn.engine.name != "sqlite":
        return 0
    found = txn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
    ).fetchone()
    if found is None:
        return 0
    row = txn.execute("SELECT version FROM schema_version").fetchone()
    txn.execute("DROP TABLE schema_version")
    return 0 if row is None else int(row[0])


_REFRESH_FACTS_FUNCTION = """
CREATE FUNCTION smeldr_refresh_facts(presented TEXT)
RETURNS TABLE (
    grant_id TEXT, client_id TEXT, subject TEXT, scopes TEXT, resource TEXT,
    created_at DOUBLE PRECISION, site_token_id TEXT, client_name TEXT,
    last_used_at DOUBLE PRECISION, revoked_at DOUBLE PRECISION,
    token_hash TEXT, token_scopes TEXT, generation INTEGER,
    token_created_at DOUBLE PRECISION, expires_at DOUBLE PRECISION,
    used_at DOUBLE PRECISION, token_revoked_at DOUBLE PRECISION,
    live_generation INTEGER, live_siblings BIGINT
)
LANGUAGE plpgsql VOLATILE AS $body$
#variable_conflict use_column
BEGIN
    PERFORM 1 FROM refresh_tokens t JOIN grants g ON g.grant_id = t.grant_id
        WHERE t.token_hash = presented FOR UPDATE;
    RETURN QUERY
    SELECT g.grant_id, g.client_id, g.subject, g.scopes, g.resource, g.created_at,
           g.site_token_id, g.client_name, g.last_used_at, g.revoked_at,
           t.token_hash, t.scopes, t.generation, t.created_at, t.expires_at, t.used_at,
           t.revoked_at, live.generation, live.siblings
    FROM refresh_tokens t JOIN grants g ON g.grant_id = t.grant_id,
         (SELECT r.generation, COUNT(*) AS siblings FROM refresh_tokens r
          WHERE r.grant_id = (SELECT p.grant_id FROM refresh_tokens p WHERE p.token_hash = presented)
          GROUP BY r.generation ORDER BY r.generation DESC LIMIT 1) live
    WHERE t.token_hash = presented;
END
$body$
"""

_REFRESH_FACTS_MANY_FUNCTION = """
CREATE FUNCTION smeldr_refresh_facts_many(presented TEXT[])
RETURNS TABLE (
    grant_id TEXT, client_id TEXT, subject TEXT, scopes TEXT, resource TEXT,
    created_at DOUBLE PRECISION, site_token_id TEXT, client_name TEXT,
    last_used_at DOUBLE PRECISION, revoked_at DOUBLE PRECISION,
    token_hash TEXT, token_scopes TEXT, generation INTEGER,
    token_created_at DOUBLE PRECISION, expires_at DOUBLE PRECISION,
    used_at DOUBLE PRECISION, token_revoked_at DOUBLE PRECISION,
    live_generation INTEGER, live_siblings BIGINT
)
LANGUAGE plpgsql VOLATILE AS $body$
#variable_conflict use_column
BEGIN
    PERFORM 1 FROM grants g
        WHERE g.grant_id IN (SELECT p.grant_id FROM refresh_tokens p WHERE p.token_hash = ANY (presented))
        ORDER BY g.grant_id FOR UPDATE;
    RETURN QUERY
    SELECT g.grant_id, g.client_id, g.subject, g.scopes, g.resource, g.created_at,
           g.site_token_id, g.client_name, g.last_used_at, g.revoked_at,
           t.token_hash, t.scopes, t.generation, t.created_at, t.expires_at, t.used_at,
           t.revoked_at, live.generation, live.siblings
    FROM refresh_tokens t JOIN grants g ON g.grant_id = t.grant_id
    CROSS JOIN LATERAL
         (SELECT r.generation, COUNT(*) AS siblings FROM refresh_tokens r
          WHERE r.grant_id = t.grant_id
          GROUP BY r.generation ORDER BY r.generation DESC LIMIT 1) live
    WHERE t.token_hash = ANY (presented);
END
$body$
"""

#: OAuth migration 7 (PostgreSQL): smeldr_refresh_facts_many with the same
#: arguments and rows (each presented hash once), its statements written so
#: that every plan the planner can make for them, generic or custom, made
#: on a table of three rows or three million, reaches each row through an
#: index condition: the presented hashes are unnested and each is looked up
#: in a LATERAL subquery that OFFSET 0 keeps from being flattened (so the
#: look-up is by one hash, an equality on the primary key, and with
#: sequential scans off no other path is cheaper), each token's grant is
#: found the same way by its key (joined plainly, a generic plan made on a
#: small table read the whole of grants_pkey for each token), the grants
#: are locked one primary-key look-up each in grant_id order, and the
#: live generation is MAX over the (grant_id, generation) index plus a
#: count of that generation.  So the plans are made once a session
#: (force_generic_plan), not at every call: planning the two statements at
#: every call (migration 5) was half the function's backend CPU
#: (docs/performance.md, "Round ten").  The first version joined
#: token_hash = ANY (presented) directly; its generic plan, made on a small
#: table, read a whole index of refresh_tokens with a filter (60 ms a
#: call on 95,000 rows), as round nine found.
_REFRESH_FACTS_MANY_GENERIC = """
CREATE OR REPLACE FUNCTION smeldr_refresh_facts_many(presented TEXT[])
RETURNS TABLE (
    grant_id TEXT, client_id TEXT, subject TEXT, scopes TEXT, resource TEXT,
    created_at DOUBLE PRECISION, site_token_id TEXT, client_name TEXT,
    last_used_at DOUBLE PRECISION, revoked_at DOUBLE PRECISION,
    token_hash TEXT, token_scopes TEXT, generation INTEGER,
    token_created_at DOUBLE PRECISION, expires_at DOUBLE PRECISION,
    used_at DOUBLE PRECISION, token_revoked_at DOUBLE PRECISION,
    live_generation INTEGER, live_siblings BIGINT
)
LANGUAGE plpgsql VOLATILE
SET plan_cache_mode = force_generic_plan
SET enable_seqscan = off
AS $body$
#variable_conflict use_column
BEGIN
    PERFORM 1 FROM
        (SELECT DISTINCT p.grant_id FROM unnest(presented) AS h(token_hash)
         CROSS JOIN LATERAL
             (SELECT p.grant_id FROM refresh_tokens p WHERE p.token_hash = h.token_hash OFFSET 0) p
         ORDER BY p.grant_id) AS ids
        CROSS JOIN LATERAL
            (SELECT 1 FROM grants g WHERE g.grant_id = ids.grant_id OFFSET 0 FOR UPDATE) AS locked;
    RETURN QUERY
    SELECT f.* FROM (SELECT DISTINCT u.token_hash FROM unnest(presented) AS u(token_hash)) AS h
    CROSS JOIN LATERAL (
        SELECT g.grant_id, g.client_id, g.subject, g.scopes, g.resource, g.created_at,
               g.site_token_id, g.client_name, g.last_used_at, g.revoked_at,
               t.token_hash, t.scopes, t.generation, t.created_at, t.expires_at, t.used_at,
               t.revoked_at, live.generation,
               (SELECT COUNT(*) FROM refresh_tokens s
                WHERE s.grant_id = t.grant_id AND s.generation = live.generation)
        FROM refresh_tokens t
        CROSS JOIN LATERAL (SELECT * FROM grants g WHERE g.grant_id = t.grant_id OFFSET 0) g
        CROSS JOIN LATERAL
            (SELECT MAX(r.generation) AS generation FROM refresh_tokens r WHERE r.grant_id = t.grant_id) live
        WHERE t.token_hash = h.token_hash OFFSET 0) f;
END
$body$
"""

#: OAuth migration 8 (PostgreSQL): smeldr_refresh_facts, a batch of one
#: (a quiet server's usual refresh), given migration 7's treatment: its
#: statements planned once a session (force_generic_plan), each written so
#: that every plan, made on three rows or three million, reaches each row
#: by an index condition on one value (the presented hash on the primary
#: key, the grant by its key in a LATERAL subquery that OFFSET 0 keeps
#: apart, the live generation MAX over the (grant_id, generation) index
#: plus a count of it; sequential scans off).
#:
#: It locks the grant alone, as the batch function does.  Migration 2's
#: function locked the presented token's row too, not by design: C{FOR
#: UPDATE} on a join locks a row of every table joined (the statement it
#: replaced, "Lock the token's grant", was written that way).  The grant's
#: lock is what makes a rotation single-use across processes: every
#: refresh of a grant, alone or batched, takes it before reading its facts
#: and holds it to the commit, and the spend is a conditional update
#: whose returned rows are checked.  The token's lock added nothing but a
#: WAL record a refresh and a lock order, token then grant, the reverse
#: of a batch's (its grant in the facts function, then its tokens in the
#: spend): a single refresh and a batch of another process on one grant
#: could wait on each other until PostgreSQL's deadlock detector failed
#: one (tests.test_store_postgres).
_REFRESH_FACTS_GENERIC = """
CREATE OR REPLACE FUNCTION smeldr_refresh_facts(presented TEXT)
RETURNS TABLE (
    grant_id TEXT, client_id TEXT, subject TEXT, scopes TEXT, resource TEXT,
    created_at DOUBLE PRECISION, site_token_id TEXT, client_name TEXT,
    last_used_at DOUBLE PRECISION, revoked_at DOUBLE PRECISION,
    token_hash TEXT, token_scopes TEXT, generation INTEGER,
    token_created_at DOUBLE PRECISION, expires_at DOUBLE PRECISION,
    used_at DOUBLE PRECISION, token_revoked_at DOUBLE PRECISION,
    live_generation INTEGER, live_siblings BIGINT
)
LANGUAGE plpgsql VOLATILE
SET plan_cache_mode = force_generic_plan
SET enable_seqscan = off
AS $body$
#variable_conflict use_column
BEGIN
    PERFORM 1 FROM refresh_tokens p
        CROSS JOIN LATERAL
            (SELECT 1 FROM grants g WHERE g.grant_id = p.grant_id OFFSET 0 FOR UPDATE) AS locked
        WHERE p.token_hash = presented;
    RETURN QUERY
    SELECT g.grant_id, g.client_id, g.subject, g.scopes, g.resource, g.created_at,
           g.site_token_id, g.client_name, g.last_used_at, g.revoked_at,
           t.token_hash, t.scopes, t.generation, t.created_at, t.expires_at, t.used_at,
           t.revoked_at, live.generation,
           (SELECT COUNT(*) FROM refresh_tokens s
            WHERE s.grant_id = t.grant_id AND s.generation = live.generation)
    FROM refresh_tokens t
    CROSS JOIN LATERAL (SELECT * FROM grants g WHERE g.grant_id = t.grant_id OFFSET 0) g
    CROSS JOIN LATERAL
        (SELECT MAX(r.generation) AS generation FROM refresh_tokens r WHERE r.grant_id = t.grant_id) live
    WHERE t.token_hash = presented;
END
$body$
"""

_BLOB_KEYS = (
    """
    CREATE TABLE codes_new (
        code_hash BLOB PRIMARY KEY,
        grant_id TEXT NOT NULL REFERENCES grants (grant_id) ON DELETE CASCADE,
        client_id TEXT NOT NULL,
        redirect_uri TEXT NOT NULL,
        code_challenge TEXT NOT NULL,
        scopes TEXT NOT NULL,
        resource TEXT NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL,
        issue_refresh INTEGER NOT NULL,
        used_at DOUBLE PRECISION
    )
    """,
    "INSERT INTO codes_new (code_hash, grant_id, client_id, redirect_uri, code_challenge, scopes, resource,"
    " expires_at, issue_refresh, used_at)"
    f" SELECT {hashkeys.to_blob_sql('code_hash')}, grant_id, client_id, redirect_uri, code_challenge, scopes,"
    " resource, expires_at, issue_refresh, used_at FROM codes ORDER BY rowid",
    "DROP TABLE codes",
    "ALTER TABLE codes_new RENAME TO codes",
    "CREATE INDEX codes_grant_id ON codes (grant_id)",
    "CREATE INDEX codes_expires_at ON codes (expires_at)",
    """
    CREATE TABLE access_tokens_new (
        token_hash BLOB PRIMARY KEY,
        grant_id TEXT NOT NULL,
        scopes TEXT NOT NULL,
        resource TEXT NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL,
        revoked_at DOUBLE PRECISION
    )
    """,
    "INSERT INTO access_tokens_new (token_hash, grant_id, scopes, resource, expires_at, revoked_at)"
    f" SELECT {hashkeys.to_blob_sql('token_hash')}, grant_id, scopes, resource, expires_at, revoked_at"
    " FROM access_tokens ORDER BY rowid",
    "DROP TABLE access_tokens",
    "ALTER TABLE access_tokens_new RENAME TO access_tokens",
    "CREATE INDEX access_tokens_expires_at ON access_tokens (expires_at)",
    """
    CREATE TABLE refresh_tokens_new (
        token_hash BLOB PRIMARY KEY,
        grant_id TEXT NOT NULL REFERENCES grants (grant_id) ON DELETE CASCADE,
        scopes TEXT NOT NULL,
        generation INTEGER NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL,
        used_at DOUBLE PRECISION,
        revoked_at DOUBLE PRECISION
    )
    """,
    "INSERT INTO refresh_tokens_new (token_hash, grant_id, scopes, generation, created_at, expires_at, used_at,"
    f" revoked_at) SELECT {hashkeys.to_blob_sql('token_hash')}, grant_id, scopes, generation, created_at,"
    " expires_at, used_at, revoked_at FROM refresh_tokens ORDER BY rowid",
    "DROP TABLE refresh_tokens",
    "ALTER TABLE refresh_tokens_new RENAME TO refresh_tokens",
    "CREATE INDEX refresh_tokens_grant_id ON refresh_tokens (grant_id, generation)",
    "CREATE INDEX refresh_tokens_expires_at ON refresh_tokens (expires_at)",
)

OAUTH_SCHEMA = Schema(
    "oauth",
    (
        Migration(
            1,
            (
                """
                CREATE TABLE clients (
                    client_id TEXT PRIMARY KEY,
                    client_name TEXT,
                    redirect_uris TEXT NOT NULL,
                    token_endpoint_auth_method TEXT NOT NULL,
                    grant_types TEXT NOT NULL,
                    scope TEXT,
                    kind TEXT NOT NULL,
                    client_secret_hash TEXT,
                    created_at DOUBLE PRECISION NOT NULL,
                    client_uri TEXT,
                    logo_uri TEXT
                )
                """,
                """
                CREATE TABLE grants (
                    grant_id TEXT PRIMARY KEY,
                    client_id TEXT NOT NULL,
                    subject TEXT NOT NULL,
                    scopes TEXT NOT NULL,
                    resource TEXT NOT NULL,
                    created_at DOUBLE PRECISION NOT NULL,
                    site_token_id TEXT,
                    client_name TEXT,
                    last_used_at DOUBLE PRECISION,
                    revoked_at DOUBLE PRECISION
                )
                """,
                "CREATE INDEX grants_site_token_id ON grants (site_token_id)",
                "CREATE INDEX grants_subject ON grants (subject)",
                """
                CREATE TABLE codes (
                    code_hash TEXT PRIMARY KEY,
                    grant_id TEXT NOT NULL REFERENCES grants (grant_id) ON DELETE CASCADE,
                    client_id TEXT NOT NULL,
                    redirect_uri TEXT NOT NULL,
                    code_challenge TEXT NOT NULL,
                    scopes TEXT NOT NULL,
                    resource TEXT NOT NULL,
                    expires_at DOUBLE PRECISION NOT NULL,
                    issue_refresh INTEGER NOT NULL,
                    used_at DOUBLE PRECISION
                )
                """,
                "CREATE INDEX codes_grant_id ON codes (grant_id)",
                "CREATE INDEX codes_expires_at ON codes (expires_at)",
                """
                CREATE TABLE access_tokens (
                    token_hash TEXT PRIMARY KEY,
                    grant_id TEXT NOT NULL REFERENCES grants (grant_id) ON DELETE CASCADE,
                    scopes TEXT NOT NULL,
                    resource TEXT NOT NULL,
                    expires_at DOUBLE PRECISION NOT NULL,
                    revoked_at DOUBLE PRECISION
                )
                """,
                "CREATE INDEX access_tokens_grant_id ON access_tokens (grant_id)",
                "CREATE INDEX access_tokens_expires_at ON access_tokens (expires_at)",
                """
                CREATE TABLE refresh_tokens (
                    token_hash TEXT PRIMARY KEY,
                    grant_id TEXT NOT NULL REFERENCES grants (grant_id) ON DELETE CASCADE,
                    scopes TEXT NOT NULL,
                    generation INTEGER NOT NULL,
                    created_at DOUBLE PRECISION NOT NULL,
                    expires_at DOUBLE PRECISION NOT NULL,
                    used_at DOUBLE PRECISION,
                    revoked_at DOUBLE PRECISION
                )
                """,
                "CREATE INDEX refresh_tokens_grant_id ON refresh_tokens (grant_id, generation)",
                "CREATE INDEX refresh_tokens_expires_at ON refresh_tokens (expires_at)",
            ),
        ),
        # PostgreSQL: a refresh's lock and facts in one round trip (see
        # smeldr_oauth.store.transactions.redeem_refresh_token).  A VOLATILE
        # PL/pgSQL function takes a new snapshot for each statement at READ
        # COMMITTED, so the facts are read after the lock is granted, as the
        # two statements sent one after the other read them.  The facts are
        # refresh_facts.REFRESH_FACTS with the grant's columns named: a change
        # to either is a new migration replacing the function.
        Migration(2, sqlite=(), postgresql=(_REFRESH_FACTS_FUNCTION,)),
        # PostgreSQL: the facts of a batch of
        # refreshes (group commit) in one round trip: their grants locked
        # in grant_id order, so that two processes' batches cannot lock
        # the same grants in opposite orders, then each presented token's
        # facts, as smeldr_refresh_facts reads them (see
        # refresh_batch.redeem_refresh_tokens).
        Migration(3, sqlite=(), postgresql=(_REFRESH_FACTS_MANY_FUNCTION,)),
        # Access tokens without the index on grant_id and without the
        # foreign key to grants: every refresh and code exchange inserts an
        # access token, and the index was one more B-tree insert each (and
        # the key one more look-up of the grant).  Nothing needs them: every
        # look-up of an access token joins its grant (an orphan is refused
        # like a revoked token), a grant's revocation is read through that
        # join instead of being copied onto its access tokens, and the purge
        # deletes access tokens by expiry only (docs/performance.md, round
        # eight).  SQLite cannot drop a foreign key: the table is rebuilt
        # with its rows as they are.
        Migration(
            4,
            sqlite=(
                """
                CREATE TABLE access_tokens_new (
                    token_hash TEXT PRIMARY KEY,
                    grant_id TEXT NOT NULL,
                    scopes TEXT NOT NULL,
                    resource TEXT NOT NULL,
                    expires_at DOUBLE PRECISION NOT NULL,
                    revoked_at DOUBLE PRECISION
                )
                """,
                "INSERT INTO access_tokens_new (token_hash, grant_id, scopes, resource, expires_at, revoked_at)"
                " SELECT token_hash, grant_id, scopes, resource, expires_at, revoked_at FROM access_tokens",
                "DROP TABLE access_tokens",
                "ALTER TABLE access_tokens_new RENAME TO access_tokens",
                "CREATE INDEX access_tokens_expires_at ON access_tokens (expires_at)",
            ),
            postgresql=(
                "ALTER TABLE access_tokens DROP CONSTRAINT access_tokens_grant_id_fkey",
                "DROP INDEX access_tokens_grant_id",
            ),
        ),
        # PostgreSQL: the two facts functions plan their statements at every
        # call.  A PL/pgSQL function keeps its statements' plans for the
        # session, and after five calls may keep one generic plan, made
        # from what the planner knew then: on a young database (the
        # bench's, or any after its first hour) a sequential scan of
        # refresh_tokens, still used when the table had grown to thousands
        # of rows (every rotation adds one), so each call read the whole
        # table, twice: 1.8 ms of backend CPU a call, rising with the
        # table.  A plan made at each call sees the table as it is and the
        # presented hashes, and uses the primary key.
        Migration(
            5,
            sqlite=(),
            postgresql=(
                "ALTER FUNCTION smeldr_refresh_facts(TEXT) SET plan_cache_mode = force_custom_plan",
                "ALTER FUNCTION smeldr_refresh_facts_many(TEXT[]) SET plan_cache_mode = force_custom_plan",
            ),
        ),
        # PostgreSQL: room on refresh_tokens' pages for each token's one
        # update.  Every rotation inserts the next token and, moments later,
        # spends it (used_at, or revoked_at for its unused siblings): no
        # indexed column changes, so the new row version may stay on its
        # page as a HOT update, with no new entry in the table's three
        # indexes, but only if the page has room, and inserts pack pages
        # full.  In the bench's refresh row half the spends were HOT; with
        # 30% of each new page kept free, nearly all (docs/performance.md,
        # "Round nine").  Existing pages keep their rows; new pages take the
        # setting.  SQLite updates rows in place.
        Migration(6, sqlite=(), postgresql=("ALTER TABLE refresh_tokens SET (fillfactor = 70)",)),
        # PostgreSQL: the batch's facts function planned once a session,
        # in statements whose every plan is an index look-up (see
        # _REFRESH_FACTS_MANY_GENERIC).  SQLite has no such function.
        Migration(7, sqlite=(), postgresql=(_REFRESH_FACTS_MANY_GENERIC,)),
        # PostgreSQL: the single refresh's facts function the same way,
        # locking the grant alone (see _REFRESH_FACTS_GENERIC); and refresh
        # tokens without their foreign key to grants, as access tokens are
        # since migration 4.  Every rotation and code exchange inserts a
        # refresh token under its grant's lock (the facts functions,
        # consume_code), and the key's check looked the grant up again
        # and locked it once more: 4 us of PostgreSQL's CPU a refresh in a
        # batch's writes (docs/performance.md, "Round eleven").
        # transactions.add_tokens, the one other insert, checks the grant
        # itself; the purge deletes a grant's refresh tokens before the
        # grant (the key's ON DELETE CASCADE was never relied on); every
        # read of a refresh token joins its grant, so an orphan would be
        # unknown.  SQLite keeps its key (dropping one means rebuilding
        # the table).
        Migration(
            8,
            sqlite=(),
            postgresql=(
                _REFRESH_FACTS_GENERIC,
                "ALTER TABLE refresh_tokens DROP CONSTRAINT refresh_tokens_grant_id_fkey",
            ),
        ),
        # SQLite: the hashes of codes and tokens kept as their 32 bytes
        # (BLOB) rather than 64 hex characters, their primary keys' entries
        # half the size (see smeldr_oauth.store.hashkeys, the one place
        # that converts them).  The three tables are rebuilt with their
        # rows, each hash converted, their other columns, keys and indexes
        # as they were.  PostgreSQL keeps hex TEXT.
        Migration(9, sqlite=_BLOB_KEYS, postgresql=()),
        # PostgreSQL: a batch of rotations' writes in one function, its
        # statements planned once a session instead of at every batch
        # (see smeldr_oauth.store.rotation_writes).
        Migration(10, sqlite=(), postgresql=(WRITE_ROTATIONS_JSON_FUNCTION,)),
        # PostgreSQL: the two facts functions read a grant's live
        # generation and its count in one backward index scan bounded by
        # the presented token's generation, not MAX then COUNT (see
        # smeldr_oauth.store.facts_functions).
        Migration(11, sqlite=(), postgresql=(REFRESH_FACTS_MANY_FUNCTION, REFRESH_FACTS_FUNCTION)),
        # PostgreSQL: the batch's writes function taking the new tokens'
        # rows as typed arrays a column instead of JSON, which was read
        # twice (see smeldr_oauth.store.rotation_writes).  Beside
        # migration 10's, not instead: a server of the earlier release,
        # still running during a rolling upgrade, goes on calling that one
        # (its call casts to json, so the two never make a call
        # ambiguous); a later migration may drop it.
        Migration(12, sqlite=(), postgresql=(WRITE_ROTATIONS_FUNCTION,)),
        # PostgreSQL: half of refresh_tokens' new pages free, room for every spend's HOT
        # version while other sessions' snapshots keep pruning back (docs/performance.md,
        # "Round fifteen: PostgreSQL's WAL and CPU a refresh").  Migration 6's 30% was not.
        Migration(13, sqlite=(), postgresql=("ALTER TABLE refresh_tokens SET (fillfactor = 50)",)),
    ),
    tables=("clients", "grants", "codes", "access_tokens", "refresh_tokens"),
    legacy=_legacy_version,
)
