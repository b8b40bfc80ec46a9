"""
Run every benchmark, print a table, write C{bench/results.json}.

    python -m bench                 # the full run (several minutes)
    python -m bench --smoke         # seconds: every benchmark, tiny numbers
    python -m bench --help

Each figure is measured in the same run as its reference, the bare Klein
route, and quoted as a ratio to it, because the machines this runs on are
shared and noisy:

  - throughput ratios divide by the I{ceiling}, the best bare-route req/s
    any generator reached at that connection count (so a generator that
    cannot saturate the bare route cannot flatter the ratio);
  - latency ratios divide by the bare route's latency measured by the same
    generator at the same connection count (same client stack).

The load generators: C{wrk} (when installed) for the fixed GETs, and
L{bench.loadgen} for everything that needs state.  Both generators' CPU and
the server's are printed, to show which side was the bottleneck.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from importlib import metadata
from typing import Any, Optional

from bench import loadgen, servers, streams

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUTPUT = os.path.join(HERE, "results.json")

TARGETS = {
    "refresh_vs_ceiling": 0.60,
    "flows_per_s": 300.0,
    "tools_call_p99_vs_bare_at_50": 1.5,
    "idle_sse_kib_per_stream_at_10000": 15.0,
}


# -- wrk --------------------------------------------------------------------------


def _ms(value: str, unit: str) -> float:
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def parse_wrk(output: str) -> dict[str, Any]:
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    latencies = {
        int(p): _ms(v, u)
        for p, v, u in re.findall(r"^\s+(50|99)(?:\.000)?%\s+([\d.]+)(us|ms|s|m)\s*$", output, re.M)
    }
    errors = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    count = (int(errors.group(1)) if errors else 0) + (
        sum(int(x) for x in socket_errors.groups()) if socket_errors else 0
    )
    return {
        "ops_per_s": float(rps.group(1)) if rps else 0.0,
        "p50_ms": latencies.get(50),
        "p99_ms": latencies.get(99),
        "errors": count,
    }


def run_wrk(
    server: servers.Server, path: str, connections: int, duration: float, warmup: float
) -> dict[str, Any]:
    """C{wrk} against one fixed GET; its CPU and the server's over the run."""
    url = f"http://127.0.0.1:{server.port}{path}"
    threads = str(min(2, connections))

    def wrk(seconds: float) -> tuple[str, float]:
        process = subprocess.Popen(
            [
                "wrk",
                "-t",
                threads,
                "-c",
                str(connections),
                "-d",
                f"{max(1, round(seconds))}s",
                "--latency",
                url,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        out = process.stdout.read() if process.stdout else ""
        _, _, usage = os.wait4(process.pid, 0)
        process.returncode = 0
        return out, usage.ru_utime + usage.ru_stime

    if warmup > 0:
        wrk(warmup)
    cpu0 = loadgen.process_cpu(server.pid)
    began = time.monotonic()
    out, client_cpu = wrk(duration)
    elapsed = time.monotonic() - began
    server_cpu = loadgen.process_cpu(server.pid) - cpu0
    result = parse_wrk(out)
    result.update(
        generator="wrk",
        connections=connections,
        processes=1,
        client_cpu=client_cpu / elapsed,
        server_cpu=server_cpu / elapsed,
        error_samples=[] if result["ops_per_s"] else [out[-500:]],
    )
    return result


# -- the machine ------------------------------------------------------------------


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
    }


# -- the run ------------------------------------------------------------------------


class Settings:
    def __init__(self, args: argparse.Namespace) -> None:
        self.smoke = args.smoke
        self.duration = args.duration if args.duration is not None else (0.4 if self.smoke else 8.0)
        self.warmup = args.warmup if args.warmup is not None else (0.1 if self.smoke else 2.0)
        self.connections = [int(c) for c in (args.connections or ("2" if self.smoke else "1,50")).split(",")]
        self.processes = args.processes
        self.use_wrk = bool(shutil.which("wrk")) and not args.no_wrk and not self.smoke
        self.stream_counts = [
            int(c) for c in (args.streams or ("10,20" if self.smoke else "1000,10000")).split(",")
        ]
        self.keepalive = args.keepalive if args.keepalive is not None else (1.0 if self.smoke else 5.0)
        self.observe = args.observe if args.observe is not None else (2.2 if self.smoke else 16.0)
        self.verify_calls = 200 if self.smoke else 5000
        self.only = set(args.only.split(",")) if args.only else None
        self.server_args = tuple(args.server_arg or ()) + (("--database", args.database) if args.database else ())

    def as_json(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if k != "only"} | {"only": sorted(self.only or [])}

    def wants(self, name: str) -> bool:
        return self.only is None or name in self.only


def _processes(settings: Settings, connections: int) -> int:
    if settings.processes:
        return settings.processes
    return 1 if connections < 8 else 2


def _record(
    results: list[dict[str, Any]], name: str, result: dict[str, Any], echo: bool = True
) -> dict[str, Any]:
    result = dict(result, name=name)
    results.append(result)
    if echo:
        print(
            f"  {name:<28} c={result['connections']:<4} {result['generator']:<6} {_fmt(result['ops_per_s'], 1):>9}/s"
            f"  p50 {_fmt(result.get('p50_ms'), 2):>8} ms  p99 {_fmt(result.get('p99_ms'), 2):>8} ms"
            f"  cpu srv {_fmt(result.get('server_cpu'), 2)} gen {_fmt(result.get('client_cpu'), 2)}"
            f"  err {result.get('errors', 0)}",
            flush=True,
        )
        for sample in result.get("error_samples") or []:
            print(f"      error: {sample}", flush=True)
    return result


def _fmt(value: Any, digits: int) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}"


