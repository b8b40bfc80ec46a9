# -*- test-case-name: tests.test_store_postgres,tests.test_store_sqlite -*-
"""
A group-commit batch's refreshes on PostgreSQL in three statements
(L{redeem_refresh_tokens}), whatever their number: the C{together} of
L{smeldr_oauth.store.transactions.redeem_refresh_token} (see
L{smeldr_oauth.db.database.Database.write}).  The rule stays in
L{rotation.decide} and the statements in
L{smeldr_oauth.store.transactions}; only how they are sent differs.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Optional, Sequence

from smeldr_oauth.db.arrays import number_array, text_array
from smeldr_oauth.db.database import Transaction
from smeldr_oauth.db.postgres import scrub
from smeldr_oauth.oauth import rotation
from smeldr_oauth.oauth.interfaces import RefreshRedemption
from smeldr_oauth.store.refresh_facts import GRANT_ID, TOKEN_HASH
from smeldr_oauth.store.rotation_writes import TABLES, WRITE_ROTATIONS, columns
from smeldr_oauth.store.transactions import (
    RECORD_USE,
    SPEND_GENERATION,
    _apply,
    _decide,
    _writes,
    redeem_refresh_token,
)

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
      - every rotation's writes in one call of C{smeldr_write_rotations}
        (one per L{MAX_PARAMETERS} parameters; OAuth migration 10), which
        fails unless each presented token was spent by this batch.

    A call whose grant an earlier call of the batch has already decided on
    (two refreshes of one grant, or a replay of one token) cannot use the
    facts read before that decision: the writes so far are sent, and it
    runs as L{redeem_refresh_token}, which reads its facts again and so
    sees them, as it would after the earlier call's commit.  So does a
    reuse that ends its grant (rare, and with a notification to send).
    """
    if txn.engine.single_writer:
        # SQLite: one call after another, each reading its facts after the
        # writes before it, as alone; being a together, without a
        # savepoint each (Database.write), the refreshes' saving there.
        return [redeem_refresh_token(txn, *args) for args in calls]
    hashes: list[object] = list(dict.fromkeys(args[0] for args in calls))
    # simple: in the round trip of the batch's BEGIN (Transaction.begin_later).
    facts = {
        row[TOKEN_HASH]: row
        for row in txn.execute(
            "SELECT * FROM smeldr_refresh_facts_many(?::text[])", (text_array(hashes),), simple=True
        ).fetchall()
    }
    decided: set[str] = set()
    writes: list[tuple[str, Sequence[Any]]] = []
    spent: list[tuple[int, str]] = []
    results: list[RefreshRedemption] = []
    parameters = 0

    def send(last: bool = False) -> None:
        nonlocal parameters
        if writes:
            _write_batch(txn, writes, spent, last)
            del writes[:], spent[:]
            parameters = 0

    for args in calls:
        token_hash, now, grace, requested_scopes, new_access, new_refresh = args
        row = facts.get(token_hash)
        if row is not None and row[GRANT_ID] in decided:
            send()
            results.append(redeem_refresh_token(txn, *args))
            continue
        if row is None:
            results.append(RefreshRedemption(status=rotation.UNKNOWN))
            continue
        decided.add(row[GRANT_ID])
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
    send(last=True)
    return results


#: An insert of one row of named columns, as the rotation sends its new
#: tokens: a batch sends all rows of such inserts into each table of
#: L{TABLES} as one array parameter a column (L{columns}).
_INSERT = re.compile(r"INSERT INTO (\w+) \(([\w, ]+)\) VALUES \([?, ]+\)\Z")


@functools.lru_cache(maxsize=64)
def _shape(sql: str) -> Optional[tuple[str, tuple[str, ...]]]:
    """
    The table and the columns of an insert of one row (L{_INSERT}), or
    C{None} for a statement of another shape; remembered, since the same
    few statement texts arrive with every refresh.
    """
    match = _INSERT.match(sql)
    return None if match is None else (match.group(1), tuple(match.group(2).split(", ")))


