# -*- test-case-name: tests.test_service_wiring -*-
"""
Putting the parts together: the library's L{mount} (the seed's "four
steps" end here), which an application embeds on its own Klein app, and
the flow timeline's L{mount_flows}.  The standalone service behind C{twist
smeldr-oauth}, a process's life around them, is
L{smeldr_oauth.service.standalone}.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import attr
from klein import Klein
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IReactorTime

from smeldr_oauth.mcp.app import MCPApp
from smeldr_oauth.mcp.http import MCPHTTP
from smeldr_oauth.oauth.config import OFFLINE_ACCESS
from smeldr_oauth.oauth.server import OAuthServer
from smeldr_oauth.web.authorize import AuthorizeRoutes
from smeldr_oauth.web.errors import API_PREFIXES, install_error_handlers
from smeldr_oauth.web.grants import GrantsPage
from smeldr_oauth.web.health import Health
from smeldr_oauth.web.landing import Landing
from smeldr_oauth.web.oauth import OAuthRoutes, issuer_path
from smeldr_oauth.web.routes import Route, mount_routes

@attr.s(auto_attribs=True, kw_only=True)
class Mounted:
    """
    What L{mount} put on the Klein app: keep it to shut down cleanly.
    """

    oauth: OAuthServer
    routes: list[Route]
    mcp_http: Optional[MCPHTTP]
    #: The MCP endpoint of each upstream (the OAuth gateway), and its gateway.
    fronts: list[tuple[MCPHTTP, Any]] = attr.ib(factory=list)
    #: The state of each upstream for C{/healthz} (C{None}: no upstreams).
    describe_upstreams: Optional[Callable[[], dict[str, Any]]] = None

    @property
    def stream_count(self) -> int:
        """Open SSE streams of every MCP endpoint."""
        endpoints = ([self.mcp_http] if self.mcp_http is not None else []) + [f for f, _ in self.fronts]
        return sum(e.stream_count for e in endpoints)

    def shutdown(self) -> "Deferred[Any]":
        """End every stream and session, then stop the upstreams' instances."""
        waits: list[Deferred[Any]] = [self.mcp_http.shutdown()] if self.mcp_http is not None else []
        for front, gateway in self.fronts:
            front.shutdown()
            waits.append(gateway.stop())
        if not waits:
            return succeed(None)
        return DeferredList(waits, consumeErrors=True)


def resource_metadata_url(resource: str) -> str:
    """
    RFC 9728 section 3.1: the well-known path goes between the resource's
    origin and its path.
    """
    from hyperlink import URL

    url = URL.from_text(resource)
    origin = url.replace(path=(), query=(), fragment="").to_text().rstrip("/")
    suffix = "/".join(p for p in url.path if p)
    return origin + "/.well-known/oauth-protected-resource" + ("/" + suffix if suffix else "")