def run_http(settings: Settings, report: dict[str, Any]) -> None:
    results: list[dict[str, Any]] = report["http"]
    bare = servers.start_bare()
    smeldr = servers.start_smeldr(settings.server_args)
    report["servers"] = {"bare": " ".join(bare.argv), "smeldr": " ".join(smeldr.argv)}
    try:
        site_token = servers.create_site_token(smeldr)
        client_id = servers.register_client(smeldr)
        target = smeldr.target(resource=smeldr.resource)
        flow_state = {"client_id": client_id, "redirect_uri": servers.REDIRECT_URI, "site_token": site_token}
        for conns in settings.connections:
            print(f"-- {conns} connection(s)", flush=True)
            procs = _processes(settings, conns)

            def py(
                name: str,
                scenario: str,
                server: servers.Server,
                states: list[Any],
                tgt: Optional[dict[str, Any]] = None,
                procs: int = procs,
            ) -> None:
                result = loadgen.run_load(
                    scenario,
                    tgt or server.target(),
                    states,
                    duration=settings.duration,
                    warmup=settings.warmup,
                    processes=procs,
                    server_pid=server.pid,
                )
                _record(results, name, result)

            # 1. the ceiling, by every generator
            if settings.use_wrk:
                _record(results, "bare", run_wrk(bare, "/bare", conns, settings.duration, settings.warmup))
            py("bare", "fixed", bare, [{"path": "/bare"}] * conns)
            # 2. AS metadata
            if settings.wants("metadata"):
                if settings.use_wrk:
                    _record(
                        results,
                        "as_metadata",
                        run_wrk(
                            smeldr,
                            "/.well-known/oauth-authorization-server",
                            conns,
                            settings.duration,
                            settings.warmup,
                        ),
                    )
                py(
                    "as_metadata",
                    "fixed",
                    smeldr,
                    [{"path": "/.well-known/oauth-authorization-server"}] * conns,
                )
            # 3. refresh with rotation: one chain per connection, separate grants
            if settings.wants("refresh"):
                chains = servers.obtain_tokens(smeldr, client_id, site_token, conns)
                py("refresh_rotation", "refresh", smeldr, chains, target)
            # 4. the whole flow
            if settings.wants("flow"):
                py("full_flow", "flow", smeldr, [flow_state] * conns, target)
            # 5. tools/call over both transports, one session per connection
            if settings.wants("tools"):
                tokens = servers.obtain_tokens(smeldr, client_id, site_token, conns)
                py("tools_call_streamable", "streamable", smeldr, tokens, target)
                py("tools_call_sse", "legacy", smeldr, tokens, target)
            # the ceiling again, so drift during the group shows
            if not settings.smoke:
                py("bare_again", "fixed", bare, [{"path": "/bare"}] * conns)
    except Exception:
        print(smeldr.log()[-3000:], file=sys.stderr)
        raise
    finally:
        bare.stop()
        smeldr.stop()


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
    # One token holds every stream here, so the per-grant and per-user
    # session caps (a defence against one caller starving the rest) are
    # raised to the largest count measured.
    most = str(max(settings.stream_counts) + 10)
    smeldr = servers.start_smeldr(
        (
            "--keepalive",
            str(max(1, round(settings.keepalive))),
            "--max-sessions-per-grant",
            most,
            "--max-sessions-per-user",
            most,
            "--max-sessions",
            most,
            *settings.server_args,
        )
    )
    try:
        site_token = servers.create_site_token(smeldr)
        client_id = servers.register_client(smeldr)
        token = servers.obtain_tokens(smeldr, client_id, site_token, 1)[0]["access_token"]
        result = streams.run(
            smeldr,
            token,
            settings.stream_counts,
            float(max(1, round(settings.keepalive))),
            settings.observe,
            settle=0.3 if settings.smoke else 2.0,
        )
    finally:
        smeldr.stop()
    report["sse_idle"] = result
    for step in result["steps"]:
        print(
            f"  idle SSE: {step['streams']} streams ({step['failures']} failed) in {step['open_seconds']:.1f}s, "
            f"server RSS {step['server_rss_mib']:.1f} MiB, {step['per_stream_kib']:.2f} KiB/stream",
            flush=True,
        )
    print(
        f"  keepalives every {result['keepalive_interval_s']}s: late p50 {_fmt(result['keepalive_late_p50_ms'], 1)} ms, "
        f"p99 {_fmt(result['keepalive_late_p99_ms'], 1)} ms, max {_fmt(result['keepalive_late_max_ms'], 1)} ms; "
        f"{result['streams_missing_keepalives']} streams missed one; server CPU {result['server_cpu_idle']:.2f}",
        flush=True,
    )


