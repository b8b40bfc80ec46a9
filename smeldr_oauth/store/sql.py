# -*- test-case-name: tests.test_store_sqlite,tests.test_store_postgres -*-
"""
L{IOAuthStore} in SQL, written once for SQLite and PostgreSQL over the
database layer (L{smeldr_oauth.db}).

Every call is one transaction (L{Database.write}) or one statement
(L{Database.read}), so every call is all-or-nothing; what each runs, and
why it is safe under concurrency, is in L{smeldr_oauth.store.transactions}.
This module is the store around them: readiness after the migrations, the
purge in batches, the change watch, and which calls share a group commit.

Revocations are announced (L{Transaction.notify}) so that other processes
drop cached answers at once: see L{SQLStore.watch_changes}.

Only hashes of secrets are stored: the interface never hands plaintext to a
store.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, TypeVar, Union, cast

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from smeldr_oauth.db.database import Before, Database, Transaction
from smeldr_oauth.db.engine import IWatch
from smeldr_oauth.db.errors import StoreUnavailable
from smeldr_oauth.db.migrations import Schema
from smeldr_oauth.oauth.interfaces import (
    CodeRedemption,
    IChangeWatch,
    IOAuthStore,
    RefreshRedemption,
)
from smeldr_oauth.oauth import model
from smeldr_oauth.store import refresh_batch, transactions
from smeldr_oauth.store.common import (
    CLIENT_RETENTION,
    DEFAULT_PURGE_INTERVAL,
    GRANT_RETENTION,
    start_purging,
)
from smeldr_oauth.store.schema import OAUTH_SCHEMA
from smeldr_oauth.store.transactions import CHANGES_CHANNEL

log = Logger()

T = TypeVar("T")

#: Rows (or grants) removed per purge transaction.
PURGE_BATCH = 1000


# The purge's transactions, beside the loop that runs them in batches
# (L{SQLStore.purge_expired}).

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
    """
    Delete up to C{limit} grants revoked at or before C{cutoff}, or live
    ones unused since then with no code or refresh token left, with their
    codes and refresh tokens.

    Access tokens are not looked at: they have no index on C{grant_id}
    (schema migration 4) and go by expiry alone (L{_purge_expired_rows}).
    An access token outlives its grant's last use by at most its lifetime
    (a code exchange records the use; a refresh, at most a minute late), far
    less than the retention; one that does outlive its grant is an orphan,
    refused by every look-up's join on C{grants}.
    """
    grants = txn.execute(
        "SELECT grant_id FROM grants g WHERE"
        " (revoked_at IS NOT NULL AND revoked_at <= ?)"
        " OR (revoked_at IS NULL AND created_at <= ?"
        "  AND COALESCE(last_used_at, created_at) <= ?"
        "  AND NOT EXISTS (SELECT 1 FROM codes c WHERE c.grant_id = g.grant_id)"
        "  AND NOT EXISTS (SELECT 1 FROM refresh_tokens r WHERE r.grant_id = g.grant_id))"
        " LIMIT ?",
        (cutoff, cutoff, cutoff, limit),
    ).fetchall()
    removed = 0
    for (grant_id,) in grants:
        for table in ("codes", "refresh_tokens", "grants"):
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
            if result.check(StoreUnavailable):
                # Out of reach: one line (the next call tries again).
                log.warn("The OAuth database could not be migrated: {error}", error=str(result.value))
            else:
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

    def save_client(self, client: model.Client) -> "Deferred[None]":
        return self._write(transactions.save_client, client)

    def get_client(self, client_id: str) -> "Deferred[Optional[model.Client]]":
        return self._read(transactions.get_client, client_id)

    def count_clients(self) -> "Deferred[int]":
        return self._read(transactions.count_clients)

    def create_grant(self, grant: model.Grant, code: model.AuthorizationCode) -> "Deferred[None]":
        # Consents of one reactor turn may share a transaction (group
        # commit), as refreshes do: each insert's outcome as alone.
        return self.database.write(self._schema, transactions.create_grant, grant, code, group=True)

    def consume_code(self, code_hash: str, now: float) -> "Deferred[CodeRedemption]":
        """
        See L{transactions.consume_code}.
        """
        return self._write(transactions.consume_code, code_hash, now)

    def exchange_code(
        self,
        code_hash: str,
        now: float,
        check: Callable[[model.AuthorizationCode], Any],
        access: model.AccessToken,
        refresh: Optional[model.RefreshToken],
    ) -> "Deferred[CodeRedemption]":
        """
        See L{IOAuthStore.exchange_code}.
        """

        def outcome(result: tuple[CodeRedemption, Optional[Failure]]) -> Any:
            redemption, refused = result
            return redemption if refused is None else refused

        # Exchanges of one reactor turn may share a transaction (group
        # commit): the spend, the checks and the tokens of each in its own
        # savepoint, each outcome (a replay's revocation too) as alone.
        return self.database.write(
            self._schema, transactions.exchange_code, code_hash, now, check, access, refresh, group=True
        ).addCallback(outcome)

    def add_tokens(
        self, grant_id: str, access: model.AccessToken, refresh: Optional[model.RefreshToken]
    ) -> "Deferred[None]":
        """
        Store the tokens of a code exchange under C{grant_id} (the records'
        own C{grant_id} is ignored).  Fails with L{StoreConflict} if the
        grant does not exist or a hash is already stored.
        """
        return self._write(transactions.add_tokens, grant_id, access, refresh)

    def redeem_refresh_token(
        self,
        token_hash: str,
        now: float,
        grace: float,
        requested_scopes: Optional[tuple[str, ...]],
        new_access: model.AccessToken,
        new_refresh: model.RefreshToken,
    ) -> "Deferred[RefreshRedemption]":
        """
        Decide and apply one refresh in one transaction: see
        L{transactions.redeem_refresh_token}.  The new access token takes the decided
        scopes and the grant's resource (a refresh cannot change the
        audience); the new refresh token the grant's scopes and the decided
        generation; both keep the caller's hashes and expiry times.  A
        successful refresh also sets the grant's C{last_used_at}, at most
        once a minute (L{smeldr_oauth.oauth.rotation.USE_RESOLUTION}): see
        L{IOAuthStore.redeem_refresh_token}.
        """
        return self._redeem(None, token_hash, now, grace, requested_scopes, new_access, new_refresh)

    def carries(self, rate_limits: object) -> bool:
        """
        Whether L{redeem_refresh_token_after} can carry C{rate_limits}'
        spends: it is a store of the same database.
        """
        return getattr(rate_limits, "database", None) is self.database and hasattr(rate_limits, "take_both_before")

    def redeem_refresh_token_after(
        self,
        before: Before,
        token_hash: str,
        now: float,
        grace: float,
        requested_scopes: Optional[tuple[str, ...]],
        new_access: model.AccessToken,
        new_refresh: model.RefreshToken,
    ) -> "Deferred[tuple[Any, Any]]":
        """
        L{redeem_refresh_token} carrying a read that decides whether it
        runs (a token request's rate-limit spend, L{Before}), in the same
        hand-off to a database thread: fires with C{(read, redemption)},
        the read's result or L{Failure}, and the redemption, its
        L{Failure}, or C{None} when the read did not let it run.
        """
        return self._redeem(before, token_hash, now, grace, requested_scopes, new_access, new_refresh)

    def _redeem(self, before: Optional[Before], *args: Any) -> "Deferred[Any]":
        # Concurrent refreshes may share one transaction (group commit,
        # when the database has it on), each outcome as it would be alone.
        return self.database.write(
            self._schema,
            transactions.redeem_refresh_token,
            *args,
            group=True,
            together=refresh_batch.redeem_refresh_tokens,
            before=before,
        )

    def lookup_access_token(self, token_hash: str, now: float) -> "Deferred[Optional[model.AccessInfo]]":
        return self._read(transactions.lookup_access_token, token_hash, now)

    def revoke_token(
        self, token_hash: str, now: float, client_id: Optional[str] = None
    ) -> "Deferred[Optional[str]]":
        """
        See L{transactions.revoke_token}.
        """
        return self._write(transactions.revoke_token, token_hash, now, client_id)

    def revoke_grant(self, grant_id: str, now: float) -> "Deferred[bool]":
        return self._write(transactions.revoke_grant, grant_id, now)

    def revoke_grants_of_site_token(self, site_token_id: str, now: float) -> "Deferred[list[str]]":
        return self._write(transactions.revoke_grants_of_site_token, site_token_id, now)

    def list_grants(
        self, subject: Optional[str] = None, site_token_id: Optional[str] = None
    ) -> "Deferred[list[model.Grant]]":
        return self._read(transactions.list_grants, subject, site_token_id)

    def touch_grant(self, grant_id: str, now: float) -> "Deferred[None]":
        return self._write(transactions.touch_grant, grant_id, now)

    def purge_expired(self, now: float) -> "Deferred[int]":
        """
        Delete expired codes, access tokens and refresh tokens; then grants
        revoked more than C{grant_retention} seconds ago, and live grants
        that have no code or refresh token left and no activity (creation,
        last use) for that long, with their codes and refresh tokens (their
        access tokens go when they expire, and are refused until then: see
        L{_purge_dead_grants}); then idle registered clients.  Spent refresh
        tokens stay until they expire: they are what reuse detection reads.

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