def mount(
    app: Klein,
    oauth: OAuthServer,
    mcp_app: Optional[MCPApp] = None,
    *,
    reactor: IReactorTime,
    allowed_origins: Optional[tuple[str, ...]] = None,
    keepalive_interval: float = 15.0,
    max_body: int = 1 << 20,
    mcp_path: Optional[str] = None,
    max_sessions_per_grant: int = 50,
    max_sessions_per_subject: int = 200,
    max_sessions: int = 10000,
    whole_site: bool = False,
    docs_url: Optional[str] = None,
    sessions: Optional[Any] = None,
    upstreams: Sequence[tuple[Any, Any]] = (),
    site_tokens: Optional[Any] = None,
) -> Mounted:
    """
    Mount every endpoint of C{oauth} (metadata, authorize, token, revoke,
    register, the connected-apps page, C{/healthz}) and, when C{mcp_app} is
    given, the MCP endpoints protected by it, on an existing Klein app.

    @param mcp_path: where the MCP endpoint lives; defaults to the path of
        the configured resource URL (C{/mcp}).
    @param whole_site: C{app} is the whole site (the standalone server):
        also serve the landing page at C{/}, and answer every unknown path
        and method with the project's own 404 and 405.  Off when mounting
        into someone else's app, whose C{/} and errors stay theirs.
    @param docs_url: a documentation link for the landing page.
    @param sessions: where MCP sessions live, when not in this process
        alone: an object with C{store}, C{delivery} and C{events} (a
        started L{smeldr_oauth.mcp.state.postgres.PostgresSessionState},
        so that every process on one PostgreSQL database serves every
        session).  The gateway's endpoints keep theirs in this process:
        a gateway session is bound to its upstream's connection here.
    @param upstreams: the OAuth gateway: pairs of a
        L{smeldr_oauth.gateway.front.MountedUpstream} (where, which
        resource) and its L{smeldr_oauth.gateway.Gateway}; each gets an MCP
        endpoint (both transports) whose sessions are the gateway's, whose
        tokens must have been issued for its resource, and whose
        C{insufficient_scope} challenges name its scopes.
    @param site_tokens: the site's tokens
        (L{smeldr_oauth.site.tokens.SiteTokenStore}), when they are ours:
        a connected-apps session then ends when its token is revoked.
    """
    from hyperlink import URL

    config = oauth.config
    routes = OAuthRoutes(oauth).routes() + AuthorizeRoutes(oauth).routes()
    describe = None
    if upstreams:

        def describe() -> dict[str, Any]:
            return {u.config.name or "default": g.describe() for u, g in upstreams}

    live = site_tokens.is_live if site_tokens is not None else None
    routes += GrantsPage(oauth, reactor, live).routes() + Health(oauth.store, upstreams=describe).routes()
    if whole_site:
        routes += Landing(config, docs_url).routes()
    mount_routes(app, routes)
    common: dict[str, Any] = dict(
        allowed_origins=allowed_origins,
        keepalive_interval=keepalive_interval,
        max_body=max_body,
        max_sessions_per_grant=max_sessions_per_grant,
        max_sessions_per_subject=max_sessions_per_subject,
        max_sessions=max_sessions,
    )
    mcp_http = None
    if mcp_app is not None:
        resource = config.resource or ""
        path = mcp_path or ("/" + "/".join(p for p in URL.from_text(resource).path if p)) or "/mcp"
        mcp_http = MCPHTTP(
            reactor,
            mcp_app,
            oauth,
            resource_url=resource,
            resource_metadata_url=resource_metadata_url(resource),
            challenge_scope=" ".join(s for s in config.all_scopes if s != OFFLINE_ACCESS),
            **common,
            **(
                {"store": sessions.store, "delivery": sessions.delivery, "events": sessions.events}
                if sessions is not None
                else {}
            ),
        )
        mcp_routes = mcp_http.routes(path)
        mount_routes(app, mcp_routes)
        routes += mcp_routes
        oauth.add_revocation_observer(mcp_http.close_grant)
    fronts = []
    for upstream, gateway in upstreams:
        front = MCPHTTP(
            reactor,
            None,
            oauth,
            resource_url=upstream.resource.url,
            resource_metadata_url=resource_metadata_url(upstream.resource.url),
            challenge_scope=upstream.challenge_scope,
            session_factory=gateway.session,
            **common,
        )
        front_routes = front.routes(upstream.path)
        mount_routes(app, front_routes)
        routes += front_routes
        oauth.add_revocation_observer(front.close_grant)
        fronts.append((front, gateway))
    if whole_site:
        # Every unknown path and method gets the project's own answer,
        # never Werkzeug's page: JSON under the API paths (the issuer's and
        # the MCP endpoint's included), the site's page elsewhere.
        prefix = issuer_path(config.issuer)
        extra = [prefix + "/oauth/"] + ([mcp_http.path] if mcp_http is not None else [])
        extra += [front.path for front, _ in fronts]
        install_error_handlers(app, site_wide=True, api_prefixes=API_PREFIXES + tuple(extra))
    return Mounted(oauth=oauth, routes=routes, mcp_http=mcp_http, fronts=fronts, describe_upstreams=describe)


def mount_flows(
    app: Klein, oauth: OAuthServer, reactor: Any, database: Any, tokens: Any, docs_url: Optional[str] = None
) -> Any:
    """
    The flow timeline (L{smeldr_oauth.flows}): its store in C{database}
    (the OAuth store's), the operator's page on C{app} (open to C{tokens}'
    admin tokens), and the recorder that feeds it, returned for the caller
    to start, observe the log with, and stop.
    """
    from smeldr_oauth.flows.recorder import FlowRecorder
    from smeldr_oauth.flows.store import FlowStore
    from smeldr_oauth.flows.page import FlowsPage

    store = FlowStore(database, reactor)
    mount_routes(app, FlowsPage(oauth, reactor, store, tokens.is_admin, docs_url).routes())
    return FlowRecorder(store, reactor)
