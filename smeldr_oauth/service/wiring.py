# -*- test-case-name: tests.test_service_wiring -*-
"""
Putting the parts together: the library's L{mount} (the seed's "four
steps" end here) and the standalone service behind C{twist smeldr-oauth}.

This is the only layer that may fall back to the global reactor.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import attr
from klein import Klein
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, gatherResults, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger, LogLevel

from smeldr_oauth.mcp.app import MCPApp
from smeldr_oauth.db.errors import log_failure
from smeldr_oauth.mcp.http import MCPHTTP
from smeldr_oauth.oauth.config import OFFLINE_ACCESS
from smeldr_oauth.oauth.ratelimit import Limits
from smeldr_oauth.oauth.server import OAuthServer
from smeldr_oauth.service.collector import CollectorWatch
from smeldr_oauth.web.authorize import AuthorizeRoutes
from smeldr_oauth.web.errors import API_PREFIXES, install_error_handlers
from smeldr_oauth.web.grants import GrantsPage
from smeldr_oauth.web.health import Health, HealthCheck
from smeldr_oauth.web.landing import Landing
from smeldr_oauth.web.oauth import OAuthRoutes, issuer_path
from smeldr_oauth.web.accesslog import for_twist
from smeldr_oauth.web.routes import Route, direct_answers, mount_routes, static_answers
from smeldr_oauth.web.site import SmeldrSite, TrustedProxies

log = Logger()


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


def watch_external_changes(store: Any, oauth: OAuthServer, clock: IReactorTime, interval: float = 1.0) -> Any:
    """
    Forget the cached access-token answers whenever another process (a
    second server, C{smeldr-oauth-admin grants revoke}) may have revoked
    something, so that its revocation takes effect here at once rather
    than after the cache's lifetime: pushed on PostgreSQL (C{LISTEN}), or
    within C{interval} seconds on SQLite (C{PRAGMA data_version}): see the
    store's C{watch_changes}.

    @return: the watch (C{stop()} it).
    """
    return store.watch_changes(lambda change: oauth.forget_cached_tokens(), clock, interval)




def start_checkpoints(database: Any, reactor: Any) -> Any:
    """
    On a SQLite file, WAL checkpoints on a timer in a thread rather than
    inside a commit (L{smeldr_oauth.db.sqlite.Checkpointer}); C{None} on
    PostgreSQL and in-memory SQLite.
    """
    from twisted.internet.threads import deferToThreadPool

    from smeldr_oauth.db.sqlite import Checkpointer

    if database.engine.name != "sqlite" or database.engine.path == ":memory:":
        return None
    if hasattr(reactor, "getThreadPool"):
        pool = reactor.getThreadPool()
        checkpoints = Checkpointer(database, reactor, lambda f: deferToThreadPool(reactor, pool, f))
    else:
        # A test's clock: no threads, so the checkpoints run inline.
        checkpoints = Checkpointer(database, reactor, maybeDeferred)
    checkpoints.start().addErrback(lambda f: log.failure("could not start WAL checkpoints", f))
    return checkpoints


class StandaloneService(Service):
    """
    Everything C{twist smeldr-oauth} runs, but the listeners: the stores,
    the authorization server, the MCP app and the HTTP site.

    @ivar ready: once started, a L{Deferred} that fires when the database
        is open and its watchers run (and, on PostgreSQL, this process is
        registered for MCP session routing).
    """

    def __init__(self, options: Any, reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        from smeldr_oauth.db import open_database
        from smeldr_oauth.site.stores import open_site
        from smeldr_oauth.site.tools import build_app, site_scopes
        from smeldr_oauth.store import SQLStore

        self.reactor = reactor
        self.options = options
        self.on_failure: Optional[Callable[[], None]] = None  # the database not opened (tap: exit 1)
        self._http_agent: Any = None
        db_threads = options.get("db-threads")
        # Where the rate limits' buckets live: in memory for one process
        # (SQLite), in the shared database when any process may answer.
        self.rate_limits: Any = None
        self.sessions: Any = None
        if options.get("database"):
            from smeldr_oauth.mcp.state.postgres import PostgresSessionState
            from smeldr_oauth.store.ratelimits import SQLRateLimitStore

            # One PostgreSQL database (one pool) for OAuth data, site
            # content, rate limits and MCP sessions, which every process
            # then serves.
            # Refreshes, exchanges and consents that arrive while the
            # pool's batch threads are busy share one transaction (group
            # commit; see Database's group_commit).
            database = open_database(options["database"], reactor, threads=db_threads, group_commit=True)
            self.site_stores = open_site(database, reactor)
            self.store = SQLStore(database, reactor)
            self.rate_limits = SQLRateLimitStore(database, reactor)
            self.sessions = PostgresSessionState(database, reactor)
        else:
            threads = 0 if db_threads is None else db_threads
            self.site_stores = open_site(options["site-db"], reactor, threads=threads)
            # Refreshes of one reactor turn share a transaction (SQLite on
            # the reactor thread only; see Database's group_commit).
            oauth_db = open_database(options["oauth-db"], reactor, threads=threads, group_commit=True)
            self.store = SQLStore(oauth_db, reactor)
        upstreams = options.get("upstreams") or ()
        self.gateways = [self._gateway(u.config) for u in upstreams]
        mcp_app: Optional[MCPApp]
        scopes: Optional[dict[str, str]] = None
        if upstreams:
            # The gateway serves the upstreams' tools, not the site's (see
            # docs/gateway.md); their scopes come from the options.
            mcp_app = None
        elif options["mcp-app"] is not None:
            mcp_app = options["mcp-app"]
            # The scopes a user's app names are the ones the server grants;
            # without this a tool needing "admin" could never be called.
            scopes = {s: f"Use what needs the {s!r} scope" for s in sorted(mcp_app.all_scopes())}
        else:
            mcp_app = build_app(self.site_stores, reactor)
            scopes = dict(site_scopes())
        cimd = None
        if not options["no-cimd"]:
            from smeldr_oauth.oauth.cimd import CIMDResolver

            cimd = CIMDResolver(
                reactor, allow_insecure=bool(options["dev"]), trust_root=options["cimd-ca"]
            )
        overrides: dict[str, Any] = {"verify_bearer": self.site_stores.tokens.verify_bearer}
        if scopes is not None:
            overrides["scopes"] = scopes
        config = options.config(**overrides)
        limits = Limits.from_config(config, reactor, store=self.rate_limits)
        self.oauth = OAuthServer(config, self.store, reactor, cimd, limits=limits)
        self.app = Klein()
        self.mounted = mount(
            self.app,
            self.oauth,
            mcp_app,
            reactor=reactor,
            allowed_origins=tuple(options["allowed-origin"]) or None,
            keepalive_interval=float(options["keepalive"]),
            max_body=options["max-body"],
            max_sessions_per_grant=options["max-sessions-per-grant"],
            max_sessions_per_subject=options["max-sessions-per-user"],
            max_sessions=options["max-sessions"],
            whole_site=True,
            docs_url=options.get("docs-url"),
            sessions=self.sessions,
            upstreams=list(zip(upstreams, self.gateways)),
            site_tokens=self.site_stores.tokens,
        )
        from smeldr_oauth.service.metrics import Metrics, MetricsObserver

        mounted = self.mounted
        serving = mounted.mcp_http is not None or bool(mounted.fronts)
        self.metrics = Metrics(open_streams=(lambda: float(mounted.stream_count)) if serving else None)
        if options.get("database"):
            self.metrics.watch_databases({"main": self.store.database})
            self.metrics.watch_sessions(self.sessions)
        else:
            self.metrics.watch_databases({"oauth": self.store.database, "site": self.site_stores.db})
        self._metrics_observer = MetricsObserver(self.metrics)
        if self.gateways:
            from smeldr_oauth.gateway.metrics import PrometheusFigures

            gateways = self.gateways
            self.metrics.watch(PrometheusFigures(self.metrics.registry, lambda: [g.metrics for g in gateways]))
        self.collector = CollectorWatch(reactor, freeze=not options.get("no-gc-freeze"))
        self.metrics.registry.register(self.collector.pauses)
        self.health = HealthCheck(self.store, reactor, upstreams=mounted.describe_upstreams)
        static = static_answers(self.mounted.routes)
        static[b"/healthz"] = self.health.resource()
        self.site = SmeldrSite(
            self.app.resource(),
            max_body=options["max-body"],
            metrics=self.metrics if options["metrics-listen"] else None,
            trusted_proxies=TrustedProxies(options.get("trust-forwarded-from", ())),
            # The metadata documents, /healthz and the token, revocation and
            # registration endpoints without Klein's routing, and the access
            # log in batches: docs/performance.md says why.
            static=static,
            direct=direct_answers(self.mounted.routes),
            access_log=for_twist(options, reactor),
        )
        self._purging: Any = None
        self._purging_limits: Any = None
        self._watching: Any = None
        self._checkpoints: Any = None
        from smeldr_oauth.flows.recorder import FlowRecorder

        # The flow timeline: the operator's page and the recorder.
        self.flows: Optional[FlowRecorder] = None
        if not options.get("no-flow-timeline"):
            self.flows = mount_flows(
                self.app, self.oauth, reactor, self.store.database, self.site_stores.tokens, options.get("docs-url")
            )

    def _gateway(self, upstream: Any) -> Any:
        """One upstream's L{Gateway}: stdio processes on the reactor, HTTP over a shared pool."""
        from smeldr_oauth.gateway import Gateway
        from smeldr_oauth.gateway.agent import upstream_agent

        if self._http_agent is None:
            self._http_agent = upstream_agent(self.reactor)
        return Gateway(upstream, clock=self.reactor, reactor=self.reactor, http_agent=self._http_agent)

    def startService(self) -> None:
        super().startService()
        self.collector.start()
        from smeldr_oauth.oauth.routine import routine

        # The metrics and the flow timeline (smeldr_oauth.flows, steps
        # buffered there, written in batches) observe the log, and take
        # the routine events of the hot paths directly.
        if self.options["metrics-listen"]:
            routine.observe(self._metrics_observer)
        if self.flows is not None:
            routine.observe(self.flows)
            self.flows.start()
        if self.options["dev"]:
            log.warn(
                "DEVELOPMENT MODE (--dev): http:// and loopback client_id URLs are accepted. "
                "Never use this on a public server."
            )
        if self.options["cimd-ca-file"]:
            log.warn("--cimd-ca-file is set: client metadata fetches trust an extra CA (testing only)")

        def ready(_: Any) -> None:
            self._purging = self.store.start_purging(self.reactor)
            self._watching = watch_external_changes(self.store, self.oauth, self.reactor)
            self.health.start()
            self._checkpoints = start_checkpoints(self.store.database, self.reactor)
            if self.rate_limits is not None:
                self._purging_limits = self.rate_limits.start_purging(self.reactor)
            self.collector.ready()

        def failed(f: Any) -> None:
            log_failure(f, "the OAuth database could not be opened", outage=LogLevel.critical)
            # SQLite fails here before the reactor runs: a stop then was lost and the server served on.
            self.reactor.callWhenRunning(self.on_failure or self.reactor.stop)

        self.store.ready.addCallbacks(ready, failed)
        starting = [self.store.ready]
        if self.sessions is not None:
            # Until registered, what must reach another process waits.
            starting.append(self.sessions.start().addErrback(failed))
        # (For whoever starts the service and must know it is all up.)
        self.ready: Deferred[None] = gatherResults(starting).addCallback(lambda _: None)
        log.info(
            "smeldr-oauth serving issuer {issuer}, resource {resource}",
            issuer=self.oauth.config.issuer,
            resource=self.oauth.config.resource,
        )

    def stopService(self) -> "Deferred[Any]":
        super().stopService()
        self.collector.stop()
        if self.site.access_log is not None:
            self.site.access_log.flush()
        from smeldr_oauth.oauth.routine import routine

        routine.unobserve(self._metrics_observer)
        self.health.stop()
        for loop in (self._purging, self._watching, self._purging_limits):
            if loop is not None and loop.running:
                loop.stop()

        def leave(_: Any) -> Any:
            if self.sessions is not None:
                # An outage at shutdown: one warning line, not a traceback.
                return self.sessions.stop().addErrback(log_failure, "MCP sessions not left cleanly")
            return None

        def checkpointed(_: Any) -> Any:
            if self._checkpoints is None:
                return None
            return self._checkpoints.stop()

        def close(_: Any) -> None:
            self.store.close()
            self.site_stores.close()
            if self._http_agent is not None:
                self._http_agent.close()

        def flush_flows(_: Any) -> Any:
            # After the shutdown, so that the streams it closes are in the
            # timeline too; then what waits is written, before the stores
            # close.
            if self.flows is None:
                return None
            routine.unobserve(self.flows)
            return self.flows.stop()

        return self.mounted.shutdown().addBoth(flush_flows).addBoth(leave).addBoth(checkpointed).addBoth(close)
