"""
What a run means: every row's figures as ratios to the floor measured in the
same run, the verdict on each goal of issue 13, the Markdown tables, and the
"Latest run" section of C{docs/performance.md}, rewritten between its
markers from C{bench/results.json}.
"""

from __future__ import annotations

import os
from statistics import mean
from typing import Any, Optional

from bench.rows import BY_NAME, P99_GOAL, REFERENCE_ROWS

#: Idle streams: server memory per authenticated idle stream at 10,000.
IDLE_KIB_GOAL = 10.0
IDLE_KIB_AT = 10000
#: Idle streams held by one server process.
STREAMS_GOAL = 100000

BEGIN = "<!-- bench:latest:begin (written by python -m bench; edits here are lost) -->"
END = "<!-- bench:latest:end -->"


def fmt(value: Any, digits: int) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}" if abs(value) >= 10000 else f"{value:.{digits}f}"


def _floors(results: list[dict[str, Any]], r: dict[str, Any]) -> list[dict[str, Any]]:
    """The floor figures to compare C{r} with: same connections, same generator if measured by it."""
    floors = [
        f for f in results if f["name"] in ("floor", "floor_again") and f["connections"] == r["connections"]
    ]
    same = [f for f in floors if f["generator"] == r["generator"]]
    return same or [f for f in floors if f["generator"] == "python"]


def _spread(r: dict[str, Any]) -> Optional[float]:
    """
    p99 over p50: the tail a row adds beyond its own queueing.

    With a closed-loop generator holding C{c} requests on a saturated server,
    every latency is about C{c} times the CPU per request (Little's law), so
    C{p99_vs_floor} moves with C{cpu_vs_floor} whatever the tail looks like.
    Dividing p99 by the same row's p50 cancels that factor and leaves the
    stalls (a GC pause, a batch, a slow COMMIT) that make some requests wait
    longer than their neighbours.
    """
    if not r.get("p99_ms") or not r.get("p50_ms"):
        return None
    return float(r["p99_ms"]) / float(r["p50_ms"])


def annotate(report: dict[str, Any]) -> None:
    """Add each row's ratios to the floor, and the verdict on each goal."""
    results = report["http"]
    for r in results:
        cpu = r.get("server_cpu")
        r["server_us_per_op"] = cpu * 1e6 / r["ops_per_s"] if cpu and r["ops_per_s"] else None
        database = r.get("database_cpu")
        if database is not None:
            r["database_us_per_op"] = database * 1e6 / r["ops_per_s"] if r["ops_per_s"] else None
    for r in results:
        floors = _floors(results, r)
        costs = [f["server_us_per_op"] for f in floors if f.get("server_us_per_op")]
        p99s = [f["p99_ms"] for f in floors if f.get("p99_ms")]
        spreads = [_spread(f) for f in floors if _spread(f)]
        rates = [f["ops_per_s"] for f in floors if f.get("ops_per_s")]
        r["floor_us_per_op"] = mean(costs) if costs else None
        r["cpu_vs_floor"] = (
            r["server_us_per_op"] / r["floor_us_per_op"] if r["server_us_per_op"] and costs else None
        )
        r["p99_vs_floor"] = r["p99_ms"] / mean(p99s) if r.get("p99_ms") and p99s else None
        r["spread_vs_floor"] = _spread(r) / mean(spreads) if _spread(r) and spreads else None
        r["ops_vs_floor"] = r["ops_per_s"] / mean(rates) if rates else None
    report["targets"] = verdict(report)


def _goal(value: Optional[float], goal: float, at_most: bool = True) -> dict[str, Any]:
    met = value is not None and (value <= goal if at_most else value >= goal)
    return {"value": value, "target": goal, "at_most": at_most, "met": met}


def verdict(report: dict[str, Any]) -> dict[str, Any]:
    """Issue 13's goals, judged at the largest connection count with the Python generator."""
    results = report["http"]
    top = max(report["settings"]["connections"])
    found: dict[str, Any] = {}
    for r in results:
        if r["connections"] != top or r["generator"] != "python" or r["name"] in REFERENCE_ROWS:
            continue
        row = BY_NAME.get(r["name"])
        if row is not None and row.goal is not None:
            found[f"{r['name']}_cpu_vs_floor"] = _goal(r.get("cpu_vs_floor"), row.goal)
        found[f"{r['name']}_p99_vs_floor_at_{top}"] = _goal(r.get("p99_vs_floor"), P99_GOAL)
    for run in report.get("streams", []):
        at = [s for s in run["steps"] if s["streams"] <= IDLE_KIB_AT] or run["steps"][:1]
        step = at[-1]
        found[f"idle_{run['transport']}_kib_per_stream_at_{step['streams']}"] = _goal(
            step["per_stream_kib"], IDLE_KIB_GOAL
        )
        if max(s["asked"] for s in run["steps"]) >= STREAMS_GOAL:
            held = run["steps"][-1]["streams"] if run["streams_missing_keepalives"] == 0 else 0
            found[f"idle_{run['transport']}_streams_in_one_process"] = _goal(
                held, STREAMS_GOAL, at_most=False
            )
    return found


