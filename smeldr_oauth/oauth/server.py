# -*- test-case-name: tests.test_oauth_server -*-
"""
The authorization server's protocol logic.

Every method takes plain values (parameters already parsed out of HTTP)
and returns plain values or raises the errors of L{smeldr_oauth.oauth.errors}.
The Klein glue in L{smeldr_oauth.oauth.http} only translates; storage sits
behind L{IOAuthStore}.
"""

from __future__ import annotations

import inspect
import unicodedata
from collections import OrderedDict
from typing import Any, Callable, Iterable, Mapping, Optional

import attr
from twisted.internet.defer import Deferred, ensureDeferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from smeldr_oauth.oauth import errors, pkce
from smeldr_oauth.oauth.config import OFFLINE_ACCESS, Config
from smeldr_oauth.oauth.interfaces import IAccessVerifier, IGrantEvents
from smeldr_oauth.oauth.model import (
    AccessInfo,
    AccessToken,
    Approval,
    AuthorizationCode,
    Client,
    Grant,
    IssuedTokens,
    RefreshToken,
)
from smeldr_oauth.oauth.secrets import constant_time_equal, hash_secret, new_id, new_secret
from smeldr_oauth.oauth.urls import (
    canonical_resource,
    is_loopback_host,
    parse,
    redirect_uri_matches,
    valid_redirect_uri,
    with_query,
)
from smeldr_oauth.store.interface import IOAuthStore

log = Logger()

MAX_PARAM = 2048
MAX_STATE = 1024

#: Seconds between two records of the same grant's use ("last used" on the
#: connected-apps page): one write a minute per grant, not one per request.
TOUCH_INTERVAL = 60.0

#: Longest access token worth looking up: ours are 43 characters.
MAX_TOKEN = 512

#: The authorization request's parameters that may appear at most once
#: (RFC 6749 section 3.1).  C{resource} is checked on its own: RFC 8707
#: allows several, and this server refuses more than one as invalid_target.
AUTHORIZE_PARAMS = (
    "response_type",
    "client_id",
    "redirect_uri",
    "scope",
    "state",
    "code_challenge",
    "code_challenge_method",
    "prompt",
    "response_mode",
)

#: The same for the token endpoint (RFC 6749 section 3.2).
TOKEN_PARAMS = (
    "grant_type",
    "code",
    "redirect_uri",
    "client_id",
    "client_secret",
    "code_verifier",
    "refresh_token",
    "scope",
)

#: And for the revocation endpoint (RFC 7009 section 2.1).
REVOKE_PARAMS = ("token", "token_type_hint", "client_id", "client_secret")


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


def single(params: Mapping[str, list[str]], name: str, required: bool = False) -> Optional[str]:
    """
    The one value of parameter C{name}.  A repeated parameter is an
    C{invalid_request} (RFC 6749 section 3.1), and so is an empty or
    oversized one.
    """
    values = params.get(name, [])
    if len(values) > 1:
        raise errors.invalid_request(f"parameter {name} is repeated")
    if not values or values[0] == "":
        if required:
            raise errors.invalid_request(f"parameter {name} is required")
        return None
    value = values[0]
    if len(value) > MAX_PARAM:
        raise errors.invalid_request(f"parameter {name} is too long")
    return value


def reject_repeated(params: Mapping[str, list[str]], names: Iterable[str]) -> None:
    """
    Refuse a request that repeats one of C{names} (RFC 6749 sections 3.1
    and 3.2: parameters MUST NOT be included more than once).  Parameters
    we do not know are ignored, as RFC 6749 section 3.1 requires.
    """
    for name in names:
        if len(params.get(name, [])) > 1:
            raise errors.invalid_request(f"parameter {name} is repeated")
    if len(params.get("resource", [])) > 1:
        raise errors.invalid_target("only one resource may be requested")


def display_name(name: str) -> Optional[str]:
    """
    A self-declared client name made safe to show and to log: control
    characters become spaces, format characters (bidi overrides, zero-width
    joiners that could disguise the name) go, whitespace is collapsed.
    """
    visible = "".join(
        " " if unicodedata.category(c) == "Cc" else c
        for c in name
        if unicodedata.category(c) not in ("Cf", "Co", "Cs", "Cn")
    )
    return " ".join(visible.split()) or None


#: Longest rendering of a client-chosen value in a log line.
MAX_LOGGED = 200


