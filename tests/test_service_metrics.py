"""
Tests for L{smeldr_oauth.service.metrics}: the counters follow the
structured log events, and labels stay bounded.
"""

from __future__ import annotations

import re
import socket
from typing import Any

from klein import Klein
from prometheus_client import generate_latest
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.threads import deferToThread
from twisted.logger import Logger, LogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from smeldr_oauth.service import metrics as metrics_module
from smeldr_oauth.service.metrics import MAX_TOOL_LABELS, Metrics, MetricsObserver, route_label
from smeldr_oauth.web.site import SmeldrSite


class MetricsObserverTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.metrics = Metrics(open_streams=lambda: 3.0)
        publisher = LogPublisher(MetricsObserver(self.metrics))
        self.log = Logger(observer=publisher)

    def text(self) -> str:
        return generate_latest(self.metrics.registry).decode()

    def test_events_counted(self) -> None:
        self.log.info("x", smeldr_event="grant_approved")
        self.log.info("x", smeldr_event="token_issued", grant_type="refresh_token")
        self.log.info("x", smeldr_event="token_refused", reason="invalid_grant")
        self.log.warn("x", smeldr_event="code_replay")
        self.log.warn("x", smeldr_event="rate_limited", endpoint="register")
        self.log.info("x", smeldr_event="mcp_call", tool="list_posts", outcome="ok")
        self.log.info("an event without smeldr_event is ignored")
        text = self.text()
        self.assertIn("smeldr_grants_approved_total 1.0", text)
        self.assertIn('smeldr_tokens_issued_total{grant_type="refresh_token"} 1.0', text)
        self.assertIn('smeldr_token_refusals_total{reason="invalid_grant"} 1.0', text)
        self.assertIn('smeldr_security_events_total{event="code_replay"} 1.0', text)
        self.assertIn('smeldr_rate_limited_total{endpoint="register"} 1.0', text)
        self.assertIn('smeldr_mcp_tool_calls_total{outcome="ok",tool="list_posts"} 1.0', text)
        self.assertIn("smeldr_mcp_open_streams 3.0", text)

    def test_tool_labels_bounded(self) -> None:
        for n in range(MAX_TOOL_LABELS + 50):
            self.log.info("x", smeldr_event="mcp_call", tool=f"tool{n}", outcome="ok")
        self.assertIn('tool="other"', self.text())
        self.assertEqual(len(self.metrics._tools), MAX_TOOL_LABELS)

    def test_counters_kept_by_labels(self) -> None:
        """
        The counters kept for each label combination count each
        combination apart, and past the bound the others still count.
        """
        self.patch(metrics_module, "MAX_CHILDREN", 3)
        for tool, outcome in [("a", "ok"), ("a", "ok"), ("a", "tool_error"), ("b", "ok"), ("c", "ok"), ("c", "ok")]:
            self.log.info("x", smeldr_event="mcp_call", tool=tool, outcome=outcome)
        for grant_type in ["refresh_token", "authorization_code", "refresh_token"]:
            self.log.info("x", smeldr_event="token_issued", grant_type=grant_type)
        text = self.text()
        self.assertIn('smeldr_mcp_tool_calls_total{outcome="ok",tool="a"} 2.0', text)
        self.assertIn('smeldr_mcp_tool_calls_total{outcome="tool_error",tool="a"} 1.0', text)
        self.assertIn('smeldr_mcp_tool_calls_total{outcome="ok",tool="b"} 1.0', text)
        self.assertIn('smeldr_mcp_tool_calls_total{outcome="ok",tool="c"} 2.0', text)
        self.assertIn('smeldr_tokens_issued_total{grant_type="refresh_token"} 2.0', text)
        self.assertIn('smeldr_tokens_issued_total{grant_type="authorization_code"} 1.0', text)

    def test_routes_bounded(self) -> None:
        self.assertEqual(route_label(b"/oauth/token"), "/oauth/token")
        self.assertEqual(route_label(b"/mcp?session_id=abc"), "/mcp")
        self.assertEqual(route_label(b"/random/scan/path"), "other")

    def test_methods_bounded(self) -> None:
        for method in (b"POST", b"BREW", b"post", b"GET"):
            self.metrics.observe_request(b"/mcp", method, 200, 0.01)
        text = self.text()
        labels = set(re.findall(r'smeldr_http_request_duration_seconds_count\{method="([^"]*)"', text))
        self.assertEqual(labels, {"GET", "POST", "other"})