# -- tables --------------------------------------------------------------------------------


def summary_table(report: dict[str, Any]) -> str:
    """One line a row at the largest connection count: the figures the goals speak of."""
    top = max(report["settings"]["connections"])
    lines = [
        f"| row ({top} connections, Python generator) | server CPU µs/op | × floor | goal | p99 ms | p99 × floor "
        f"| goal | p99/p50 × floor's | ops/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["http"]:
        if r["connections"] != top or r["generator"] != "python" or r["name"] == "floor_again":
            continue
        row = BY_NAME.get(r["name"])
        goal = row.goal if row is not None and row.goal is not None else None
        reference = r["name"] in REFERENCE_ROWS
        lines.append(
            f"| {r['name']} | {fmt(r.get('server_us_per_op'), 0)} | {fmt(r.get('cpu_vs_floor'), 2)} "
            f"| {'-' if goal is None else f'≤ {goal:g}'} | {fmt(r.get('p99_ms'), 2)} "
            f"| {fmt(r.get('p99_vs_floor'), 2)} | {'-' if reference else f'≤ {P99_GOAL:g}'} "
            f"| {fmt(r.get('spread_vs_floor'), 2)} | {fmt(r['ops_per_s'], 0)} |"
        )
    return "\n".join(lines)


def http_table(report: dict[str, Any]) -> str:
    lines = [
        "| row | conns | generator | ops/s | × floor | p50 ms | p99 ms | p99 × floor | server CPU "
        "| generator CPU | server µs/op | CPU × floor | errors |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["http"]:
        lines.append(
            f"| {r['name']} | {r['connections']} | {r['generator']} | {fmt(r['ops_per_s'], 0)} "
            f"| {fmt(r.get('ops_vs_floor'), 2)} | {fmt(r.get('p50_ms'), 2)} | {fmt(r.get('p99_ms'), 2)} "
            f"| {fmt(r.get('p99_vs_floor'), 2)} | {fmt(r.get('server_cpu'), 2)} | {fmt(r.get('client_cpu'), 2)} "
            f"| {fmt(r.get('server_us_per_op'), 0)} | {fmt(r.get('cpu_vs_floor'), 2)} | {r.get('errors', 0)} |"
        )
    return "\n".join(lines)


def verify_table(v: dict[str, Any]) -> str:
    return (
        "| access-token validation (`OAuthServer.verify_access_token`) | sequential µs/call | 50 in flight µs/call |\n"
        "|---|---:|---:|\n"
        f"| cache on (`access_cache_ttl=30`) | {v['cached']['sequential_us']:.1f} | {v['cached']['concurrent50_us']:.1f} |\n"
        f"| cache off (`access_cache_ttl=0`, SQLite lookup) | {v['uncached']['sequential_us']:.1f} "
        f"| {v['uncached']['concurrent50_us']:.1f} |"
    )


def streams_table(run: dict[str, Any]) -> str:
    rows = [
        f"| idle {run['transport']} streams | opened in s (this step) | server RSS MiB | KiB per stream | kernel TCP MiB (box) |",
        "|---:|---:|---:|---:|---:|",
        f"| 0 (baseline) | - | {run['baseline_rss_mib']:.1f} | - | - |",
    ]
    for step in run["steps"]:
        asked = f" of {step['asked']:,} asked" if step["asked"] != step["streams"] else ""
        rows.append(
            f"| {step['streams']:,}{asked} ({step['failures']} failed) | {step['open_seconds']:.1f} "
            f"| {step['server_rss_mib']:.1f} | {step['per_stream_kib']:.2f} | {fmt(step.get('tcp_kernel_mib'), 1)} |"
        )
    idle, loaded = run["probe_idle"], run["probe_loaded"]
    rows.append(
        f"\n{run['transport']}: {run['processes']} generator processes over {len(run['source_addresses'])} "
        f"source addresses ({run['source_addresses'][0]}–{run['source_addresses'][-1]}). Keepalives every "
        f"{run['keepalive_interval_s']:g} s, watched {run['observed_s']:.0f} s over {run['streams_alive']:,} live "
        f"streams: lateness p50 {fmt(run['keepalive_late_p50_ms'], 1)} ms, p99 {fmt(run['keepalive_late_p99_ms'], 1)} "
        f"ms, max {fmt(run['keepalive_late_max_ms'], 1)} ms ({run['keepalive_gaps']:,} gaps, "
        f"{run['keepalives_late_over_1s']} over 1 s late); streams short of keepalives: "
        f"{run['streams_missing_keepalives']}; server CPU while idle: {run['server_cpu_idle']:.2f} core. "
        f"`GET {loaded['path']}` one at a time: p50 {fmt(idle['p50_ms'], 2)} / p99 {fmt(idle['p99_ms'], 2)} ms "
        f"with no stream open, p50 {fmt(loaded['p50_ms'], 2)} / p99 {fmt(loaded['p99_ms'], 2)} / max "
        f"{fmt(loaded['max_ms'], 2)} ms holding {run['steps'][-1]['streams']:,} streams "
        f"({loaded['requests']} requests, {loaded['errors']} errors)."
    )
    if run.get("gc_longest_full_ms") is not None:
        rows[-1] += (
            f" Garbage collection (the server's own timing): longest full collection "
            f"{fmt(run['gc_longest_full_ms'], 0)} ms ({run['gc_full_collections']} full collections since start), "
            f"longest young one {fmt(run.get('gc_longest_young_ms'), 1)} ms."
        )
    limited = run.get("fd_limited")
    if limited:
        rows.append(
            f"\n**Capped by the descriptor limit**: {limited['asked']:,} streams were asked for; this box's hard "
            f"`RLIMIT_NOFILE` is {limited['hard']:,} and may not be raised here ({limited['refused']}), so one "
            f"server process can hold at most {limited['cap']:,}."
        )
    return "\n".join(rows)


def targets_table(targets: dict[str, Any]) -> str:
    rows = ["| goal (issue 13) | value | goal | met |", "|---|---:|---:|---|"]
    for name, x in targets.items():
        sign = "≤" if x["at_most"] else "≥"
        rows.append(
            f"| {name} | {fmt(x['value'], 2)} | {sign} {x['target']:g} | {'yes' if x['met'] else '**no**'} |"
        )
    return "\n".join(rows)


def table(report: dict[str, Any]) -> str:
    """Every table of the run, as Markdown."""
    out = [summary_table(report), http_table(report)]
    if report.get("verify"):
        out.append(verify_table(report["verify"]))
    for run in report.get("streams", []):
        out.append(streams_table(run))
    if report.get("targets"):
        out.append(targets_table(report["targets"]))
    return "\n\n".join(out)


# -- docs/performance.md -----------------------------------------------------------------------


def latest_section(report: dict[str, Any], figures: list[str], docs_dir: str) -> str:
    m = report["machine"]
    s = report["settings"]
    load = m.get("loadavg_start"), m.get("loadavg_end")
    figure_lines = [
        f"![{os.path.splitext(os.path.basename(p))[0]}]({os.path.relpath(p, docs_dir)})" for p in figures
    ]
    limits = report.get("fd_limit", {})
    return "\n\n".join(
        [
            f"{m['date']}: `nproc` {m['nproc']}, CPU {m['cpu']}, Python {m['python']} ({m['implementation']}), "
            f"Twisted {m['twisted']}, Klein {m['klein']}, treq {m['treq']}, wrk {m['wrk']}, kernel {m['kernel']}; "
            f"RLIMIT_NOFILE {limits.get('soft')}/{limits.get('hard')}. Each figure: {s['warmup']:g} s warm-up, "
            f"{s['duration']:g} s measured; connections {', '.join(str(c) for c in s['connections'])}; server "
            f"arguments: {' '.join(s['server_args']) or 'defaults'}.",
            f"**The box is shared**: other engineers run their test suites on the same 2 cores during the run "
            f"(load average {load[0] or '?'} at the start, {load[1] or '?'} at the end), so the server often gets "
            f"less than a core. Read the ratios to the floor and the CPU per operation, which sharing disturbs "
            f"least; the optimisation round will run this again.",
            "Goals at the largest connection count (Python generator; CPU × floor is the row's server CPU per "
            "operation over the floor's in this run, a full flow being three requests):",
            summary_table(report),
            *figure_lines,
            "Every figure:",
            http_table(report),
            *([verify_table(report["verify"])] if report.get("verify") else []),
            *[streams_table(run) for run in report.get("streams", [])],
            targets_table(report.get("targets", {})),
        ]
    )


def update_docs(report: dict[str, Any], path: str, figures: list[str]) -> None:
    """Rewrite the section between L{BEGIN} and L{END} of C{path}."""
    with open(path) as f:
        text = f.read()
    if BEGIN not in text or END not in text:
        raise RuntimeError(f"{path} has no {BEGIN!r} ... {END!r} section")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    section = latest_section(report, figures, os.path.dirname(os.path.abspath(path)))
    with open(path, "w") as f:
        f.write(f"{head}{BEGIN}\n\n{section}\n\n{END}{tail}")
