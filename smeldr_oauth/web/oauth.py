# -*- test-case-name: tests.test_web_oauth -*-
"""
The authorization server's JSON endpoints: its metadata (RFC 8414, and
the protected resource's, RFC 9728), the token endpoint (RFC 6749), the
revocation endpoint (RFC 7009) and dynamic registration (RFC 7591).

Routes translate HTTP into calls on L{OAuthServer} and its answers back;
its errors (RFC 6749 section 5.2 JSON) are written by
L{smeldr_oauth.web.errors}.  No protocol decision is made here.

Paths: an issuer with a path (C{https://example.com/auth}) serves its
endpoints under that path and its metadata at the path-inserted
well-known URL of RFC 8414 section 3.1
(C{/.well-known/oauth-authorization-server/auth}), and also at the root
one, where clients that drop the path look.  The authorize, token,
register and revoke endpoints also answer at the origin root, where
clients that skip metadata (the 2025-03-26 fallback, Claude.ai at times)
look for them.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any, Optional
from urllib.parse import unquote

from hyperlink import URL
from twisted.web.iweb import IRequest

from smeldr_oauth.oauth import errors as oauth_errors
from smeldr_oauth.oauth.server import OAuthServer
from smeldr_oauth.web import errors
from smeldr_oauth.web.body import read_form, read_json
from smeldr_oauth.web.headers import header
from smeldr_oauth.web.responses import StaticJSON, json_response
from smeldr_oauth.web.routes import CORS, Route

#: RFC 6797: once a browser has seen this over https it never talks to the
#: issuer over plain http again (a year, the usual preload minimum).
HSTS = (b"Strict-Transport-Security", b"max-age=31536000")


def hsts(issuer: str) -> tuple[tuple[bytes, bytes], ...]:
    """
    The headers of L{HSTS} for every route of C{issuer}: only when it is
    https (a browser ignores the header over plain http, and a plain http
    issuer is a test or a local server).  One place, since every page and
    endpoint of the issuer must agree.
    """
    return (HSTS,) if issuer.startswith("https://") else ()

#: The JSON endpoints may be called from any web page (browser-based MCP
#: clients such as the Inspector); the authorization endpoint never is.
CORS_ANY = CORS(allow_headers="Authorization, Content-Type, MCP-Protocol-Version")

AS_METADATA = "/.well-known/oauth-authorization-server"
PR_METADATA = "/.well-known/oauth-protected-resource"
OIDC_DISCOVERY = "/.well-known/openid-configuration"


def client_address(request: IRequest) -> str:
    """
    The peer address used as the rate-limit key (the forwarded client's
    when the peer is a proxy named by C{--trust-forwarded-from}: see
    L{smeldr_oauth.web.site}).  The limiters fold IPv6 addresses into
    their /64 (L{smeldr_oauth.oauth.ratelimit.bucket_key}).
    """
    peer = request.getClientAddress()
    return getattr(peer, "host", None) or "unknown"


def basic_credentials(request: IRequest) -> Optional[tuple[str, str]]:
    """
    C{client_secret_basic} credentials (RFC 6749 section 2.3.1: both parts
    form-urlencoded before base64), or C{None} when the header is absent.

    @raise oauth_errors.OAuthError: C{invalid_client} (401) for a header
        that is repeated, not ASCII, of another scheme, or malformed.
    """
    try:
        value = header(request, b"authorization", unique=True)
    except errors.HTTPError:
        raise oauth_errors.invalid_client("malformed Authorization header")
    if not value:
        return None
    scheme, _, encoded = value.partition(" ")
    if scheme.lower() != "basic":
        raise oauth_errors.invalid_client("unsupported client authentication scheme")
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise oauth_errors.invalid_client("malformed Basic credentials")
    user, sep, password = decoded.partition(":")
    if not sep:
        raise oauth_errors.invalid_client("malformed Basic credentials")
    return unquote(user.replace("+", " ")), unquote(password.replace("+", " "))


def oauth_form(request: IRequest) -> dict[str, list[str]]:
    """
    The form of a token or revocation request.  A body of another type or
    an unreadable one is C{invalid_request} (400, as RFC 6749 section 5.2
    says); one over the limit stays a 413.
    """
    try:
        return read_form(request)
    except errors.HTTPError as e:
        if e.status == 413:
            raise
        raise oauth_errors.invalid_request(e.description)


def client_request(request: IRequest) -> tuple[dict[str, list[str]], Optional[tuple[str, str]]]:
    """
    What a client sends to the endpoints it may authenticate at (token,
    revocation, introspection): the form (L{oauth_form}) and its
    C{client_secret_basic} credentials (L{basic_credentials}), in that
    order, so that a body of the wrong type is answered as such whatever
    the Authorization header holds.
    """
    params = oauth_form(request)
    return params, basic_credentials(request)


def resource_path(resource: str) -> str:
    """The path of a resource URL without its slashes at either end: C{mcp/a}."""
    return "/".join(p for p in URL.from_text(resource).path if p)


def issuer_path(issuer: str) -> str:
    """
    The path of C{issuer} without a trailing slash: C{""} for a bare origin.
    """
    segments = [p for p in URL.from_text(issuer).path if p]
    return "/" + "/".join(segments) if segments else ""


class OAuthRoutes:
    """
    The authorization server's JSON endpoints, as routes.
    """

    def __init__(self, server: OAuthServer) -> None:
        self.server = server
        self.config = server.config
        self.prefix = issuer_path(self.config.issuer)
        self.hsts = hsts(self.config.issuer)
        self.as_metadata = StaticJSON(server.authorization_server_metadata())
        self.pr_metadata = StaticJSON(server.protected_resource_metadata())
        # RFC 9728 section 3.1: each resource's document at the well-known
        # URL with the resource's path inserted (the root one names the
        # default resource).
        self.pr_documents = {
            resource_path(r.url): StaticJSON(server.protected_resource_metadata(r)) for r in self.config.resources
        }

    def metadata_paths(self) -> list[str]:
        """
        Where the authorization server metadata is served: the RFC 8414
        path-inserted URL, and the root one.
        """
        return list(dict.fromkeys([AS_METADATA + self.prefix, AS_METADATA]))

    def routes(self) -> list[Route]:
        def json_route(path: str, methods: dict[str, Any]) -> Route:
            return Route(path=path, methods=methods, cors=CORS_ANY, headers=self.hsts, name=f"oauth:{path}")

        routes = [json_route(path, {"GET": self.as_metadata}) for path in self.metadata_paths()]
        routes += [
            json_route(path, {"GET": self.no_oidc})
            for path in dict.fromkeys([OIDC_DISCOVERY + self.prefix, OIDC_DISCOVERY])
        ]
        routes.append(json_route(PR_METADATA, {"GET": self.pr_metadata}))
        for path, document in self.pr_documents.items():
            if path:
                routes.append(json_route(PR_METADATA + "/" + path, {"GET": document}))
        for prefix in dict.fromkeys([self.prefix + "/oauth", ""]):
            routes += [
                json_route(prefix + "/token", {"POST": self.token}),
                json_route(prefix + "/register", {"POST": self.register}),
                json_route(prefix + "/revoke", {"POST": self.revoke}),
                json_route(prefix + "/introspect", {"POST": self.introspect}),
            ]
        return routes

    def no_oidc(self, request: IRequest) -> bytes:
        """
        This server is not an OpenID provider; a 404 is what clients that
        probe for OIDC discovery (ChatGPT, the Python SDK) handle well.
        """
        raise errors.not_found("this server is not an OpenID provider")

    async def token(self, request: IRequest) -> bytes:
        params, basic = client_request(request)
        body = await self.server.token(params, basic, address=client_address(request))
        return json_response(request, body)

    async def revoke(self, request: IRequest) -> bytes:
        params, basic = client_request(request)
        await self.server.revoke(params, basic)
        return json_response(request, {})

    async def introspect(self, request: IRequest) -> bytes:
        """RFC 7662: for resource servers, with their own credentials."""
        params, basic = client_request(request)
        body = await self.server.introspect(params, basic, address=client_address(request))
        return json_response(request, body)

    async def register(self, request: IRequest) -> bytes:
        if not self.config.dynamic_registration:
            raise errors.not_found("dynamic client registration is disabled")
        try:
            metadata = read_json(request)
        except errors.HTTPError as e:
            if e.status == 413:
                raise
            raise oauth_errors.invalid_client_metadata(
                "the body must be application/json" if e.status == 415 else "the body is not a JSON object"
            )
        result = await self.server.register(metadata, address=client_address(request))
        return json_response(request, result, 201)
