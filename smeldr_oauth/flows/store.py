# -*- test-case-name: tests.test_flows_store -*-
"""
The flow steps in the database: component C{flows} of the one migration
scheme (L{smeldr_oauth.db.migrations}), on SQLite or PostgreSQL; in memory
as a private SQLite C{:memory:} database, so that there is one store, not
two written twice.

Retention is enforced here, in the same transaction as each batch of new
steps (L{FlowStore.record}): steps older than L{Retention.max_age} go,
each client and each grant touched by the batch keeps its newest
L{Retention.per_client} / L{Retention.per_grant} steps, and the whole
table its newest L{Retention.total}.  A flood of junk clients (thousands
of registrations, client_id values, bogus tokens) therefore cannot grow
the table past C{total} rows, however many clients it invents.

With several processes on one PostgreSQL database each process writes its
own batches; ids come from one sequence, so "newest" is one order for all.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Mapping, Optional, Sequence

import attr
from twisted.internet.defer import Deferred
from zope.interface import Interface, implementer

from smeldr_oauth.db import Database, Migration, Schema, Transaction, open_database
from smeldr_oauth.db.rows import from_row
from smeldr_oauth.flows.model import Step

_INDEXES = (
    "CREATE INDEX flow_steps_client ON flow_steps (client_id, id)",
    "CREATE INDEX flow_steps_grant ON flow_steps (grant_id, id)",
    "CREATE INDEX flow_steps_address ON flow_steps (address, id)",
    "CREATE INDEX flow_steps_at ON flow_steps (at)",
)


def _table(id_column: str) -> str:
    return (
        "CREATE TABLE flow_steps ("
        f" id {id_column},"
        " at DOUBLE PRECISION NOT NULL,"
        " kind TEXT NOT NULL,"
        " client_id TEXT,"
        " grant_id TEXT,"
        " address TEXT,"
        " outcome TEXT NOT NULL,"
        " detail TEXT NOT NULL)"
    )


SCHEMA = Schema(
    "flows",
    (
        Migration(
            1,
            sqlite=(_table("INTEGER PRIMARY KEY AUTOINCREMENT"),) + _INDEXES,
            postgresql=(_table("BIGSERIAL PRIMARY KEY"),) + _INDEXES,
        ),
    ),
    tables=("flow_steps",),
)

_COLUMNS = "id, at, kind, client_id, grant_id, address, outcome, detail"


@attr.s(frozen=True, auto_attribs=True)
class Retention:
    """
    How much of the timeline is kept.

    @ivar max_age: seconds a step is kept.
    @ivar per_client: steps kept per client.
    @ivar per_grant: steps kept per grant.
    @ivar total: steps kept in all (clients, grants and requests without
        either together).
    """

    max_age: float = 7 * 24 * 3600.0
    per_client: int = 200
    per_grant: int = 100
    total: int = 20000


@attr.s(frozen=True, auto_attribs=True)
class ClientSummary:
    """One client's line in the list: its latest step and how many are kept."""

    client_id: str
    last_at: float
    steps: int


def _step(row: Any) -> Step:
    try:
        detail = json.loads(row["detail"])
    except ValueError:
        detail = {}
    return from_row(Step, row, at=float(row["at"]), detail=detail if isinstance(detail, dict) else {})


def _keep_newest(txn: Transaction, column: str, value: str, keep: int) -> None:
    txn.execute(
        f"DELETE FROM flow_steps WHERE {column} = ? AND id < ("
        f" SELECT MIN(id) FROM (SELECT id FROM flow_steps WHERE {column} = ? ORDER BY id DESC LIMIT ?) AS newest)",
        (value, value, keep),
    )


#: The detail objects' JSON, by their fields: a tool call's detail (tool,
#: protocol version, transport) repeats from step to step, and encoding
#: it with sorted keys was a third of recording a step.  Cleared when full.
_DETAILS: dict[tuple[tuple[str, str], ...], str] = {}
_MAX_DETAILS = 1024


def _detail_json(detail: Mapping[str, str]) -> str:
    key = tuple(detail.items())
    text = _DETAILS.get(key)
    if text is None:
        if len(_DETAILS) >= _MAX_DETAILS:
            _DETAILS.clear()
        text = _DETAILS[key] = json.dumps(dict(detail), sort_keys=True)
    return text


def _record(
    txn: Transaction,
    steps: Sequence[Step],
    retention: Retention,
    now: float,
    clients: Iterable[str],
    grants: Iterable[str],
) -> None:
    txn.executemany(
        "INSERT INTO flow_steps (at, kind, client_id, grant_id, address, outcome, detail)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        [
            (s.at, s.kind, s.client_id, s.grant_id, s.address, s.outcome, _detail_json(s.detail))
            for s in steps
        ],
    )
    txn.execute("DELETE FROM flow_steps WHERE at < ?", (now - retention.max_age,))
    for client_id in sorted(clients):
        _keep_newest(txn, "client_id", client_id, retention.per_client)
    for grant_id in sorted(grants):
        _keep_newest(txn, "grant_id", grant_id, retention.per_grant)
    # Ids come from one sequence: the newest `total` steps are those above
    # the highest id less `total` (fewer where a rolled-back insert left a
    # gap), found with one index probe rather than a scan.
    txn.execute(
        "DELETE FROM flow_steps WHERE id <= (SELECT MAX(id) FROM flow_steps) - ?", (retention.total,)
    )


