# -*- test-case-name: tests.test_store_memory -*-
"""
L{IOAuthStore} in memory: for tests, and for embedding where losing every
grant on restart is acceptable.

It keeps the semantics of L{smeldr_oauth.store.sql.SQLStore} (the same
behavioural tests run against both, and both defer refresh decisions to
L{smeldr_oauth.oauth.rotation.decide}).  Atomicity comes from doing all the
checks of a call before its first change; everything runs on the reactor
thread, so no call can interleave with another.  Results are already-fired
L{Deferred}s.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, TypeVar

import attr
from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from zope.interface import implementer

from smeldr_oauth.oauth import model, rotation
from smeldr_oauth.db.errors import StoreConflict
from smeldr_oauth.oauth.interfaces import (
    CodeRedemption,
    IChangeWatch,
    IOAuthStore,
    RefreshRedemption,
)
from smeldr_oauth.store.common import (
    CLIENT_RETENTION,
    DEFAULT_PURGE_INTERVAL,
    GRANT_RETENTION,
    start_purging,
)

T = TypeVar("T")


def _call(f: Callable[[], T]) -> "Deferred[T]":
    """
    C{f()} as an already fired L{Deferred}: its value, or its exception (or
    the L{Failure} it returns) as the Deferred's failure.
    """
    try:
        result = f()
    except Exception:
        return fail()
    if isinstance(result, Failure):
        return fail(result)
    return succeed(result)


@implementer(IChangeWatch)
class _NoChanges:
    """
    What L{MemoryStore.watch_changes} returns: no other process shares
    the dictionaries, so there is nothing to hear.
    """

    running = True

    def stop(self) -> None:
        self.running = False


@implementer(IOAuthStore)
class MemoryStore:
    """
    Clients, grants, codes and tokens in dictionaries keyed by id or hash.
    """

    def __init__(
        self,
        clock: Optional[IReactorTime] = None,
        *,
        grant_retention: float = GRANT_RETENTION,
        client_retention: float = CLIENT_RETENTION,
    ) -> None:
        """
        @param clock: the default clock of L{start_purging}.
        @param grant_retention: seconds a revoked or dead grant is kept.
        @param client_retention: seconds a registered client is kept when
            no grant refers to it.
        """
        self._clock = clock
        self._grant_retention = grant_retention
        self._client_retention = client_retention
        self._clients: dict[str, model.Client] = {}
        self._grants: dict[str, model.Grant] = {}
        self._codes: dict[str, model.AuthorizationCode] = {}
        self._code_used: dict[str, float] = {}
        self._access: dict[str, model.AccessToken] = {}
        self._access_revoked: dict[str, float] = {}
        self._refresh: dict[str, model.RefreshToken] = {}
        self._refresh_revoked: dict[str, float] = {}

    def close(self) -> None:
        """
        Nothing to release; here so that both stores close alike.
        """

    def start_purging(
        self, clock: Optional[IReactorTime] = None, interval: float = DEFAULT_PURGE_INTERVAL
    ) -> LoopingCall:
        """
        Purge expired rows now and every C{interval} seconds: see
        L{smeldr_oauth.store.common.start_purging}.
        """
        clock = clock if clock is not None else self._clock
        if clock is None:
            raise ValueError("start_purging needs a clock")
        return start_purging(self, clock, interval)

    def watch_changes(
        self,
        callback: Callable[[Optional[str]], None],
        clock: Optional[IReactorTime] = None,
        interval: float = 1.0,
    ) -> IChangeWatch:
        """
        Nothing to watch: no other process shares this store.
        """
        return _NoChanges()

    # Helpers

    def _revoke_grant(self, grant_id: str, now: float) -> bool:
        grant = self._grants.get(grant_id)
        if grant is None:
            return False
        ended = grant.revoked_at is None
        if ended:
            self._grants[grant_id] = attr.evolve(grant, revoked_at=now)
        # Its access tokens are left as they are, as the SQL store leaves
        # them: every look-up reads the grant (lookup_access_token).
        for token_hash, token in self._refresh.items():
            if token.grant_id == grant_id:
                self._refresh_revoked.setdefault(token_hash, now)
        return ended

    def _check_new_tokens(
        self, grant_id: str, access: model.AccessToken, refresh: Optional[model.RefreshToken]
    ) -> None:
        if grant_id not in self._grants:
            raise StoreConflict("no such grant")
        if access.token_hash in self._access:
            raise StoreConflict("access token hash already stored")
        if refresh is not None and refresh.token_hash in self._refresh:
            raise StoreConflict("refresh token hash already stored")

    # Clients

    def save_client(self, client: model.Client) -> "Deferred[None]":
        def save() -> None:
            if client.client_id in self._clients:
                raise StoreConflict("client id already stored")
            self._clients[client.client_id] = client

        return _call(save)

    def get_client(self, client_id: str) -> "Deferred[Optional[model.Client]]":
        return succeed(self._clients.get(client_id))

    def count_clients(self) -> "Deferred[int]":
        return succeed(len(self._clients))

    # Grants and codes

    def create_grant(self, grant: model.Grant, code: model.AuthorizationCode) -> "Deferred[None]":
        def create() -> None:
            if code.grant_id != grant.grant_id:
                raise ValueError("the code does not belong to the grant")
            if grant.grant_id in self._grants:
                raise StoreConflict("grant id already stored")
            if code.code_hash in self._codes:
                raise StoreConflict("code hash already stored")
            self._grants[grant.grant_id] = grant
            self._codes[code.code_hash] = code

        return _call(create)

    def consume_code(self, code_hash: str, now: float) -> "Deferred[CodeRedemption]":
        """
        See L{smeldr_oauth.store.transactions.consume_code}.
        """
        return _call(lambda: self._consume(code_hash, now))

    def exchange_code(
        self,
        code_hash: str,
        now: float,
        check: Callable[[model.AuthorizationCode], Any],
        access: model.AccessToken,
        refresh: Optional[model.RefreshToken],
    ) -> "Deferred[CodeRedemption]":
        """
        See L{IOAuthStore.exchange_code}: every check before the first
        change but the spend, which stands whatever C{check} says.
        """

        def exchange() -> Any:
            code = self._codes.get(code_hash)
            grant = None if code is None else self._grants.get(code.grant_id)
            if (
                code is not None
                and code_hash not in self._code_used
                and grant is not None
                and grant.revoked_at is None
                and now < code.expires_at
            ):
                # Before anything changes: a conflict leaves the code unspent.
                self._check_new_tokens(code.grant_id, access, refresh if code.issue_refresh else None)
            redemption = self._consume(code_hash, now)
            if redemption.status != "ok":
                return redemption
            assert redemption.code is not None
            code = redemption.code
            try:
                check(code)
                if code.issue_refresh and refresh is None:
                    raise ValueError("the code issues a refresh token but none was given")
            except Exception:
                return Failure()
            self._access[access.token_hash] = attr.evolve(
                access, grant_id=code.grant_id, scopes=code.scopes, resource=code.resource
            )
            if code.issue_refresh:
                assert refresh is not None
                self._refresh[refresh.token_hash] = attr.evolve(
                    refresh, grant_id=code.grant_id, scopes=code.scopes, generation=1, used_at=None
                )
            grant = self._grants[code.grant_id] = attr.evolve(self._grants[code.grant_id], last_used_at=now)
            return attr.evolve(redemption, grant=grant)

        return _call(exchange)

    def _consume(self, code_hash: str, now: float) -> CodeRedemption:
        code = self._codes.get(code_hash)
        if code is None:
            return CodeRedemption(status="unknown")
        if code_hash in self._code_used:
            self._revoke_grant(code.grant_id, now)
            return CodeRedemption(
                status="replayed", code=code, grant=self._grants.get(code.grant_id)
            )
        self._code_used[code_hash] = now
        return CodeRedemption.first_spend(code, self._grants.get(code.grant_id), now)

    def add_tokens(
        self, grant_id: str, access: model.AccessToken, refresh: Optional[model.RefreshToken]
    ) -> "Deferred[None]":
        """
        See L{smeldr_oauth.store.sql.SQLStore.add_tokens}.
        """

        def add() -> None:
            self._check_new_tokens(grant_id, access, refresh)
            self._access[access.token_hash] = attr.evolve(access, grant_id=grant_id)
            if refresh is not None:
                self._refresh[refresh.token_hash] = attr.evolve(
                    refresh, grant_id=grant_id, used_at=None
                )

        return _call(add)

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
        See L{smeldr_oauth.store.sql.SQLStore.redeem_refresh_token}.
        """

        def redeem() -> RefreshRedemption:
            token = self._refresh.get(token_hash)
            grant = None if token is None else self._grants.get(token.grant_id)
            live_generation = live_siblings = 0
            if token is not None:
                generations = [
                    t.generation for t in self._refresh.values() if t.grant_id == token.grant_id
                ]
                live_generation = max(generations)
                live_siblings = generations.count(live_generation)
            decision = rotation.decide(
                token=token,
                token_revoked=token_hash in self._refresh_revoked,
                token_revoked_at=self._refresh_revoked.get(token_hash),
                grant=grant,
                live_generation=live_generation,
                live_siblings=live_siblings,
                now=now,
                grace=grace,
                requested_scopes=requested_scopes,
            )
            if token is None or grant is None:
                return RefreshRedemption(status=decision.status)
            grant_id = grant.grant_id
            if decision.new_generation is not None:
                # Every check before the first change: all or nothing.
                self._check_new_tokens(grant_id, new_access, new_refresh)
            if decision.revoke_grant:
                self._revoke_grant(grant_id, now)
            if decision.mark_used:
                self._refresh[token_hash] = attr.evolve(token, used_at=now)
            if decision.revoke_unused_siblings:
                for other_hash, other in self._refresh.items():
                    if (
                        other.grant_id == grant_id
                        and other.generation == token.generation
                        and other_hash != token_hash
                        and other.used_at is None
                    ):
                        self._refresh_revoked.setdefault(other_hash, now)
            if decision.new_generation is not None:
                self._access[new_access.token_hash] = attr.evolve(
                    new_access,
                    grant_id=grant_id,
                    scopes=decision.access_scopes,
                    resource=grant.resource,
                )
                self._refresh[new_refresh.token_hash] = attr.evolve(
                    new_refresh,
                    grant_id=grant_id,
                    scopes=decision.refresh_scopes,
                    generation=decision.new_generation,
                    used_at=None,
                )
            if decision.record_use:
                self._grants[grant_id] = attr.evolve(self._grants[grant_id], last_used_at=now)
            return RefreshRedemption(status=decision.status, grant=self._grants[grant_id])

        return _call(redeem)

    def lookup_access_token(self, token_hash: str, now: float) -> "Deferred[Optional[model.AccessInfo]]":
        token = self._access.get(token_hash)
        if token is None or token_hash in self._access_revoked or now >= token.expires_at:
            return succeed(None)
        grant = self._grants.get(token.grant_id)
        if grant is None or grant.revoked_at is not None:
            return succeed(None)
        return succeed(
            model.AccessInfo(
                subject=grant.subject,
                client_id=grant.client_id,
                scopes=frozenset(token.scopes),
                resource=token.resource,
                grant_id=grant.grant_id,
                expires_at=token.expires_at,
            )
        )

    def _client_of(self, grant_id: str) -> Optional[str]:
        grant = self._grants.get(grant_id)
        return None if grant is None else grant.client_id

    def revoke_token(
        self, token_hash: str, now: float, client_id: Optional[str] = None
    ) -> "Deferred[Optional[str]]":
        """
        See L{smeldr_oauth.store.transactions.revoke_token}.
        """
        access = self._access.get(token_hash)
        grant = None if access is None else self._grants.get(access.grant_id)
        if access is not None and grant is not None:
            if grant.revoked_at is None and client_id in (None, grant.client_id):
                self._access_revoked.setdefault(token_hash, now)
            return succeed(None)
        token = self._refresh.get(token_hash)
        if token is None or (client_id is not None and self._client_of(token.grant_id) != client_id):
            return succeed(None)
        if self._revoke_grant(token.grant_id, now):
            return succeed(token.grant_id)
        return succeed(None)

    def revoke_grant(self, grant_id: str, now: float) -> "Deferred[bool]":
        return succeed(self._revoke_grant(grant_id, now))

    def revoke_grants_of_site_token(self, site_token_id: str, now: float) -> "Deferred[list[str]]":
        ended = [
            grant.grant_id
            for grant in self._sorted_grants()
            if grant.site_token_id == site_token_id and grant.revoked_at is None
        ]
        for grant_id in ended:
            self._revoke_grant(grant_id, now)
        return succeed(ended)

    def _sorted_grants(self) -> list[model.Grant]:
        return sorted(self._grants.values(), key=lambda g: (g.created_at, g.grant_id))

    def list_grants(
        self, subject: Optional[str] = None, site_token_id: Optional[str] = None
    ) -> "Deferred[list[model.Grant]]":
        return succeed(
            [
                grant
                for grant in self._sorted_grants()
                if grant.revoked_at is None
                and (subject is None or grant.subject == subject)
                and (site_token_id is None or grant.site_token_id == site_token_id)
            ]
        )

    def touch_grant(self, grant_id: str, now: float) -> "Deferred[None]":
        grant = self._grants.get(grant_id)
        if grant is not None:
            self._grants[grant_id] = attr.evolve(grant, last_used_at=now)
        return succeed(None)

    def purge_expired(self, now: float) -> "Deferred[int]":
        """
        See L{smeldr_oauth.store.sql.SQLStore.purge_expired}.
        """
        cutoff = now - self._grant_retention
        removed = 0
        # Each table with its side table of spend/revocation times.
        tables: tuple[tuple[dict[str, Any], dict[str, float]], ...] = (
            (self._codes, self._code_used),
            (self._access, self._access_revoked),
            (self._refresh, self._refresh_revoked),
        )
        for rows, extra in tables:
            for key in [k for k, row in rows.items() if row.expires_at <= now]:
                del rows[key]
                extra.pop(key, None)
                removed += 1
        # Access tokens neither keep a grant nor go with it: they go by
        # expiry alone, as in the SQL store (sql._purge_dead_grants).
        hanging = (tables[0], tables[2])
        in_use = {row.grant_id for rows, _ in hanging for row in rows.values()}
        for grant in list(self._grants.values()):
            last_activity = max(grant.created_at, grant.last_used_at or grant.created_at)
            if (grant.revoked_at is not None and grant.revoked_at <= cutoff) or (
                grant.revoked_at is None
                and last_activity <= cutoff
                and grant.grant_id not in in_use
            ):
                for rows, extra in hanging:
                    for key in [k for k, row in rows.items() if row.grant_id == grant.grant_id]:
                        del rows[key]
                        extra.pop(key, None)
                        removed += 1
                del self._grants[grant.grant_id]
                removed += 1
        client_cutoff = now - self._client_retention
        with_grants = {grant.client_id for grant in self._grants.values()}
        for client in list(self._clients.values()):
            if client.created_at <= client_cutoff and client.client_id not in with_grants:
                del self._clients[client.client_id]
                removed += 1
        return succeed(removed)
