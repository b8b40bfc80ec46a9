# -*- test-case-name: tests.test_store_sqlite,tests.test_store_postgres -*-
"""
What a refresh is decided on: SQLite's one statement that reads it
(L{REFRESH_FACTS}) and the records made from a row of it (L{records}).
L{smeldr_oauth.store.transactions.redeem_refresh_token} runs the statement
and decides; PostgreSQL reads the same facts, by these names and in this
order, through the functions of L{smeldr_oauth.store.schema}, and its rows
are read the same way.

A module of its own because the row is read by position: the statements
and their reader change together (C{tests.test_store_postgres} checks the
functions' columns against L{FACTS_COLUMNS}).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

from smeldr_oauth.oauth import model
from smeldr_oauth.store.hashkeys import shown

#: The grant, the presented token, and the grant's live generation with its
#: size, in the order of L{FACTS_COLUMNS}.
#:
#: The live generation is the first term of the join and joined with
#: C{CROSS JOIN}, which keeps it there: SQLite then runs it as a co-routine,
#: its one row handed straight to the join.  As a later term (round nine's
#: text) it was materialised into an ephemeral table at every refresh: a
#: temporary B-tree opened, written, read and closed, for one row
#: (C{docs/performance.md}, round ten).  The other two terms are read by
#: primary key either way.
REFRESH_FACTS = (
    "SELECT g.grant_id, g.client_id, g.subject, g.scopes, g.resource, g.created_at,"
    " g.site_token_id, g.client_name, g.last_used_at, g.revoked_at,"
    " t.token_hash, t.scopes AS token_scopes, t.generation,"
    " t.created_at AS token_created_at, t.expires_at, t.used_at, t.revoked_at AS token_revoked_at,"
    " live.generation AS live_generation, live.siblings AS live_siblings"
    " FROM (SELECT generation, COUNT(*) AS siblings FROM refresh_tokens"
    "  WHERE grant_id = (SELECT grant_id FROM refresh_tokens WHERE token_hash = ?)"
    "  GROUP BY generation ORDER BY generation DESC LIMIT 1) live"
    " CROSS JOIN refresh_tokens t JOIN grants g ON g.grant_id = t.grant_id"
    " WHERE t.token_hash = ?"
)

#: The columns of L{REFRESH_FACTS}, in order (the names and the order of
#: PostgreSQL's facts functions' columns too).
FACTS_COLUMNS = (
    "grant_id", "client_id", "subject", "scopes", "resource", "created_at",
    "site_token_id", "client_name", "last_used_at", "revoked_at",
    "token_hash", "token_scopes", "generation", "token_created_at", "expires_at", "used_at", "token_revoked_at",
    "live_generation", "live_siblings",
)

#: Where a row of facts holds the grant's id and the presented token's hash.
GRANT_ID, TOKEN_HASH = FACTS_COLUMNS.index("grant_id"), FACTS_COLUMNS.index("token_hash")


def records(
    row: Sequence[Any], load: Callable[[str], tuple[str, ...]]
) -> tuple[model.Grant, model.RefreshToken, Optional[float], int, int]:
    """
    The grant, the presented token, its revocation time and the live
    generation with its size, from a row of facts (L{REFRESH_FACTS}'s, a
    C{sqlite3.Row}, or a PostgreSQL facts function's, a
    L{smeldr_oauth.db.postgres.Row}), read by position.

    A C{sqlite3.Row} finds a name by comparing it with each column's in
    turn (the facts have nineteen): round nine made the row a dict first
    and built the records through the generic L{from_row}; unpacked by
    position they are built with neither (C{docs/performance.md}, round
    ten).  PostgreSQL's rows were still read by name, nineteen calls of
    C{Row.__getitem__} in Python and the dict of L{from_row} a refresh, on
    the batch's thread (C{docs/performance.md}, "Round thirteen: CPU a
    refresh on PostgreSQL").

    @param load: decodes a JSON list of scopes.
    """
    (
        grant_id, client_id, subject, scopes, resource, created_at,
        site_token_id, client_name, last_used_at, revoked_at,
        token_hash, token_scopes, generation, token_created_at, expires_at, used_at, token_revoked_at,
        live_generation, live_siblings,
    ) = row
    grant = model.Grant(
        grant_id=grant_id,
        client_id=client_id,
        subject=subject,
        scopes=load(scopes),
        resource=resource,
        created_at=created_at,
        site_token_id=site_token_id,
        client_name=client_name,
        last_used_at=last_used_at,
        revoked_at=revoked_at,
    )
    token = model.RefreshToken(
        token_hash=shown(token_hash),
        grant_id=grant_id,
        scopes=load(token_scopes),
        generation=generation,
        created_at=token_created_at,
        expires_at=expires_at,
        used_at=used_at,
    )
    return grant, token, token_revoked_at, live_generation, live_siblings
