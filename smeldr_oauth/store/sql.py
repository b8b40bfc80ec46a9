# -*- test-case-name: tests.test_store_sqlite,tests.test_store_postgres -*-
"""
L{IOAuthStore} in SQL, written once for SQLite and PostgreSQL over the
database layer (L{smeldr_oauth.db}).

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

Revocations are announced (L{Transaction.notify}) so that other processes
drop cached answers at once: see L{SQLStore.watch_changes}.

Only hashes of secrets are stored: the interface never hands plaintext to a
store.
"""

from __future__ import annotations

import functools
import json
from typing import Any, Callable, Optional, Sequence, TypeVar, Union, cast

import attr
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from smeldr_oauth.db.database import Database, Transaction
from smeldr_oauth.db.engine import IWatch
from smeldr_oauth.db.migrations import Schema
from smeldr_oauth.db.rows import from_row, where
from smeldr_oauth.oauth import rotation
from smeldr_oauth.oauth.interfaces import (
    CodeRedemption,
    IChangeWatch,
    IOAuthStore,
    RefreshRedemption,
)
from smeldr_oauth.oauth.model import (
    AccessInfo,
    AccessToken,
    AuthorizationCode,
    Client,
    Grant,
    RefreshToken,
)
from smeldr_oauth.store.common import (
    CLIENT_RETENTION,
    DEFAULT_PURGE_INTERVAL,
    GRANT_RETENTION,
    start_purging,
)
from smeldr_oauth.store.schema import OAUTH_SCHEMA

log = Logger()

T = TypeVar("T")

#: Where revocations are announced (PostgreSQL C{NOTIFY}); the payload
#: says what ended (C{"grant <id>"}, C{"access_token <hash>"}).
CHANGES_CHANNEL = "smeldr_oauth_changes"

#: Rows (or grants) removed per purge transaction.
PURGE_BATCH = 1000


# Scope lists repeat: a server sees a handful of distinct ones, and each
# refresh encodes two and decodes two (a JSON round trip costs about 2 us).
# Tuples and the text are immutable, so remembering them is safe.


@functools.lru_cache(maxsize=256)
def _dump_tuple(values: tuple[str, ...]) -> str:
    return json.dumps(list(values))


def _dump(values: Sequence[str]) -> str:
    if isinstance(values, tuple):
        return _dump_tuple(values)
    return json.dumps(list(values))


@functools.lru_cache(maxsize=256)
def _load(text: str) -> tuple[str, ...]:
    return tuple(json.loads(text))


def _client(row: Any) -> Client:
    return from_row(Client, row, redirect_uris=_load(row["redirect_uris"]), grant_types=_load(row["grant_types"]))


def _grant(row: Any) -> Grant:
    return from_row(Grant, row, scopes=_load(row["scopes"]))


def _code(row: Any) -> AuthorizationCode:
    return from_row(AuthorizationCode, row, scopes=_load(row["scopes"]), issue_refresh=bool(row["issue_refresh"]))


def _get_grant(txn: Transaction, grant_id: str, lock: bool = False) -> Optional[Grant]:
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


def _insert_grant(txn: Transaction, grant: Grant) -> None:
    txn.execute(
        "INSERT INTO grants (grant_id, client_id, subject, scopes, resource,"
        " created_at, site_token_id, client_name, last_used_at, revoked_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            grant.grant_id,
            grant.client_id,
            grant.subject,
            _dump(grant.scopes),
            grant.resource,
            grant.created_at,
            grant.site_token_id,
            grant.client_name,
            grant.last_used_at,
            grant.revoked_at,
        ),
    )


def _access_row(
    access: AccessToken, grant_id: str, scopes: Sequence[str], resource: str
) -> tuple[str, Sequence[Any]]:
    return (
        "INSERT INTO access_tokens (token_hash, grant_id, scopes, resource, expires_at)"
        " VALUES (?, ?, ?, ?, ?)",
        (access.token_hash, grant_id, _dump(scopes), resource, access.expires_at),
    )


