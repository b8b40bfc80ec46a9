"""
Run every benchmark, print the tables, write C{bench/results.json}, draw the
figures into C{docs/performance/} and rewrite the "Latest run" section of
C{docs/performance.md}.

    python -m bench                 # the full run (about ten minutes)
    python -m bench --smoke         # seconds: every benchmark, tiny numbers
    python -m bench --streams 1000,10000,100000   # idle streams up to 100,000
    python -m bench --profile refresh_rotation    # py-spy under one row's load
    python -m bench --from-results bench/results.json   # redraw, rewrite the docs
    python -m bench --help

Each figure is quoted as a ratio to the I{floor} measured in the same run, a
bare twisted.web C{Resource} behind the same C{Site} and access log, because
the machines this runs on are shared and noisy: a row's server CPU per
operation over the floor's, its p99 over the floor's p99 measured by the same
generator at the same connection count.  The bare Klein route (the
I{ceiling}) is measured beside it, to show what Klein's routing costs.

The load generators: C{wrk} (when installed) for the fixed GETs, and
L{bench.loadgen} for everything that needs state.  Both generators' CPU and
the server's are printed, to show which side was the bottleneck.  Every
process the bench starts dies with it (L{bench.lifeline}).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from importlib import metadata
from typing import Any, Optional

from bench import lifeline, report as reporting, servers, streams
from bench.rows import ROWS, Bench

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUTPUT = os.path.join(HERE, "results.json")
DEFAULT_DOCS = os.path.join(os.path.dirname(HERE), "docs", "performance.md")


# -- the machine ------------------------------------------------------------------


def _loadavg() -> Optional[str]:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return None


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass

    def version(name: str) -> Optional[str]:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    wrk_version = None
    if shutil.which("wrk"):
        out = subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout
        wrk_version = (out.split() or [None])[1] if out else None
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "twisted": version("twisted"),
        "klein": version("klein"),
        "treq": version("treq"),
        "smeldr-oauth": version("smeldr-oauth"),
        "wrk": wrk_version,
        "kernel": platform.release(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "loadavg_start": _loadavg(),
        "kernel_settings": streams.kernel_settings(),
    }


# -- the run ------------------------------------------------------------------------


class Settings:
    def __init__(self, args: argparse.Namespace) -> None:
        self.smoke = args.smoke
        self.duration = args.duration if args.duration is not None else (0.4 if self.smoke else 8.0)
        self.warmup = args.warmup if args.warmup is not None else (0.1 if self.smoke else 2.0)
        self.connections = [
            int(c) for c in (args.connections or ("2" if self.smoke else "1,10,50")).split(",")
        ]
        self.processes = args.processes
        self.use_wrk = bool(shutil.which("wrk")) and not args.no_wrk and not self.smoke
        self.stream_counts = [
            int(c) for c in (args.streams or ("10,20" if self.smoke else "1000,10000")).split(",")
        ]
        self.transports = (args.transports or "legacy,streamable").split(",")
        self.keepalive = args.keepalive if args.keepalive is not None else (1.0 if self.smoke else 5.0)
        self.observe = args.observe if args.observe is not None else (2.2 if self.smoke else 16.0)
        self.verify_calls = 200 if self.smoke else 5000
        self.only = set(args.only.split(",")) if args.only else None
        self.server_args = tuple(args.server_arg or ()) + (("--database", args.database) if args.database else ())

    def as_json(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if k != "only"} | {"only": sorted(self.only or [])}

    def wants(self, name: Optional[str]) -> bool:
        return name is None or self.only is None or name in self.only


def _processes(settings: Settings, connections: int) -> int:
    if settings.processes:
        return settings.processes
    return 1 if connections < 8 else 2


def _database_figure(result: dict[str, Any]) -> str:
    """
    The PostgreSQL server's CPU (its backends and helpers) in the row's
    line, when it was measured (a C{--database} on this machine).
    """
    cpu, ops = result.get("database_cpu"), result["ops_per_s"]
    if cpu is None:
        return ""
    return f"  db {_fmt(cpu, 2)} ({_fmt(cpu * 1e6 / ops if ops else None, 0)} us/op)"


def _record(
    results: list[dict[str, Any]], name: str, result: dict[str, Any], echo: bool = True
) -> dict[str, Any]:
    result = dict(result, name=name)
    results.append(result)
    if echo:
        cpu, ops = result.get("server_cpu"), result["ops_per_s"]
        print(
            f"  {name:<24} c={result['connections']:<4} {result['generator']:<6} {_fmt(ops, 1):>9}/s"
            f"  p50 {_fmt(result.get('p50_ms'), 2):>8} ms  p99 {_fmt(result.get('p99_ms'), 2):>8} ms"
            f"  cpu srv {_fmt(cpu, 2)} ({_fmt(cpu * 1e6 / ops if cpu and ops else None, 0)} us/op)"
            f" gen {_fmt(result.get('client_cpu'), 2)}  err {result.get('errors', 0)}"
            + _database_figure(result),
            flush=True,
        )
        for sample in result.get("error_samples") or []:
            print(f"      error: {sample}", flush=True)
    return result


_fmt = reporting.fmt


def run_http(settings: Settings, report: dict[str, Any]) -> None:
    results: list[dict[str, Any]] = report["http"]
    if not any(row.group is not None and settings.wants(row.group) for row in ROWS):
        return  # only verify or streams: no row to compare with the references
    bench = Bench(settings.server_args)
    try:
        for name in ("floor", "bare", "smeldr"):
            bench.server(name)
        report["servers"] = {name: " ".join(server.argv) for name, server in bench.servers.items()}
        for conns in settings.connections:
            print(f"-- {conns} connection(s)", flush=True)
            procs = _processes(settings, conns)
            for row in ROWS:
                if not settings.wants(row.group) or (settings.smoke and row.name == "floor_again"):
                    continue
                if row.path is not None and settings.use_wrk and row.name != "floor_again":
                    _record(results, row.name, bench.wrk(row, conns, settings.duration, settings.warmup))
                _record(results, row.name, bench.load(row, conns, settings.duration, settings.warmup, procs))
    except Exception:
        print(bench.log()[-3000:], file=sys.stderr)
        raise
    finally:
        bench.stop()


def run_verify(settings: Settings, report: dict[str, Any]) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench.verify", str(settings.verify_calls)],
        capture_output=True,
        text=True,
        cwd=os.path.dirname(HERE),
        env=dict(
            os.environ, PYTHONPATH=os.path.dirname(HERE) + os.pathsep + os.environ.get("PYTHONPATH", "")
        ),
        timeout=300,
        **lifeline.popen_kwargs(),
    )
    if out.returncode != 0:
        raise RuntimeError(f"bench.verify failed:\n{out.stderr}")
    report["verify"] = json.loads(out.stdout.strip().splitlines()[-1])
    v = report["verify"]
    print(
        f"  verify_access_token: cached {v['cached']['sequential_us']:.1f} us, "
        f"uncached {v['uncached']['sequential_us']:.1f} us sequential / "
        f"{v['uncached']['concurrent50_us']:.1f} us at 50 in flight",
        flush=True,
    )


def run_streams(settings: Settings, report: dict[str, Any]) -> None:
    """Idle streams on each transport, each in a fresh server process."""
    limits = report["fd_limit"]
    cap = limits["hard"] - streams.SERVER_RESERVE
    asked = max(settings.stream_counts)
    counts = sorted({min(c, cap) for c in settings.stream_counts})
    limited = None
    if asked > cap:
        limited = {"asked": asked, "cap": cap, "hard": limits["hard"], "refused": limits["refused"]}
        print(
            f"  cannot hold {asked} streams in one process here: the hard RLIMIT_NOFILE is {limits['hard']} "
            f"({limits['refused']}); measuring up to {cap}",
            flush=True,
        )
    keepalive = float(max(1, round(settings.keepalive)))
    # One token holds every stream here, so the per-grant and per-user
    # session caps (a defence against one caller starving the rest) are
    # raised to the largest count measured.
    most = str(max(counts) + 10)
    for transport in settings.transports:
        # The metrics page tells the longest garbage-collection pause.
        metrics_port = servers.free_port()
        smeldr = servers.start_smeldr(
            (
                "--metrics-listen",
                f"tcp:{metrics_port}:interface=127.0.0.1",
                "--keepalive",
                str(int(keepalive)),
                "--max-sessions-per-grant",
                most,
                "--max-sessions-per-user",
                most,
                "--max-sessions",
                most,
                *settings.server_args,
            ),
            listen_options=":backlog=1024",
        )
        try:
            site_token = servers.create_site_token(smeldr)
            client_id = servers.register_client(smeldr)
            token = servers.obtain_tokens(smeldr, client_id, site_token, 1)[0]["access_token"]
            result = streams.measure(
                smeldr,
                token,
                transport,
                counts,
                keepalive,
                settings.observe,
                settle=0.3 if settings.smoke else 2.0,
                spread_for=asked,
                metrics_port=metrics_port,
            )
        finally:
            smeldr.stop()
        result["fd_limited"] = limited
        report["streams"].append(result)
        for step in result["steps"]:
            print(
                f"  idle {transport}: {step['streams']} streams ({step['failures']} failed) in "
                f"{step['open_seconds']:.1f}s, server RSS {step['server_rss_mib']:.1f} MiB, "
                f"{step['per_stream_kib']:.2f} KiB/stream",
                flush=True,
            )
        for sample in result["failure_samples"]:
            print(f"      failure: {sample}", flush=True)
        loaded = result["probe_loaded"]
        print(
            f"  keepalives every {keepalive:g}s: late p50 {_fmt(result['keepalive_late_p50_ms'], 1)} ms, "
            f"p99 {_fmt(result['keepalive_late_p99_ms'], 1)} ms, max {_fmt(result['keepalive_late_max_ms'], 1)} ms; "
            f"{result['streams_missing_keepalives']} streams missed one; server CPU {result['server_cpu_idle']:.2f}; "
            f"GET /healthz p50 {_fmt(loaded['p50_ms'], 2)} p99 {_fmt(loaded['p99_ms'], 2)} ms; "
            f"longest full GC pause {_fmt(result.get('gc_longest_full_ms'), 0)} ms "
            f"({result.get('gc_full_collections')} full collections)",
            flush=True,
        )


def publish(report: dict[str, Any], figures_dir: Optional[str], docs: Optional[str]) -> None:
    """Draw the figures and rewrite the docs' "Latest run" section."""
    paths: list[str] = []
    if figures_dir:
        from bench import figures

        paths = figures.draw(report, figures_dir)
        for path in paths:
            print(f"drew {path}")
    if docs:
        reporting.update_docs(report, docs, paths)
        print(f"rewrote the latest run in {docs}")


