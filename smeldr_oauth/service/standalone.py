# -*- test-case-name: tests.test_service_standalone -*-
"""
The standalone service behind C{twist smeldr-oauth}: the stores, the
authorization server, the MCP app and the HTTP site, put together from the
options (L{StandaloneService}), with what runs beside them once the
database is open: purging, the watch for other processes' revocations,
SQLite's checkpoints, the health check, the flow timeline.

Why apart from L{smeldr_oauth.service.wiring}: that module is the library's
L{mount}, which an application embeds on its own Klein app and reactor;
this one is a process's life (options in, services started and stopped),
which only C{twist} and the tests run.  This is, with the wiring, the only
layer that may fall back to the global reactor.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from klein import Klein
from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger, LogLevel

from smeldr_oauth.mcp.app import MCPApp
from smeldr_oauth.db.errors import log_failure
from smeldr_oauth.oauth.ratelimit import Limits
from smeldr_oauth.oauth.server import OAuthServer
from smeldr_oauth.service.collector import CollectorWatch
from smeldr_oauth.service.wiring import mount, mount_flows
from smeldr_oauth.web.health import HealthCheck
from smeldr_oauth.web.accesslog import for_twist
from smeldr_oauth.web.routes import direct_answers, static_answers
from smeldr_oauth.web.site import SmeldrSite, TrustedProxies

log = Logger()


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
