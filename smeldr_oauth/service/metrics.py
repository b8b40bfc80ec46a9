# -*- test-case-name: tests.test_service_metrics -*-
"""
Prometheus metrics, fed by the same structured log events that record
security decisions.

Protocol code does not import this module.  It emits L{twisted.logger}
events carrying a C{smeldr_event} field (for example C{"code_replay"} or
C{"token_issued"}); L{MetricsObserver} counts them.  The log and the metrics
therefore cannot disagree, and the protocol layers stay free of a metrics
dependency.

Metrics are served only on their own listener (C{--metrics-listen}), never
on the public site.

With C{--workers N} every worker records into prometheus_client's
multiprocess files (C{PROMETHEUS_MULTIPROC_DIR}, a private directory the
parent makes) and the parent serves their aggregate (L{PoolMetrics}), so a
scrape reports the whole server, not one worker at random.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.twisted import MetricsResource
from twisted.application.service import IService, Service
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.web.resource import IResource, Resource
from zope.interface import implementer

#: Paths that get their own latency label; anything else is "other", so a
#: scan of random URLs cannot create unbounded label values.
KNOWN_ROUTES = frozenset(
    {
        "/.well-known/oauth-authorization-server",
        "/.well-known/oauth-protected-resource",
        "/.well-known/oauth-protected-resource/mcp",
        "/.well-known/openid-configuration",
        "/oauth/authorize",
        "/oauth/token",
        "/oauth/revoke",
        "/oauth/register",
        "/oauth/grants",
        "/authorize",
        "/token",
        "/register",
        "/mcp",
        "/mcp/message",
        "/healthz",
    }
)

#: Methods with a latency label of their own, any other "other" (HTTP takes any token: each was a series for good).
KNOWN_METHODS = {m: m.decode() for m in (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"TRACE")}
MAX_TOOL_LABELS = 200


def multiprocess_directory() -> Optional[str]:
    """
    The multiprocess directory this process records into, if any: the
    same test prometheus_client makes (at import) to choose its value
    storage.
    """
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir")


def route_label(path: bytes) -> str:
    text = path.split(b"?", 1)[0].decode("ascii", "replace")
    return text if text in KNOWN_ROUTES else "other"


class Metrics:
    """
    The server's metrics, in a registry of their own (not the process-wide
    default), so several servers in one process (tests) do not collide.

    @ivar multiprocess: This process is a worker of C{--workers}: its
        values go to the multiprocess files and the parent serves them.
    """

    def __init__(self, open_streams: Optional[Callable[[], float]] = None) -> None:
        self.multiprocess = multiprocess_directory() is not None
        self.registry = CollectorRegistry()
        r = self.registry
        self.grants = Counter("smeldr_grants_approved", "Grants approved on the consent page", registry=r)
        self.tokens_issued = Counter(
            "smeldr_tokens_issued", "Token responses, by grant type", ["grant_type"], registry=r
        )
        self.token_refusals = Counter(
            "smeldr_token_refusals", "Token endpoint errors, by OAuth error code", ["reason"], registry=r
        )
        self.security_events = Counter(
            "smeldr_security_events",
            "Security decisions (code replay, refresh reuse, refused paste, refused CIMD fetch, ...)",
            ["event"],
            registry=r,
        )
        self.rate_limited = Counter(
            "smeldr_rate_limited", "Requests refused by a rate limit, by endpoint", ["endpoint"], registry=r
        )
        self.mcp_calls = Counter(
            "smeldr_mcp_tool_calls", "MCP tool calls, by tool and outcome", ["tool", "outcome"], registry=r
        )
        self.latency = Histogram(
            "smeldr_http_request_duration_seconds",
            "HTTP request latency (to the end of the response; SSE streams excluded)",
            ["route", "method", "status"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        )
        # Summed over the live workers; a dead worker's streams are gone.
        self.open_streams = Gauge(
            "smeldr_mcp_open_streams", "Open SSE streams", registry=r, multiprocess_mode="livesum"
        )
        self._open_streams = open_streams
        if open_streams is not None and not self.multiprocess:
            # A function gauge is read at scrape time, which a worker's
            # parent cannot do: workers call refresh() instead.
            self.open_streams.set_function(open_streams)
        self._tools: set[str] = set()
        self._worker_requests: Any = None
        self._databases: Optional[DatabaseFigures] = None
        self._routing: Optional[RoutingFigures] = None
        self._watched: list[Any] = []

    def watch_databases(self, databases: Mapping[str, Any]) -> None:
        """
        Report the pools and transactions of C{databases} (label
        C{database}: C{main} on PostgreSQL, C{oauth} and C{site} on
        SQLite): see L{DatabaseFigures}.
        """
        self._databases = DatabaseFigures(self.registry, databases)

    def watch_sessions(self, sessions: Any) -> None:
        """
        Report how MCP sessions shared between processes are routed
        (L{smeldr_oauth.mcp.state.postgres.PostgresSessionState}): see
        L{RoutingFigures}.
        """
        self._routing = RoutingFigures(self.registry, sessions)

    def watch(self, figures: Any) -> None:
        """
        Refresh C{figures} (an object with a C{refresh()} that brings its
        metrics in this registry up to date, such as the gateway's
        L{smeldr_oauth.gateway.metrics.PrometheusFigures}) with the rest.
        """
        self._watched.append(figures)

    def refresh(self) -> None:
        """
        Bring the values read from elsewhere (open streams, the database
        pools and their transaction counters) up to date: before each
        scrape in one process (L{resource}), and every second in a worker
        of C{--workers}, whose values go to the multiprocess files.
        """
        if self._open_streams is not None and self.multiprocess:
            self.open_streams.set(self._open_streams())
        if self._databases is not None:
            self._databases.refresh()
        if self._routing is not None:
            self._routing.refresh()
        for figures in self._watched:
            figures.refresh()

    def count_worker(self, index: int) -> None:
        """
        Count this process's requests as worker C{index}'s, so the
        aggregate shows how the kernel spreads connections over workers.
        """
        self._worker_requests = Counter(
            "smeldr_worker_http_requests",
            "HTTP requests answered, by worker (--workers)",
            ["worker"],
            registry=self.registry,
        ).labels(worker=str(index))

    def tool_label(self, name: Any) -> str:
        name = str(name)[:64]
        if name in self._tools:
            return name
        if len(self._tools) >= MAX_TOOL_LABELS:
            return "other"
        self._tools.add(name)
        return name

    def observe_request(self, path: bytes, method: bytes, status: int, seconds: float) -> None:
        self.latency.labels(
            route=route_label(path),
            method=KNOWN_METHODS.get(method, "other"),
            status=f"{status // 100}xx",
        ).observe(seconds)
        if self._worker_requests is not None:
            self._worker_requests.inc()

    def resource(self) -> IResource:
        return _Refreshed(self)


class _Refreshed(Resource):
    """
    The metrics page of one process: values read from elsewhere are
    brought up to date first.
    """

    isLeaf = True

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self._metrics = metrics
        self._page = MetricsResource(registry=metrics.registry)

    def render(self, request: Any) -> Any:
        self._metrics.refresh()
        return self._page.render(request)


class _Advancing:
    """
    Counters that follow totals kept elsewhere: each refresh adds what the
    totals grew by since the last one.
    """

    def __init__(self) -> None:
        self._seen: dict[Any, float] = {}

    def advance(self, counter: Any, key: Any, total: float) -> None:
        grown = total - self._seen.get(key, 0)
        self._seen[key] = total
        if grown > 0:
            counter.inc(grown)


class DatabaseFigures(_Advancing):
    """
    What the database layer counts (L{smeldr_oauth.db.Database.pool_stats}
    and C{transaction_stats}), as metrics:

      - C{smeldr_db_connections}: connections open in the pool;
      - C{smeldr_db_calls_in_flight}: calls handed to the pool's threads
        and not back yet (running, or waiting for a thread);
      - C{smeldr_db_calls_waiting}: of those, the ones waiting for a
        thread (more than C{--db-threads} at once: a pool too small, or a
        slow database);
      - C{smeldr_db_transactions_total}, C{..._errors_total},
        C{..._retries_total} (deadlocks, serialisation failures) and
        C{smeldr_db_transaction_seconds_total} (time inside the database,
        lock waits included), per transaction C{name} (a store method: a
        bounded set);
      - C{smeldr_db_listener_connected}: 1 while the PostgreSQL
        notification listener is connected (revocation pushes arrive).

    Gauges add up over live workers; the counters are advanced by what
    changed since the last refresh, so they also add up.
    """

    def __init__(self, registry: CollectorRegistry, databases: Mapping[str, Any]) -> None:
        super().__init__()
        self._databases = dict(databases)

        def gauge(name: str, documentation: str) -> Gauge:
            # Each worker reports its own pools: the deployment's value is
            # the sum over the live workers.
            return Gauge(name, documentation, ["database"], registry=registry, multiprocess_mode="livesum")

        def counter(name: str, documentation: str) -> Counter:
            return Counter(name, documentation, ["database", "name"], registry=registry)

        self.connections = gauge("smeldr_db_connections", "Database connections open in the pool")
        self.in_flight = gauge("smeldr_db_calls_in_flight", "Database calls running or waiting for a pool thread")
        self.waiting = gauge("smeldr_db_calls_waiting", "Database calls waiting for a pool thread")
        self.listener = gauge("smeldr_db_listener_connected", "1 while the notification listener is connected")
        self.transactions = counter("smeldr_db_transactions", "Database calls finished, by transaction name")
        self.errors = counter("smeldr_db_transaction_errors", "Database calls that failed, by transaction name")
        self.retries = counter(
            "smeldr_db_transaction_retries",
            "Database calls run again after a deadlock or serialisation failure, by transaction name",
        )
        self.seconds = counter(
            "smeldr_db_transaction_seconds",
            "Seconds spent inside the database (lock waits included), by transaction name",
        )

    def refresh(self) -> None:
        for label, database in self._databases.items():
            pool = database.pool_stats()
            self.connections.labels(database=label).set(pool["connections"])
            self.in_flight.labels(database=label).set(pool["in_flight"])
            self.waiting.labels(database=label).set(max(0, pool["in_flight"] - pool["threads"]))
            listening = getattr(database.engine, "listener_connected", None)
            connected = listening() if listening is not None else None
            if connected is not None:
                self.listener.labels(database=label).set(1 if connected else 0)
            for name, stats in database.transaction_stats().items():
                for counter, total in (
                    (self.transactions, stats.count),
                    (self.errors, stats.errors),
                    (self.retries, stats.retries),
                    (self.seconds, stats.seconds),
                ):
                    self.advance(counter.labels(database=label, name=name), (counter, label, name), total)


class RoutingFigures(_Advancing):
    """
    The figures of MCP sessions shared through PostgreSQL (kept by
    L{smeldr_oauth.mcp.state.postgres.PostgresDelivery} and
    C{PostgresSessionState}), as metrics:

      - C{smeldr_mcp_routed_out_total} / C{smeldr_mcp_routed_in_total}:
        messages for a session sent to / received from other processes;
      - C{smeldr_mcp_route_latency_seconds}: their one-way delay
        (C{NOTIFY} to delivery), a histogram;
      - C{smeldr_mcp_changes_out_total} / C{smeldr_mcp_changes_in_total}:
        session state changes (log level, subscriptions) relayed;
      - C{smeldr_mcp_streams_taken_over_total}: session streams moved here
        from another (dead or left) process;
      - C{smeldr_mcp_processes_reaped_total},
        C{smeldr_mcp_legacy_sessions_reaped_total}: dead processes whose
        lease this one ended, and the legacy sessions that died with them;
      - C{smeldr_mcp_sessions_purged_total}: expired session records
        removed.
    """

    def __init__(self, registry: CollectorRegistry, sessions: Any) -> None:
        super().__init__()
        self._sessions = sessions
        self._latencies_seen = 0

        def counter(name: str, text: str) -> Counter:
            return Counter(name, text, registry=registry)

        self.routed_out = counter("smeldr_mcp_routed_out", "MCP session messages sent to other processes")
        self.routed_in = counter("smeldr_mcp_routed_in", "MCP session messages received from other processes")
        self.changes_out = counter(
            "smeldr_mcp_changes_out", "MCP session state changes relayed to other processes"
        )
        self.changes_in = counter(
            "smeldr_mcp_changes_in", "MCP session state changes received from other processes"
        )
        self.taken_over = counter(
            "smeldr_mcp_streams_taken_over", "MCP session streams taken over from another process"
        )
        self.reaped = counter("smeldr_mcp_processes_reaped", "Dead processes whose session lease this one ended")
        self.legacy_reaped = counter(
            "smeldr_mcp_legacy_sessions_reaped", "Legacy MCP sessions ended with their dead process"
        )
        self.purged = counter("smeldr_mcp_sessions_purged", "Expired MCP session records removed")
        self.latency = Histogram(
            "smeldr_mcp_route_latency_seconds",
            "One-way delay of MCP session messages between processes (NOTIFY to delivery)",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
            registry=registry,
        )

    def refresh(self) -> None:
        delivery = self._sessions.delivery
        self.advance(self.routed_out, "out", delivery.routed_out)
        self.advance(self.routed_in, "in", delivery.routed_in)
        self.advance(self.changes_out, "changes_out", delivery.changes_out)
        self.advance(self.changes_in, "changes_in", delivery.changes_in)
        self.advance(self.taken_over, "taken", delivery.streams_taken_over)
        self.advance(self.reaped, "reaped", delivery.processes_reaped)
        self.advance(self.legacy_reaped, "legacy", delivery.legacy_sessions_reaped)
        self.advance(self.purged, "purged", self._sessions.purged)
        # Every message received appends its delay to a bounded deque:
        # the new ones are its last (routed_in grew by) entries.
        latencies = list(delivery.latencies)
        new = min(delivery.routed_in - self._latencies_seen, len(latencies))
        self._latencies_seen = delivery.routed_in
        for seconds in latencies[len(latencies) - new:] if new > 0 else ():
            self.latency.observe(seconds)


@implementer(ILogObserver)
class PoolMetrics:
    """
    What the parent of C{--workers N} serves on C{--metrics-listen}: the
    sum of its workers' metrics (read from their multiprocess files at
    each scrape) and its own.

    Counters and histograms of a worker that died stay in the sum, so
    totals never go backwards when a worker is replaced; its gauges leave
    it (L{worker_exited}).
    """

    def __init__(self, directory: str, running: Callable[[], float]) -> None:
        self.directory = directory
        self.registry = CollectorRegistry()
        MultiProcessCollector(self.registry, path=directory)
        r = self.registry
        self.workers = Gauge("smeldr_workers", "Worker processes running (--workers)", registry=r)
        self.workers.set_function(running)
        self.restarts = Counter(
            "smeldr_worker_restarts", "Workers that died and were restarted", registry=r
        )

    def worker_exited(self, pid: Optional[int], restarting: bool) -> None:
        if pid is not None:
            mark_process_dead(pid, self.directory)
        if restarting:
            self.restarts.inc()

    def __call__(self, event: dict[str, Any]) -> None:
        """
        A log observer: the supervisor's C{worker_exited} events.
        """
        if event.get("smeldr_event") == "worker_exited":
            self.worker_exited(event.get("pid"), bool(event.get("restarting")))

    def observe_log(self) -> IService:
        """
        A service that feeds this from the global log while it runs.
        """
        return _Observing(self)

    def resource(self) -> IResource:
        return MetricsResource(registry=self.registry)


class _Observing(Service):
    def __init__(self, observer: ILogObserver) -> None:
        self.observer = observer

    def startService(self) -> None:
        super().startService()
        globalLogPublisher.addObserver(self.observer)

    def stopService(self) -> Any:
        super().stopService()
        globalLogPublisher.removeObserver(self.observer)


#: Most label combinations whose counter L{MetricsObserver} keeps at hand.
MAX_CHILDREN = 1024


@implementer(ILogObserver)
class MetricsObserver:
    """
    Count the log events that carry C{smeldr_event}.

    The counters of the per-request events (a token issued, a tool call)
    are kept by their labels: C{labels()} checks and locks on every call,
    a third of counting a call.  The labels are bounded already (grant
    types, outcomes, L{Metrics.tool_label}); past L{MAX_CHILDREN}
    combinations the counter is looked up each time.
    """

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._children: dict[tuple[Any, ...], Any] = {}

    def _child(self, metric: Any, *values: str) -> Any:
        key = (metric,) + values
        child = self._children.get(key)
        if child is None:
            child = metric.labels(*values)
            if len(self._children) < MAX_CHILDREN:
                self._children[key] = child
        return child

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event.get("smeldr_event")
        if kind is None:
            return
        m = self.metrics
        if kind == "grant_approved":
            m.grants.inc()
        elif kind == "token_issued":
            self._child(m.tokens_issued, str(event.get("grant_type", "unknown"))[:32]).inc()
        elif kind == "token_refused":
            m.token_refusals.labels(reason=str(event.get("reason", "unknown"))[:32]).inc()
        elif kind == "rate_limited":
            m.rate_limited.labels(endpoint=str(event.get("endpoint", "unknown"))[:32]).inc()
        elif kind == "mcp_call":
            self._child(
                m.mcp_calls, m.tool_label(event.get("tool", "unknown")), str(event.get("outcome", "unknown"))[:16]
            ).inc()
        if kind in SECURITY_EVENTS:
            m.security_events.labels(event=kind).inc()


SECURITY_EVENTS = frozenset(
    {
        "code_replay",
        "refresh_reuse",
        "refresh_wrong_client",
        "refresh_superseded",
        "paste_refused",
        "cimd_refused",
        "rate_limited",
        "csrf_refused",
        "session_owner_mismatch",
    }
)
