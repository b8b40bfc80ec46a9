"""
A short run of C{bench/} (C{python -m bench --smoke}) so that the benchmarks
cannot rot: every benchmark must run against real server processes and
produce numbers.  Nothing here is timed: a shared CI box says nothing about
speed, only whether the bench still works.
"""

from __future__ import annotations

import gzip
import json
import os
import select
import shutil
import signal
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

from bench import figures, profiling, report as reporting
from tests.lifetime import bound

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: What every HTTP figure must carry.
FIELDS = (
    "ops_per_s",
    "p50_ms",
    "p99_ms",
    "server_cpu",
    "client_cpu",
    "server_us_per_op",
    "cpu_vs_floor",
    "p99_vs_floor",
)
BENCHMARKS = (
    "floor",
    "bare",
    "as_metadata",
    "pr_metadata",
    "healthz",
    "refresh_rotation",
    "full_flow",
    "tools_call_streamable",
    "tools_call_sse",
)


class BenchSmokeTests(SynchronousTestCase):
    """
    One smoke run (a few seconds: tiny durations, one connection count,
    twenty idle streams per transport), judged on its JSON report.
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

    def test_ratios_are_to_the_floor(self) -> None:
        """The floor is 1.00 of itself; every other row is its own CPU per op over the floor's."""
        results = self.report["http"]
        floor = next(r for r in results if r["name"] == "floor")
        self.assertAlmostEqual(floor["cpu_vs_floor"], 1.0)
        for r in results:
            self.assertAlmostEqual(
                r["cpu_vs_floor"], r["server_us_per_op"] / floor["server_us_per_op"], places=6, msg=r["name"]
            )
            self.assertAlmostEqual(r["p99_vs_floor"], r["p99_ms"] / floor["p99_ms"], places=6, msg=r["name"])
            self.assertAlmostEqual(
                r["spread_vs_floor"],
                (r["p99_ms"] / r["p50_ms"]) / (floor["p99_ms"] / floor["p50_ms"]),
                places=6,
                msg=r["name"],
            )

    def test_token_validation_measured_both_ways(self) -> None:
        verify = self.report["verify"]
        for mode in ("cached", "uncached"):
            self.assertGreater(verify[mode]["sequential_us"], 0)
            self.assertGreater(verify[mode]["concurrent50_us"], 0)

    def test_idle_streams_measured_on_both_transports(self) -> None:
        runs = {run["transport"]: run for run in self.report["streams"]}
        self.assertEqual(sorted(runs), ["legacy", "streamable"])
        for run in runs.values():
            self.assertEqual(run["failures"], 0, run["failure_samples"])
            self.assertEqual([s["streams"] for s in run["steps"]], self.report["settings"]["stream_counts"])
            for step in run["steps"]:
                self.assertGreater(step["server_rss_mib"], 0)
            self.assertEqual(run["streams_alive"], run["steps"][-1]["streams"])
            self.assertGreater(run["keepalive_gaps"], 0)
            self.assertEqual(run["streams_missing_keepalives"], 0)
            # Spread over several generator processes and source addresses.
            self.assertGreaterEqual(run["processes"], 2)
            self.assertGreaterEqual(len(run["source_addresses"]), 2)
            # The plain request answered while the streams were held.
            self.assertGreater(run["probe_loaded"]["requests"], 0)
            self.assertEqual(run["probe_loaded"]["errors"], 0)
            # The server's own garbage-collection timing, from its metrics
            # page: at least the collection before the freeze at start-up.
            self.assertGreaterEqual(run["gc_full_collections"], 1)
            self.assertGreater(run["gc_longest_full_ms"], 0)

    def test_targets_judged_and_table_printed(self) -> None:
        targets = self.report["targets"]
        for key in (
            "as_metadata_cpu_vs_floor",
            "pr_metadata_cpu_vs_floor",
            "healthz_cpu_vs_floor",
            "refresh_rotation_cpu_vs_floor",
            "full_flow_cpu_vs_floor",
            "tools_call_streamable_cpu_vs_floor",
            "tools_call_sse_cpu_vs_floor",
            "idle_legacy_kib_per_stream_at_20",
            "idle_streamable_kib_per_stream_at_20",
        ):
            self.assertIn(key, targets)
        self.assertIn("| row | conns |", BenchSmokeTests.stdout)
        self.assertIn("machine", self.report)
        self.assertEqual(self.report["machine"]["nproc"], os.cpu_count())

    def test_figures_and_docs_from_the_results(self) -> None:
        """The figures are drawn and the docs' section rewritten from a report."""
        directory = os.path.abspath(self.mktemp())
        paths = figures.draw(self.report, directory)
        self.assertEqual(
            sorted(os.path.basename(p) for p in paths),
            ["cpu.png", "p99.png", "streams.png", "throughput.png"],
        )
        for path in paths:
            with open(path, "rb") as f:
                self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
        docs = os.path.join(directory, "performance.md")
        with open(docs, "w") as f:
            f.write(f"# Title\n\nbefore\n\n{reporting.BEGIN}\nold\n{reporting.END}\n\nafter\n")
        reporting.update_docs(self.report, docs, paths)
        with open(docs) as f:
            text = f.read()
        self.assertNotIn("\nold\n", text)
        self.assertTrue(text.startswith("# Title\n\nbefore\n"))
        self.assertTrue(text.endswith(f"{reporting.END}\n\nafter\n"))
        self.assertIn("![throughput](throughput.png)", text)
        self.assertIn("| healthz |", text)


