"""
A short run of C{bench/gateway.py} so the gateway's benchmark cannot rot: it
must run against the real upstream and report its numbers.  Nothing is timed
here: a shared CI box says nothing about speed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests.gateway_real import everything

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class GatewayBenchSmokeTests(SynchronousTestCase):
    def test_reports_numbers(self) -> None:
        everything()  # the upstream must be installed
        out = subprocess.run(
            [sys.executable, "-m", "bench.gateway", "--calls", "30", "--sessions", "5", "--json"],
            cwd=CHECKOUT,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        ).stdout
        report = json.loads(out)
        for side in ("direct", "gateway"):
            self.assertGreater(report[side]["p50_ms"], 0)
            self.assertGreaterEqual(report[side]["p99_ms"], report[side]["p50_ms"])
        self.assertGreater(report["direct"]["upstream_rss_kib"], 1024)
        self.assertGreater(report["gateway"]["bytes_per_idle_session"], 0)
        self.assertIn("overhead_p50_ms", report)

    def test_front_reports_numbers(self) -> None:
        """C{bench/gateway_front.py}: the whole front over HTTP, direct and through."""
        everything()
        out = subprocess.run(
            [
                sys.executable, "-m", "bench.gateway_front",
                "--calls", "20", "--connections", "2", "--seconds", "0.5", "--idle-sessions", "20", "--json",
            ],
            cwd=CHECKOUT,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        ).stdout
        report = json.loads(out)
        for side in ("direct", "gateway"):
            self.assertGreater(report[side]["p50_ms"], 0)
            self.assertGreater(report[side]["calls_per_second"], 0)
        self.assertGreater(report["throughput_ratio"], 0)
        self.assertIn("bytes_per_idle_session", report["gateway"])
        # CPU per call of each process in the throughput phase, and the ratio from them.
        self.assertEqual(set(report["direct"]["cpu_ms_per_call"]), {"upstream", "generator"})
        self.assertEqual(set(report["gateway"]["cpu_ms_per_call"]), {"front", "upstream", "generator"})
        self.assertGreater(report["gateway"]["cpu_ms_per_call"]["front"], 0)
        # And in the one-connection calls (the latency's path), per process.
        self.assertEqual(set(report["direct"]["cpu_ms_per_call_one_connection"]), {"upstream"})
        self.assertEqual(set(report["gateway"]["cpu_ms_per_call_one_connection"]), {"front", "upstream"})
        self.assertGreater(report["cpu_ratio"], 0)


class GatewayFrontCPUTests(SynchronousTestCase):
    def test_cpu_below_a_clock_tick(self) -> None:
        """
        A process's CPU is read finer than the kernel's 10 ms clock tick:
        3 ms of work (by this process's own clock) reads as about 3 ms, not
        as 0 or 10.
        """
        from bench.gateway_front import cpu_seconds

        before = cpu_seconds(os.getpid())
        start = time.process_time()
        while time.process_time() - start < 0.003:
            pass
        used = cpu_seconds(os.getpid()) - before
        self.assertGreater(used, 0.0025)
        self.assertLess(used, 0.009)


class GatewayFrontTurnTests(SynchronousTestCase):
    def test_each_turn_opens_its_connections(self) -> None:
        """
        Each throughput turn puts its sessions on new connections before it
        calls: none has idled through the other side's turn past the
        upstream's 5 s keep-alive (which aborted runs with longer turns).
        """
        import asyncio

        from bench.gateway_front import Side

        events: list[str] = []

        class Recorded:
            def __init__(self, name: str) -> None:
                self.name = name

            async def reconnect(self) -> None:
                events.append("reconnect " + self.name)

            async def echo(self) -> None:
                events.append("echo " + self.name)

        side = Side(0, {})
        asyncio.run(side.throughput([Recorded("a"), Recorded("b")], 0.0))  # type: ignore[list-item]
        self.assertEqual(events, ["reconnect a", "reconnect b"])


class GatewayFrontShapeTests(SynchronousTestCase):
    """
    The bench's front is what C{twist smeldr-oauth} serves for an upstream:
    until round nine it mounted the gateway on a Klein app of its own, a
    path production does not take.
    """

    def test_front_in_the_bench_session(self) -> None:
        """
        The front runs in the bench's own session, beside the upstream and
        the generator: a session of its own would be a scheduling group of
        its own (autogroup), a share of a busy box the direct side lacks.
        """
        import bench.servers
        from bench import gateway_front

        started: list[Any] = []

        class Stop(Exception):
            pass

        def start_smeldr(extra: Any, **kwargs: Any) -> Any:
            started.append((extra, kwargs))
            raise Stop()

        self.patch(bench.servers, "start_smeldr", start_smeldr)
        self.assertRaises(Stop, gateway_front.start_front, "http://127.0.0.1:9/mcp")
        [(extra, kwargs)] = started
        self.assertIn("--upstream-config", extra)
        self.assertEqual(kwargs, {"new_session": False})

    def test_front_is_the_server_with_the_upstream(self) -> None:
        """
        The server the bench starts, built from the bench's own arguments
        (the listener and databases as L{bench.servers.start_smeldr} gives
        them), answers the upstream's C{/mcp} through the site's direct
        routes (no Klein), with the gateway's sessions, and keeps every
        session the bench opens on one grant.
        """
        from bench.gateway_front import UPSTREAM_TOML, front_arguments
        from smeldr_oauth.service import tap
        from smeldr_oauth.service.standalone import StandaloneService
        from smeldr_oauth.web.routes import DirectRoute
        from tests.test_store_sqlite import InlineReactor

        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        config = os.path.join(directory, "upstreams.toml")
        with open(config, "w", encoding="utf-8") as f:
            f.write(UPSTREAM_TOML.format(url="http://127.0.0.1:9/mcp"))
        options = tap.Options()
        options.parseOptions(
            [
                "--issuer", "http://127.0.0.1:1",
                "--oauth-db", os.path.join(directory, "oauth.db"),
                "--site-db", os.path.join(directory, "site.db"),
                "--db-threads", "0",
                "--dev",
                *front_arguments(config),
            ]
        )
        service = StandaloneService(options, InlineReactor())
        [(front, gateway)] = service.mounted.fronts
        self.assertIsInstance(service.site.direct[b"/mcp"], DirectRoute)
        self.assertEqual(front.path, "/mcp")
        self.assertEqual(gateway.config.isolation, "session")
        self.assertGreaterEqual(options["max-sessions-per-grant"], 1000)
        self.assertGreaterEqual(gateway.config.limits.max_instances, 1000)
