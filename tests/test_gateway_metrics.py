"""
The gateway's figures as Prometheus metrics (L{smeldr_oauth.gateway.metrics}):
counters that follow the plain counters, and, over real processes and a
real socket, the figures of several workers added up by the parent as
C{--workers} does.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import ProcessProtocol
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent
from twisted.web.server import Site

from smeldr_oauth.gateway.metrics import PrometheusFigures, UpstreamMetrics
from smeldr_oauth.service.metrics import PoolMetrics
from tests import e2e

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gateway_metrics_worker.py")


class FiguresTests(SynchronousTestCase):
    def test_counters_follow_and_never_count_twice(self) -> None:
        """
        Each refresh adds what the plain counters grew since the last one;
        the gauge is the number live now; the histogram has every request.
        """
        registry = CollectorRegistry()
        m = UpstreamMetrics("notes")
        live = [1]
        m.live = lambda: live[0]
        figures = PrometheusFigures(registry, lambda: [m])
        m.observe("tools/call", 0.002, True)
        m.observe("tools/call", 0.2, False)
        m.started += 1
        figures.refresh()
        figures.refresh()
        m.observe("resources/read", 0.002, True)
        m.crashes += 1
        live[0] = 0
        figures.refresh()
        text = generate_latest(registry).decode()
        for line in (
            'smeldr_gateway_calls_total{method="tools/call",upstream="notes"} 2.0',
            'smeldr_gateway_calls_total{method="resources/read",upstream="notes"} 1.0',
            'smeldr_gateway_errors_total{upstream="notes"} 1.0',
            'smeldr_gateway_started_total{upstream="notes"} 1.0',
            'smeldr_gateway_crashes_total{upstream="notes"} 1.0',
            'smeldr_gateway_live_instances{upstream="notes"} 0.0',
            'smeldr_gateway_request_duration_seconds_count{upstream="notes"} 3.0',
            'smeldr_gateway_request_duration_seconds_bucket{le="0.0025",upstream="notes"} 2.0',
        ):
            self.assertIn(line, text)

    def test_unnamed_upstream(self) -> None:
        registry = CollectorRegistry()
        m = UpstreamMetrics("")
        PrometheusFigures(registry, lambda: [m]).refresh()
        self.assertIn('smeldr_gateway_live_instances{upstream="default"} 0.0', generate_latest(registry).decode())


class _Worker(ProcessProtocol):
    def __init__(self) -> None:
        self.output = b""
        self.ready: Deferred = Deferred()
        self.ended: Deferred = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data
        if b"READY" in self.output and not self.ready.called:
            self.ready.callback(None)

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        if not self.ready.called:
            self.ready.errback(RuntimeError(self.output.decode(errors="replace")))
        self.ended.callback(reason.value.exitCode)


class PoolTests(TestCase):
    """Two processes with their own gateways; one scrape of the parent."""

    timeout = 120

    async def test_workers_add_up(self) -> None:
        """
        Each worker counts its own calls to its own upstream process; the
        parent's page (L{PoolMetrics}, as C{--workers} serves it) has the
        sum: calls, instances started and the latency histogram over every
        worker, live instances over the live ones.  A worker that exits
        leaves its counts in the sum and its instance out of the gauge.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        env = e2e.subprocessEnvironment()
        env["PROMETHEUS_MULTIPROC_DIR"] = directory
        workers = []
        for calls in (2, 3):
            worker = _Worker()
            transport = reactor.spawnProcess(  # type: ignore[attr-defined]
                worker, sys.executable, [sys.executable, WORKER, str(calls)], env=env
            )
            self.addCleanup(lambda t=transport: t.signalProcess("KILL") if t.pid else None)
            workers.append((worker, transport))
        for worker, _ in workers:
            await worker.ready.addTimeout(90, reactor)

        pool = PoolMetrics(directory, running=lambda: 2.0)
        port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(Site(pool.resource()))
        self.addCleanup(port.stopListening)
        url = f"http://127.0.0.1:{port.getHost().port}/"
        http = HTTPClient(Agent(reactor))

        async def scrape() -> str:
            response = await http.get(url)
            return (await response.content()).decode()

        text = await scrape()
        for line in (
            'smeldr_gateway_calls_total{method="tools/call",upstream="notes"} 5.0',
            'smeldr_gateway_started_total{upstream="notes"} 2.0',
            'smeldr_gateway_live_instances{upstream="notes"} 2.0',
            'smeldr_gateway_request_duration_seconds_count{upstream="notes"} 5.0',
            'smeldr_gateway_errors_total{upstream="notes"} 0.0',
        ):
            self.assertIn(line, text)

        worker, transport = workers[0]
        pid = transport.pid
        transport.closeStdin()
        self.assertEqual(await worker.ended.addTimeout(30, reactor), 0, worker.output)
        pool.worker_exited(pid, restarting=False)
        text = await scrape()
        self.assertIn('smeldr_gateway_calls_total{method="tools/call",upstream="notes"} 5.0', text)
        self.assertIn('smeldr_gateway_live_instances{upstream="notes"} 1.0', text)
        worker, transport = workers[1]
        transport.closeStdin()
        self.assertEqual(await worker.ended.addTimeout(30, reactor), 0, worker.output)