def _refresh_row(
    refresh: RefreshToken, grant_id: str, scopes: Sequence[str], generation: int
) -> tuple[str, Sequence[Any]]:
    return (
        "INSERT INTO refresh_tokens (token_hash, grant_id, scopes, generation,"
        " created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?)",
        (
            refresh.token_hash,
            grant_id,
            _dump(scopes),
            generation,
            refresh.created_at,
            refresh.expires_at,
        ),
    )


def _revoke_grant(txn: Transaction, grant_id: str, now: float) -> bool:
    """
    End a grant and mark every token of it revoked; C{True} if it was live
    (and then other processes are told).
    """
    txn.execute(
        "UPDATE grants SET revoked_at = ? WHERE grant_id = ? AND revoked_at IS NULL",
        (now, grant_id),
    )
    ended = txn.rowcount == 1
    for table in ("access_tokens", "refresh_tokens"):
        txn.execute(
            f"UPDATE {table} SET revoked_at = ? WHERE grant_id = ? AND revoked_at IS NULL",
            (now, grant_id),
        )
    if ended:
        txn.notify(CHANGES_CHANNEL, f"grant {grant_id}")
    return ended


def _revoked(grant: Optional[Grant], ended: bool, now: float) -> Optional[Grant]:
    """
    C{grant} as it is after L{_revoke_grant} returned C{ended}.
    """
    return attr.evolve(grant, revoked_at=now) if ended and grant is not None else grant


# Transactions (each runs in one database transaction; see SQLStore).


def _save_client(txn: Transaction, client: Client) -> None:
    txn.execute(
        "INSERT INTO clients (client_id, client_name, redirect_uris,"
        " token_endpoint_auth_method, grant_types, scope, kind,"
        " client_secret_hash, created_at, client_uri, logo_uri)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            client.client_id,
            client.client_name,
            _dump(client.redirect_uris),
            client.token_endpoint_auth_method,
            _dump(client.grant_types),
            client.scope,
            client.kind,
            client.client_secret_hash,
            client.created_at,
            client.client_uri,
            client.logo_uri,
        ),
    )


def _get_client(txn: Transaction, client_id: str) -> Optional[Client]:
    row = txn.execute("SELECT * FROM clients WHERE client_id = ?", (client_id,)).fetchone()
    return None if row is None else _client(row)


def _count_clients(txn: Transaction) -> int:
    return int(txn.execute("SELECT COUNT(*) FROM clients").fetchone()[0])


def _create_grant(txn: Transaction, grant: Grant, code: AuthorizationCode) -> None:
    if code.grant_id != grant.grant_id:
        raise ValueError("the code does not belong to the grant")
    _insert_grant(txn, grant)
    txn.execute(
        "INSERT INTO codes (code_hash, grant_id, client_id, redirect_uri,"
        " code_challenge, scopes, resource, expires_at, issue_refresh)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            code.code_hash,
            grant.grant_id,
            code.client_id,
            code.redirect_uri,
            code.code_challenge,
            _dump(code.scopes),
            code.resource,
            code.expires_at,
            int(code.issue_refresh),
        ),
    )


def _consume_code(txn: Transaction, code_hash: str, now: float) -> CodeRedemption:
    """
    Spend a code with one conditional C{UPDATE} that returns the code only
    to the call that spent it.  Statuses, checked in order:
    C{"unknown"}; C{"replayed"} (spent before: the grant is revoked now,
    whether or not the code has expired since); C{"revoked"} (the grant
    ended before the exchange); C{"expired"}; C{"ok"}.
    """
    row = txn.execute(
        "UPDATE codes SET used_at = ? WHERE code_hash = ? AND used_at IS NULL RETURNING *",
        (now, code_hash),
    ).fetchone()
    spent_now = row is not None
    if row is None:
        row = txn.execute("SELECT * FROM codes WHERE code_hash = ?", (code_hash,)).fetchone()
        if row is None:
            return CodeRedemption(status="unknown")
    code = _code(row)
    grant = _get_grant(txn, code.grant_id, lock=True)
    if not spent_now:
        ended = _revoke_grant(txn, code.grant_id, now)
        return CodeRedemption(status="replayed", code=code, grant=_revoked(grant, ended, now))
    if grant is None or grant.revoked_at is not None:
        return CodeRedemption(status="revoked", code=code, grant=grant)
    if now >= code.expires_at:
        return CodeRedemption(status="expired", code=code, grant=grant)
    return CodeRedemption(status="ok", code=code, grant=grant)


