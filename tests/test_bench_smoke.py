"""
A short run of C{bench/} (C{python -m bench --smoke}) so that the benchmarks
cannot rot: every benchmark must run against real server processes and
produce numbers.  Nothing here is timed: a shared CI box says nothing about
speed, only whether the bench still works.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

from tests.lifetime import bound

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: What every HTTP figure must carry.
FIELDS = ("ops_per_s", "p50_ms", "p99_ms", "server_cpu", "client_cpu", "vs_ceiling")
BENCHMARKS = (
    "bare",
    "as_metadata",
    "refresh_rotation",
    "full_flow",
    "tools_call_streamable",
    "tools_call_sse",
)


class BenchSmokeTests(SynchronousTestCase):
    """
    One smoke run (a few seconds: tiny durations, two connection counts,
    twenty idle streams), judged on its JSON report.
    """

    report: dict = {}

    def setUp(self) -> None:
        if not BenchSmokeTests.report:
            output = os.path.abspath(self.mktemp())
            completed = subprocess.run(
                bound([sys.executable, "-m", "bench", "--smoke", "--output", output]),
                cwd=CHECKOUT,
                capture_output=True,
                text=True,
                timeout=180,
            )
            if completed.returncode != 0:
                self.fail(
                    f"python -m bench --smoke exited {completed.returncode}\n{completed.stdout}\n{completed.stderr}"
                )
            with open(output) as f:
                BenchSmokeTests.report = json.load(f)
            BenchSmokeTests.stdout = completed.stdout
        self.report = BenchSmokeTests.report

    def test_every_http_benchmark_produced_numbers(self) -> None:
        results = self.report["http"]
        connections = self.report["settings"]["connections"]
        for name in BENCHMARKS:
            for conns in connections:
                found = [r for r in results if r["name"] == name and r["connections"] == conns]
                self.assertTrue(found, f"{name} at {conns} connection(s) missing")
                for r in found:
                    self.assertEqual(r["errors"], 0, r)
                    self.assertGreater(r["ops_per_s"], 0, r)
                    for field in FIELDS:
                        self.assertIsInstance(r[field], (int, float), (name, field, r))

    def test_token_validation_measured_both_ways(self) -> None:
        verify = self.report["verify"]
        for mode in ("cached", "uncached"):
            self.assertGreater(verify[mode]["sequential_us"], 0)
            self.assertGreater(verify[mode]["concurrent50_us"], 0)

    def test_idle_streams_measured(self) -> None:
        sse = self.report["sse_idle"]
        self.assertEqual(sse["failures"], 0)
        self.assertEqual([s["streams"] for s in sse["steps"]], self.report["settings"]["stream_counts"])
        for step in sse["steps"]:
            self.assertGreater(step["server_rss_mib"], 0)
        self.assertEqual(sse["streams_alive"], sse["steps"][-1]["streams"])
        self.assertGreater(sse["keepalive_gaps"], 0)

    def test_targets_judged_and_table_printed(self) -> None:
        for key in ("refresh_vs_ceiling", "flows_per_s"):
            self.assertIn(key, self.report["targets"])
        self.assertIn("| benchmark | conns |", BenchSmokeTests.stdout)
        self.assertIn("machine", self.report)
        self.assertEqual(self.report["machine"]["nproc"], os.cpu_count())
