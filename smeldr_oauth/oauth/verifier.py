# -*- test-case-name: tests.test_oauth_server -*-
"""
The resource side: turning a bearer token into an L{AccessInfo}, from a
short-lived cache that every revocation through this process empties of
the revoked tokens at once.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from smeldr_oauth.oauth.config import Config
from smeldr_oauth.oauth.expiring import ExpiringDict
from smeldr_oauth.oauth.interfaces import IAccessVerifier
from smeldr_oauth.oauth.model import AccessInfo
from smeldr_oauth.oauth.params import MAX_TOKEN
from smeldr_oauth.oauth.secrets import hash_secret
from smeldr_oauth.oauth.urls import canonical_resource

log = Logger()

#: Seconds between two records of the same grant's use ("last used" on the
#: connected-apps page): one write a minute per grant, not one per request.
TOUCH_INTERVAL = 60.0


@implementer(IAccessVerifier)
class AccessVerifier:
    """
    L{IAccessVerifier} over a store, with a bounded cache of answers.

    Answers are cached for up to C{config.access_cache_ttl} seconds (never
    past the token's own expiry).  L{token_revoked} and L{grant_revoked}
    drop the affected answers at once; a look-up that was under way while
    a revocation happened is neither trusted nor cached (L{_lookup}).
    Revocations made by another process are L{forget_cached_tokens}'s job.
    """

    def __init__(self, config: Config, store: Any, clock: IReactorTime) -> None:
        self.config = config
        self.store = store
        self._clock = clock
        # (ExpiringDict, not cachetools.TTLCache: a full TTLCache's insert
        # cost 5 µs, two of them per code exchange; docs/performance.md,
        # round seven.)
        self._cache: ExpiringDict[str, AccessInfo] = ExpiringDict(
            config.access_cache_size, config.access_cache_ttl, timer=clock.seconds
        )
        # Grants whose use was recorded less than TOUCH_INTERVAL ago.
        self._touched: ExpiringDict[str, None] = ExpiringDict(
            config.access_cache_size, TOUCH_INTERVAL, timer=clock.seconds
        )
        # Bumped by every revocation.  A look-up that started before a
        # revocation and ends after it may have read the token as live: its
        # answer must not be cached (it would outlive the revocation).
        self._revocations = 0

    def verify_access_token(self, token: str) -> "Deferred[Optional[AccessInfo]]":
        """
        L{IAccessVerifier}: a live token issued for one of our resources
        (each protected resource checks its own audience: see
        L{smeldr_oauth.mcp.auth.BearerAuth}).  A use
        also marks the grant as used (at most once a minute per grant) for
        the connected-apps page.
        """
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN:
            return succeed(None)
        now = self._clock.seconds()
        key = hash_secret(token)
        try:
            info = self._cache[key]
        except KeyError:
            return self._lookup(key, now, retry=True)
        if now < info.expires_at:
            self._touch(info.grant_id, now)
            return succeed(info)
        self._cache.pop(key, None)
        return self._lookup(key, now, retry=True)

    def _lookup(self, key: str, now: float, retry: bool) -> "Deferred[Optional[AccessInfo]]":
        revocations = self._revocations

        def found(info: Optional[AccessInfo]) -> "Optional[AccessInfo] | Deferred[Optional[AccessInfo]]":
            if info is None:
                return None
            if self.config.protected_resource(canonical_resource(info.resource)) is None:
                # Issued for a resource this server no longer protects.
                return None
            if revocations != self._revocations:
                # A revocation happened while we looked, so this answer may
                # predate it: ask again (fail closed if it happens twice).
                return self._lookup(key, now, retry=False) if retry else None
            self._cache[key] = info
            self._touch(info.grant_id, now)
            return info

        return maybeDeferred(self.store.lookup_access_token, key, now).addCallback(found)

    def token_revoked(self, token_hash: str) -> None:
        """
        Forget a revoked access token (called once the store has recorded
        the revocation, so no later look-up can cache it again).
        """
        self._revocations += 1
        self._cache.pop(token_hash, None)

    def grant_revoked(self, grant_id: str) -> None:
        """
        Forget every cached token of a revoked grant.
        """
        self._revocations += 1
        for key in [k for k, info in list(self._cache.items()) if info.grant_id == grant_id]:
            self._cache.pop(key, None)

    def forget_cached_tokens(self) -> None:
        """
        Drop every cached answer, so the next use of each token asks the
        store again.  For revocations made outside this process (the admin
        command on the same database): see
        L{smeldr_oauth.service.standalone.watch_external_changes}.
        """
        self._cache.clear()
        self._revocations += 1

    def revocation_mark(self) -> int:
        """
        A mark to hand to L{access_issued}: taken before the store call
        that issues a token, it tells whether a revocation happened since.
        """
        return self._revocations

    def access_issued(self, token_hash: str, info: AccessInfo, mark: int) -> None:
        """
        Remember a token the store has just issued (a code exchange) as a
        look-up would have found it, so its first use (the first
        C{tools/call} of every new connection) asks the store nothing.

        Not remembered when a revocation happened since C{mark} (the
        exchange's answer could predate it, as in L{_lookup}), nor when its
        resource is no longer protected (a look-up would refuse it).
        """
        if mark != self._revocations:
            return
        if self.config.protected_resource(canonical_resource(info.resource)) is None:
            return
        self._cache[token_hash] = info

    def grant_used(self, grant_id: str) -> None:
        """
        The store has just recorded C{grant_id}'s use (a code exchange sets
        C{last_used_at}): its tokens' next uses need not record it again
        for L{TOUCH_INTERVAL}.  Saves a write transaction on the first use
        of every new grant's token.
        """
        self._touched[grant_id] = None

    def _touch(self, grant_id: str, now: float) -> None:
        """
        Record a grant's use, at most once per L{TOUCH_INTERVAL} per grant,
        without holding up the request that used it.
        """
        if grant_id in self._touched:
            return
        self._touched[grant_id] = None

        def failed(f: Any) -> None:
            log.failure("could not record the use of grant {grant_id}", f, grant_id=grant_id)

        maybeDeferred(self.store.touch_grant, grant_id, now).addErrback(failed)