def _exchange_code(
    txn: Transaction,
    code_hash: str,
    now: float,
    check: Callable[[AuthorizationCode], Any],
    access: AccessToken,
    refresh: Optional[RefreshToken],
) -> tuple[CodeRedemption, Optional[Failure]]:
    """
    L{_consume_code}, then the checks, then the tokens and the grant's
    C{last_used_at}: see L{IOAuthStore.exchange_code}.  A refusal by
    C{check} is returned (not raised) so that the spend commits.
    """
    redemption = _consume_code(txn, code_hash, now)
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
    rows = [_access_row(access, code.grant_id, code.scopes, code.resource)]
    if code.issue_refresh:
        assert refresh is not None
        rows.append(_refresh_row(refresh, code.grant_id, code.scopes, 1))
    # The grant's use, recorded here rather than by a transaction of its
    # own when the new token is first used (AccessVerifier.grant_used).
    rows.append(("UPDATE grants SET last_used_at = ? WHERE grant_id = ?", (now, code.grant_id)))
    txn.execute_together(rows)
    grant = redemption.grant
    return attr.evolve(redemption, grant=None if grant is None else attr.evolve(grant, last_used_at=now)), None


def _add_tokens(
    txn: Transaction, grant_id: str, access: AccessToken, refresh: Optional[RefreshToken]
) -> None:
    rows = [_access_row(access, grant_id, access.scopes, access.resource)]
    if refresh is not None:
        rows.append(_refresh_row(refresh, grant_id, refresh.scopes, refresh.generation))
    txn.execute_together(rows)


#: Everything a refresh decides on, in one statement: the grant, the
#: presented token, and the grant's live generation with its size.
_REFRESH_FACTS = (
    "SELECT g.*, t.token_hash, t.scopes AS token_scopes, t.generation,"
    " t.created_at AS token_created_at, t.expires_at, t.used_at, t.revoked_at AS token_revoked_at,"
    " live.generation AS live_generation, live.siblings AS live_siblings"
    " FROM refresh_tokens t JOIN grants g ON g.grant_id = t.grant_id,"
    " (SELECT generation, COUNT(*) AS siblings FROM refresh_tokens"
    "  WHERE grant_id = (SELECT grant_id FROM refresh_tokens WHERE token_hash = ?)"
    "  GROUP BY generation ORDER BY generation DESC LIMIT 1) live"
    " WHERE t.token_hash = ?"
)


def _redeem_refresh_token(
    txn: Transaction,
    token_hash: str,
    now: float,
    grace: float,
    requested_scopes: Optional[tuple[str, ...]],
    new_access: AccessToken,
    new_refresh: RefreshToken,
) -> RefreshRedemption:
    """
    Lock the token's grant, then load the token, its grant and the grant's
    live generation, let L{rotation.decide} rule, and apply the ruling.

    SQLite's C{BEGIN IMMEDIATE} already holds the whole file, so there the
    facts are one statement.  PostgreSQL first locks the grant's row: the
    facts are read after the lock, when a concurrent refresh of this grant
    has committed (at C{READ COMMITTED} each statement sees what was
    committed before it began), and its effects are what this one must see.
    """
    if not txn.engine.single_writer:
        txn.execute(
            "SELECT 1 FROM refresh_tokens t JOIN grants g ON g.grant_id = t.grant_id"
            " WHERE t.token_hash = ?" + txn.engine.for_update,
            (token_hash,),
        )
    row = txn.execute(_REFRESH_FACTS, (token_hash, token_hash)).fetchone()
    if row is None:
        return RefreshRedemption(status=rotation.UNKNOWN)
    grant = _grant(row)
    token = RefreshToken(
        token_hash=row["token_hash"],
        grant_id=grant.grant_id,
        scopes=_load(row["token_scopes"]),
        generation=row["generation"],
        created_at=row["token_created_at"],
        expires_at=row["expires_at"],
        used_at=row["used_at"],
    )
    decision = rotation.decide(
        token=token,
        token_revoked=row["token_revoked_at"] is not None,
        token_revoked_at=row["token_revoked_at"],
        grant=grant,
        live_generation=row["live_generation"],
        live_siblings=row["live_siblings"],
        now=now,
        grace=grace,
        requested_scopes=requested_scopes,
    )
    return RefreshRedemption(
        status=decision.status,
        grant=_apply(txn, decision, token, grant, now, new_access, new_refresh),
    )