class DatabaseFiguresTests(SynchronousTestCase):
    """
    The database layer's pool and transaction counters, on a real SQLite
    file, as metrics; counters advance by what changed since the last
    refresh.
    """

    def test_pool_and_transactions(self) -> None:
        from smeldr_oauth.db import open_database
        from smeldr_oauth.store.ratelimits import SQLRateLimitStore
        from tests.test_store_sqlite import InlineReactor

        database = open_database(self.mktemp() + ".db", InlineReactor(), threads=0)
        self.addCleanup(database.close)
        store = SQLRateLimitStore(database)
        metrics = Metrics()
        metrics.watch_databases({"oauth": database})
        for _ in range(3):
            self.successResultOf(store.take("test", "k", 3.0, 1.0, 1e9))
        metrics.refresh()
        metrics.refresh()
        text = generate_latest(metrics.registry).decode()
        self.assertIn('smeldr_db_transactions_total{database="oauth",name="rate_limits.take"} 3.0', text)
        self.assertIn('smeldr_db_connections{database="oauth"} 1.0', text)
        self.assertIn('smeldr_db_calls_waiting{database="oauth"} 0.0', text)
        self.assertIn('smeldr_db_transaction_seconds_total{database="oauth",name="rate_limits.take"}', text)
        # No listener on SQLite: no value rather than a misleading 0.
        self.assertNotIn('smeldr_db_listener_connected{', text)
        self.successResultOf(store.take("test", "k", 3.0, 1.0, 1e9))
        metrics.refresh()
        text = generate_latest(metrics.registry).decode()
        self.assertIn('smeldr_db_transactions_total{database="oauth",name="rate_limits.take"} 4.0', text)


class RoutingFiguresTests(SynchronousTestCase):
    """
    The figures the PostgreSQL session delivery keeps (plain totals and a
    bounded deque of latencies) become counters and a histogram that count
    each message once.
    """

    def test_routing(self) -> None:
        from collections import deque
        from types import SimpleNamespace

        delivery = SimpleNamespace(
            routed_out=2, routed_in=3, latencies=deque([0.001, 0.002, 0.2], maxlen=4),
            streams_taken_over=1, processes_reaped=0, legacy_sessions_reaped=0, changes_out=4, changes_in=0,
        )
        sessions = SimpleNamespace(delivery=delivery, purged=5)
        metrics = Metrics()
        metrics.watch_sessions(sessions)
        metrics.refresh()
        metrics.refresh()
        text = generate_latest(metrics.registry).decode()
        self.assertIn("smeldr_mcp_routed_out_total 2.0", text)
        self.assertIn("smeldr_mcp_routed_in_total 3.0", text)
        self.assertIn("smeldr_mcp_streams_taken_over_total 1.0", text)
        self.assertIn("smeldr_mcp_changes_out_total 4.0", text)
        self.assertIn("smeldr_mcp_sessions_purged_total 5.0", text)
        self.assertIn("smeldr_mcp_route_latency_seconds_count 3.0", text)
        self.assertIn('smeldr_mcp_route_latency_seconds_bucket{le="0.0025"} 2.0', text)
        # Three more received; the deque keeps only the last four.
        delivery.routed_in = 6
        delivery.latencies.extend([0.003, 0.004, 0.5])
        metrics.refresh()
        text = generate_latest(metrics.registry).decode()
        self.assertIn("smeldr_mcp_route_latency_seconds_count 6.0", text)
        self.assertIn('smeldr_mcp_route_latency_seconds_bucket{le="0.005"} 4.0', text)


class RequestLabelsOverSocketTests(TestCase):
    """
    The request latency's labels stay bounded whatever a client sends,
    over a real socket to the production site.
    """

    async def methods(self) -> None:
        metrics = Metrics()
        app = Klein()

        @app.route("/healthz", methods=["GET"])
        def healthz(request: Any) -> bytes:
            return b"ok"

        port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(
            SmeldrSite(app.resource(), metrics=metrics)
        )
        self.addCleanup(port.stopListening)
        address = ("127.0.0.1", port.getHost().port)
        # Any token is a method to HTTP: each used to be a label of its
        # own, a histogram's sixteen series more in the registry (and in
        # every scrape) for each, without bound.
        sent = [b"GET"] + [b"M%07d" % n for n in range(40)] + [b"get", b"\xff"]
        for method in sent:
            answer = await deferToThread(_exchange, address, method + b" /healthz HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
            self.assertTrue(answer.startswith(b"HTTP/1.1 "), answer)
        text = generate_latest(metrics.registry).decode()
        labels = set(re.findall(r'smeldr_http_request_duration_seconds_count\{method="([^"]*)"', text))
        self.assertEqual(labels, {"GET", "other"})

    def test_methods_bounded(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self.methods())


def _exchange(address: tuple[str, int], request: bytes) -> bytes:
    """Send C{request} on a new connection; everything the server answers."""
    with socket.create_connection(address, timeout=10) as connection:
        connection.sendall(request)
        answer = b""
        while True:
            data = connection.recv(65536)
            if not data:
                return answer
            answer += data
