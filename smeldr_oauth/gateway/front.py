# -*- test-case-name: tests.test_gateway_front -*-
"""
Where each upstream is served and what a token for it may carry: the plan
the service wiring follows to put the gateway behind our authorization.

Each upstream becomes one protected resource (RFC 8707 / RFC 9728): a
single upstream stays at C{/mcp}, several each get C{/mcp/NAME}, and a
token issued for one is refused at the others (the MCP front checks the
audience).  A resource's scopes are the ones its mapping names; an
upstream whose mapping names none gets L{BASE_SCOPE}, so that a consent
page always says something and a token always names what it was given.

Pure values in, pure values out: the wiring builds the L{Gateway}s and the
HTTP endpoints from this plan.
"""

from __future__ import annotations

from typing import Any, Optional

import attr

from smeldr_oauth.gateway.config import GatewayConfig, UpstreamConfig
from smeldr_oauth.oauth.config import ProtectedResource
from smeldr_oauth.oauth.urls import canonical_resource

#: The scope of an upstream whose mapping names none.
BASE_SCOPE = "mcp"


@attr.s(frozen=True, auto_attribs=True)
class MountedUpstream:
    """
    One upstream as the front serves it.

    @ivar path: the MCP endpoint's path on our site (C{/mcp/NAME}).
    @ivar resource: its protected resource: URL (the token's audience),
        scopes, and the words the consent page shows for them.
    """

    config: UpstreamConfig
    path: str
    resource: ProtectedResource

    @property
    def challenge_scope(self) -> str:
        """The C{scope} of its C{WWW-Authenticate} challenge: every scope it maps."""
        return " ".join(self.resource.scopes)


def _scopes(upstream: UpstreamConfig) -> tuple[str, ...]:
    named = upstream.scopes.all_scopes()
    if not named:
        return (BASE_SCOPE,)
    # Required scopes first (every client needs them), then the rest sorted.
    rest = sorted(named - set(upstream.scopes.required))
    return tuple(upstream.scopes.required) + tuple(rest)


def _words(upstream: UpstreamConfig, scopes: tuple[str, ...]) -> dict[str, str]:
    label = upstream.name or "the server"
    words = upstream.scopes.describe(label)
    return {s: words.get(s, f"Use every tool, resource and prompt of {label}") for s in scopes}


def plan(gateway: GatewayConfig, issuer: str, resource: Optional[str] = None) -> tuple[MountedUpstream, ...]:
    """
    Where each upstream is served.

    @param issuer: the public base URL; resources live under it.
    @param resource: C{--resource}: the public URL of a I{single}
        upstream's endpoint (a proxy in front may rewrite paths).
    @raise ValueError: C{resource} with several upstreams, or not a URL.
    """
    paths = gateway.paths()
    if resource is not None and len(gateway.upstreams) != 1:
        raise ValueError("--resource names one MCP endpoint: with several upstreams each is <issuer>/mcp/NAME")
    mounted = []
    for upstream in gateway.upstreams:
        path = paths[upstream.name]
        url = canonical_resource(resource if resource is not None else issuer.rstrip("/") + path)
        if url is None:
            raise ValueError(f"resource must be an absolute http(s) URL, got {resource!r}")
        scopes = _scopes(upstream)
        protected = ProtectedResource(
            url=url,
            scopes=scopes,
            name=upstream.name or None,
            scope_words=_words(upstream, scopes),
        )
        mounted.append(MountedUpstream(upstream, path, protected))
    return tuple(mounted)


def authorization_settings(mounted: tuple[MountedUpstream, ...]) -> dict[str, Any]:
    """
    The L{smeldr_oauth.oauth.config.Config} arguments that make the
    authorization server issue tokens for these upstreams: every scope any
    of them names (with words for the metadata and the consent page), one
    protected resource each, the first one the default.
    """
    scopes: dict[str, str] = {}
    for m in mounted:
        for scope in m.resource.scopes:
            scopes.setdefault(scope, m.resource.scope_words.get(scope, scope))
    resources = tuple(m.resource for m in mounted)
    return {"scopes": scopes, "resources": resources, "resource": resources[0].url}
