# -*- test-case-name: tests.test_oauth_server -*-
"""
The authorization endpoint's decisions (RFC 6749 section 4.1, OAuth 2.1):
validating a request, checking the site token a person pastes, and turning
an approval into a grant and its code.
"""

from __future__ import annotations

import inspect
from typing import Any, Optional

import attr
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from smeldr_oauth.oauth import errors, pkce
from smeldr_oauth.oauth.clients import ClientResolver
from smeldr_oauth.oauth.config import OFFLINE_ACCESS, Config
from smeldr_oauth.oauth.model import Approval, AuthorizationCode, Client, Grant
from smeldr_oauth.oauth.params import AUTHORIZE_PARAMS, MAX_STATE, Params, reject_repeated, single
from smeldr_oauth.oauth.ratelimit import IRateLimiter, spend_now
from smeldr_oauth.oauth.scopes import check_resource, parse_scopes
from smeldr_oauth.oauth.secrets import hash_secret, new_ordered_id, new_secret
from smeldr_oauth.oauth.text import loggable
from smeldr_oauth.oauth.urls import is_loopback_host, parse, redirect_uri_matches, with_query

log = Logger()

#: Longest site token worth checking.
MAX_PASTE = 4096


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class AuthorizationRequest:
    """
    A validated authorization request: what the consent page shows and what
    an approval turns into a grant.
    """

    client: Client
    redirect_uri: str
    scopes: tuple[str, ...]
    state: Optional[str]
    code_challenge: str
    resource: str

    def form_fields(self) -> list[tuple[str, str]]:
        """
        The hidden fields that carry the request through the consent form.
        They are re-validated on submission, never trusted.
        """
        fields = [
            ("response_type", "code"),
            ("client_id", self.client.client_id),
            ("redirect_uri", self.redirect_uri),
            ("scope", " ".join(self.scopes)),
            ("code_challenge", self.code_challenge),
            ("code_challenge_method", "S256"),
            ("resource", self.resource),
        ]
        if self.state is not None:
            fields.append(("state", self.state))
        return fields


def approval_of(result: Any) -> Optional[Approval]:
    """
    What C{verify_bearer} answered, as an L{Approval} (or C{None}: refused).
    """
    if isinstance(result, Approval):
        return result
    if result is True:
        return Approval(subject="site")
    if isinstance(result, str) and result:
        return Approval(subject=result)
    return None


def check_prompt(prompt: Optional[str]) -> None:
    """
    C{prompt} (OpenID Connect Core section 3.1.2.1, used by OAuth clients
    too): the consent page is always shown, so C{consent}, C{login} and
    C{select_account} are already honoured; C{none} cannot be, because
    approving needs a pasted site token.  C{none} with any other value is
    contradictory.  Unknown values are ignored.
    """
    if prompt is None:
        return
    values = prompt.split()
    if "none" in values:
        if len(values) > 1:
            raise errors.invalid_request("prompt=none cannot be combined with other values")
        raise errors.login_required("approval needs the user to paste a site token")


