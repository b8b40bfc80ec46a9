# -*- test-case-name: tests.test_mcp_auth -*-
"""
Bearer-token protection of the MCP endpoints (RFC 6750, RFC 9728, MCP
authorization): reading the C{Authorization} header and building the
C{WWW-Authenticate} challenges that send a client to the authorization
server.

Tokens are accepted only in the C{Authorization} header: never in the
query string or a form body (RFC 6750 section 2.3 allows it; MCP forbids
it, and URLs end up in logs).
"""

from __future__ import annotations

import math
import re
from typing import Any, Optional, Sequence

import attr
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from smeldr_oauth.db.errors import StoreUnavailable
from smeldr_oauth.mcp.jsonrpc import Message
from smeldr_oauth.mcp.calls import Principal, log_scope_refusal, outcome_now
from smeldr_oauth.mcp.session import ServerSession
from smeldr_oauth.oauth.interfaces import IAccessVerifier
from smeldr_oauth.oauth.model import AccessInfo
from smeldr_oauth.oauth.urls import canonical_resource

log = Logger()

# RFC 6750 b64token.
_TOKEN68 = re.compile(r"^[A-Za-z0-9\-._~+/]+=*$")
MAX_TOKEN_LENGTH = 4096


class AuthFailure(Exception):
    """
    The request is not authorised: answer with C{status} and the
    C{WWW-Authenticate} value C{challenge}.
    """

    def __init__(
        self, status: int, challenge: str, error: Optional[str] = None, retry_after: Optional[int] = None
    ) -> None:
        super().__init__(error or "unauthorized")
        self.status = status
        self.challenge = challenge
        self.error = error
        self.retry_after = retry_after


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@attr.s(frozen=True, auto_attribs=True)
class Challenger:
    """
    Builds the challenges of one protected resource.

    @ivar resource_metadata_url: absolute URL of the RFC 9728 document.
    @ivar scope: the scopes a client should ask for by default.
    """

    resource_metadata_url: str
    scope: str

    def _header(self, error: Optional[str], scope: Optional[str], description: Optional[str]) -> str:
        params = []
        if error:
            params.append(f"error={_quote(error)}")
        if description:
            params.append(f"error_description={_quote(description)}")
        if scope:
            params.append(f"scope={_quote(scope)}")
        params.append(f"resource_metadata={_quote(self.resource_metadata_url)}")
        return "Bearer " + ", ".join(params)

    def missing(self) -> AuthFailure:
        """No credentials: 401 pointing at the resource metadata."""
        header = "Bearer " + ", ".join(
            [f"resource_metadata={_quote(self.resource_metadata_url)}", f"scope={_quote(self.scope)}"]
        )
        return AuthFailure(401, header)

    def invalid_token(self, description: str = "The access token is invalid or expired") -> AuthFailure:
        return AuthFailure(401, self._header("invalid_token", self.scope, description), "invalid_token")

    def invalid_request(self, description: str) -> AuthFailure:
        return AuthFailure(400, self._header("invalid_request", None, description), "invalid_request")

    def insufficient_scope(self, scopes: tuple[str, ...]) -> AuthFailure:
        return AuthFailure(
            403,
            self._header("insufficient_scope", " ".join(scopes), "The access token lacks a required scope"),
            "insufficient_scope",
        )


def bearer_token(authorization: Optional[list[bytes]], challenger: Challenger) -> str:
    """
    The token of an C{Authorization: Bearer} header.

    @param authorization: every raw C{Authorization} header value.
    @raise AuthFailure: none given (401 without an error code, so the client
        starts authorization); several, another scheme, or a malformed
        token (401 invalid_token / 400 invalid_request).
    """
    if not authorization:
        raise challenger.missing()
    if len(authorization) > 1:
        raise challenger.invalid_request("Several Authorization headers")
    try:
        value = authorization[0].decode("ascii").strip()
    except UnicodeDecodeError:
        raise challenger.invalid_token("Malformed Authorization header")
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer":
        # Another scheme (Basic, ...) is "no bearer credentials".
        raise challenger.missing()
    token = token.strip()
    if not token or len(token) > MAX_TOKEN_LENGTH or not _TOKEN68.match(token):
        raise challenger.invalid_token("Malformed bearer token")
    return token


def verify(
    verifier: IAccessVerifier,
    token: str,
    challenger: Challenger,
    clock: IReactorTime,
    audience: Optional[str] = None,
) -> Deferred:
    """
    Ask the verifier about C{token}.

    @param audience: the canonical URL of the resource asking (RFC 8707):
        a token issued for another resource of the same authorization
        server (another upstream of the gateway, say) is refused here.

    @return: a L{Deferred} firing with the L{AccessInfo}, or failing with
        L{AuthFailure}.  A verifier that fails (its store is down) becomes
        a 503-style L{AuthFailure}, never a 500 with a traceback.
    """
    # Plain functions with their arguments, not closures: this runs for
    # every MCP request.
    return _judged(maybeDeferred(verifier.verify_access_token, token), challenger, clock, audience)