def _timeline(
    txn: Transaction, client_id: Optional[str], grant_id: Optional[str], last: int
) -> list[Step]:
    if grant_id is not None:
        # The grant's steps, and its client's steps that name no grant
        # (registration, the authorization page).
        where = (
            "grant_id = ? OR (grant_id IS NULL AND client_id IN"
            " (SELECT client_id FROM flow_steps WHERE grant_id = ?))"
        )
        params: tuple[Any, ...] = (grant_id, grant_id)
    elif client_id is not None:
        # The client's steps, and the anonymous requests (discovery, a
        # 401 without a token) from the addresses it used.
        where = (
            "client_id = ? OR (client_id IS NULL AND address IN"
            " (SELECT address FROM flow_steps WHERE client_id = ? AND address IS NOT NULL))"
        )
        params = (client_id, client_id)
    else:
        where, params = "1 = 1", ()
    rows = txn.execute(
        f"SELECT {_COLUMNS} FROM flow_steps WHERE {where} ORDER BY id DESC LIMIT ?", params + (last,)
    ).fetchall()
    steps = [_step(r) for r in reversed(rows)]
    steps.sort(key=lambda s: s.at)
    return steps


def _clients(txn: Transaction, last: int) -> list[ClientSummary]:
    rows = txn.execute(
        "SELECT client_id, MAX(at) AS last_at, COUNT(*) AS steps FROM flow_steps"
        " WHERE client_id IS NOT NULL GROUP BY client_id ORDER BY MAX(at) DESC LIMIT ?",
        (last,),
    ).fetchall()
    return [ClientSummary(r["client_id"], float(r["last_at"]), int(r["steps"])) for r in rows]


def _count(txn: Transaction) -> int:
    return int(txn.execute("SELECT COUNT(*) FROM flow_steps").fetchone()[0])


class IFlowStore(Interface):
    """
    Where the timeline lives: what the recorder writes to, and the admin
    command and the operator's page read from.
    """

    def record(steps: Sequence[Step], trim: Any = True) -> "Deferred[None]":
        """Add steps and enforce the retention limits, all or nothing."""

    def timeline(
        client_id: Optional[str] = None, grant_id: Optional[str] = None, last: int = 50
    ) -> "Deferred[list[Step]]":
        """The newest steps of a grant, a client, or everyone, oldest first."""

    def clients(last: int = 50) -> "Deferred[list[ClientSummary]]":
        """The clients seen most recently."""

    def count() -> "Deferred[int]":
        """How many steps are kept."""


@implementer(IFlowStore)
class FlowStore:
    """
    The flow steps of one database.  Every method returns a L{Deferred}.

    @param database: the L{Database} (the OAuth store's, so that the
        timeline is shared where the store is).
    @param clock: what "now" is for the age limit.
    """

    schema = SCHEMA

    def __init__(self, database: Database, clock: Any, retention: Retention = Retention()) -> None:
        self.database = database
        self.retention = retention
        self._clock = clock

    @classmethod
    def in_memory(cls, clock: Any, retention: Retention = Retention()) -> "FlowStore":
        """
        A store of this process alone (the in-memory OAuth store's
        companion): SQLite C{:memory:} on the calling thread.
        """
        return cls(open_database(":memory:", threads=0), clock, retention)

    def record(self, steps: Sequence[Step], trim: Any = True) -> "Deferred[None]":
        """
        Add C{steps} and enforce the retention limits, in one transaction.

        @param trim: whose per-client and per-grant limits to enforce:
            C{True}, the clients and grants of C{steps}; C{False}, none
            (the age and total limits always are); or C{(client_ids,
            grant_ids)}.  The recorder trims every few writes, for all the
            clients and grants it wrote since: a statement per client and
            grant is the dearest part of a write.
        """
        steps = list(steps)
        if trim is True:
            clients: Iterable[str] = {s.client_id for s in steps if s.client_id is not None}
            grants: Iterable[str] = {s.grant_id for s in steps if s.grant_id is not None}
        elif trim:
            clients, grants = trim
        else:
            clients, grants = (), ()
        # Grouped: on SQLite on the reactor thread (group commit), the
        # batch shares the transaction and the COMMIT of the refreshes,
        # consents and code exchanges of its reactor turn, in a savepoint of
        # its own, rather than paying for a BEGIN and a COMMIT (1.6-2.5% of
        # a refresh's CPU in round four's profile).
        return self.database.write(
            SCHEMA, _record, steps, self.retention, self._clock.seconds(), clients, grants, group=True
        )

    def timeline(
        self, client_id: Optional[str] = None, grant_id: Optional[str] = None, last: int = 50
    ) -> "Deferred[list[Step]]":
        """
        The newest C{last} steps of a grant, of a client (with the anonymous
        requests from its addresses), or of everyone, oldest first.
        """
        return self.database.read(SCHEMA, _timeline, client_id, grant_id, max(1, last))

    def clients(self, last: int = 50) -> "Deferred[list[ClientSummary]]":
        """The C{last} clients seen most recently."""
        return self.database.read(SCHEMA, _clients, max(1, last))

    def count(self) -> "Deferred[int]":
        """How many steps are kept."""
        return self.database.read(SCHEMA, _count)

    def close(self) -> None:
        self.database.close()