def _more_options(parser: argparse.ArgumentParser) -> None:
    """The options of idle streams at scale, the figures, the docs and the profiler."""
    parser.add_argument("--transports", help="idle-stream transports, comma-separated [legacy,streamable]")
    parser.add_argument(
        "--figures",
        help=f"where to draw the PNG figures [full run: {os.path.relpath(os.path.dirname(DEFAULT_DOCS))}"
        "/performance; smoke and --only: none]",
    )
    parser.add_argument(
        "--docs", help=f"the Markdown file whose latest-run section to rewrite [full run: {DEFAULT_DOCS}]"
    )
    parser.add_argument(
        "--from-results",
        metavar="JSON",
        help="measure nothing: annotate a results.json again, redraw its figures, rewrite the docs",
    )
    parser.add_argument(
        "--profile",
        metavar="ROW",
        help="py-spy under one row's load instead of the run: a row name, comma-separated names, "
        "or 'baseline' (writes bench/profiles/)",
    )
    parser.add_argument(
        "--profile-seconds", type=float, default=12.0, help="seconds sampled per profile [12]"
    )
    parser.add_argument("--profiles", metavar="DIR", help="where --profile writes [bench/profiles]")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--smoke", action="store_true", help="a run of seconds that exercises every benchmark"
    )
    parser.add_argument(
        "--output", default=None, help=f"where to write the JSON [default: {DEFAULT_OUTPUT}; smoke: none]"
    )
    parser.add_argument("--duration", type=float, help="measured seconds per figure [8; smoke 0.4]")
    parser.add_argument("--warmup", type=float, help="unmeasured seconds before each figure [2; smoke 0.1]")
    parser.add_argument("--connections", help="comma-separated connection counts [1,10,50; smoke 2]")
    parser.add_argument(
        "--processes", type=int, help="Python generator processes [1 below 8 connections, else 2]"
    )
    parser.add_argument("--no-wrk", action="store_true", help="do not use wrk even when installed")
    parser.add_argument(
        "--streams", help="idle stream counts, e.g. 1000,10000,100000 [1000,10000; smoke 10,20]"
    )
    parser.add_argument(
        "--keepalive", type=float, help="SSE keepalive interval for the idle test, whole seconds [5]"
    )
    parser.add_argument(
        "--server-arg",
        action="append",
        metavar="ARG",
        help="extra argument for the smeldr-oauth server (repeatable), e.g. --server-arg=--db-threads=1",
    )
    parser.add_argument(
        "--database", metavar="URL", help="run the server on this PostgreSQL database [SQLite files]"
    )
    parser.add_argument("--observe", type=float, help="seconds to watch keepalives [16]")
    parser.add_argument(
        "--only",
        help="subset: metadata,refresh,flow,tools,verify,streams (the floor and the ceiling run with any HTTP row)",
    )
    _more_options(parser)
    args = parser.parse_args(argv)
    if args.from_results:
        return republish(args)
    settings = Settings(args)
    if args.profile:
        from bench import profiling

        return profiling.main(
            args.profile, settings, args.profile_seconds, args.profiles or profiling.PROFILES
        )
    limits = servers.raise_fd_limit(max(settings.stream_counts) + streams.SERVER_RESERVE)
    report: dict[str, Any] = {
        "machine": machine(),
        "settings": settings.as_json(),
        "fd_limit": limits,
        "http": [],
        "streams": [],
    }
    print(f"machine: {json.dumps(report['machine'])}", flush=True)
    if not settings.use_wrk and not settings.smoke and not args.no_wrk:
        print("wrk not found (scripts/setup-bench.sh installs it): Python generator only", flush=True)
    run_http(settings, report)
    if settings.wants("verify"):
        run_verify(settings, report)
    if settings.wants("streams"):
        run_streams(settings, report)
    report["machine"]["loadavg_end"] = _loadavg()
    reporting.annotate(report)
    print()
    print(reporting.table(report))
    output = args.output or (None if settings.smoke else DEFAULT_OUTPUT)
    if output:
        with open(output, "w") as f:
            json.dump(report, f, indent=2)
        print(f"\nwrote {output}")
    whole = not settings.smoke and settings.only is None
    publish(
        report,
        args.figures or (figures_default() if whole else None),
        args.docs or (DEFAULT_DOCS if whole else None),
    )
    return 0


def figures_default() -> str:
    return os.path.join(os.path.dirname(DEFAULT_DOCS), "performance")


def republish(args: argparse.Namespace) -> int:
    with open(args.from_results) as f:
        report = json.load(f)
    reporting.annotate(report)
    print(reporting.table(report))
    publish(report, args.figures or figures_default(), args.docs or DEFAULT_DOCS)
    return 0