class ProfileSummaryTests(SynchronousTestCase):
    """The profile summary reads py-spy's collapsed stacks."""

    def test_profile_a_row(self) -> None:
        """C{--profile ROW}: py-spy on the server under the row's load, summarised."""
        directory = os.path.abspath(self.mktemp())
        completed = subprocess.run(
            [
                sys.executable,
                "-m",
                "bench",
                "--profile",
                "floor",
                "--profile-seconds",
                "2",
                "--warmup",
                "0.2",
                "--connections",
                "2",
                "--profiles",
                directory,
            ],
            cwd=CHECKOUT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        self.assertEqual(completed.returncode, 0, completed.stdout + completed.stderr)
        with open(os.path.join(directory, "floor.txt")) as f:
            text = f.read()
        self.assertIn("| where the time goes | % of samples |", text)
        self.assertIn("twisted.web HTTP", text)
        with gzip.open(os.path.join(directory, "floor.collapsed.gz"), "rt") as z:
            stacks = profiling.parse_collapsed(z)
        # The server's own frames, whatever share of them the sampling caught.
        self.assertTrue(any("twisted/web/" in path for frames, _, _ in stacks for _, path in frames), stacks)

    def test_categories_and_top_entries(self) -> None:
        lines = [
            "run (twisted/internet/base.py:10);doRead (twisted/internet/tcp.py:5);"
            "dataReceived (twisted/web/http.py:1) 5",
            "run (twisted/internet/base.py:10);log (twisted/web/http.py:3471);emit (twisted/logger/_logger.py:9) 3",
            "run (twisted/internet/base.py:10);token (smeldr_oauth/oauth/server.py:4);"
            "_runInteraction (twisted/enterprise/adbapi.py:445) 2",
            "run (twisted/internet/base.py:10);token (smeldr_oauth/oauth/server.py:4);"
            "_runInteraction (twisted/enterprise/adbapi.py:443) 1",
        ]
        summary = profiling.summarise(profiling.parse_collapsed(lines), commit_line=445)
        self.assertEqual(summary["samples"], 11)
        self.assertEqual(
            {name: round(share * 11 / 100) for name, share in summary["categories"]},
            {
                "twisted.web HTTP (parse, headers, finish)": 5,
                "access log (twisted.web, through the legacy log)": 3,
                profiling.COMMIT: 2,
                "SQLite statements and the store": 1,
            },
        )
        top = {frame: (round(s * 11 / 100), round(t * 11 / 100)) for frame, s, t in summary["top_self"]}
        self.assertEqual(top[("dataReceived", "twisted/web/http.py")], (5, 5))
        # Aggregated by function, whatever the line.
        self.assertEqual(top[("_runInteraction", "twisted/enterprise/adbapi.py")], (3, 3))
        # The reactor loop is in every sample: not a top "total" entry.
        self.assertNotIn(("run", "twisted/internet/base.py"), {f for f, _, _ in summary["top_total"]})

    def test_the_database_layers_commit(self) -> None:
        """A sample inside smeldr_oauth.db.database._commit is COMMIT, wherever it was called from."""
        lines = [
            "run (twisted/internet/base.py:10);_interact (smeldr_oauth/db/database.py:360);"
            "_commit (smeldr_oauth/db/database.py:530) 4",
            "run (twisted/internet/base.py:10);_interact (smeldr_oauth/db/database.py:358) 1",
        ]
        summary = profiling.summarise(profiling.parse_collapsed(lines), commit_line=445)
        self.assertEqual(
            {name: round(share * 5 / 100) for name, share in summary["categories"]},
            {profiling.COMMIT: 4, "SQLite statements and the store": 1},
        )

    def test_the_commit_line_is_found(self) -> None:
        """The line of adbapi's _runInteraction that calls conn.commit()."""
        import linecache

        from twisted.enterprise import adbapi

        line = profiling._commit_line()
        self.assertIn("conn.commit()", linecache.getline(adbapi.__file__, line))


def _descendants(pid: int) -> list[int]:
    """Every process below C{pid}, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class LifelineTests(SynchronousTestCase):
    """Every process a bench run starts dies with it, even on C{kill -9}."""

    def test_servers_die_with_a_killed_bench(self) -> None:
        bench = subprocess.Popen(
            # Long enough that the servers are certainly still up when it is killed.
            [sys.executable, "-m", "bench", "--smoke", "--duration", "60", "--only", "metadata"],
            cwd=CHECKOUT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.addCleanup(bench.wait)
        self.addCleanup(lambda: bench.poll() is None and bench.kill())
        assert bench.stdout is not None
        self.addCleanup(bench.stdout.close)
        seen = []
        for line in bench.stdout:
            seen.append(line)
            # Printed once the floor, the ceiling and smeldr-oauth listen.
            if line.startswith("-- "):
                break
        else:
            self.fail("the bench ended before starting its servers:\n" + "".join(seen))
        started = _descendants(bench.pid)
        servers = []
        for pid in started:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
                directory = os.readlink(f"/proc/{pid}/cwd")
            except OSError:
                continue
            if b"twisted" in argv:
                servers.append(pid)
                self.addCleanup(shutil.rmtree, directory, True)
        self.assertGreaterEqual(len(servers), 3, seen)
        # pidfds: wait for their exit without polling or sleeping.
        pidfds = [os.pidfd_open(pid) for pid in started]
        for fd in pidfds:
            self.addCleanup(os.close, fd)
        os.kill(bench.pid, signal.SIGKILL)
        bench.wait()
        waiting = list(pidfds)
        while waiting:
            ready, _, _ = select.select(waiting, [], [], 30)
            self.assertTrue(ready, f"still running 30 s after kill -9 of the bench: {_alive(started)}")
            waiting = [fd for fd in waiting if fd not in ready]
        self.assertEqual(_alive(started), [])


def _alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.append(pid)
    return alive
