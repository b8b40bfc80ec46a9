# -*- test-case-name: tests.test_oauth_server -*-
"""
The token endpoint (RFC 6749 section 3.2): the authorization code grant
with PKCE, and the refresh grant with rotation (L{smeldr_oauth.oauth.rotation}
decides; the store applies).  A new grant type is a method here and a
branch in L{Tokens.token}.

With shared token limits in the OAuth store's own database (PostgreSQL), a
refresh grant whose checks all pass before its spend hands the spend to
its redemption (L{Tokens._refresh_carried}): one trip to a database thread
instead of two, the same statement, the same refusals in the same order.
"""

from __future__ import annotations

from typing import Any, Optional, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from smeldr_oauth.oauth import errors, pkce, rotation
from smeldr_oauth.oauth.answered import CODE_OK, CODE_REPLAYED, kept
from smeldr_oauth.oauth.clients import ClientResolver, presented_client
from smeldr_oauth.oauth.config import Config
from smeldr_oauth.oauth.model import AccessInfo, AccessToken, AuthorizationCode, RefreshToken, token_response
from smeldr_oauth.oauth.params import MAX_PARAM, TOKEN_PARAMS, Params, reject_repeated, single
from smeldr_oauth.oauth.ratelimit import Limits, SharedRateLimiter, refuse_both, spend_both, spend_now
from smeldr_oauth.oauth.ratelimit_both import BothAsked
from smeldr_oauth.oauth.revocation import GrantEvents
from smeldr_oauth.oauth.routine import routine
from smeldr_oauth.oauth.scopes import check_resource, parse_scopes
from smeldr_oauth.oauth.secrets import hash_secret, new_secret, new_secrets
from smeldr_oauth.oauth.text import loggable
from smeldr_oauth.oauth.urls import canonical_resource

log = Logger()



def _label(value: Optional[str]) -> str:
    """
    A client-supplied value fit for a log field or metric label: known
    grant types pass, anything else is "other".
    """
    return value if value in ("authorization_code", "refresh_token") else "other"