def _apply(
    txn: Transaction,
    decision: rotation.RotationDecision,
    token: RefreshToken,
    grant: Grant,
    now: float,
    new_access: AccessToken,
    new_refresh: RefreshToken,
) -> Grant:
    """
    Carry out a L{rotation.RotationDecision} inside the current transaction;
    returns the grant as it now is.
    """
    if decision.revoke_grant and _revoke_grant(txn, grant.grant_id, now):
        grant = attr.evolve(grant, revoked_at=now)
    # The writes of a rotation depend on nothing but the decision: one round
    # trip on PostgreSQL (see Transaction.execute_together).
    writes: list[tuple[str, Sequence[Any]]] = []
    if decision.new_generation is not None:
        writes.append(_access_row(new_access, grant.grant_id, decision.access_scopes, grant.resource))
        writes.append(
            _refresh_row(new_refresh, grant.grant_id, decision.refresh_scopes, decision.new_generation)
        )
        writes.append(("UPDATE grants SET last_used_at = ? WHERE grant_id = ?", (now, grant.grant_id)))
        grant = attr.evolve(grant, last_used_at=now)
    if decision.mark_used:
        # Spend the presented token and, with revoke_unused_siblings (they
        # always come together), revoke the other unused tokens of its
        # generation, in one statement.  (The new token is of another
        # generation.)
        assert decision.revoke_unused_siblings
        writes.append(
            (
                "UPDATE refresh_tokens SET"
                " used_at = CASE WHEN token_hash = ? THEN ? ELSE used_at END,"
                " revoked_at = CASE WHEN token_hash = ? THEN revoked_at ELSE ? END"
                " WHERE grant_id = ? AND generation = ? AND used_at IS NULL AND revoked_at IS NULL"
                " RETURNING token_hash",
                (token.token_hash, now, token.token_hash, now, grant.grant_id, token.generation),
            )
        )
    if writes:
        txn.execute_together(writes)
    if decision.mark_used and token.token_hash not in {row[0] for row in txn.fetchall()}:
        # Impossible with the grant locked; refuse rather than fork the chain.
        raise RuntimeError("refresh token spent concurrently")
    return grant


def _lookup_access_token(txn: Transaction, token_hash: str, now: float) -> Optional[AccessInfo]:
    row = txn.execute(
        "SELECT a.scopes, a.resource, a.grant_id, a.expires_at, g.subject, g.client_id"
        " FROM access_tokens a JOIN grants g ON g.grant_id = a.grant_id"
        " WHERE a.token_hash = ? AND a.revoked_at IS NULL"
        " AND g.revoked_at IS NULL AND a.expires_at > ?",
        (token_hash, now),
    ).fetchone()
    if row is None:
        return None
    return AccessInfo(
        subject=row["subject"],
        client_id=row["client_id"],
        scopes=frozenset(_load(row["scopes"])),
        resource=row["resource"],
        grant_id=row["grant_id"],
        expires_at=row["expires_at"],
    )


def _revoke_token(
    txn: Transaction, token_hash: str, now: float, client_id: Optional[str]
) -> Optional[str]:
    """
    Revoke an access token (just it) or a refresh token (its whole grant);
    with C{client_id}, only if the token's grant belongs to that client.
    """

    def owned(grant_id: str) -> bool:
        if client_id is None:
            return True
        row = txn.execute("SELECT client_id FROM grants WHERE grant_id = ?", (grant_id,)).fetchone()
        return row is not None and row["client_id"] == client_id

    row = txn.execute("SELECT grant_id FROM access_tokens WHERE token_hash = ?", (token_hash,)).fetchone()
    if row is not None:
        if owned(row["grant_id"]):
            txn.execute(
                "UPDATE access_tokens SET revoked_at = ? WHERE token_hash = ? AND revoked_at IS NULL",
                (now, token_hash),
            )
            if txn.rowcount:
                txn.notify(CHANGES_CHANNEL, f"access_token {token_hash}")
        return None
    row = txn.execute("SELECT grant_id FROM refresh_tokens WHERE token_hash = ?", (token_hash,)).fetchone()
    if row is not None and owned(row["grant_id"]) and _revoke_grant(txn, row["grant_id"], now):
        return str(row["grant_id"])
    return None


