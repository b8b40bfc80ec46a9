# -*- test-case-name: tests.test_facts_postgres -*-
"""
The refresh facts functions on PostgreSQL as OAuth migration 11 replaces
them (L{smeldr_oauth.store.schema}): C{smeldr_refresh_facts_many}, a
group-commit batch's (L{smeldr_oauth.store.refresh_batch}), and
C{smeldr_refresh_facts}, a single refresh's
(L{smeldr_oauth.store.transactions}).  Same arguments, same rows, the same
locks in the same order (the grants, in C{grant_id} order), and the facts
read by a second statement after the lock, as migrations 7 and 8 made
them; one part of the facts is read differently.

The grant's live generation and its count ("siblings") were C{MAX} over
the C{(grant_id, generation)} index, then a C{COUNT} of that generation:
two index scans a token.  They are now one backward scan of the same
index, grouped by generation, the first group taken, and bounded below by
the presented token's own generation (which is in the range: the live
generation is never lower, so the answer is the same).  Why the bound
matters: PostgreSQL 15 reads a leaf page's matching index entries all at
once, so a scan keyed on the grant alone checked every generation of the
grant on that page (a chain of 200 rotations, 200 entries); C{MAX}'s
implicit C{generation IS NOT NULL} made each check fetch the second
column too.  Counted with callgrind on a single-user backend (17 live
tokens of 200 grants' chains, 35,000 refresh tokens): 4.03 million
instructions for a batch of 17 and a single refresh, 3.26 million scanned
once without the bound, 2.34 million with it (C{docs/performance.md},
"Round thirteen: the facts function").

The plans are made once a session (C{force_generic_plan}), so the scan
must stay an index look-up bounded by the grant whatever the tables held
when it was made (migration 5's trap): a backward index scan is the only
path that yields the generations in order without reading them all, and
sequential scans are off; C{tests.test_facts_postgres} reads the kept
plans through C{auto_explain}.
"""

from __future__ import annotations

#: The rows both functions return (C{refresh_facts.REFRESH_FACTS}'s, the
#: grant's columns named), and their settings.
_SIGNATURE = """
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
"""

#: The facts of the token C{t}, read after its grant's lock: its grant by
#: key (a LATERAL subquery that OFFSET 0 keeps apart), and the live
#: generation with its count in one bounded backward scan.
_FACTS = """
        SELECT g.grant_id, g.client_id, g.subject, g.scopes, g.resource, g.created_at,
               g.site_token_id, g.client_name, g.last_used_at, g.revoked_at,
               t.token_hash, t.scopes, t.generation, t.created_at, t.expires_at, t.used_at,
               t.revoked_at, live.generation, live.siblings
        FROM refresh_tokens t
        CROSS JOIN LATERAL (SELECT * FROM grants g WHERE g.grant_id = t.grant_id OFFSET 0) g
        CROSS JOIN LATERAL
            (SELECT r.generation, COUNT(*) AS siblings FROM refresh_tokens r
             WHERE r.grant_id = t.grant_id AND r.generation >= t.generation
             GROUP BY r.generation ORDER BY r.generation DESC LIMIT 1) live"""

REFRESH_FACTS_MANY_FUNCTION = f"""
CREATE OR REPLACE FUNCTION smeldr_refresh_facts_many(presented TEXT[])
{_SIGNATURE}
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
    CROSS JOIN LATERAL ({_FACTS}
        WHERE t.token_hash = h.token_hash OFFSET 0) f;
END
$body$
"""

REFRESH_FACTS_FUNCTION = f"""
CREATE OR REPLACE FUNCTION smeldr_refresh_facts(presented TEXT)
{_SIGNATURE}
AS $body$
#variable_conflict use_column
BEGIN
    PERFORM 1 FROM refresh_tokens p
        CROSS JOIN LATERAL
            (SELECT 1 FROM grants g WHERE g.grant_id = p.grant_id OFFSET 0 FOR UPDATE) AS locked
        WHERE p.token_hash = presented;
    RETURN QUERY{_FACTS}
        WHERE t.token_hash = presented;
END
$body$
"""
