# -*- test-case-name: tests.test_store_sqlite -*-
"""
What a refresh is decided on, on SQLite: the one statement that reads it
(L{REFRESH_FACTS}) and the records made from its row (L{from_sqlite}).
L{smeldr_oauth.store.transactions.redeem_refresh_token} runs the statement
and decides; PostgreSQL reads the same facts, by these names, through the
functions of L{smeldr_oauth.store.schema}.

A module of its own because the row is read by position: the statement and
its reader change together.
"""

from __future__ import annotations

import sqlite3
from typing import Callable, Optional

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

#: The columns of L{REFRESH_FACTS}, in order (the names PostgreSQL's facts
#: functions give them too).
FACTS_COLUMNS = (
    "grant_id", "client_id", "subject", "scopes", "resource", "created_at",
    "site_token_id", "client_name", "last_used_at", "revoked_at",
    "token_hash", "token_scopes", "generation", "token_created_at", "expires_at", "used_at", "token_revoked_at",
    "live_generation", "live_siblings",
)


def from_sqlite(
    row: sqlite3.Row, load: Callable[[str], tuple[str, ...]]
) -> tuple[model.Grant, model.RefreshToken, Optional[float], int, int]:
    """
    The grant, the presented token, its revocation time and the live
    generation with its size, from a row of L{REFRESH_FACTS}, read by
    position.

    A C{sqlite3.Row} finds a name by comparing it with each column's in
    turn (the facts have nineteen): round nine made the row a dict first
    and built the records through the generic L{from_row}; unpacked by
    position they are built with neither (C{docs/performance.md}, round
    ten).

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