def _revoke_grants_of_site_token(txn: Transaction, site_token_id: str, now: float) -> list[str]:
    rows = txn.execute(
        "SELECT grant_id FROM grants WHERE site_token_id = ? AND revoked_at IS NULL"
        " ORDER BY created_at, grant_id",
        (site_token_id,),
    ).fetchall()
    ended = [str(row["grant_id"]) for row in rows]
    for grant_id in ended:
        _revoke_grant(txn, grant_id, now)
    return ended


def _list_grants(
    txn: Transaction, subject: Optional[str], site_token_id: Optional[str]
) -> list[Grant]:
    clause, params = where("revoked_at IS NULL", ("subject = ?", subject), ("site_token_id = ?", site_token_id))
    rows = txn.execute(f"SELECT * FROM grants{clause} ORDER BY created_at, grant_id", params).fetchall()
    return [_grant(row) for row in rows]


def _touch_grant(txn: Transaction, grant_id: str, now: float) -> None:
    txn.execute("UPDATE grants SET last_used_at = ? WHERE grant_id = ?", (now, grant_id))


_EXPIRING = {"codes": "code_hash", "access_tokens": "token_hash", "refresh_tokens": "token_hash"}


def _purge_expired_rows(txn: Transaction, table: str, now: float, limit: int) -> int:
    key = _EXPIRING[table]
    txn.execute(
        f"DELETE FROM {table} WHERE {key} IN"
        f" (SELECT {key} FROM {table} WHERE expires_at <= ? LIMIT ?)",
        (now, limit),
    )
    return txn.rowcount


def _purge_idle_clients(txn: Transaction, cutoff: float, limit: int) -> int:
    """
    Delete up to C{limit} clients created at or before C{cutoff} that no
    grant refers to.
    """
    txn.execute(
        "DELETE FROM clients WHERE client_id IN (SELECT client_id FROM clients"
        " WHERE created_at <= ? AND client_id NOT IN (SELECT client_id FROM grants) LIMIT ?)",
        (cutoff, limit),
    )
    return txn.rowcount


def _purge_dead_grants(txn: Transaction, cutoff: float, limit: int) -> tuple[int, int]:
    grants = txn.execute(
        "SELECT grant_id FROM grants g WHERE"
        " (revoked_at IS NOT NULL AND revoked_at <= ?)"
        " OR (revoked_at IS NULL AND created_at <= ?"
        "  AND COALESCE(last_used_at, created_at) <= ?"
        "  AND NOT EXISTS (SELECT 1 FROM codes c WHERE c.grant_id = g.grant_id)"
        "  AND NOT EXISTS (SELECT 1 FROM access_tokens a WHERE a.grant_id = g.grant_id)"
        "  AND NOT EXISTS (SELECT 1 FROM refresh_tokens r WHERE r.grant_id = g.grant_id))"
        " LIMIT ?",
        (cutoff, cutoff, cutoff, limit),
    ).fetchall()
    removed = 0
    for (grant_id,) in grants:
        for table in ("codes", "access_tokens", "refresh_tokens", "grants"):
            txn.execute(f"DELETE FROM {table} WHERE grant_id = ?", (grant_id,))
            removed += txn.rowcount
    return removed, len(grants)


