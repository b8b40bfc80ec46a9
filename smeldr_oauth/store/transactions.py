# -*- test-case-name: tests.test_store_sqlite,tests.test_store_postgres -*-
"""
What each call of L{smeldr_oauth.store.sql.SQLStore} runs: plain functions
of a L{Transaction}, the SQL of the authorization server's store, written
once for SQLite and PostgreSQL, with the rows mapped to the records of
L{smeldr_oauth.oauth.model}.

Every call is one transaction (L{Database.write}) or one statement
(L{Database.read}), so every call is all-or-nothing.  The read-decide-write
calls are safe under concurrency from many processes on both engines:

  - spending a code is a conditional C{UPDATE ... WHERE used_at IS NULL}
    whose row count says whether this call spent it: of two concurrent
    exchanges exactly one sees it fresh;
  - a refresh locks its grant's row (C{SELECT ... FOR UPDATE} on
    PostgreSQL; SQLite's C{BEGIN IMMEDIATE} already holds the whole file)
    before it reads the token, its generation and siblings, so concurrent
    refreshes of one grant are decided one after another by the pure
    L{rotation.decide}, each exactly as it would be alone.

Revocations are announced on L{CHANGES_CHANNEL} inside the transaction that
makes them, so that other processes hear of them only once committed.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import attr
from twisted.python.failure import Failure

from smeldr_oauth.db.database import Transaction
from smeldr_oauth.db.errors import StoreConflict
from smeldr_oauth.db.rows import from_row, to_row, where
from smeldr_oauth.oauth import model, rotation
from smeldr_oauth.oauth.interfaces import CodeRedemption, RefreshRedemption
from smeldr_oauth.store import refresh_facts
from smeldr_oauth.store.hashkeys import key_for, shown
from smeldr_oauth.store.scopelists import dump as _dump, load as _load
from smeldr_oauth.store.token_rows import _access_row, _refresh_row

#: Where revocations are announced (PostgreSQL C{NOTIFY}); the payload
#: says what ended (C{"grant <id>"}, C{"access_token <hash>"}).
CHANGES_CHANNEL = "smeldr_oauth_changes"

def _client(row: Any) -> model.Client:
    return from_row(model.Client, row, redirect_uris=_load(row["redirect_uris"]), grant_types=_load(row["grant_types"]))


def _grant(row: Any) -> model.Grant:
    return from_row(model.Grant, row, scopes=_load(row["scopes"]))


def _code(row: Any) -> model.AuthorizationCode:
    hashed, scopes, issue = shown(row["code_hash"]), _load(row["scopes"]), bool(row["issue_refresh"])
    return from_row(model.AuthorizationCode, row, code_hash=hashed, scopes=scopes, issue_refresh=issue)


def _get_grant(txn: Transaction, grant_id: str, lock: bool = False) -> Optional[model.Grant]:
    """
    The grant, or C{None}; with C{lock}, its row stays locked until the
    transaction ends (PostgreSQL), so that every read-decide-write on one
    grant runs one after another.
    """
    sql = "SELECT * FROM grants WHERE grant_id = ?"
    if lock:
        sql += txn.engine.for_update
    row = txn.execute(sql, (grant_id,)).fetchone()
    return None if row is None else _grant(row)


def _insert_grant(txn: Transaction, grant: model.Grant) -> None:
    txn.execute(*to_row("grants", grant, scopes=_dump(grant.scopes)))


#: A grant's use recorded (its C{last_used_at}), by a code exchange, a
#: rotation or a first use of an access token.
RECORD_USE = "UPDATE grants SET last_used_at = ? WHERE grant_id = ?"

#: A rotation's spend of the presented refresh token and the revocation of
#: its generation's other unused tokens, in one statement that returns the
#: hashes it spent (parameters: the token's hash, now, the hash again, now,
#: the grant, the generation).  L{smeldr_oauth.store.refresh_batch} sends a
#: batch's spends as one statement of its own and recognises them by it.
SPEND_GENERATION = (
    "UPDATE refresh_tokens SET"
    " used_at = CASE WHEN token_hash = ? THEN ? ELSE used_at END,"
    " revoked_at = CASE WHEN token_hash = ? THEN revoked_at ELSE ? END"
    " WHERE grant_id = ? AND generation = ? AND used_at IS NULL AND revoked_at IS NULL"
    " RETURNING token_hash"
)


def revoke_grant(txn: Transaction, grant_id: str, now: float) -> bool:
    """
    End a grant and mark its refresh tokens revoked; C{True} if it was live
    (and then other processes are told).

    Its access tokens are not marked: every look-up of an access token
    joins its grant (L{lookup_access_token}, L{revoke_token}), so the
    grant's C{revoked_at} refuses them in the same transaction.  (Access
    tokens have no index on C{grant_id}: schema migration 4.)
    """
    txn.execute(
        "UPDATE grants SET revoked_at = ? WHERE grant_id = ? AND revoked_at IS NULL",
        (now, grant_id),
    )
    ended = txn.rowcount == 1
    txn.execute(
        "UPDATE refresh_tokens SET revoked_at = ? WHERE grant_id = ? AND revoked_at IS NULL",
        (now, grant_id),
    )
    if ended:
        txn.notify(CHANGES_CHANNEL, f"grant {grant_id}")
    return ended


def _revoked(grant: Optional[model.Grant], ended: bool, now: float) -> Optional[model.Grant]:
    """
    C{grant} as it is after L{revoke_grant} returned C{ended}.
    """
    return attr.evolve(grant, revoked_at=now) if ended and grant is not None else grant


# Transactions (each runs in one database transaction; see SQLStore).


def save_client(txn: Transaction, client: model.Client) -> None:
    txn.execute(
        *to_row("clients", client, redirect_uris=_dump(client.redirect_uris), grant_types=_dump(client.grant_types))
    )


def get_client(txn: Transaction, client_id: str) -> Optional[model.Client]:
    row = txn.execute("SELECT * FROM clients WHERE client_id = ?", (client_id,)).fetchone()
    return None if row is None else _client(row)


def count_clients(txn: Transaction) -> int:
    return int(txn.execute("SELECT COUNT(*) FROM clients").fetchone()[0])


def create_grant(txn: Transaction, grant: model.Grant, code: model.AuthorizationCode) -> None:
    if code.grant_id != grant.grant_id:
        raise ValueError("the code does not belong to the grant")
    _insert_grant(txn, grant)
    key, refresh = key_for(txn.engine.name)(code.code_hash), int(code.issue_refresh)
    txn.execute(*to_row("codes", code, code_hash=key, scopes=_dump(code.scopes), issue_refresh=refresh))


def consume_code(txn: Transaction, code_hash: str, now: float) -> CodeRedemption:
    """
    Spend a code with one conditional C{UPDATE} that returns the code only
    to the call that spent it.  Statuses, checked in order:
    C{"unknown"}; C{"replayed"} (spent before: the grant is revoked now,
    whether or not the code has expired since); C{"revoked"} (the grant
    ended before the exchange); C{"expired"}; C{"ok"}.
    """
    key = key_for(txn.engine.name)(code_hash)
    row = txn.execute(
        "UPDATE codes SET used_at = ? WHERE code_hash = ? AND used_at IS NULL RETURNING *",
        (now, key),
    ).fetchone()
    spent_now = row is not None
    if row is None:
        row = txn.execute("SELECT * FROM codes WHERE code_hash = ?", (key,)).fetchone()
        if row is None:
            return CodeRedemption(status="unknown")
    code = _code(row)
    grant = _get_grant(txn, code.grant_id, lock=True)
    if not spent_now:
        ended = revoke_grant(txn, code.grant_id, now)
        return CodeRedemption(status="replayed", code=code, grant=_revoked(grant, ended, now))
    return CodeRedemption.first_spend(code, grant, now)


def exchange_code(
    txn: Transaction,
    code_hash: str,
    now: float,
    check: Callable[[model.AuthorizationCode], Any],
    access: model.AccessToken,
    refresh: Optional[model.RefreshToken],
) -> tuple[CodeRedemption, Optional[Failure]]:
    """
    L{consume_code}, then the checks, then the tokens and the grant's
    C{last_used_at}: see L{IOAuthStore.exchange_code}.  A refusal by
    C{check} is returned (not raised) so that the spend commits.
    """
    redemption = consume_code(txn, code_hash, now)
    if redemption.status != "ok":
        return redemption, None
    code = redemption.code
    assert code is not None
    try:
        check(code)
        if code.issue_refresh and refresh is None:
            raise ValueError("the code issues a refresh token but none was given")
    except Exception:
        return redemption, Failure()
    key = key_for(txn.engine.name)
    rows = [_access_row(access, code.grant_id, code.scopes, code.resource, key)]
    if code.issue_refresh:
        assert refresh is not None
        rows.append(_refresh_row(refresh, code.grant_id, code.scopes, 1, key))
    # The grant's use, recorded here rather than by a transaction of its
    # own when the new token is first used (AccessVerifier.grant_used).
    rows.append((RECORD_USE, (now, code.grant_id)))
    txn.execute_together(rows)
    grant = redemption.grant
    return attr.evolve(redemption, grant=None if grant is None else attr.evolve(grant, last_used_at=now)), None


def add_tokens(
    txn: Transaction, grant_id: str, access: model.AccessToken, refresh: Optional[model.RefreshToken]
) -> None:
    if refresh is not None and not txn.engine.single_writer:
        # No foreign key on PostgreSQL (OAuth migration 8): the grant is looked for, and kept, here.
        if txn.execute("SELECT 1 FROM grants WHERE grant_id = ? FOR KEY SHARE", (grant_id,)).fetchone() is None:
            raise StoreConflict(f"no grant {grant_id!r} for the refresh token")
    key = key_for(txn.engine.name)
    rows = [_access_row(access, grant_id, access.scopes, access.resource, key)]
    if refresh is not None:
        rows.append(_refresh_row(refresh, grant_id, refresh.scopes, refresh.generation, key))
    txn.execute_together(rows)


def redeem_refresh_token(
    txn: Transaction,
    token_hash: str,
    now: float,
    grace: float,
    requested_scopes: Optional[tuple[str, ...]],
    new_access: model.AccessToken,
    new_refresh: model.RefreshToken,
) -> RefreshRedemption:
    """
    Lock the token's grant, then load the token, its grant and the grant's
    live generation, let L{rotation.decide} rule, and apply the ruling.

    SQLite's C{BEGIN IMMEDIATE} already holds the whole file, so there the
    facts are one statement.  PostgreSQL first locks the grant's row: the
    facts are read after the lock, when a concurrent refresh of this grant
    has committed (at C{READ COMMITTED} each statement sees what was
    committed before it began), and its effects are what this one must see.
    Both statements run in one call of a PL/pgSQL function (one round
    trip), whose statements each take a snapshot of their own.
    """
    if txn.engine.single_writer:
        presented = key_for(txn.engine.name)(token_hash)
        row = txn.execute(refresh_facts.REFRESH_FACTS, (presented, presented)).fetchone()
    else:
        # PostgreSQL: the grant's lock, then these facts, in one round
        # trip (schema migration 2's function, as migration 8 wrote it).
        row = txn.execute("SELECT * FROM smeldr_refresh_facts(?)", (token_hash,)).fetchone()
    if row is None:
        return RefreshRedemption(status=rotation.UNKNOWN)
    decision, token, grant = _decide(row, now, grace, requested_scopes)
    return RefreshRedemption(
        status=decision.status,
        grant=_apply(txn, decision, token, grant, now, new_access, new_refresh),
    )


def _decide(
    row: Any, now: float, grace: float, requested_scopes: Optional[tuple[str, ...]]
) -> tuple[rotation.RotationDecision, model.RefreshToken, model.Grant]:
    """
    L{rotation.decide} on one row of refresh facts, SQLite's or
    PostgreSQL's, read by position (L{refresh_facts.records}).
    """
    grant, token, token_revoked_at, live_generation, live_siblings = refresh_facts.records(row, _load)
    decision = rotation.decide(
        token=token,
        token_revoked=token_revoked_at is not None,
        token_revoked_at=token_revoked_at,
        grant=grant,
        live_generation=live_generation,
        live_siblings=live_siblings,
        now=now,
        grace=grace,
        requested_scopes=requested_scopes,
    )
    return decision, token, grant


def _apply(
    txn: Transaction,
    decision: rotation.RotationDecision,
    token: model.RefreshToken,
    grant: model.Grant,
    now: float,
    new_access: model.AccessToken,
    new_refresh: model.RefreshToken,
) -> model.Grant:
    """
    Carry out a L{rotation.RotationDecision} inside the current transaction;
    returns the grant as it now is.
    """
    if decision.revoke_grant and revoke_grant(txn, grant.grant_id, now):
        grant = attr.evolve(grant, revoked_at=now)
    # The writes of a rotation depend on nothing but the decision: one round
    # trip on PostgreSQL (see Transaction.execute_together).
    key = key_for(txn.engine.name)
    grant, writes = _writes(decision, token, grant, now, new_access, new_refresh, key)
    if writes:
        txn.execute_together(writes)
    if decision.mark_used and key(token.token_hash) not in {row[0] for row in txn.fetchall()}:
        # Impossible with the grant locked; refuse rather than fork the chain.
        raise RuntimeError("refresh token spent concurrently")
    return grant


def _writes(
    decision: rotation.RotationDecision,
    token: model.RefreshToken,
    grant: model.Grant,
    now: float,
    new_access: model.AccessToken,
    new_refresh: model.RefreshToken,
    key: Callable[[str], Any] = key_for("postgresql"),
) -> tuple[model.Grant, list[tuple[str, Sequence[Any]]]]:
    """
    The statements of a L{rotation.RotationDecision} other than ending the
    grant, and the grant as they leave it; the spend of the presented
    token, when there is one, comes last and returns the hashes it spent
    (as C{key} stores them: L{key_for}; PostgreSQL's batch leaves it).
    """
    writes: list[tuple[str, Sequence[Any]]] = []
    if decision.new_generation is not None:
        writes.append(_access_row(new_access, grant.grant_id, decision.access_scopes, grant.resource, key))
        writes.append(
            _refresh_row(new_refresh, grant.grant_id, decision.refresh_scopes, decision.new_generation, key)
        )
    if decision.record_use:
        writes.append((RECORD_USE, (now, grant.grant_id)))
        grant = attr.evolve(grant, last_used_at=now)
    if decision.mark_used:
        # Spend the presented token and, with revoke_unused_siblings (they
        # always come together), revoke the other unused tokens of its
        # generation, in one statement.  (The new token is of another
        # generation.)
        assert decision.revoke_unused_siblings
        spent = key(token.token_hash)
        writes.append((SPEND_GENERATION, (spent, now, spent, now, grant.grant_id, token.generation)))
    return grant, writes


def lookup_access_token(txn: Transaction, token_hash: str, now: float) -> Optional[model.AccessInfo]:
    """
    A live access token as its verifier sees it.  The join on C{grants} is
    what refuses a token of a revoked grant (L{revoke_grant} leaves its
    access tokens unmarked) and an orphan whose grant has been purged
    (access tokens have no foreign key: schema migration 4).
    """
    row = txn.execute(
        "SELECT a.scopes, a.resource, a.grant_id, a.expires_at, g.subject, g.client_id"
        " FROM access_tokens a JOIN grants g ON g.grant_id = a.grant_id"
        " WHERE a.token_hash = ? AND a.revoked_at IS NULL"
        " AND g.revoked_at IS NULL AND a.expires_at > ?",
        (key_for(txn.engine.name)(token_hash), now),
    ).fetchone()
    if row is None:
        return None
    return model.AccessInfo(
        subject=row["subject"],
        client_id=row["client_id"],
        scopes=frozenset(_load(row["scopes"])),
        resource=row["resource"],
        grant_id=row["grant_id"],
        expires_at=row["expires_at"],
    )


def revoke_token(
    txn: Transaction, token_hash: str, now: float, client_id: Optional[str]
) -> Optional[str]:
    """
    Revoke an access token (just it) or a refresh token (its whole grant);
    with C{client_id}, only if the token's grant belongs to that client.

    An access token is found through its grant, as L{lookup_access_token}
    finds it: one whose grant is gone (access tokens have no foreign key)
    is unknown here too, and one whose grant is revoked is already refused
    (L{revoke_grant} leaves it unmarked): nothing changes, nobody is told.
    """

    def owned(grant_id: str) -> bool:
        if client_id is None:
            return True
        row = txn.execute("SELECT client_id FROM grants WHERE grant_id = ?", (grant_id,)).fetchone()
        return row is not None and row["client_id"] == client_id

    key = key_for(txn.engine.name)(token_hash)
    row = txn.execute(
        "SELECT g.client_id, g.revoked_at FROM access_tokens a JOIN grants g ON g.grant_id = a.grant_id"
        " WHERE a.token_hash = ?",
        (key,),
    ).fetchone()
    if row is not None:
        if row["revoked_at"] is None and (client_id is None or row["client_id"] == client_id):
            txn.execute(
                "UPDATE access_tokens SET revoked_at = ? WHERE token_hash = ? AND revoked_at IS NULL",
                (now, key),
            )
            if txn.rowcount:
                txn.notify(CHANGES_CHANNEL, f"access_token {token_hash}")
        return None
    row = txn.execute("SELECT grant_id FROM refresh_tokens WHERE token_hash = ?", (key,)).fetchone()
    if row is not None and owned(row["grant_id"]) and revoke_grant(txn, row["grant_id"], now):
        return str(row["grant_id"])
    return None


def revoke_grants_of_site_token(txn: Transaction, site_token_id: str, now: float) -> list[str]:
    rows = txn.execute(
        "SELECT grant_id FROM grants WHERE site_token_id = ? AND revoked_at IS NULL"
        " ORDER BY created_at, grant_id",
        (site_token_id,),
    ).fetchall()
    ended = [str(row["grant_id"]) for row in rows]
    for grant_id in ended:
        revoke_grant(txn, grant_id, now)
    return ended


def list_grants(
    txn: Transaction, subject: Optional[str], site_token_id: Optional[str]
) -> list[model.Grant]:
    clause, params = where("revoked_at IS NULL", ("subject = ?", subject), ("site_token_id = ?", site_token_id))
    rows = txn.execute(f"SELECT * FROM grants{clause} ORDER BY created_at, grant_id", params).fetchall()
    return [_grant(row) for row in rows]


def touch_grant(txn: Transaction, grant_id: str, now: float) -> None:
    txn.execute(RECORD_USE, (now, grant_id))
