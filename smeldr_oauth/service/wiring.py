# -*- test-case-name: tests.test_service_wiring -*-
"""
Putting the parts together: the library's L{mount} (the seed's "four
steps" end here) and the standalone service behind C{twist smeldr-oauth}.

This is the only layer that may fall back to the global reactor.
"""

from __future__ import annotations

from typing import Any, Optional

import attr
from klein import Klein
from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from smeldr_oauth.mcp.app import MCPApp
from smeldr_oauth.mcp.http import MCPHTTP
from smeldr_oauth.oauth.config import OFFLINE_ACCESS
from smeldr_oauth.oauth.ratelimit import Limits
from smeldr_oauth.oauth.server import OAuthServer
from smeldr_oauth.web.authorize import AuthorizeRoutes
from smeldr_oauth.web.errors import API_PREFIXES, install_error_handlers
from smeldr_oauth.web.grants import GrantsPage
from smeldr_oauth.web.health import Health
from smeldr_oauth.web.landing import Landing
from smeldr_oauth.web.oauth import OAuthRoutes, issuer_path
from smeldr_oauth.web.routes import Route, mount_routes
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

    def shutdown(self) -> "Deferred[None]":
        if self.mcp_http is None:
            return succeed(None)
        return self.mcp_http.shutdown()


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
        session).
    """
    from hyperlink import URL

    config = oauth.config
    routes = OAuthRoutes(oauth).routes() + AuthorizeRoutes(oauth).routes()
    routes += GrantsPage(oauth, reactor).routes() + Health(oauth.store).routes()
    if whole_site:
        routes += Landing(config, docs_url).routes()
    mount_routes(app, routes)
    mcp_http = None
    if mcp_app is not None:
        resource = config.resource or ""
        path = mcp_path or ("/" + "/".join(p for p in URL.from_text(resource).path if p)) or "/mcp"
        # RFC 9728 section 3.1: the well-known path goes between the
        # resource's origin and its path.
        origin = URL.from_text(resource).replace(path=(), query=(), fragment="").to_text().rstrip("/")
        suffix = "/".join(p for p in URL.from_text(resource).path if p)
        metadata_url = origin + "/.well-known/oauth-protected-resource" + ("/" + suffix if suffix else "")
        mcp_http = MCPHTTP(
            reactor,
            mcp_app,
            oauth,
            resource_url=resource,
            resource_metadata_url=metadata_url,
            challenge_scope=" ".join(s for s in config.all_scopes if s != OFFLINE_ACCESS),
            allowed_origins=allowed_origins,
            keepalive_interval=keepalive_interval,
            max_body=max_body,
            max_sessions_per_grant=max_sessions_per_grant,
            max_sessions_per_subject=max_sessions_per_subject,
            max_sessions=max_sessions,
            **(
                {"store": sessions.store, "delivery": sessions.delivery, "events": sessions.events}
                if sessions is not None
                else {}
            ),
        )
        mcp_http.register(app, path)
        oauth.add_revocation_observer(mcp_http.close_grant)
    if whole_site:
        # Every unknown path and method gets the project's own answer,
        # never Werkzeug's page: JSON under the API paths (the issuer's and
        # the MCP endpoint's included), the site's page elsewhere.
        prefix = issuer_path(config.issuer)
        extra = [prefix + "/oauth/"] + ([mcp_http.path] if mcp_http is not None else [])
        install_error_handlers(app, site_wide=True, api_prefixes=API_PREFIXES + tuple(extra))
    return Mounted(oauth=oauth, routes=routes, mcp_http=mcp_http)


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
            database = open_database(options["database"], reactor, threads=db_threads)
            self.site_stores = open_site(database, reactor)
            self.store = SQLStore(database, reactor)
            self.rate_limits = SQLRateLimitStore(database, reactor)
            self.sessions = PostgresSessionState(database, reactor)
        else:
            threads = 0 if db_threads is None else db_threads
            self.site_stores = open_site(options["site-db"], reactor, threads=threads)
            self.store = SQLStore(open_database(options["oauth-db"], reactor, threads=threads), reactor)
        if options["mcp-app"] is not None:
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
        config = options.config(verify_bearer=self.site_stores.tokens.verify_bearer, scopes=scopes)
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
        )
        from smeldr_oauth.service.metrics import Metrics, MetricsObserver

        mcp_http = self.mounted.mcp_http
        self.metrics = Metrics(open_streams=(lambda: float(mcp_http.stream_count)) if mcp_http else None)
        if options.get("database"):
            self.metrics.watch_databases({"main": self.store.database})
            self.metrics.watch_sessions(self.sessions)
        else:
            self.metrics.watch_databases({"oauth": self.store.database, "site": self.site_stores.db})
        self._metrics_observer = MetricsObserver(self.metrics)
        self.site = SmeldrSite(
            self.app.resource(),
            max_body=options["max-body"],
            metrics=self.metrics if options["metrics-listen"] else None,
            trusted_proxies=TrustedProxies(options.get("trust-forwarded-from", ())),
        )
        self._purging: Any = None
        self._purging_limits: Any = None
        self._watching: Any = None

    def startService(self) -> None:
        super().startService()
        if self.options["metrics-listen"]:
            from twisted.logger import globalLogPublisher

            globalLogPublisher.addObserver(self._metrics_observer)
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
            if self.rate_limits is not None:
                self._purging_limits = self.rate_limits.start_purging(self.reactor)

        def failed(f: Any) -> None:
            log.failure("the OAuth database could not be opened", f)
            self.reactor.stop()

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
        from twisted.logger import globalLogPublisher

        globalLogPublisher.removeObserver(self._metrics_observer)
        for loop in (self._purging, self._watching, self._purging_limits):
            if loop is not None and loop.running:
                loop.stop()

        def leave(_: Any) -> Any:
            if self.sessions is not None:
                return self.sessions.stop().addErrback(lambda f: log.failure("MCP sessions not left cleanly", f))
            return None

        def close(_: Any) -> None:
            self.store.close()
            self.site_stores.close()

        return self.mounted.shutdown().addBoth(leave).addBoth(close)