def _write_batch(
    txn: Transaction, writes: list[tuple[str, Sequence[Any]]], spent: list[tuple[int, str]], last: bool = False
) -> None:
    """
    Send a batch's writes as one call of C{smeldr_write_rotations} (they
    touch rows of distinct grants, so none depends on another; see
    L{smeldr_oauth.store.rotation_writes}), which refuses, as L{_apply}
    does, if a presented token was not spent by it.

    The rows of each kind of write travel as one array parameter a
    column, so the statement's text is the same whatever the batch
    holds: PostgreSQL parses one short statement instead of a clause per
    write (a batch of 25 refreshes was 75 clauses and 450 parameters, a
    text never seen before, parsed and planned at 1.9 ms of backend CPU),
    and plans only the call (the function's statements are planned once
    a session).  Writes of another shape (none today) go first, as one
    clause each.  Text values are stored with a NUL as U+FFFD, as every
    text parameter is on PostgreSQL (L{smeldr_oauth.db.postgres}), which
    refuses C{\\u0000} in text; floats keep their exact value (Python
    writes the shortest decimal that reads back as the same double).
    """
    rows: dict[str, list[dict[str, Any]]] = {table: [] for table in TABLES}
    # Columns: (now, grant_id) and (token_hash, now, grant_id, generation).
    record_use: tuple[list[Any], ...] = ([], [])
    spends: tuple[list[Any], ...] = ([], [], [], [])
    others: list[tuple[str, Sequence[Any]]] = []
    others_spent: list[int] = []
    spent_at = {index for index, _ in spent}
    for position, (sql, values) in enumerate(writes):
        if sql == SPEND_GENERATION:
            token_hash, now, _, _, grant_id, generation = values
            for column, value in zip(spends, (token_hash, now, grant_id, generation)):
                column.append(value)
        elif sql == RECORD_USE:
            record_use[0].append(values[0])
            record_use[1].append(values[1])
        else:
            shape = _shape(sql)
            if shape is None or shape[0] not in rows:
                if position in spent_at:
                    others_spent.append(len(others))
                others.append((sql, [scrub(value) for value in values]))
                continue
            rows[shape[0]].append(dict(zip(shape[1], values)))
    found: set[str] = set()
    if others:
        _write_clauses(txn, others, others_spent, found)
        # Tokens spent by those clauses are checked here, the rest in the
        # function.
        spent = [(index, token_hash) for index, token_hash in spent if token_hash not in found]
    expected: list[object] = [*sorted({token_hash for _, token_hash in spent})]
    # The batch's last statement takes the COMMIT with it when it may:
    # one round trip instead of two.
    txn.execute(
        WRITE_ROTATIONS,
        [
            *(column for table in TABLES for column in columns(table, rows[table])),
            number_array(record_use[0]),
            text_array(record_use[1]),
            text_array(spends[0]),
            number_array(spends[1]),
            text_array(spends[2]),
            number_array(spends[3]),
            text_array(expected),
        ],
        simple=True,
        commit=last and not others and txn.may_commit,
    )


def _write_clauses(
    txn: Transaction, writes: list[tuple[str, Sequence[Any]]], spent: list[int], found: set[str]
) -> None:
    """
    Writes as one statement of one C{WITH} clause each (round seven's
    shape), for writes L{_write_batch} does not know; the rows returned by
    the clauses in C{spent} go into C{found}.
    """
    clauses = ", ".join(f"_{index} AS ({sql})" for index, (sql, _) in enumerate(writes))
    values = [value for _, row in writes for value in row]
    returned = " UNION ALL ".join(f"SELECT token_hash FROM _{index}" for index in spent) or "SELECT NULL"
    txn.execute(f"WITH {clauses} {returned}", values)
    found.update(row[0] for row in txn.fetchall())
