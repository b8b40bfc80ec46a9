# -*- test-case-name: tests.test_store_postgres -*-
"""
A group-commit batch's refreshes on PostgreSQL in three statements
(L{redeem_refresh_tokens}), whatever their number: the C{together} of
L{smeldr_oauth.store.transactions.redeem_refresh_token} (see
L{smeldr_oauth.db.database.Database.write}).  The rule stays in
L{rotation.decide} and the statements in
L{smeldr_oauth.store.transactions}; only how they are sent differs.
"""

from __future__ import annotations

from typing import Any, Sequence

from smeldr_oauth.db.database import Transaction
from smeldr_oauth.oauth import rotation
from smeldr_oauth.oauth.interfaces import RefreshRedemption
from smeldr_oauth.store.transactions import _apply, _decide, _writes, redeem_refresh_token

#: The most bind parameters in one statement of rotations' writes: libpq
#: refuses more than 65,535, which a rotation's 18 to 20 reach from about
#: 3,300 refreshes on (then the whole batch failed, and was run again one
#: call at a time).  Group commit's batches stay far below that
#: (L{smeldr_oauth.db.database.Database.batch_limit}); past it, the writes
#: go in more than one statement, a rotation's never split.
MAX_PARAMETERS = 30_000


def redeem_refresh_tokens(txn: Transaction, calls: list[tuple[Any, ...]]) -> list[RefreshRedemption]:
    """
    The refreshes of one group-commit batch on PostgreSQL (the arguments of
    L{redeem_refresh_token}, one tuple a call), each with the outcome it
    would have alone after the ones before it, in three round trips
    whatever their number instead of two each:

      - the facts of every presented token, after their grants are locked
        in C{grant_id} order, in one call of C{smeldr_refresh_facts_many}
        (migration 3);
      - L{rotation.decide} for each, in Python, as alone;
      - every rotation's writes in one statement (one per
        L{MAX_PARAMETERS} bind parameters), whose C{RETURNING} says that
        each presented token was spent by this batch.

    A call whose grant an earlier call of the batch has already decided on
    (two refreshes of one grant, or a replay of one token) cannot use the
    facts read before that decision: the writes so far are sent, and it
    runs as L{redeem_refresh_token}, which reads its facts again and so
    sees them, as it would after the earlier call's commit.  So does a
    reuse that ends its grant (rare, and with a notification to send).
    """
    if txn.engine.single_writer:
        return [redeem_refresh_token(txn, *args) for args in calls]
    hashes = list(dict.fromkeys(args[0] for args in calls))
    facts = {
        row["token_hash"]: row
        for row in txn.execute("SELECT * FROM smeldr_refresh_facts_many(?::text[])", (hashes,)).fetchall()
    }
    decided: set[str] = set()
    writes: list[tuple[str, Sequence[Any]]] = []
    spent: list[tuple[int, str]] = []
    results: list[RefreshRedemption] = []
    parameters = 0

    def send() -> None:
        nonlocal parameters
        if writes:
            _write_batch(txn, writes, spent)
            del writes[:], spent[:]
            parameters = 0

    for args in calls:
        token_hash, now, grace, requested_scopes, new_access, new_refresh = args
        row = facts.get(token_hash)
        if row is not None and row["grant_id"] in decided:
            send()
            results.append(redeem_refresh_token(txn, *args))
            continue
        if row is None:
            results.append(RefreshRedemption(status=rotation.UNKNOWN))
            continue
        decided.add(row["grant_id"])
        decision, token, grant = _decide(row, now, grace, requested_scopes)
        if decision.revoke_grant:
            send()
            grant = _apply(txn, decision, token, grant, now, new_access, new_refresh)
        else:
            grant, own = _writes(decision, token, grant, now, new_access, new_refresh)
            own_parameters = sum(len(values) for _, values in own)
            if parameters + own_parameters > MAX_PARAMETERS:
                send()
            parameters += own_parameters
            if decision.mark_used:
                spent.append((len(writes) + len(own) - 1, token.token_hash))
            writes.extend(own)
        results.append(RefreshRedemption(status=decision.status, grant=grant))
    send()
    return results


def _write_batch(
    txn: Transaction, writes: list[tuple[str, Sequence[Any]]], spent: list[tuple[int, str]]
) -> None:
    """
    Send a batch's writes as one statement, each a C{WITH} clause (they
    touch rows of distinct grants, so none depends on another), and
    refuse, as L{_apply} does, if a presented token was not spent by it.
    """
    clauses = ", ".join(f"_{index} AS ({sql})" for index, (sql, _) in enumerate(writes))
    params = [value for _, values in writes for value in values]
    returned = " UNION ALL ".join(f"SELECT token_hash FROM _{index}" for index, _ in spent) or "SELECT NULL"
    txn.execute(f"WITH {clauses} {returned}", params)
    found = {row[0] for row in txn.fetchall()}
    if any(token_hash not in found for _, token_hash in spent):
        raise RuntimeError("refresh token spent concurrently")
