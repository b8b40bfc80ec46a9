# -*- test-case-name: tests.test_oauth_client_cache -*-
"""
Who a client is: resolving a C{client_id} (a registration, or a Client ID
Metadata Document fetched on demand, at a rate limited per browser
address) and authenticating it at the token and revocation endpoints.
"""

from __future__ import annotations

from typing import Any, Optional

from cachetools import TTLCache
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from smeldr_oauth.oauth import errors
from smeldr_oauth.oauth.config import Config
from smeldr_oauth.oauth.model import Client
from smeldr_oauth.oauth.params import MAX_PARAM, Params, single
from smeldr_oauth.oauth.ratelimit import IRateLimiter, spend
from smeldr_oauth.oauth.secrets import constant_time_equal, hash_secret
from smeldr_oauth.oauth.text import loggable

log = Logger()

#: How many registered clients are kept in memory.
CLIENT_CACHE_SIZE = 1024

#: Seconds a remembered registration is trusted.
CLIENT_CACHE_TTL = 3600.0


class ClientResolver:
    """
    Finds clients.

    @param cimd: resolves Client ID Metadata Document client ids (with
        C{resolve(client_id)}); C{None} turns CIMD off.
    @param cimd_limiter: fetches of metadata documents per browser address.
    """

    def __init__(
        self,
        config: Config,
        store: Any,
        clock: IReactorTime,
        cimd: Any,
        cimd_limiter: IRateLimiter,
        cache_size: int = CLIENT_CACHE_SIZE,
        cache_ttl: float = CLIENT_CACHE_TTL,
    ) -> None:
        self.config = config
        self.store = store
        self.cimd = cimd
        self.cimd_limiter = cimd_limiter
        # Registered clients never change, so one found once is kept, in a
        # bounded LRU, and every token request stops paying a database
        # round trip.  Entries live cache_ttl at most: the store deletes
        # long-unused registrations (purge_expired), and a running server
        # must not keep one alive for ever.  Only hits are kept: an unknown
        # id is asked again next time.
        self._known: TTLCache[str, Client] = TTLCache(cache_size, cache_ttl, timer=clock.seconds)

    def is_cimd(self, client_id: str) -> bool:
        from smeldr_oauth.oauth.cimd import is_cimd_client_id

        return self.cimd is not None and is_cimd_client_id(
            client_id, allow_insecure=self.config.allow_insecure_client_ids
        )

    def resolve(self, client_id: str, address: Optional[str] = None) -> "Deferred[Optional[Client]]":
        """
        Find a client: a CIMD URL is fetched (and cached by the resolver),
        anything else is looked up among registrations.  Failures of a CIMD
        fetch become C{None} with the reason logged.

        @param address: the address of the browser that sent an
            authorization request.  When given, a CIMD resolution that has
            to fetch counts against the CIMD fetch limit for that address,
            so no one can make this server fetch URLs of their choosing at
            speed.  (The token and revocation endpoints pass none: their
            callers are client back ends such as Claude.ai's, thousands of
            users behind few addresses, and they present client ids whose
            documents the authorization request has just cached.)

        @raise errors.RateLimited: (as a failed Deferred) C{address} has
            made too many authorization requests that needed a fetch.
        """
        # An id found here came through the store branch below, so it is
        # not a CIMD URL under this configuration.
        try:
            # Indexing, not .get(): a cachetools .get is a lookup twice over.
            return succeed(self._known[client_id])
        except KeyError:
            pass
        if self.is_cimd(client_id):
            return self._resolve_document(client_id, address)
        return self.store.get_client(client_id).addCallback(self._remember)

    def known(self, client_id: str) -> Optional[Client]:
        """
        The registered client L{resolve} would answer from its cache, at
        once, or C{None} (then ask L{resolve}): the token endpoint's client
        without a L{Deferred} to make and await.
        """
        try:
            return self._known[client_id]
        except KeyError:
            return None

    def _remember(self, client: Optional[Client]) -> Optional[Client]:
        if client is not None:
            self._known[client.client_id] = client
        return client

    def _resolve_document(self, client_id: str, address: Optional[str]) -> "Deferred[Optional[Client]]":
        if address is None:
            return self._fetch_document(client_id, None)
        spent = spend(self.cimd_limiter, address, "cimd", "client metadata document fetch")
        return spent.addCallback(lambda _: self._fetch_document(client_id, address))

    def _fetch_document(self, client_id: str, address: Optional[str]) -> "Deferred[Optional[Client]]":
        from smeldr_oauth.oauth.cimd import CIMDError

        d = maybeDeferred(self.cimd.resolve, client_id)
        if address is not None and d.called:
            # Answered at once: from the resolver's cache, or refused
            # before any fetch.  Only fetches count.
            self.cimd_limiter.refund(address)

        def failed(f: Any) -> None:
            if f.check(CIMDError):
                log.info(
                    "refused client metadata document {client_id}: {reason}",
                    client_id=loggable(client_id),
                    reason=loggable(f.value.reason),
                    smeldr_event="cimd_refused",
                )
            else:
                log.failure(
                    "resolving client metadata document {client_id} failed",
                    f,
                    client_id=loggable(client_id),
                )
            return None

        return d.addErrback(failed)

    async def authenticate(
        self,
        params: Params,
        basic: Optional[tuple[str, str]],
        presented: Optional[tuple[str, Optional[str]]] = None,
    ) -> Client:
        """
        Client authentication at the token and revocation endpoints:
        C{none} for public clients (the client_id alone), or
        C{client_secret_basic} / C{client_secret_post} for confidential
        registered clients.  Using more than one method is an error
        (RFC 6749 section 2.3).

        @param presented: what L{presented_client} already read from this
            request, if it was called.
        """
        client_id, secret = presented if presented is not None else presented_client(params, basic)
        client = self.authenticated_now((client_id, secret))
        if client is not None:
            return client
        client = await self.resolve(client_id)
        if client is None:
            raise errors.invalid_client("unknown client")
        return _with_secret(client, secret)

    def authenticated_now(self, presented: tuple[str, Optional[str]]) -> Optional[Client]:
        """
        L{authenticate} decided at once, from what L{presented_client}
        read: the client, or C{None} when it must be resolved first (then
        call L{authenticate}).

        @raise errors.OAuthError: as L{authenticate} would.
        """
        client_id, secret = presented
        if not client_id:
            raise errors.invalid_client("client_id is required")
        if len(client_id) > MAX_PARAM:
            raise errors.invalid_client("unknown client")
        client = self.known(client_id)
        return None if client is None else _with_secret(client, secret)


def _with_secret(client: Client, secret: Optional[str]) -> Client:
    """
    C{client}, if C{secret} authenticates it (C{None} for a public client).
    """
    if client.client_secret_hash is not None:
        if secret is None or not constant_time_equal(hash_secret(secret), client.client_secret_hash):
            raise errors.invalid_client("client authentication failed")
    elif secret is not None:
        raise errors.invalid_client("this is a public client: it has no secret")
    return client


def presented_client(params: Params, basic: Optional[tuple[str, str]]) -> tuple[str, Optional[str]]:
    """
    The client id and secret a request presents, from C{client_secret_basic}
    or the form.

    @raise errors.OAuthError: both methods at once, or two different ids.
    """
    post_id = single(params, "client_id")
    post_secret = single(params, "client_secret")
    if basic is not None and post_secret is not None:
        raise errors.invalid_request("use one client authentication method")
    if basic is None:
        return post_id or "", post_secret
    client_id, basic_secret = basic
    if post_id is not None and post_id != client_id:
        raise errors.invalid_client("client_id does not match the Authorization header")
    # Some libraries send "client_id:" for a public client.
    return client_id, basic_secret or None