@attr.s(auto_attribs=True, eq=False)
class Authorization:
    """
    The authorization endpoint's protocol.

    @ivar paste_limiter: refused site-token pastes per client address.
    """

    config: Config
    store: Any
    _clock: IReactorTime
    clients: ClientResolver
    paste_limiter: IRateLimiter

    async def validate(self, params: Params, address: Optional[str] = None) -> AuthorizationRequest:
        """
        Validate an authorization request (GET query or the consent form's
        fields, which are checked again in full on POST).

        The client and its redirect URI are checked first: until both are
        trusted, every problem is shown on a page (redirecting to an
        unchecked URI would make this an open redirector).  After that,
        every problem goes back to the client with C{state} and C{iss}.

        @param address: the browser's address, for the CIMD fetch limit
            (see L{ClientResolver.resolve}); a limited request is an
            L{errors.UntrustedRedirect} with status 429.
        @raise errors.UntrustedRedirect: the client or the redirect URI
            cannot be trusted: show a page, do not redirect.
        @raise errors.AuthorizeRedirectError: anything else, to be sent back
            to the (now trusted) redirect URI with C{state} and C{iss}.
        """
        try:
            client_id = single(params, "client_id", required=True)
            redirect_uri = single(params, "redirect_uri")
        except errors.OAuthError as e:
            raise errors.UntrustedRedirect("Invalid request", e.description)
        assert client_id is not None
        try:
            client = await self.clients.resolve(client_id, address)
        except errors.RateLimited as e:
            raise errors.UntrustedRedirect(
                "Too many requests",
                "Too many sign-in requests came from your network. Wait a minute and try again.",
                status=429,
                retry_after=e.retry_after,
            )
        if client is None:
            raise errors.UntrustedRedirect(
                "Unknown application",
                "This application is not registered with this site, or its "
                "client metadata document could not be used.",
            )
        if redirect_uri is None:
            # Only an unambiguous, fixed registration may be defaulted: a
            # loopback one needs the port the client is listening on.
            only = parse(client.redirect_uris[0]) if len(client.redirect_uris) == 1 else None
            if only is None or is_loopback_host(only.host):
                raise errors.UntrustedRedirect(
                    "Invalid request", "The request does not say where to return to (redirect_uri)."
                )
            redirect_uri = client.redirect_uris[0]
        if not any(redirect_uri_matches(r, redirect_uri) for r in client.redirect_uris):
            raise errors.UntrustedRedirect(
                "Unexpected return address",
                "The address this request would return to is not one the application registered.",
            )
        try:
            state = single(params, "state")
        except errors.OAuthError as e:
            raise errors.UntrustedRedirect("Invalid request", e.description)
        if state is not None and len(state) > MAX_STATE:
            raise self._back(redirect_uri, None, errors.invalid_request("state is too long"))
        try:
            reject_repeated(params, AUTHORIZE_PARAMS)
            response_type = single(params, "response_type", required=True)
            if response_type != "code":
                raise errors.unsupported_response_type("only response_type=code is supported")
            response_mode = single(params, "response_mode")
            if response_mode not in (None, "query"):
                raise errors.invalid_request("only response_mode=query is supported")
            challenge = single(params, "code_challenge")
            if challenge is None:
                raise errors.invalid_request("PKCE is required: code_challenge is missing")
            method = single(params, "code_challenge_method")
            if method != "S256":
                raise errors.invalid_request("code_challenge_method must be S256")
            if not pkce.valid_challenge(challenge):
                raise errors.invalid_request("code_challenge is not a valid S256 challenge")
            resource = check_resource(self.config, params.get("resource", []))
            scopes = parse_scopes(self.config, single(params, "scope"), client, resource)
            check_prompt(single(params, "prompt"))
        except errors.OAuthError as e:
            raise self._back(redirect_uri, state, e)
        return AuthorizationRequest(
            client=client,
            redirect_uri=redirect_uri,
            scopes=scopes,
            state=state,
            code_challenge=challenge,
            resource=resource,
        )

    def _back(self, redirect_uri: str, state: Optional[str], error: errors.OAuthError) -> errors.AuthorizeRedirectError:
        return errors.AuthorizeRedirectError(redirect_uri, state, error, issuer=self.config.issuer)

    async def verify_paste(self, pasted: str) -> Optional[Approval]:
        """
        Ask the configured C{verify_bearer} about a pasted site token.
        Exceptions count as a refusal (and are logged without the token).
        """
        if not pasted or len(pasted) > MAX_PASTE:
            return None
        try:
            result = self.config.verify_bearer(pasted)
            # The site's own check answers a Deferred: asked about first,
            # before inspect.isawaitable (an ABC check).
            if isinstance(result, Deferred):
                result = await result
            elif inspect.isawaitable(result):
                result = await ensureDeferred(result)  # type: ignore[arg-type]
        except Exception as e:
            # Not log.failure: the exception's text or traceback could
            # quote the pasted token.  Its type is enough to start looking.
            log.error(
                "verify_bearer raised {exception_type}; treating the paste as refused",
                exception_type=type(e).__qualname__,
            )
            return None
        return approval_of(result)

    async def check_paste(
        self, pasted: str, address: str, request: Optional[AuthorizationRequest] = None
    ) -> Approval:
        """
        Check a site token pasted by a person at C{address} (the consent
        form for C{request}, or the connected-apps page), counting refusals
        against the paste limit.

        An attempt is spent before the (possibly slow) check and given back
        on success: checking first and spending after the wait would let any
        number of parallel pastes through the check.

        @raise errors.RateLimited: too many refused pastes from C{address}.
        @raise errors.PasteRefused: the token was not accepted.
        """
        limiter = self.paste_limiter
        endpoint = "authorize" if request is not None else "grants"
        # Decided at once for a limiter in memory: no Deferred to make and
        # await (spend_now), as the token endpoint does.
        later = spend_now(limiter, address, endpoint, "site token paste")
        if later is not None:
            await later
        approval = await self.verify_paste(pasted)
        if approval is None:
            if request is not None:
                log.warn(
                    "refused site token paste from {address} for client {client_id}",
                    address=loggable(address),
                    client_id=loggable(request.client.client_id),
                    smeldr_event="paste_refused",
                )
            else:
                log.warn(
                    "refused site token paste on the connected-apps page from {address}",
                    address=loggable(address),
                    smeldr_event="paste_refused",
                )
            raise errors.PasteRefused()
        limiter.refund(address)
        if request is None:
            # A page's sign-in (connected apps, the flow timeline); the
            # consent form's acceptance is recorded by grant_approved.
            log.info(
                "site token {site_token_id} accepted for {subject} to sign in to a page",
                site_token_id=approval.site_token_id,
                subject=loggable(approval.subject),
            )
        return approval

    async def approve(self, request: AuthorizationRequest, approval: Approval) -> str:
        """
        Make the grant and its code; return the Location of the success
        redirect (code, state, iss).
        """
        now = self._clock.seconds()
        code = new_secret()
        grant = Grant(
            grant_id=new_ordered_id(now),
            client_id=request.client.client_id,
            subject=approval.subject,
            scopes=request.scopes,
            resource=request.resource,
            created_at=now,
            site_token_id=approval.site_token_id,
            client_name=request.client.client_name,
        )
        issue_refresh = OFFLINE_ACCESS in request.scopes or (
            self.config.refresh_for_refresh_grant_clients and "refresh_token" in request.client.grant_types
        )
        record = AuthorizationCode(
            code_hash=hash_secret(code),
            grant_id=grant.grant_id,
            client_id=request.client.client_id,
            redirect_uri=request.redirect_uri,
            code_challenge=request.code_challenge,
            scopes=request.scopes,
            resource=request.resource,
            expires_at=now + self.config.auth_code_ttl,
            issue_refresh=issue_refresh,
        )
        await self.store.create_grant(grant, record)
        log.info(
            "grant {grant_id} approved by {subject} for client {client_id} scopes {scopes}",
            smeldr_event="grant_approved",
            grant_id=grant.grant_id,
            site_token_id=approval.site_token_id,
            subject=loggable(approval.subject),
            client_id=loggable(request.client.client_id),
            scopes=" ".join(request.scopes),
        )
        params = [("code", code)]
        if request.state is not None:
            params.append(("state", request.state))
        params.append(("iss", self.config.issuer))
        return with_query(request.redirect_uri, params)

    def deny(self, request: AuthorizationRequest) -> str:
        """
        The Location that tells the client the person said no.
        """
        return self._back(
            request.redirect_uri, request.state, errors.access_denied("the user denied the request")
        ).location
