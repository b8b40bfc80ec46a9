# -*- test-case-name: tests.test_oauth_server -*-
"""
The authorization server, composed of one service per concern:

  - L{smeldr_oauth.oauth.clients}: who a client is (registrations, metadata
    documents, client authentication);
  - L{smeldr_oauth.oauth.authorization}: the authorization endpoint;
  - L{smeldr_oauth.oauth.tokens}: the token endpoint;
  - L{smeldr_oauth.oauth.revocation}: revocation, and the events that tell
    the rest of the process about it;
  - L{smeldr_oauth.oauth.registration}: dynamic registration;
  - L{smeldr_oauth.oauth.verifier}: the resource side (bearer tokens).

Every method takes plain values (parameters already parsed out of HTTP)
and returns plain values or raises the errors of
L{smeldr_oauth.oauth.errors}; the HTTP glue in L{smeldr_oauth.web} only
translates, and storage sits behind L{IOAuthStore}.  L{OAuthServer} is
what the library, the HTTP layer and the MCP layer hold.  Its methods hand
back the services' coroutines rather than awaiting them in one of their
own: one coroutine less on every request.
"""

from __future__ import annotations

from typing import Any, Callable, Coroutine, Iterable, Mapping, Optional

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from smeldr_oauth.oauth import errors, metadata
from smeldr_oauth.oauth.authorization import Authorization, AuthorizationRequest, check_prompt
from smeldr_oauth.oauth.clients import ClientResolver
from smeldr_oauth.oauth.config import Config, ProtectedResource
from smeldr_oauth.oauth.interfaces import IAccessVerifier, IGrantEvents
from smeldr_oauth.oauth.model import AccessInfo, Approval, Client
from smeldr_oauth.oauth.params import AUTHORIZE_PARAMS, Params
from smeldr_oauth.oauth.ratelimit import Limits
from smeldr_oauth.oauth.registration import Registration
from smeldr_oauth.oauth.introspection import Introspection
from smeldr_oauth.oauth.revocation import GrantEvents, Revocation
from smeldr_oauth.oauth.scopes import check_resource, parse_scopes
from smeldr_oauth.oauth.text import loggable
from smeldr_oauth.oauth.tokens import Tokens
from smeldr_oauth.oauth.verifier import AccessVerifier
from smeldr_oauth.oauth.interfaces import IOAuthStore

__all__ = ["AUTHORIZE_PARAMS", "AuthorizationRequest", "OAuthServer", "loggable"]


@implementer(IAccessVerifier, IGrantEvents)
class OAuthServer:
    """
    An OAuth 2.1 authorization server for one protected resource.

    @param cimd: resolves Client ID Metadata Document client ids; C{None}
        turns CIMD off (then only registered clients exist).
    @param limits: the rate limits it spends; default those C{config}
        describes.
    """

    def __init__(
        self,
        config: Config,
        store: IOAuthStore,
        clock: IReactorTime,
        cimd: Any = None,
        *,
        limits: Optional[Limits] = None,
    ) -> None:
        self.config = config
        self.store = store
        self.limits = limits if limits is not None else Limits.from_config(config, clock)
        self.cimd_enabled = cimd is not None
        self.clients = ClientResolver(config, store, clock, cimd, self.limits.cimd_fetch)
        self.verifier = AccessVerifier(config, store, clock)
        self.events = GrantEvents(self.verifier)
        self.authorization = Authorization(config, store, clock, self.clients, self.limits.paste)
        self.tokens = Tokens(config, store, clock, self.clients, self.events, self.limits)
        self.revocation = Revocation(store, clock, self.clients, self.events)
        self.registration = Registration(config, store, clock, self.limits.registration)
        self.introspection = Introspection(config, store, clock, self.clients, self.limits.introspection)

    # -- metadata ---------------------------------------------------------

    def authorization_server_metadata(self) -> dict[str, Any]:
        return metadata.authorization_server_metadata(self.config, self.cimd_enabled)

    def protected_resource_metadata(self, resource: Optional[ProtectedResource] = None) -> dict[str, Any]:
        return metadata.protected_resource_metadata(self.config, resource)

    # -- clients ----------------------------------------------------------

    def resolve_client(self, client_id: str, address: Optional[str] = None) -> "Deferred[Optional[Client]]":
        return self.clients.resolve(client_id, address)

    def authenticate_client(self, params: Params, basic: Optional[tuple[str, str]]) -> "Coroutine[Any, Any, Client]":
        return self.clients.authenticate(params, basic)

    # -- authorization endpoint ----------------------------------------------

    def validate_authorization_request(
        self, params: Params, address: Optional[str] = None
    ) -> "Coroutine[Any, Any, AuthorizationRequest]":
        return self.authorization.validate(params, address)

    def parse_scopes(self, scope: Optional[str], client: Optional[Client] = None) -> tuple[str, ...]:
        return parse_scopes(self.config, scope, client)

    def check_resource(self, values: Iterable[str]) -> str:
        return check_resource(self.config, values)

    def check_prompt(self, prompt: Optional[str]) -> None:
        check_prompt(prompt)

    def error_redirect(self, error: errors.AuthorizeRedirectError) -> str:
        """
        The Location of an authorization error response (RFC 6749 section
        4.1.2.1, with RFC 9207's C{iss}).
        """
        error.issuer = self.config.issuer
        return error.location

    def verify_paste(self, pasted: str) -> "Coroutine[Any, Any, Optional[Approval]]":
        return self.authorization.verify_paste(pasted)

    def check_paste(
        self, pasted: str, address: str, request: Optional[AuthorizationRequest] = None
    ) -> "Coroutine[Any, Any, Approval]":
        return self.authorization.check_paste(pasted, address, request)

    def approve(self, request: AuthorizationRequest, approval: Approval) -> "Coroutine[Any, Any, str]":
        return self.authorization.approve(request, approval)

    def deny(self, request: AuthorizationRequest) -> str:
        return self.authorization.deny(request)

    # -- token, revocation and registration endpoints ----------------------

    def token(
        self, params: Params, basic: Optional[tuple[str, str]] = None, address: Optional[str] = None
    ) -> "Coroutine[Any, Any, dict[str, Any]]":
        return self.tokens.token(params, basic, address)

    def revoke(
        self, params: Mapping[str, list[str]], basic: Optional[tuple[str, str]] = None
    ) -> "Coroutine[Any, Any, None]":
        return self.revocation.revoke(params, basic)

    def introspect(
        self, params: Params, basic: Optional[tuple[str, str]] = None, address: Optional[str] = None
    ) -> "Coroutine[Any, Any, dict[str, Any]]":
        """RFC 7662: see L{smeldr_oauth.oauth.introspection}."""
        return self.introspection.introspect(params, basic, address)

    def revoke_grant(self, grant_id: str) -> "Coroutine[Any, Any, bool]":
        return self.revocation.revoke_grant(grant_id)

    def register(self, metadata: Any, address: Optional[str] = None) -> "Coroutine[Any, Any, dict[str, Any]]":
        return self.registration.register(metadata, address)

    # -- resource side: IAccessVerifier, IGrantEvents -------------------------

    def verify_access_token(self, token: str) -> "Deferred[Optional[AccessInfo]]":
        return self.verifier.verify_access_token(token)

    def forget_cached_tokens(self) -> None:
        self.verifier.forget_cached_tokens()

    def add_revocation_observer(self, observer: Callable[[str], None]) -> None:
        self.events.add_revocation_observer(observer)