# -- summary --------------------------------------------------------------------------


def _find(
    results: list[dict[str, Any]], name: str, conns: int, generator: Optional[str] = None
) -> Optional[dict[str, Any]]:
    for r in results:
        if (
            r["name"] == name
            and r["connections"] == conns
            and (generator is None or r["generator"] == generator)
        ):
            return r
    return None


def annotate(report: dict[str, Any]) -> None:
    """Add the ratios to the reference, and the verdict on each target."""
    results = report["http"]
    for r in results:
        conns = r["connections"]
        bares = [b for b in results if b["name"] in ("bare", "bare_again") and b["connections"] == conns]
        ceiling = max((b["ops_per_s"] for b in bares), default=0.0)
        same = [b for b in bares if b["generator"] == r["generator"] and b.get("p99_ms")]
        r["ceiling_ops_per_s"] = ceiling
        r["vs_ceiling"] = r["ops_per_s"] / ceiling if ceiling else None
        # CPU-normalised figures: what one fully-used core would do.  On a
        # shared box the server often gets less than a core; its CPU time
        # per operation is the figure that noise disturbs least.
        cpu = r.get("server_cpu")
        r["server_ms_per_op"] = cpu * 1000 / r["ops_per_s"] if cpu and r["ops_per_s"] else None
        r["ops_per_core_s"] = r["ops_per_s"] / cpu if cpu and r["ops_per_s"] else None
        per_core = [b["ops_per_s"] / b["server_cpu"] for b in bares if b.get("server_cpu") and b["ops_per_s"]]
        r["per_core_vs_ceiling"] = (
            r["ops_per_core_s"] / max(per_core) if per_core and r["ops_per_core_s"] else None
        )
        if same and r.get("p99_ms") is not None:
            r["p50_vs_bare"] = r["p50_ms"] / same[0]["p50_ms"] if same[0].get("p50_ms") else None
            r["p99_vs_bare"] = r["p99_ms"] / same[0]["p99_ms"]
    top = max(report["settings"]["connections"])
    verdict: dict[str, Any] = {}
    refresh = max((r["vs_ceiling"] or 0 for r in results if r["name"] == "refresh_rotation"), default=None)
    if refresh is not None:
        verdict["refresh_vs_ceiling"] = {
            "value": refresh,
            "target": TARGETS["refresh_vs_ceiling"],
            "met": refresh >= TARGETS["refresh_vs_ceiling"],
        }
        per_core = max(
            (r["per_core_vs_ceiling"] or 0 for r in results if r["name"] == "refresh_rotation"), default=0
        )
        verdict["refresh_vs_ceiling_per_core"] = {
            "value": per_core,
            "target": TARGETS["refresh_vs_ceiling"],
            "met": per_core >= TARGETS["refresh_vs_ceiling"],
        }
    flows = max((r["ops_per_s"] for r in results if r["name"] == "full_flow"), default=None)
    if flows is not None:
        verdict["flows_per_s"] = {
            "value": flows,
            "target": TARGETS["flows_per_s"],
            "met": flows >= TARGETS["flows_per_s"],
        }
        per_core = max((r["ops_per_core_s"] or 0 for r in results if r["name"] == "full_flow"), default=0)
        verdict["flows_per_core_s"] = {
            "value": per_core,
            "target": TARGETS["flows_per_s"],
            "met": per_core >= TARGETS["flows_per_s"],
        }
    for transport in ("streamable", "sse"):
        r = _find(results, f"tools_call_{transport}", top)
        if r is not None and r.get("p99_vs_bare") is not None:
            verdict[f"tools_call_{transport}_p99_vs_bare_at_{top}"] = {
                "value": r["p99_vs_bare"],
                "target": TARGETS["tools_call_p99_vs_bare_at_50"],
                "met": r["p99_vs_bare"] <= TARGETS["tools_call_p99_vs_bare_at_50"],
            }
    sse = report.get("sse_idle")
    if sse and sse["steps"]:
        last = sse["steps"][-1]
        verdict[f"idle_sse_kib_per_stream_at_{last['streams']}"] = {
            "value": last["per_stream_kib"],
            "target": TARGETS["idle_sse_kib_per_stream_at_10000"],
            "met": last["per_stream_kib"] <= TARGETS["idle_sse_kib_per_stream_at_10000"],
        }
    report["targets"] = verdict


