"""
The seams of the authorization server.

Between it and the resources it protects: the MCP layer depends only on
L{IAccessVerifier} and L{IGrantEvents}, never on the OAuth server's
internals: anything that can turn a bearer token into an L{AccessInfo} (and
tell when a grant ends) can protect an MCP endpoint.

Between it and persistence: L{IOAuthStore}, with the records its atomic
calls return (L{CodeRedemption}, L{RefreshRedemption}).  The stores
(L{smeldr_oauth.store}) implement it; the OAuth package never imports them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Optional

import attr
from zope.interface import Interface

from smeldr_oauth.oauth.model import (
    AccessInfo,
    AccessToken,
    AuthorizationCode,
    Client,
    Grant,
    RefreshToken,
)

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred
    from twisted.internet.interfaces import IReactorTime


class IAccessVerifier(Interface):
    """
    Validates access tokens presented to a protected resource.
    """

    def verify_access_token(token: str) -> "Deferred[Optional[AccessInfo]]":  # type: ignore[misc]
        """
        The L{smeldr_oauth.oauth.model.AccessInfo} of a live token issued
        for this resource, or C{None} if the token is unknown, expired,
        revoked, or was issued for another resource (audience).
        """


class IGrantEvents(Interface):
    """
    Lets a resource hear that a grant ended, so it can close what was
    opened with it (for MCP: the SSE streams of that grant).
    """

    def add_revocation_observer(observer: Callable[[str], None]) -> None:  # type: ignore[misc]
        """
        Call C{observer(grant_id)} whenever a grant is revoked.
        """


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class CodeRedemption:
    """
    The result of L{IOAuthStore.consume_code} and L{IOAuthStore.exchange_code}.

    @ivar status: C{"ok"} (the code was fresh and is now spent),
        C{"replayed"} (it had been spent before: its grant has now been
        revoked), C{"revoked"} (its grant had ended before this exchange),
        C{"expired"} or C{"unknown"}.  Only C{"ok"} may yield tokens; every
        other status is an C{invalid_grant} error.  A code is spent by the
        first exchange whatever its status, so it never works twice.
    """

    status: str
    code: Optional[AuthorizationCode] = None
    grant: Optional[Grant] = None

    @classmethod
    def first_spend(cls, code: AuthorizationCode, grant: Optional[Grant], now: float) -> "CodeRedemption":
        """
        The outcome of the exchange that spent C{code} (every store decides
        it here, so they agree on the order): C{"revoked"} when its grant is
        gone or ended, then C{"expired"}, else C{"ok"}.
        """
        if grant is None or grant.revoked_at is not None:
            return cls(status="revoked", code=code, grant=grant)
        if now >= code.expires_at:
            return cls(status="expired", code=code, grant=grant)
        return cls(status="ok", code=code, grant=grant)


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class RefreshRedemption:
    """
    The result of L{IOAuthStore.redeem_refresh_token}.

    @ivar status: C{"rotated"} (new tokens stored), C{"grace"} (the previous
        generation replayed within the grace window: new tokens stored),
        C{"reused"} (an older token: the grant is now revoked),
        C{"grace_exhausted"} (a replay inside the grace window beyond the
        sibling cap: refused, nothing changed, the grant lives on),
        C{"superseded"} (an unused sibling revoked because another sibling
        was rotated, presented within the grace window of that revocation:
        the loser of a parallel refresh; refused, nothing changed, the
        grant lives on; later it would be C{"reused"}),
        C{"invalid_scope"} (asked for scopes beyond the grant: nothing
        changed), C{"expired"}, C{"unknown"} or C{"revoked"}.
    """

    status: str
    grant: Optional[Grant] = None


class IChangeWatch(Interface):
    """
    A subscription made by L{IOAuthStore.watch_changes}.
    """

    def stop() -> None:  # type: ignore[misc]
        """
        Stop calling the callback.
        """


class IOAuthStore(Interface):
    """
    Persistence for clients, grants, codes and tokens.

    Every method returns a L{Deferred}.  Methods that change more than one
    row are atomic: an implementation applies all of a call's changes or
    none.  Only hashes of secrets cross this seam.  A database that cannot
    be reached fails a call with
    L{smeldr_oauth.db.errors.StoreUnavailable} (nothing written; try again
    later); a broken uniqueness or reference rule with
    L{smeldr_oauth.db.errors.StoreConflict} (nothing written).
    """

    def save_client(client: Client) -> "Deferred[None]":  # type: ignore[misc]
        """
        Store a dynamically registered client.
        """

    def get_client(client_id: str) -> "Deferred[Optional[Client]]":  # type: ignore[misc]
        """
        The registered client with this id, or C{None}.
        """

    def count_clients() -> "Deferred[int]":  # type: ignore[misc]
        """
        How many registered clients are stored (for the registration cap).
        """

    def create_grant(grant: Grant, code: AuthorizationCode) -> "Deferred[None]":  # type: ignore[misc]
        """
        Store a new grant together with its first authorization code.
        """

    def consume_code(code_hash: str, now: float) -> "Deferred[CodeRedemption]":  # type: ignore[misc]
        """
        Atomically spend an authorization code.  Spending a spent code
        revokes its grant (and every token hanging from it).
        """

    def exchange_code(  # type: ignore[misc]
        code_hash: str,
        now: float,
        check: Callable[[AuthorizationCode], Any],
        access: AccessToken,
        refresh: Optional[RefreshToken],
    ) -> "Deferred[CodeRedemption]":
        """
        The whole code exchange in one transaction: spend the code as
        L{consume_code} does and, when it was fresh (C{"ok"}) and
        C{check(code)} returns without raising, store C{access} (and
        C{refresh}, only if the code says C{issue_refresh}) for the code's
        grant, and set the grant's C{last_used_at} to C{now} (the
        redemption's C{grant} shows it).  The records carry placeholders: the store gives them the
        code's C{grant_id}, C{scopes} and C{resource} (the refresh token
        generation 1); hashes and expiry times are the caller's.

        The code is spent whatever C{check} decides: if it raises, no token
        is stored, the spend is committed, and the L{Deferred} fails with
        C{check}'s exception.  A replay revokes the grant as
        L{consume_code} does.  If storing fails (a database error), nothing
        of the call is kept: the code stays unspent.

        @param check: a pure function of the stored code (client, redirect
            URI, resource, PKCE verifier checks); it may run more than once
            if the database asks for the transaction to be retried.
        """

    def add_tokens(
        grant_id: str, access: AccessToken, refresh: Optional[RefreshToken]
    ) -> "Deferred[None]":  # type: ignore[misc]
        """
        Store the tokens issued for a code exchange.
        """

    def redeem_refresh_token(
        token_hash: str,
        now: float,
        grace: float,
        requested_scopes: Optional[tuple[str, ...]],
        new_access: AccessToken,
        new_refresh: RefreshToken,
    ) -> "Deferred[RefreshRedemption]":  # type: ignore[misc]
        """
        Atomically decide and apply one refresh: see
        L{smeldr_oauth.oauth.rotation.decide}.  C{new_access} and
        C{new_refresh} carry a placeholder C{grant_id}, C{scopes} and
        C{generation}; the store fills in the real ones (and gives the new
        access token the grant's C{resource}: a refresh cannot move a token
        to another audience).  C{requested_scopes} of C{None} or C{()} means
        the grant's scopes; duplicates are dropped.  A refresh that issues
        tokens sets the grant's C{last_used_at} to C{now} unless the one
        recorded is less than L{smeldr_oauth.oauth.rotation.USE_RESOLUTION}
        seconds old (the decision's C{record_use}); the redemption's C{grant}
        shows what is stored.
        """

    def lookup_access_token(token_hash: str, now: float) -> "Deferred[Optional[AccessInfo]]":  # type: ignore[misc]
        """
        What a live access token grants, or C{None} if it is unknown,
        expired or revoked.
        """

    def revoke_token(
        token_hash: str, now: float, client_id: Optional[str] = None
    ) -> "Deferred[Optional[str]]":  # type: ignore[misc]
        """
        RFC 7009: revoke an access token (just it) or a refresh token (its
        whole grant).  Returns the revoked grant id when a grant ended.

        @param client_id: the client asking, when it named itself: a token
            whose grant belongs to another client is left alone (and
            C{None} returned, as for an unknown token).
        """

    def revoke_grant(grant_id: str, now: float) -> "Deferred[bool]":  # type: ignore[misc]
        """
        End a grant and every code and token hanging from it.
        """

    def revoke_grants_of_site_token(site_token_id: str, now: float) -> "Deferred[list[str]]":  # type: ignore[misc]
        """
        End every grant approved with this site token; returns their ids.
        """

    def list_grants(
        subject: Optional[str] = None, site_token_id: Optional[str] = None
    ) -> "Deferred[list[Grant]]":  # type: ignore[misc]
        """
        Live grants, optionally only those of one subject or site token.
        """

    def touch_grant(grant_id: str, now: float) -> "Deferred[None]":  # type: ignore[misc]
        """
        Record that a grant was used (for the connected-apps page).
        """

    def purge_expired(now: float) -> "Deferred[int]":  # type: ignore[misc]
        """
        Delete expired codes and tokens and long-revoked grants, then
        registered clients created long ago (see each store's
        C{client_retention}) that no grant refers to any more, so that
        abandoned registrations do not fill the registration cap for good.
        Returns the number of rows removed.
        """

    def watch_changes(  # type: ignore[misc]
        callback: Callable[[Optional[str]], None],
        clock: "Optional[IReactorTime]" = None,
        interval: float = 1.0,
    ) -> IChangeWatch:
        """
        Call C{callback} when another process (a second server, the admin
        command) may have revoked something this process has cached: on
        PostgreSQL each revocation is pushed (C{LISTEN}/C{NOTIFY}) with a
        short description as the argument, and C{None} after a reconnection
        (anything may have changed meanwhile); on SQLite C{callback(None)}
        follows any commit by another process, polled every C{interval}
        seconds on C{clock}; in memory there is no other process.
        """