def _judged(d: Deferred, challenger: Challenger, clock: IReactorTime, audience: Optional[str]) -> Deferred:
    """The verifier's answer C{d}, checked (L{_checked}) and its failures made refusals (L{_broken})."""
    return d.addCallback(_checked, challenger, clock, audience).addErrback(_broken)


def _checked(
    info: Optional[AccessInfo], challenger: Challenger, clock: IReactorTime, audience: Optional[str]
) -> AccessInfo:
    if info is None:
        log.info("Bearer token refused")
        raise challenger.invalid_token()
    if info.expires_at and info.expires_at <= clock.seconds():
        raise challenger.invalid_token("The access token expired")
    if audience is not None and info.resource != audience and canonical_resource(info.resource) != audience:
        log.info(
            "Bearer token for another resource refused: {subject} via {client_id}",
            subject=info.subject,
            client_id=info.client_id,
        )
        raise challenger.invalid_token("The access token was issued for another resource")
    return info


def _broken(failure: Failure) -> None:
    if failure.check(AuthFailure):
        failure.raiseException()
    if failure.check(StoreUnavailable):
        # The database is down or restarting: expected, and said once
        # per request without a traceback; the client retries.
        log.warn("Access token verifier: {error}", error=str(failure.value))
        raise AuthFailure(503, "", "temporarily_unavailable", retry_after=failure.value.retry_after)
    log.failure("Access token verifier failed", failure)
    raise AuthFailure(503, "", "temporarily_unavailable", retry_after=1)


@attr.s(frozen=True, auto_attribs=True, slots=True)
class Credential:
    """
    A verified bearer token and what the verifier said about it.  The
    token itself is kept (a stream re-verifies it) but never shown.
    """

    info: AccessInfo
    token: str = attr.ib(repr=False)

    @property
    def principal(self) -> Principal:
        info = self.info
        return Principal(
            subject=info.subject, client_id=info.client_id, scopes=frozenset(info.scopes), grant_id=info.grant_id
        )

    @property
    def expires_at(self) -> float:
        # verify() treats a zero expires_at as "does not expire".
        return self.info.expires_at or math.inf


@attr.s(auto_attribs=True)
class BearerAuth:
    """
    The protection of one resource: its verifier, its challenges, its clock.

    @ivar audience: the resource's canonical URL; tokens issued for another
        resource are refused (C{None}: the verifier alone decides).
    """

    verifier: IAccessVerifier
    challenger: Challenger
    clock: IReactorTime
    audience: Optional[str] = None

    def credential(self, request: Any) -> "Credential | Deferred[Credential]":
        """
        L{authenticate}, but the L{Credential} itself when the verifier
        answers at once (a token in its cache, as on every request after
        a session's first): the same checks in the same order, without
        the four L{Deferred} steps around an answer already known.

        @raise AuthFailure: the token is refused (or, returned in the
            L{Deferred}, when the verifier had to look it up).
        """
        token = bearer_token(request.requestHeaders.getRawHeaders(b"authorization"), self.challenger)
        # maybeDeferred, as verify(): a verifier may raise, or answer with
        # the value itself rather than a Deferred.
        d = maybeDeferred(self.verifier.verify_access_token, token)
        known = outcome_now(d)
        if not known:
            return _judged(d, self.challenger, self.clock, self.audience).addCallback(Credential, token)
        info = known[0]
        if isinstance(info, Failure):
            _broken(info)  # raises the AuthFailure it makes of it
        return Credential(_checked(info, self.challenger, self.clock, self.audience), token)

    def authenticate(self, request: Any) -> "Deferred[Credential]":
        """
        @return: a L{Deferred} firing with the request's L{Credential}, or
            failing with L{AuthFailure}.
        """
        token = bearer_token(request.requestHeaders.getRawHeaders(b"authorization"), self.challenger)
        return self.verify(token).addCallback(Credential, token)

    def verify(self, token: str) -> "Deferred[AccessInfo]":
        """See L{verify}."""
        return verify(self.verifier, token, self.challenger, self.clock, self.audience)

    def require_scopes(self, protocol: ServerSession, messages: Sequence[Message], principal: Principal) -> None:
        """
        Refuse, before anything runs, a request whose token lacks a scope
        one of C{messages} needs: HTTP transports answer 403 with an
        C{insufficient_scope} challenge, so the client can step up.

        @raise AuthFailure: 403.
        """
        for message in messages:
            needed = protocol.missing_scopes(message, principal)
            if needed:
                log_scope_refusal("MCP request", principal, needed)
                raise self.challenger.insufficient_scope(needed)