def table(report: dict[str, Any]) -> str:
    """The results as a Markdown table (what docs/performance.md holds)."""
    lines = [
        "| benchmark | conns | generator | ops/s | × ceiling | p50 ms | p99 ms | p99 × bare | server CPU | generator CPU "
        "| server CPU ms/op | ops per core-s | per core × ceiling | errors |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["http"]:
        lines.append(
            f"| {r['name']} | {r['connections']} | {r['generator']} | {_fmt(r['ops_per_s'], 0)} | {_fmt(r.get('vs_ceiling'), 2)} "
            f"| {_fmt(r.get('p50_ms'), 2)} | {_fmt(r.get('p99_ms'), 2)} | {_fmt(r.get('p99_vs_bare'), 2)} "
            f"| {_fmt(r.get('server_cpu'), 2)} | {_fmt(r.get('client_cpu'), 2)} | {_fmt(r.get('server_ms_per_op'), 3)} "
            f"| {_fmt(r.get('ops_per_core_s'), 0)} | {_fmt(r.get('per_core_vs_ceiling'), 2)} | {r.get('errors', 0)} |"
        )
    out = ["\n".join(lines)]
    v = report.get("verify")
    if v:
        out.append(
            "\n| access-token validation (`OAuthServer.verify_access_token`) | sequential µs/call | 50 in flight µs/call |\n"
            "|---|---:|---:|\n"
            f"| cache on (`access_cache_ttl=30`) | {v['cached']['sequential_us']:.1f} | {v['cached']['concurrent50_us']:.1f} |\n"
            f"| cache off (`access_cache_ttl=0`, SQLite lookup) | {v['uncached']['sequential_us']:.1f} | {v['uncached']['concurrent50_us']:.1f} |"
        )
    s = report.get("sse_idle")
    if s:
        rows = [
            "\n| idle SSE streams | opened in s | server RSS MiB | KiB per stream |",
            "|---:|---:|---:|---:|",
        ]
        rows.append(f"| 0 (baseline) | - | {s['baseline_rss_mib']:.1f} | - |")
        for step in s["steps"]:
            rows.append(
                f"| {step['streams']} ({step['failures']} failed) | {step['open_seconds']:.1f} | {step['server_rss_mib']:.1f} | {step['per_stream_kib']:.2f} |"
            )
        rows.append(
            f"\nKeepalives every {s['keepalive_interval_s']:g} s, watched {s['observed_s']:.0f} s over "
            f"{s['streams_alive']} live streams: lateness p50 {_fmt(s['keepalive_late_p50_ms'], 1)} ms, "
            f"p99 {_fmt(s['keepalive_late_p99_ms'], 1)} ms, max {_fmt(s['keepalive_late_max_ms'], 1)} ms "
            f"({s['keepalive_gaps']} gaps); streams short of keepalives: {s['streams_missing_keepalives']}; "
            f"server CPU while idle: {s['server_cpu_idle']:.2f} core."
        )
        out.append("\n".join(rows))
    t = report.get("targets")
    if t:
        rows = ["\n| target | value | goal | met |", "|---|---:|---:|---|"]
        for name, x in t.items():
            rows.append(
                f"| {name} | {x['value']:.2f} | {x['target']:g} | {'yes' if x['met'] else '**no**'} |"
            )
        out.append("\n".join(rows))
    return "\n".join(out)


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
    parser.add_argument("--connections", help="comma-separated connection counts [1,50; smoke 2]")
    parser.add_argument(
        "--processes", type=int, help="Python generator processes [1 below 8 connections, else 2]"
    )
    parser.add_argument("--no-wrk", action="store_true", help="do not use wrk even when installed")
    parser.add_argument("--streams", help="idle SSE stream counts [1000,10000; smoke 10,20]")
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
        "--only", help="subset: metadata,refresh,flow,tools,verify,streams (the ceiling always runs)"
    )
    args = parser.parse_args(argv)
    settings = Settings(args)
    limits = servers.raise_fd_limit()
    report: dict[str, Any] = {
        "machine": machine(),
        "settings": settings.as_json(),
        "fd_limit": limits,
        "http": [],
    }
    print(f"machine: {json.dumps(report['machine'])}", flush=True)
    if not settings.use_wrk and not settings.smoke and not args.no_wrk:
        print("wrk not found (scripts/setup-bench.sh installs it): Python generator only", flush=True)
    run_http(settings, report)
    if settings.wants("verify"):
        run_verify(settings, report)
    if settings.wants("streams"):
        run_streams(settings, report)
    annotate(report)
    print()
    print(table(report))
    output = args.output or (None if settings.smoke else DEFAULT_OUTPUT)
    if output:
        with open(output, "w") as f:
            json.dump(report, f, indent=2)
        print(f"\nwrote {output}")
    return 0