def loggable(value: object) -> str:
    """
    A client-chosen value (a client_id, a CIMD refusal reason quoting a
    document) made safe for a log line: plain printable ASCII up to
    L{MAX_LOGGED} characters passes as it is; anything else is written as
    its escaped C{ascii()} form, cut to L{MAX_LOGGED}, so that a newline
    cannot forge a log line and an escape sequence cannot drive the
    operator's terminal.
    """
    if isinstance(value, str) and len(value) <= MAX_LOGGED and all(" " <= c <= "~" for c in value):
        if "\\" not in value and not value.startswith(("'", '"')):
            return value
    return ascii(value)[:MAX_LOGGED]


def _label(value: Optional[str]) -> str:
    """
    A client-supplied value fit for a log field or metric label: known
    grant types pass, anything else is "other".
    """
    return value if value in ("authorization_code", "refresh_token") else "other"


def _approval_of(result: Any) -> Optional[Approval]:
    if isinstance(result, Approval):
        return result
    if result is True:
        return Approval(subject="site")
    if isinstance(result, str) and result:
        return Approval(subject=result)
    return None


@implementer(IAccessVerifier, IGrantEvents)
class OAuthServer:
    """
    An OAuth 2.1 authorization server for one protected resource.

    @param cimd: resolves Client ID Metadata Document client ids; C{None}
        turns CIMD off (then only registered clients exist).
    """

    def __init__(
        self,
        config: Config,
        store: IOAuthStore,
        clock: IReactorTime,
        cimd: Any = None,
    ) -> None:
        from smeldr_oauth.oauth.ratelimit import RateLimiter

        self.config = config
        self.store = store
        self._clock = clock
        self._cimd = cimd
        self._observers: list[Callable[[str], None]] = []
        self._cache: OrderedDict[str, tuple[AccessInfo, float]] = OrderedDict()
        self._touched: OrderedDict[str, float] = OrderedDict()
        # Bumped by every revocation.  A look-up that started before a
        # revocation and ends after it may have read the token as live: its
        # answer must not be cached (it would outlive the revocation).
        self._revocations = 0
        # Registered clients by id (see resolve_client).
        self._clients: OrderedDict[str, tuple[Client, float]] = OrderedDict()
        self.paste_limiter = RateLimiter(clock, config.paste_failures_per_minute)
        self.register_limiter = RateLimiter(clock, config.registrations_per_minute)
        self.cimd_limiter = RateLimiter(clock, config.cimd_fetches_per_minute)

    # -- metadata ---------------------------------------------------------

    def authorization_server_metadata(self) -> dict[str, Any]:
        """
        RFC 8414 metadata.  C{issuer} is byte-identical to the resource
        metadata's C{authorization_servers[0]}.
        """
        c = self.config
        auth_methods = ["none", "client_secret_basic", "client_secret_post"]
        body: dict[str, Any] = {
            "issuer": c.issuer,
            "authorization_endpoint": c.endpoint("/oauth/authorize"),
            "token_endpoint": c.endpoint("/oauth/token"),
            "revocation_endpoint": c.endpoint("/oauth/revoke"),
            "response_types_supported": ["code"],
            "response_modes_supported": ["query"],
            "grant_types_supported": ["authorization_code", "refresh_token"],
            "code_challenge_methods_supported": ["S256"],
            "token_endpoint_auth_methods_supported": auth_methods,
            "revocation_endpoint_auth_methods_supported": auth_methods,
            "scopes_supported": list(c.all_scopes),
            "client_id_metadata_document_supported": self._cimd is not None,
            "authorization_response_iss_parameter_supported": True,
            "service_documentation": c.endpoint("/"),
        }
        if c.dynamic_registration:
            body["registration_endpoint"] = c.endpoint("/oauth/register")
        return body

    def protected_resource_metadata(self) -> dict[str, Any]:
        """
        RFC 9728 metadata for the MCP resource.  C{offline_access} is an
        authorization-server concern, so it is not listed here.
        """
        c = self.config
        return {
            "resource": c.resource,
            "authorization_servers": [c.issuer],
            "scopes_supported": [s for s in c.all_scopes if s != OFFLINE_ACCESS],
            "bearer_methods_supported": ["header"],
            "resource_name": c.service_name,
        }

    # -- clients ----------------------------------------------------------

    def resolve_client(self, client_id: str, address: Optional[str] = None) -> "Deferred[Optional[Client]]":
        """
        Find a client: a CIMD URL is fetched (and cached by the resolver),
        anything else is looked up among registrations.  Failures of a CIMD
        fetch become C{None} with the reason logged.

        @param address: the address of the browser that sent an
            authorization request.  When given, a CIMD resolution that has
            to fetch counts against L{cimd_limiter} for that address, so no
            one can make this server fetch URLs of their choosing at
            speed.  (The token and revocation endpoints pass none: their
            callers are client back ends such as Claude.ai's, thousands of
            users behind few addresses, and they present client ids whose
            documents the authorization request has just cached.)

        @raise errors.RateLimited: (as a failed Deferred) C{address} has
            made too many authorization requests that needed a fetch.
        """
        from smeldr_oauth.oauth.cimd import CIMDError, is_cimd_client_id

        # Registered clients never change, so one found once is kept, in a
        # bounded LRU, and every token request stops paying a database
        # round trip.  Entries live client_cache_ttl at most: the store
        # deletes long-unused registrations (purge_expired), and a running
        # server must not keep one alive for ever.  Only hits are kept: an
        # unknown id is asked again next time.  An id found here came
        # through the store branch below, so it is not a CIMD URL under
        # this configuration.
        known = self._clients.get(client_id)
        if known is not None:
            client, cached_at = known
            if self._clock.seconds() - cached_at < self.client_cache_ttl:
                self._clients.move_to_end(client_id)
                return succeed(client)
            del self._clients[client_id]
        if self._cimd is not None and is_cimd_client_id(
            client_id, allow_insecure=self.config.allow_insecure_client_ids
        ):
            if address is not None and not self.cimd_limiter.hit(address):
                log.warn(
                    "refused client metadata document fetch for {address}: rate limited",
                    address=loggable(address),
                    endpoint="cimd",
                    smeldr_event="rate_limited",
                )
                return fail(errors.RateLimited(60))
            d = maybeDeferred(self._cimd.resolve, client_id)
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
        return self.store.get_client(client_id).addCallback(self._remember_client)

    #: How many registered clients L{resolve_client} keeps in memory.
    client_cache_size = 1024

    #: Seconds L{resolve_client} trusts a remembered registration.
    client_cache_ttl = 3600.0

    def _remember_client(self, client: Optional[Client]) -> Optional[Client]:
        if client is not None:
            self._clients[client.client_id] = (client, self._clock.seconds())
            self._clients.move_to_end(client.client_id)
            while len(self._clients) > self.client_cache_size:
                self._clients.popitem(last=False)
        return client

    # -- authorization endpoint ---------------------------------------------

    async def validate_authorization_request(
        self, params: Mapping[str, list[str]], address: Optional[str] = None
    ) -> AuthorizationRequest:
        """
        Validate an authorization request (GET query or the consent form's
        fields, which are checked again in full on POST).

        The client and its redirect URI are checked first: until both are
        trusted, every problem is shown on a page (redirecting to an
        unchecked URI would make this an open redirector).  After that,
        every problem goes back to the client with C{state} and C{iss}.

        @raise errors.UntrustedRedirect: the client or the redirect URI
            cannot be trusted: show a page, do not redirect.
        @raise errors.AuthorizeRedirectError: anything else, to be sent back
            to the (now trusted) redirect URI with C{state} and C{iss}.

        @param address: the browser's address, for the CIMD fetch limit
            (see L{resolve_client}); a limited request is an
            L{errors.UntrustedRedirect} with status 429.
        """
        try:
            client_id = single(params, "client_id", required=True)
            redirect_uri = single(params, "redirect_uri")
        except errors.OAuthError as e:
            raise errors.UntrustedRedirect("Invalid request", e.description)
        assert client_id is not None
        try:
            client = await self.resolve_client(client_id, address)
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
            raise errors.AuthorizeRedirectError(
                redirect_uri, None, errors.invalid_request("state is too long")
            )
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
            scopes = self.parse_scopes(single(params, "scope"), client)
            resource = self.check_resource(params.get("resource", []))
            self.check_prompt(single(params, "prompt"))
        except errors.OAuthError as e:
            raise errors.AuthorizeRedirectError(redirect_uri, state, e)
        return AuthorizationRequest(
            client=client,
            redirect_uri=redirect_uri,
            scopes=scopes,
            state=state,
            code_challenge=challenge,
            resource=resource,
        )

    def check_prompt(self, prompt: Optional[str]) -> None:
        """
        C{prompt} (OpenID Connect Core section 3.1.2.1, used by OAuth
        clients too): the consent page is always shown, so C{consent},
        C{login} and C{select_account} are already honoured; C{none} cannot
        be, because approving needs a pasted site token.  C{none} with any
        other value is contradictory.  Unknown values are ignored.
        """
        if prompt is None:
            return
        values = prompt.split()
        if "none" in values:
            if len(values) > 1:
                raise errors.invalid_request("prompt=none cannot be combined with other values")
            raise errors.login_required("approval needs the user to paste a site token")

    def parse_scopes(self, scope: Optional[str], client: Optional[Client] = None) -> tuple[str, ...]:
        """
        The scopes asked for, in server order, or the defaults when none are
        named.  Unknown scopes are an C{invalid_scope} error rather than
        silently dropped, so a client learns what it will not get.

        A I{registered} C{client} that registered a C{scope} (RFC 7591
        section 2) gets nothing beyond it: asking for more is
        C{invalid_scope}, and the defaults are cut down to it.  A CIMD
        document's C{scope} is not enforced: one document serves a client
        with every server it talks to, so its scope names are not ours.
        """
        allowed = set(self.config.all_scopes)
        limited = client is not None and client.kind == "registered" and client.scope is not None
        if limited:
            assert client is not None and client.scope is not None
            allowed &= set(client.scope.split())
        if scope is None or not scope.strip():
            defaults = tuple(s for s in self.config.default_scopes or () if s in allowed)
            if limited and not defaults:
                raise errors.invalid_scope("name a scope: none of the defaults was registered by this client")
            return defaults
        asked = scope.split()
        unknown = [s for s in asked if s not in self.config.all_scopes]
        if unknown:
            raise errors.invalid_scope("unknown scope: " + " ".join(sorted(set(unknown)))[:200])
        beyond = [s for s in asked if s not in allowed]
        if beyond:
            raise errors.invalid_scope(
                "scope not registered by this client: " + " ".join(sorted(set(beyond)))[:200]
            )
        return tuple(s for s in self.config.all_scopes if s in asked)

    def check_resource(self, values: Iterable[str]) -> str:
        """
        RFC 8707: the resource, canonicalised, must be ours; absent means
        ours.  Only one resource may be named.
        """
        values = [v for v in values if v != ""]
        if not values:
            return self.config.resource  # type: ignore[return-value]
        if len(values) > 1:
            raise errors.invalid_target("only one resource may be requested")
        canon = canonical_resource(values[0])
        if canon is None:
            raise errors.invalid_target("resource must be an absolute URL")
        if canon != self.config.resource:
            raise errors.invalid_target("this server issues tokens only for " + self.config.resource)  # type: ignore[operator]
        return canon

    def error_redirect(self, error: errors.AuthorizeRedirectError) -> str:
        """
        The Location of an authorization error response (RFC 6749 section
        4.1.2.1, with RFC 9207's C{iss}).
        """
        params = [("error", error.error.error), ("error_description", error.error.description)]
        if error.state is not None:
            params.append(("state", error.state))
        params.append(("iss", self.config.issuer))
        return with_query(error.redirect_uri, params)

    async def verify_paste(self, pasted: str) -> Optional[Approval]:
        """
        Ask the configured C{verify_bearer} about a pasted site token.
        Exceptions count as a refusal (and are logged without the token).
        """
        if not pasted or len(pasted) > 4096:
            return None
        try:
            result = self.config.verify_bearer(pasted)
            if inspect.isawaitable(result) and not isinstance(result, Deferred):
                result = await ensureDeferred(result)  # type: ignore[arg-type]
            elif isinstance(result, Deferred):
                result = await result
        except Exception as e:
            # Not log.failure: the exception's text or traceback could
            # quote the pasted token.  Its type is enough to start looking.
            log.error(
                "verify_bearer raised {exception_type}; treating the paste as refused",
                exception_type=type(e).__qualname__,
            )
            return None
        return _approval_of(result)

    async def approve(self, request: AuthorizationRequest, approval: Approval) -> str:
        """
        Make the grant and its code; return the Location of the success
        redirect (code, state, iss).
        """
        now = self._clock.seconds()
        code = new_secret()
        grant = Grant(
            grant_id=new_id(),
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
        return self.error_redirect(
            errors.AuthorizeRedirectError(
                request.redirect_uri,
                request.state,
                errors.access_denied("the user denied the request"),
            )
        )

    # -- token endpoint -----------------------------------------------------

    async def authenticate_client(
        self,
        params: Mapping[str, list[str]],
        basic: Optional[tuple[str, str]],
    ) -> Client:
        """
        Client authentication at the token and revocation endpoints:
        C{none} for public clients (the client_id alone), or
        C{client_secret_basic} / C{client_secret_post} for confidential
        registered clients.  Using more than one method is an error
        (RFC 6749 section 2.3).
        """
        post_id = single(params, "client_id")
        post_secret = single(params, "client_secret")
        if basic is not None and post_secret is not None:
            raise errors.invalid_request("use one client authentication method")
        if basic is not None:
            client_id, basic_secret = basic
            if post_id is not None and post_id != client_id:
                raise errors.invalid_client("client_id does not match the Authorization header")
            # Some libraries send "client_id:" for a public client.
            secret: Optional[str] = basic_secret or None
        else:
            client_id, secret = post_id or "", post_secret
        if not client_id:
            raise errors.invalid_client("client_id is required")
        if len(client_id) > MAX_PARAM:
            raise errors.invalid_client("unknown client")
        client = await self.resolve_client(client_id)
        if client is None:
            raise errors.invalid_client("unknown client")
        if client.client_secret_hash is not None:
            if secret is None or not constant_time_equal(hash_secret(secret), client.client_secret_hash):
                raise errors.invalid_client("client authentication failed")
        elif secret is not None:
            raise errors.invalid_client("this is a public client: it has no secret")
        return client

    async def token(
        self, params: Mapping[str, list[str]], basic: Optional[tuple[str, str]] = None
    ) -> dict[str, Any]:
        """
        The token endpoint: the JSON body of a successful response.

        Every outcome is a log event (C{smeldr_event} C{token_issued} or
        C{token_refused}, which the metrics count), carrying the grant
        type and error code only: never a parameter's value.
        """
        grant_type: Optional[str] = None
        try:
            reject_repeated(params, TOKEN_PARAMS)
            grant_type = single(params, "grant_type", required=True)
            if grant_type == "authorization_code":
                body = await self._code_grant(params, basic)
            elif grant_type == "refresh_token":
                body = await self._refresh_grant(params, basic)
            else:
                raise errors.unsupported_grant_type("grant_type must be authorization_code or refresh_token")
        except errors.OAuthError as e:
            log.info(
                "token request refused: {reason}",
                reason=e.error,
                grant_type=_label(grant_type),
                smeldr_event="token_refused",
            )
            raise
        # Debug level: a token issue is routine (one per refresh), and
        # formatting an info line for each was a fifth of a refresh's CPU.
        # The event is still published, so the metrics observer counts it;
        # grants, refusals, replays and reuse stay at info or warn.
        log.debug(
            "token issued by grant type {grant_type}", grant_type=grant_type, smeldr_event="token_issued"
        )
        return body

    async def _code_grant(
        self, params: Mapping[str, list[str]], basic: Optional[tuple[str, str]]
    ) -> dict[str, Any]:
        # Everything that can be checked without the code is checked
        # before it is spent, so a malformed request changes nothing.
        code = single(params, "code", required=True)
        verifier = single(params, "code_verifier", required=True)
        redirect_uri = single(params, "redirect_uri")
        resource_values = [v for v in params.get("resource", []) if v]
        if resource_values:
            self.check_resource(resource_values)
        client = await self.authenticate_client(params, basic)
        if not pkce.valid_verifier(verifier or ""):
            raise errors.invalid_grant("code_verifier is malformed")
        now = self._clock.seconds()
        # From here the code is spent whatever happens: a code presented
        # with the wrong verifier, client or redirect_uri never works again.
        result = await self.store.consume_code(hash_secret(code or ""), now)
        if result.status == "replayed":
            # The store has revoked the grant.
            assert result.code is not None
            log.warn(
                "replayed authorization code refused: grant {grant_id} revoked",
                grant_id=result.code.grant_id,
                client_id=loggable(result.code.client_id),
                smeldr_event="code_replay",
            )
            self._grant_revoked(result.code.grant_id)
            raise errors.invalid_grant("authorization code already used")
        if result.status != "ok":
            raise errors.invalid_grant("authorization code is invalid or expired")
        record = result.code
        assert record is not None
        if record.client_id != client.client_id:
            raise errors.invalid_grant("authorization code was issued to another client")
        if redirect_uri is not None and redirect_uri != record.redirect_uri:
            raise errors.invalid_grant("redirect_uri does not match the authorization request")
        if resource_values:
            resource = canonical_resource(resource_values[0])
            if resource != record.resource:
                raise errors.invalid_target("resource does not match the authorization request")
        if not pkce.verify(verifier or "", record.code_challenge):
            raise errors.invalid_grant("code_verifier does not match the code_challenge")
        access = new_secret()
        refresh = new_secret() if record.issue_refresh else None
        await self.store.add_tokens(
            record.grant_id,
            AccessToken(
                token_hash=hash_secret(access),
                grant_id=record.grant_id,
                scopes=record.scopes,
                resource=record.resource,
                expires_at=now + self.config.access_token_ttl,
            ),
            None
            if refresh is None
            else RefreshToken(
                token_hash=hash_secret(refresh),
                grant_id=record.grant_id,
                scopes=record.scopes,
                generation=1,
                created_at=now,
                expires_at=now + self.config.refresh_token_ttl,
            ),
        )
        return IssuedTokens(
            access_token=access,
            expires_in=self.config.access_token_ttl,
            scopes=record.scopes,
            refresh_token=refresh,
        ).as_json()

    async def _refresh_grant(
        self, params: Mapping[str, list[str]], basic: Optional[tuple[str, str]]
    ) -> dict[str, Any]:
        token = single(params, "refresh_token", required=True)
        scope = single(params, "scope")
        requested = None if scope is None else self.parse_scopes(scope)
        self.check_resource(params.get("resource", []))
        client = await self.authenticate_client(params, basic)
        now = self._clock.seconds()
        access = new_secret()
        refresh = new_secret()
        result = await self.store.redeem_refresh_token(
            hash_secret(token or ""),
            now,
            float(self.config.refresh_grace),
            requested,
            AccessToken(
                token_hash=hash_secret(access),
                grant_id="",
                scopes=(),
                resource=self.config.resource or "",
                expires_at=now + self.config.access_token_ttl,
            ),
            RefreshToken(
                token_hash=hash_secret(refresh),
                grant_id="",
                scopes=(),
                generation=0,
                created_at=now,
                expires_at=now + self.config.refresh_token_ttl,
            ),
        )
        if result.status == "reused":
            # The store has revoked the grant.
            assert result.grant is not None
            log.warn(
                "reused refresh token refused: grant {grant_id} revoked",
                grant_id=result.grant.grant_id,
                client_id=loggable(result.grant.client_id),
                smeldr_event="refresh_reuse",
            )
            self._grant_revoked(result.grant.grant_id)
            raise errors.invalid_grant("refresh token already used")
        if result.status == "superseded":
            # A parallel refresh's loser: its sibling was rotated moments
            # ago.  Refused, but the grant lives on (rotation.decide).
            log.info(
                "superseded refresh token refused: grant {grant_id} kept",
                grant_id=result.grant.grant_id if result.grant is not None else None,
                smeldr_event="refresh_superseded",
            )
            raise errors.invalid_grant("refresh token was superseded by a parallel refresh")
        if result.status == "invalid_scope":
            raise errors.invalid_scope("a refresh may narrow the scope, never widen it")
        if result.status not in ("rotated", "grace"):
            raise errors.invalid_grant("refresh token is invalid, expired or revoked")
        grant = result.grant
        assert grant is not None
        if grant.client_id != client.client_id:
            # A refresh token in the hands of another client is a stolen
            # one: end the grant rather than just refuse.
            await self.store.revoke_grant(grant.grant_id, now)
            self._grant_revoked(grant.grant_id)
            log.warn(
                "refresh token of client {owner} presented by {client_id}: grant {grant_id} revoked",
                owner=loggable(grant.client_id),
                client_id=loggable(client.client_id),
                grant_id=grant.grant_id,
                smeldr_event="refresh_wrong_client",
            )
            raise errors.invalid_grant("refresh token was issued to another client")
        return IssuedTokens(
            access_token=access,
            expires_in=self.config.access_token_ttl,
            scopes=requested if requested is not None else grant.scopes,
            refresh_token=refresh,
        ).as_json()

    # -- revocation -----------------------------------------------------------

    async def revoke(self, params: Mapping[str, list[str]], basic: Optional[tuple[str, str]] = None) -> None:
        """
        RFC 7009.  Unknown tokens are not an error; a refresh token ends its
        grant.  Public clients identify themselves by client_id only, and
        are not required to: a token is its own proof of possession.  But
        a client that does name itself (C{client_id}, or by authenticating)
        revokes only its own tokens: one of another client's is left alone,
        and the answer is the same 200 (RFC 7009 section 2.1: the server
        verifies that the token was issued to the requesting client).
        """
        reject_repeated(params, REVOKE_PARAMS)
        values = params.get("token", [])
        if not values or not values[0]:
            raise errors.invalid_request("parameter token is required")
        token = values[0]
        # RFC 7009 section 2.2.1: a token_type_hint we do not know is
        # ignored (unsupported_token_type is for types that cannot be
        # revoked; both of ours can), and so is the hint itself: the
        # token's hash finds it whatever its type.
        requester = single(params, "client_id")
        if basic is not None or single(params, "client_secret") is not None:
            requester = (await self.authenticate_client(params, basic)).client_id
        if len(token) > MAX_PARAM:
            # Not one of ours: RFC 7009 answers 200 for invalid tokens.
            return
        token_hash = hash_secret(token)
        grant_id = await self.store.revoke_token(token_hash, self._clock.seconds(), client_id=requester)
        self._token_revoked(token_hash)
        if grant_id is not None:
            self._grant_revoked(grant_id)

    async def revoke_grant(self, grant_id: str) -> bool:
        ended = await self.store.revoke_grant(grant_id, self._clock.seconds())
        if ended:
            self._grant_revoked(grant_id)
        return bool(ended)

    def add_revocation_observer(self, observer: Callable[[str], None]) -> None:
        self._observers.append(observer)

    def _token_revoked(self, token_hash: str) -> None:
        """
        Forget a revoked access token at once (called once the store has
        recorded the revocation, so no later look-up can re-cache it).
        """
        self._revocations += 1
        self._cache.pop(token_hash, None)

    def _grant_revoked(self, grant_id: str) -> None:
        self._revocations += 1
        for key in [k for k, (info, _) in self._cache.items() if info.grant_id == grant_id]:
            del self._cache[key]
        for observer in list(self._observers):
            try:
                observer(grant_id)
            except Exception:
                log.failure("revocation observer failed")

    # -- registration -----------------------------------------------------------

    async def register(self, metadata: Any) -> dict[str, Any]:
        """
        RFC 7591 dynamic client registration.  Clients are public
        (C{token_endpoint_auth_method: none}) unless they ask for a
        shared-secret method, in which case they get a secret, shown once.
        """
        if not isinstance(metadata, dict):
            raise errors.invalid_client_metadata("the body must be a JSON object")
        uris = metadata.get("redirect_uris")
        if not isinstance(uris, list) or not uris or len(uris) > 20:
            raise errors.invalid_redirect_uri("redirect_uris must be a list of 1 to 20 URIs")
        for uri in uris:
            if not isinstance(uri, str) or not valid_redirect_uri(uri, self.config.allow_insecure_client_ids):
                raise errors.invalid_redirect_uri(
                    "redirect URIs must be https, or http on a loopback host, with no fragment"
                )
        method = metadata.get("token_endpoint_auth_method", "none")
        if method not in ("none", "client_secret_basic", "client_secret_post"):
            raise errors.invalid_client_metadata(
                "token_endpoint_auth_method must be none, client_secret_basic or client_secret_post"
            )
        grant_types = metadata.get("grant_types", ["authorization_code", "refresh_token"])
        if (
            not isinstance(grant_types, list)
            or not all(g in ("authorization_code", "refresh_token") for g in grant_types)
            or "authorization_code" not in grant_types
        ):
            raise errors.invalid_client_metadata(
                "grant_types must include authorization_code and may add refresh_token only"
            )
        response_types = metadata.get("response_types", ["code"])
        if response_types != ["code"]:
            raise errors.invalid_client_metadata('response_types must be ["code"]')
        name = metadata.get("client_name")
        if name is not None and (not isinstance(name, str) or len(name) > 200):
            raise errors.invalid_client_metadata("client_name must be a string of at most 200 characters")
        if name is not None:
            name = display_name(name)
        scope = metadata.get("scope")
        if scope is not None:
            if not isinstance(scope, str):
                raise errors.invalid_client_metadata("scope must be a string")
            try:
                self.parse_scopes(scope)
            except errors.OAuthError as e:
                raise errors.invalid_client_metadata(e.description)
        optional_urls = {}
        for key in ("client_uri", "logo_uri"):
            value = metadata.get(key)
            if value is not None:
                url = parse(value) if isinstance(value, str) else None
                if url is None or url.scheme != "https":
                    raise errors.invalid_client_metadata(f"{key} must be an https URL")
                optional_urls[key] = value
        if await self.store.count_clients() >= self.config.max_registered_clients:
            log.warn(
                "refused a registration: the cap of {cap} registered clients is reached",
                cap=self.config.max_registered_clients,
            )
            raise errors.temporarily_unavailable("registration is closed: too many clients")
        now = self._clock.seconds()
        secret = new_secret() if method != "none" else None
        client = Client(
            client_id=new_id(),
            client_name=name,
            redirect_uris=tuple(uris),
            token_endpoint_auth_method=method,
            grant_types=tuple(grant_types),
            scope=scope,
            kind="registered",
            client_secret_hash=None if secret is None else hash_secret(secret),
            created_at=now,
            **optional_urls,
        )
        await self.store.save_client(client)
        log.info(
            "registered client {client_id} ({name}) auth {method}",
            client_id=client.client_id,
            name=loggable(name),
            method=method,
        )
        body: dict[str, Any] = {
            "client_id": client.client_id,
            "client_id_issued_at": int(now),
            "redirect_uris": list(uris),
            "token_endpoint_auth_method": method,
            "grant_types": list(grant_types),
            "response_types": ["code"],
        }
        if name is not None:
            body["client_name"] = name
        if scope is not None:
            body["scope"] = scope
        body.update(optional_urls)
        if secret is not None:
            body["client_secret"] = secret
            body["client_secret_expires_at"] = 0
        return body

    # -- resource server side -------------------------------------------------

    def verify_access_token(self, token: str) -> "Deferred[Optional[AccessInfo]]":
        """
        L{IAccessVerifier}: a live token issued for our resource.  Answers
        come from a bounded in-process cache for up to C{access_cache_ttl}
        seconds; every revocation made through this server drops the
        affected entries at once.  A use also marks the grant as used (at
        most once a minute per grant) for the connected-apps page.
        """
        now = self._clock.seconds()
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN:
            return succeed(None)
        key = hash_secret(token)
        hit = self._cache.get(key)
        if hit is not None:
            info, cached_at = hit
            if now < info.expires_at and now - cached_at < self.config.access_cache_ttl:
                self._touch(info.grant_id, now)
                return succeed(info)
            del self._cache[key]
        return self._lookup(key, now, retry=True)

    def _lookup(self, key: str, now: float, retry: bool) -> "Deferred[Optional[AccessInfo]]":
        revocations = self._revocations

        def found(info: Optional[AccessInfo]) -> "Optional[AccessInfo] | Deferred[Optional[AccessInfo]]":
            if info is None:
                return None
            if canonical_resource(info.resource) != self.config.resource:
                return None
            if revocations != self._revocations:
                # A revocation happened while we looked, so this answer may
                # predate it: ask again (fail closed if it happens twice).
                return self._lookup(key, now, retry=False) if retry else None
            self._cache[key] = (info, now)
            while len(self._cache) > self.config.access_cache_size:
                self._cache.popitem(last=False)
            self._touch(info.grant_id, now)
            return info

        return maybeDeferred(self.store.lookup_access_token, key, now).addCallback(found)

    def forget_cached_tokens(self) -> None:
        """
        Drop every cached access-token answer, so the next use of each token
        asks the store again.  For revocations made outside this process
        (the admin command on the same database): see
        L{smeldr_oauth.service.wiring.watch_external_changes}.
        """
        self._cache.clear()
        self._revocations += 1

    def _touch(self, grant_id: str, now: float) -> None:
        """
        Record a grant's use, at most once per L{TOUCH_INTERVAL} per grant,
        without holding up the request that used it.
        """
        last = self._touched.get(grant_id)
        if last is not None and now - last < TOUCH_INTERVAL:
            return
        self._touched[grant_id] = now
        self._touched.move_to_end(grant_id)
        while len(self._touched) > self.config.access_cache_size:
            self._touched.popitem(last=False)

        def failed(f: Any) -> None:
            log.failure("could not record the use of grant {grant_id}", f, grant_id=grant_id)

        maybeDeferred(self.store.touch_grant, grant_id, now).addErrback(failed)