@implementer(IOAuthStore)
class SQLStore:
    """
    The authorization server's store in a L{Database} (SQLite or
    PostgreSQL).

    Construct it, then wait for L{ready} (or use L{open}) before relying on
    it; calls made earlier wait for the migrations, so they are safe, but a
    failed migration fails them too (and the next call tries again: a
    database that was down at start-up is picked up when it comes back).

    @ivar database: the L{Database}; closed by L{close}.
    """

    def __init__(
        self,
        database: Database,
        clock: Optional[IReactorTime] = None,
        *,
        schema: Schema = OAUTH_SCHEMA,
        grant_retention: float = GRANT_RETENTION,
        client_retention: float = CLIENT_RETENTION,
    ) -> None:
        """
        @param clock: the default clock of L{start_purging} and
            L{watch_changes}, and what a long purge yields to between
            batches; the database's reactor when C{None}.
        @param schema: the tables (tests use broken ones).
        @param grant_retention: seconds a revoked or dead grant is kept.
        @param client_retention: seconds a registered client is kept when
            no grant refers to it.
        """
        self.database = database
        self._clock: IReactorTime = clock if clock is not None else database.reactor
        self._schema = schema
        self._closed = False
        self._grant_retention = grant_retention
        self._client_retention = client_retention
        self._outcome: Optional[Union[SQLStore, Failure]] = None
        self._waiting: list[Deferred[Any]] = []
        database.ensure(schema).addBoth(self._migrated)

    def _migrated(self, result: object) -> None:
        if isinstance(result, Failure):
            log.failure("The OAuth database could not be migrated", result)
        self._outcome = result if isinstance(result, Failure) else self
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            self._fire(d)

    def _fire(self, d: "Deferred[Any]") -> None:
        if isinstance(self._outcome, Failure):
            d.errback(self._outcome)
        else:
            d.callback(self)

    @property
    def ready(self) -> "Deferred[Any]":
        """
        A new L{Deferred} on each access (so that several waiters cannot
        spoil each other's result) that fires with the store once its schema
        is current, or fails if it could not be made current (the database
        is down, or was written by a newer version).
        """
        d: Deferred[Any] = Deferred()
        if self._outcome is None:
            self._waiting.append(d)
        else:
            self._fire(d)
        return d

    def close(self) -> None:
        """
        Close the database (work already queued finishes first).
        """
        if not self._closed:
            self._closed = True
            self.database.close()

    def start_purging(
        self, clock: Optional[IReactorTime] = None, interval: float = DEFAULT_PURGE_INTERVAL
    ) -> LoopingCall:
        """
        Purge expired rows now and every C{interval} seconds: see
        L{smeldr_oauth.store.common.start_purging}.
        """
        return start_purging(self, clock if clock is not None else self._clock, interval)

    def watch_changes(
        self,
        callback: Callable[[Optional[str]], None],
        clock: Optional[IReactorTime] = None,
        interval: float = 1.0,
    ) -> IChangeWatch:
        """
        See L{IOAuthStore.watch_changes}: PostgreSQL pushes each revocation
        made by any process (C{"grant <id>"}, C{"access_token <hash>"});
        SQLite polls C{PRAGMA data_version} every C{interval} seconds.
        """
        watch: IWatch = self.database.watch(
            CHANGES_CHANNEL, callback, clock if clock is not None else self._clock, interval
        )
        # The database layer's watches have the one method IChangeWatch asks for.
        return cast(IChangeWatch, watch)

    def _write(self, func: Callable[..., T], *args: Any) -> "Deferred[T]":
        return self.database.write(self._schema, func, *args)

    def _read(self, func: Callable[..., T], *args: Any) -> "Deferred[T]":
        return self.database.read(self._schema, func, *args)

    def save_client(self, client: Client) -> "Deferred[None]":
        return self._write(_save_client, client)

    def get_client(self, client_id: str) -> "Deferred[Optional[Client]]":
        return self._read(_get_client, client_id)

    def count_clients(self) -> "Deferred[int]":
        return self._read(_count_clients)

    def create_grant(self, grant: Grant, code: AuthorizationCode) -> "Deferred[None]":
        return self._write(_create_grant, grant, code)

    def consume_code(self, code_hash: str, now: float) -> "Deferred[CodeRedemption]":
        """
        See L{_consume_code}.
        """
        return self._write(_consume_code, code_hash, now)

    def exchange_code(
        self,
        code_hash: str,
        now: float,
        check: Callable[[AuthorizationCode], Any],
        access: AccessToken,
        refresh: Optional[RefreshToken],
    ) -> "Deferred[CodeRedemption]":
        """
        See L{IOAuthStore.exchange_code}.
        """

        def outcome(result: tuple[CodeRedemption, Optional[Failure]]) -> Any:
            redemption, refused = result
            return redemption if refused is None else refused

        return self._write(_exchange_code, code_hash, now, check, access, refresh).addCallback(outcome)

    def add_tokens(
        self, grant_id: str, access: AccessToken, refresh: Optional[RefreshToken]
    ) -> "Deferred[None]":
        """
        Store the tokens of a code exchange under C{grant_id} (the records'
        own C{grant_id} is ignored).  Fails with L{StoreConflict} if the
        grant does not exist or a hash is already stored.
        """
        return self._write(_add_tokens, grant_id, access, refresh)

    def redeem_refresh_token(
        self,
        token_hash: str,
        now: float,
        grace: float,
        requested_scopes: Optional[tuple[str, ...]],
        new_access: AccessToken,
        new_refresh: RefreshToken,
    ) -> "Deferred[RefreshRedemption]":
        """
        Decide and apply one refresh in one transaction: see
        L{_redeem_refresh_token}.  The new access token takes the decided
        scopes and the grant's resource (a refresh cannot change the
        audience); the new refresh token the grant's scopes and the decided
        generation; both keep the caller's hashes and expiry times.  A
        successful refresh also sets the grant's C{last_used_at}.
        """
        # Concurrent refreshes may share one transaction (group commit,
        # when the database has it on), each outcome as it would be alone.
        return self.database.write(
            self._schema,
            _redeem_refresh_token,
            token_hash,
            now,
            grace,
            requested_scopes,
            new_access,
            new_refresh,
            group=True,
        )

    def lookup_access_token(self, token_hash: str, now: float) -> "Deferred[Optional[AccessInfo]]":
        return self._read(_lookup_access_token, token_hash, now)

    def revoke_token(
        self, token_hash: str, now: float, client_id: Optional[str] = None
    ) -> "Deferred[Optional[str]]":
        """
        See L{_revoke_token}.
        """
        return self._write(_revoke_token, token_hash, now, client_id)

    def revoke_grant(self, grant_id: str, now: float) -> "Deferred[bool]":
        return self._write(_revoke_grant, grant_id, now)

    def revoke_grants_of_site_token(self, site_token_id: str, now: float) -> "Deferred[list[str]]":
        return self._write(_revoke_grants_of_site_token, site_token_id, now)

    def list_grants(
        self, subject: Optional[str] = None, site_token_id: Optional[str] = None
    ) -> "Deferred[list[Grant]]":
        return self._read(_list_grants, subject, site_token_id)

    def touch_grant(self, grant_id: str, now: float) -> "Deferred[None]":
        return self._write(_touch_grant, grant_id, now)

    def purge_expired(self, now: float) -> "Deferred[int]":
        """
        Delete expired codes, access tokens and refresh tokens; then grants
        revoked more than C{grant_retention} seconds ago, and live grants
        that have no code or token left and no activity (creation, last use)
        for that long, with whatever still hangs from them; then idle
        registered clients.  Spent refresh tokens stay until they expire:
        they are what reuse detection reads.

        The work is done in transactions of at most L{smeldr_oauth.store.sql.PURGE_BATCH} rows,
        with a turn of the reactor between them, so that a large backlog
        never holds the database (or, with C{--db-threads 0}, the reactor)
        for long.
        """
        return Deferred.fromCoroutine(self._purge(now))

    async def _purge(self, now: float) -> int:
        cutoff = now - self._grant_retention
        removed = 0
        for table in ("codes", "access_tokens", "refresh_tokens"):
            while True:
                count = await self._write(_purge_expired_rows, table, now, PURGE_BATCH)
                removed += count
                if count < PURGE_BATCH:
                    break
                await self._yield()
        while True:
            count, grants = await self._write(_purge_dead_grants, cutoff, PURGE_BATCH)
            removed += count
            if grants < PURGE_BATCH:
                break
            await self._yield()
        while True:
            count = await self._write(_purge_idle_clients, now - self._client_retention, PURGE_BATCH)
            removed += count
            if count < PURGE_BATCH:
                break
            await self._yield()
        return removed

    def _yield(self) -> "Deferred[None]":
        if self._clock is None:
            return succeed(None)
        return deferLater(self._clock, 0, lambda: None)