class Tokens:
    """
    Issues tokens.

    @param limits: the token endpoint's limits per client address and per
        client id are spent here.
    """

    def __init__(
        self,
        config: Config,
        store: Any,
        clock: IReactorTime,
        clients: ClientResolver,
        events: GrantEvents,
        limits: Limits,
    ) -> None:
        self.config = config
        self.store = store
        self._clock = clock
        self.clients = clients
        self.events = events
        self.limits = limits
        # A refresh's rate-limit spend carried by its redemption (one
        # hand-off to a database thread, not two): both token limiters
        # shared, in a store of the OAuth store's database.
        first, then = limits.token_per_address, limits.token_per_client
        self._carry = (
            isinstance(first, SharedRateLimiter)
            and isinstance(then, SharedRateLimiter)
            and first.store is then.store
            and bool(getattr(store, "carries", None))
            and store.carries(first.store)
        )

    def _spend(
        self, params: Params, basic: Optional[tuple[str, str]], address: Optional[str]
    ) -> tuple[Optional[tuple[str, Optional[str]]], Optional[Deferred[None]]]:
        """
        Spend one token request for the client address and one for the
        client id it presents (unauthenticated yet: an id that turns out
        unknown still counts, so cycling ids does not escape the address
        limit, and the id bucket cannot be drained by a stranger faster
        than the address limit lets them).

        A plain call, not a coroutine: in one process (SQLite) the
        limiters answer at once and there is nothing to await (a
        coroutine made and awaited for nothing, on every token request).

        @return: the client id and secret presented, if they could be read
            (so authentication need not read them again), and the spend's
            L{Deferred} to await when it is not decided yet (a shared
            store), else C{None}.
        @raise errors.RateLimited: either is used up (decided at once).
        """
        try:
            presented: Optional[tuple[str, Optional[str]]] = presented_client(params, basic)
        except errors.OAuthError:
            presented = None
        client_id = presented[0][:MAX_PARAM] if presented is not None and presented[0] else None
        # Both buckets in one statement of a shared store (spend_both); in
        # one process (SQLite) the limiters answer at once, with nothing to
        # await (spend_now).
        later: Optional[Deferred[None]] = None
        if address is not None and client_id is not None:
            later = spend_both(
                self.limits.token_per_address, address, self.limits.token_per_client, client_id, "token", "token request"
            )
        elif address is not None:
            later = spend_now(self.limits.token_per_address, address, "token", "token request")
        elif client_id is not None:
            later = spend_now(self.limits.token_per_client, client_id, "token", "token request")
        return presented, later

    def _known_client(self, presented: Optional[tuple[str, Optional[str]]]) -> Any:
        """
        The client L{ClientResolver.authenticate} would answer at once, from
        its cache (L{ClientResolver.authenticated_now}, which refuses as
        C{authenticate} would), or C{None}: then await C{authenticate}.
        Spares the usual token request a coroutine made and awaited.
        """
        return None if presented is None else self.clients.authenticated_now(presented)

    async def token(
        self, params: Params, basic: Optional[tuple[str, str]] = None, address: Optional[str] = None
    ) -> dict[str, Any]:
        """
        The token endpoint: the JSON body of a successful response.

        Every outcome is a log event (C{smeldr_event} C{token_issued} or
        C{token_refused}, which the metrics count), carrying the grant
        type and error code only: never a parameter's value.

        @param address: the client's address, for the rate limit (C{None}:
            not counted).
        @raise errors.RateLimited: a rate limit refused the request.
        """
        checked = self._refresh_checked(params, basic) if self._carry and address is not None else None
        if checked is None:
            presented, later = self._spend(params, basic, address)
            if later is not None:
                await later
        else:
            presented, client, token, requested = checked
            assert address is not None
            client_id = presented[0][:MAX_PARAM]
            limiter = cast(SharedRateLimiter, self.limits.token_per_address)
            asked = limiter.ask_with(address, cast(SharedRateLimiter, self.limits.token_per_client), client_id)
            if asked.__class__ is BothAsked:
                return await self._refresh_carried(
                    asked, token, requested, client, address, client_id  # type: ignore[arg-type]
                )
            # Decided here, or asked bucket by bucket: as _spend.
            refuse_both(await asked, address, client_id, "token", "token request")  # type: ignore[misc]
        grant_type: Optional[str] = None
        try:
            reject_repeated(params, TOKEN_PARAMS)
            grant_type = single(params, "grant_type", required=True)
            if grant_type == "authorization_code":
                body = await self._code_grant(params, basic, presented)
            elif grant_type == "refresh_token":
                body = await self._refresh_grant(params, basic, presented)
            else:
                raise errors.unsupported_grant_type("grant_type must be authorization_code or refresh_token")
        except errors.OAuthError as e:
            log.info(
                "token request refused: {reason}",
                reason=e.error,
                grant_type=_label(grant_type),
                client_id=loggable(presented[0]) if presented else None,
                smeldr_event="token_refused",
            )
            raise
        return body

    def _refresh_checked(
        self, params: Params, basic: Optional[tuple[str, str]]
    ) -> Optional[tuple[tuple[str, Optional[str]], Any, Optional[str], Optional[tuple[str, ...]]]]:
        """
        A refresh grant that every check before its redemption passes, and
        whose client is known here (nothing to await): what the client
        presented, the client, the refresh token and the scopes requested
        (C{None}: the grant's); else C{None} (the request then goes
        the usual way: its spend first, then its checks in order).  Pure:
        a check that fails here is made again, and answered, after the
        spend, so a refusal's order (429 first) is kept.
        """
        try:
            presented = presented_client(params, basic)
            if not presented[0]:
                return None
            reject_repeated(params, TOKEN_PARAMS)
            if single(params, "grant_type", required=True) != "refresh_token":
                return None
            token, requested = self._refresh_params(params)
            client = self.clients.authenticated_now(presented)
        except errors.OAuthError:
            return None
        return None if client is None else (presented, client, token, requested)

    async def _refresh_carried(
        self,
        asked: BothAsked,
        token: Optional[str],
        requested: Optional[tuple[str, ...]],
        client: Any,
        address: str,
        client_id: str,
    ) -> dict[str, Any]:
        """
        A refresh grant (L{_refresh_checked}) whose redemption carries the
        request's rate-limit spend (L{SharedRateLimiter.ask_with}): the
        store runs the spend and then, if both buckets were spent, the
        redemption, in one hand-off to a database thread.  The spend's
        answer is taken first, as L{token} takes L{_spend}'s.
        """
        now = self._clock.seconds()
        access, refresh, access_record, refresh_record = self._new_tokens(
            "", (), self.config.resource or "", True, generation=0
        )
        assert refresh_record is not None
        limiter = cast(SharedRateLimiter, self.limits.token_per_address)
        before = limiter.store.take_both_before(*asked.request)  # type: ignore[attr-defined]
        try:
            spent, result = await kept(self.store.redeem_refresh_token_after(
                before, hash_secret(token or ""), now, float(self.config.refresh_grace), requested, access_record, refresh_record
            ), self.events, self.store, client.client_id, now)
        except BaseException:
            # A bug of the batch itself: nothing is known of the spend.
            asked.failed(Failure())
            raise
        if isinstance(spent, Failure):
            asked.failed(spent)
            spent.raiseException()
        refuse_both(asked.decided(spent), address, client_id, "token", "token request")
        try:
            if isinstance(result, Failure):
                result.raiseException()
            return await self._refreshed(result, client, access, refresh, requested, now)
        except errors.OAuthError as e:
            log.info(
                "token request refused: {reason}",
                reason=e.error,
                grant_type="refresh_token",
                client_id=loggable(client_id),
                smeldr_event="token_refused",
            )
            raise

    def _new_tokens(self, grant_id: str, scopes: tuple[str, ...], resource: str, refresh: bool, generation: int) -> tuple[str, Optional[str], AccessToken, Optional[RefreshToken]]:
        now = self._clock.seconds()
        access: str
        refresh_token: Optional[str]
        if refresh:
            access, refresh_token = new_secrets(2)
        else:
            access, refresh_token = new_secret(), None
        access_record = AccessToken(
            token_hash=hash_secret(access),
            grant_id=grant_id,
            scopes=scopes,
            resource=resource,
            expires_at=now + self.config.access_token_ttl,
        )
        refresh_record = (
            None
            if refresh_token is None
            else RefreshToken(
                token_hash=hash_secret(refresh_token),
                grant_id=grant_id,
                scopes=scopes,
                generation=generation,
                created_at=now,
                expires_at=now + self.config.refresh_token_ttl,
            )
        )
        return access, refresh_token, access_record, refresh_record

    async def _code_grant(
        self, params: Params, basic: Optional[tuple[str, str]], presented: Optional[tuple[str, Optional[str]]] = None
    ) -> dict[str, Any]:
        # Everything that can be checked without the code is checked
        # before it is spent, so a malformed request changes nothing.
        code = single(params, "code", required=True)
        verifier = single(params, "code_verifier", required=True)
        redirect_uri = single(params, "redirect_uri")
        resource_values = [v for v in params.get("resource", []) if v]
        if resource_values:
            check_resource(self.config, resource_values)
        client = self._known_client(presented) or await self.clients.authenticate(params, basic, presented)
        if not pkce.valid_verifier(verifier or ""):
            raise errors.invalid_grant("code_verifier is malformed")
        now = self._clock.seconds()

        def check(record: AuthorizationCode) -> None:
            # Pure, run by the store inside the exchange's transaction:
            # the code is spent whatever it decides, so a code presented
            # with the wrong verifier, client or redirect_uri never works
            # again, and tokens exist only if it returns.
            if record.client_id != client.client_id:
                raise errors.invalid_grant("authorization code was issued to another client")
            if redirect_uri is not None and redirect_uri != record.redirect_uri:
                raise errors.invalid_grant("redirect_uri does not match the authorization request")
            if resource_values and canonical_resource(resource_values[0]) != record.resource:
                raise errors.invalid_target("resource does not match the authorization request")
            if not pkce.verify(verifier or "", record.code_challenge):
                raise errors.invalid_grant("code_verifier does not match the code_challenge")

        # The store fills in the grant, scopes and resource from the code.
        access, refresh, access_record, refresh_record = self._new_tokens(
            "", (), self.config.resource or "", True, generation=1
        )
        mark = self.events.revocation_mark()
        result = await kept(self.store.exchange_code(hash_secret(code or ""), now, check, access_record, refresh_record), self.events)
        if result.status == CODE_REPLAYED:
            # The store has revoked the grant (answered.kept said so).
            raise errors.invalid_grant("authorization code already used")
        if result.status != CODE_OK:
            raise errors.invalid_grant("authorization code is invalid or expired")
        record = result.code
        assert record is not None
        # The exchange set the grant's last_used_at, and the new token is
        # known: its first use need neither write nor look it up.
        self.events.grant_used(record.grant_id)
        if result.grant is not None:
            info = AccessInfo(
                subject=result.grant.subject,
                client_id=record.client_id,
                scopes=frozenset(record.scopes),
                resource=record.resource,
                grant_id=record.grant_id,
                expires_at=access_record.expires_at,
            )
            self.events.access_issued(access_record.token_hash, info, mark)
        self._logged("authorization_code", record.client_id, record.grant_id)
        return self._issued(access, record.scopes, refresh if record.issue_refresh else None)

    def _refresh_params(self, params: Params) -> tuple[Optional[str], Optional[tuple[str, ...]]]:
        """
        A refresh grant's own parameters, checked: the refresh token and the
        scopes requested (C{None}: the grant's).

        @raise errors.OAuthError: one is missing, repeated or not allowed.
        """
        token = single(params, "refresh_token", required=True)
        scope = single(params, "scope")
        requested = None if scope is None else parse_scopes(self.config, scope)
        check_resource(self.config, params.get("resource", []))
        return token, requested

    async def _refresh_grant(
        self, params: Params, basic: Optional[tuple[str, str]], presented: Optional[tuple[str, Optional[str]]] = None
    ) -> dict[str, Any]:
        token, requested = self._refresh_params(params)
        client = self._known_client(presented) or await self.clients.authenticate(params, basic, presented)
        now = self._clock.seconds()
        # The store fills in the grant, scopes and generation.
        access, refresh, access_record, refresh_record = self._new_tokens(
            "", (), self.config.resource or "", True, generation=0
        )
        result = await kept(self.store.redeem_refresh_token(
            hash_secret(token or ""), now, float(self.config.refresh_grace), requested, access_record, refresh_record
        ), self.events, self.store, client.client_id, now)
        return await self._refreshed(result, client, access, refresh, requested, now)

    async def _refreshed(
        self,
        result: Any,
        client: Any,
        access: str,
        refresh: Optional[str],
        requested: Optional[tuple[str, ...]],
        now: float,
    ) -> dict[str, Any]:
        """
        A refresh's answer from its redemption (the store's
        L{smeldr_oauth.oauth.interfaces.RefreshRedemption}).
        """
        status = result.status
        if status == rotation.REUSED:
            # The store has revoked the grant (answered.kept said so).
            raise errors.invalid_grant("refresh token already used")
        if status == rotation.SUPERSEDED:
            # A parallel refresh's loser: its sibling was rotated moments
            # ago.  Refused, but the grant lives on (rotation.decide).
            log.info(
                "superseded refresh token refused: grant {grant_id} kept",
                grant_id=result.grant.grant_id if result.grant is not None else None,
                smeldr_event="refresh_superseded",
            )
            raise errors.invalid_grant("refresh token was superseded by a parallel refresh")
        if status == rotation.INVALID_SCOPE:
            raise errors.invalid_scope("a refresh may narrow the scope, never widen it")
        if status not in (rotation.ROTATED, rotation.GRACE):
            raise errors.invalid_grant("refresh token is invalid, expired or revoked")
        grant = result.grant
        assert grant is not None
        if grant.client_id != client.client_id:
            # A stolen refresh token: its grant was revoked on the store's
            # answer (answered.kept), whether or not its presenter waited.
            raise errors.invalid_grant("refresh token was issued to another client")
        self._logged("refresh_token", grant.client_id, grant.grant_id)
        return self._issued(access, requested if requested is not None else grant.scopes, refresh)

    def _logged(self, grant_type: str, client_id: str, grant_id: str) -> None:
        # Debug level: a token issue is routine (one per refresh), and
        # formatting an info line for each was a fifth of a refresh's CPU.
        # The event still reaches the metrics and the flow timeline, handed
        # to them directly unless someone keeps debug events here
        # (smeldr_oauth.oauth.routine); grants, refusals, replays and reuse
        # stay at info or warn.
        routine.emit(
            log,
            LogLevel.debug,
            "token issued by grant type {grant_type}",
            grant_type=grant_type,
            client_id=client_id,
            grant_id=grant_id,
            smeldr_event="token_issued",
        )

    def _issued(self, access: str, scopes: tuple[str, ...], refresh: Optional[str]) -> dict[str, Any]:
        """
        The token response's body (RFC 6749 section 5.1).
        """
        return token_response(access, self.config.access_token_ttl, scopes, refresh)
