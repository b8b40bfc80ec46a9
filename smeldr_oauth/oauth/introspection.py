# -*- test-case-name: tests.test_oauth_introspection -*-
"""
RFC 7662 token introspection, for resource servers that are not this
process: an MCP server built with another SDK asks us whether a bearer
token is live, and for whom.

Who may ask: a I{resource server}, a client record of its own kind
(L{RESOURCE_SERVER}) made by the operator (C{smeldr-oauth-admin
resource-server create NAME --resource URL}), which authenticates with
C{client_secret_basic} or C{client_secret_post}.  Its secret is 256 bits,
shown once, stored as a hash and compared in constant time (the same
L{ClientResolver.authenticate} as the token endpoint).  An ordinary OAuth
client may not introspect (RFC 7662 section 4: the endpoint must not let
token scanning happen), and a resource server can get no token: it has no
redirect URI and no grant type.

What it learns: C{{"active": false}} and nothing else for a token that is
unknown, expired, revoked, a refresh token, or issued for another resource
than the one the resource server was created for; otherwise C{active},
C{scope}, C{client_id}, C{sub}, C{aud} (the RFC 8707 resource), C{exp},
C{iss} and C{token_type}.

Revocation is honoured at once: every answer comes from the store, never
from a cache, so a revocation made by any process (the connected-apps
page, the admin command, another server) is seen by the next
introspection.
"""

from __future__ import annotations

from typing import Any, Optional

import attr
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from smeldr_oauth.oauth import errors
from smeldr_oauth.oauth.clients import ClientResolver, presented_client
from smeldr_oauth.oauth.config import Config
from smeldr_oauth.oauth.model import Client
from smeldr_oauth.oauth.params import MAX_PARAM, Params, reject_repeated, single
from smeldr_oauth.oauth.ratelimit import IRateLimiter, spend
from smeldr_oauth.oauth.secrets import hash_secret, new_id, new_secret
from smeldr_oauth.oauth.text import loggable
from smeldr_oauth.oauth.urls import canonical_resource

log = Logger()

#: The C{kind} of the client records of resource servers.
RESOURCE_SERVER = "resource_server"

#: Parameters of an introspection request (RFC 7662 section 2.1, plus
#: C{client_secret_post}).
INTROSPECT_PARAMS = ("token", "token_type_hint", "client_id", "client_secret")

INACTIVE: dict[str, Any] = {"active": False}


def new_resource_server(name: str, resource: Optional[str], now: float) -> tuple[Client, str]:
    """
    A resource server's record and its secret (shown once, never stored).

    @param resource: the protected resource it serves (canonical URL): it
        learns nothing of tokens issued for another.  C{None}: any of ours.
    @raise ValueError: C{resource} is not an absolute http(s) URL.
    """
    canon = None
    if resource is not None:
        canon = canonical_resource(resource)
        if canon is None:
            raise ValueError(f"--resource must be an absolute http(s) URL, got {resource!r}")
    secret = new_secret()
    client = Client(
        client_id="rs-" + new_id(),
        client_name=name,
        redirect_uris=(),
        token_endpoint_auth_method="client_secret_basic",
        grant_types=(),
        kind=RESOURCE_SERVER,
        client_secret_hash=hash_secret(secret),
        created_at=now,
        # For a resource server the "client URI" is the resource it is.
        client_uri=canon,
    )
    return client, secret


@attr.s(auto_attribs=True, eq=False)
class Introspection:
    """
    The introspection endpoint's logic: plain values in, the JSON body out.

    @ivar limiter: introspection requests per client address (spent
        before authentication, so guessing secrets is slow too).
    """

    config: Config
    store: Any
    clock: IReactorTime
    clients: ClientResolver
    limiter: IRateLimiter

    async def introspect(
        self, params: Params, basic: Optional[tuple[str, str]], address: Optional[str] = None
    ) -> dict[str, Any]:
        """
        RFC 7662 section 2: the response body.

        @raise errors.OAuthError: C{invalid_client} (401 at the HTTP layer)
            when the caller is not an authenticated resource server;
            C{invalid_request} for a missing or repeated parameter.
        @raise errors.RateLimited: too many requests from C{address}.
        """
        if address is not None:
            await spend(self.limiter, address, "introspect", "introspection request")
        reject_repeated(params, INTROSPECT_PARAMS)
        client_id, secret = presented_client(params, basic)
        if secret is None:
            raise errors.invalid_client("authenticate as a resource server (client_secret_basic or client_secret_post)")
        caller = await self.clients.authenticate(params, basic, (client_id, secret))
        if caller.kind != RESOURCE_SERVER:
            log.warn(
                "token introspection refused: client {client_id} is not a resource server",
                client_id=loggable(caller.client_id),
                smeldr_event="introspection_refused",
            )
            raise errors.invalid_client("only resource servers may introspect tokens")
        token = single(params, "token")
        if not token:
            raise errors.invalid_request("parameter token is required")
        # RFC 7662 section 2.1: a hint we do not know is no error, and the
        # hash finds an access token whatever the hint says.
        if len(token) > MAX_PARAM:
            return dict(INACTIVE)
        now = self.clock.seconds()
        info = await self.store.lookup_access_token(hash_secret(token), now)
        if info is None or (info.expires_at and info.expires_at <= now):
            return dict(INACTIVE)
        audience = canonical_resource(info.resource)
        if self.config.protected_resource(audience) is None:
            return dict(INACTIVE)
        if caller.client_uri is not None and audience != caller.client_uri:
            log.info(
                "token introspection: a token for {audience} asked about by resource server {client_id} of {resource}",
                audience=audience,
                client_id=caller.client_id,
                resource=caller.client_uri,
            )
            return dict(INACTIVE)
        return {
            "active": True,
            "scope": " ".join(s for s in self.config.all_scopes if s in info.scopes),
            "client_id": info.client_id,
            "sub": info.subject,
            "aud": audience,
            "exp": int(info.expires_at),
            "iss": self.config.issuer,
            "token_type": "Bearer",
        }
