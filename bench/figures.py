"""
The figures of a run, drawn with matplotlib from the report (so
C{python -m bench --from-results bench/results.json} redraws them without
measuring again):

  - C{throughput.png}, C{p99.png}: each row's req/s (flows/s) and p99
    against connections, beside the floor and the Klein ceiling;
  - C{cpu.png}: each row's server CPU per operation over the floor's, with
    its goal;
  - C{streams.png}: server memory against open idle streams, per transport.
"""

from __future__ import annotations

import math
import os
from typing import Any

from bench.report import IDLE_KIB_GOAL
from bench.rows import BY_NAME, REFERENCE_ROWS

#: Where docs/performance.md finds them.
DEFAULT_DIRECTORY = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "performance"
)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(results: list[dict[str, Any]], name: str, field: str) -> tuple[list[int], list[float]]:
    points = sorted(
        (r["connections"], r[field])
        for r in results
        if r["name"] == name and r["generator"] == "python" and r.get(field) is not None
    )
    return [c for c, _ in points], [v for _, v in points]


def _per_row(plt: Any, report: dict[str, Any], field: str, label: str, title: str, path: str) -> str:
    results = report["http"]
    names = [n for n in dict.fromkeys(r["name"] for r in results) if n not in REFERENCE_ROWS]
    columns = 3
    rows = max(1, math.ceil(len(names) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.0 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        for reference, style in (("floor", dict(color="black", lw=2)), ("bare", dict(color="grey", ls="--"))):
            x, y = _series(results, reference, field)
            if x:
                ax.plot(
                    x,
                    y,
                    marker="o",
                    label=f"{reference} ({'Resource' if reference == 'floor' else 'Klein'})",
                    **style,
                )
        x, y = _series(results, name, field)
        ax.plot(x, y, marker="o", color="tab:blue", lw=2, label=name)
        ax.set_title(BY_NAME[name].about if name in BY_NAME else name, fontsize=9)
        ax.set_xscale("log")
        ax.set_xticks(sorted(set(report["settings"]["connections"])))
        ax.get_xaxis().set_major_formatter(plt.matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("connections", fontsize=8)
        ax.set_ylabel(label, fontsize=8)
        ax.set_ylim(bottom=0)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.suptitle(f"{title} ({report['machine']['date']}, Python generator)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _cpu(plt: Any, report: dict[str, Any], path: str) -> str:
    top = max(report["settings"]["connections"])
    rows = [
        r
        for r in report["http"]
        if r["connections"] == top
        and r["generator"] == "python"
        and r["name"] not in ("floor", "floor_again")
    ]
    fig, ax = plt.subplots(figsize=(9, 3.8))
    names = [r["name"] for r in rows]
    values = [r.get("cpu_vs_floor") or 0 for r in rows]
    bars = ax.bar(names, values, color="tab:blue")
    for i, r in enumerate(rows):
        goal = BY_NAME[r["name"]].goal if r["name"] in BY_NAME else None
        if goal is not None:
            ax.plot([i - 0.4, i + 0.4], [goal, goal], color="tab:red", lw=2)
    ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.axhline(1.0, color="black", lw=1)
    ax.set_ylabel("server CPU per op ÷ floor's")
    ax.set_title(
        f"Server CPU per operation at {top} connections, × the floor (red: issue 13's goal)", fontsize=10
    )
    ax.tick_params(axis="x", labelrotation=25, labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _streams(plt: Any, report: dict[str, Any], path: str) -> str:
    fig, ax = plt.subplots(figsize=(8, 4.2))
    most = 0
    limited = None
    for run in report.get("streams", []):
        x = [0] + [s["streams"] for s in run["steps"]]
        y = [run["baseline_rss_mib"]] + [s["server_rss_mib"] for s in run["steps"]]
        (line,) = ax.plot(x, y, marker="o", label=f"{run['transport']} (measured)")
        most = max(most, *x)
        limited = run.get("fd_limited") or limited
        if limited and len(x) > 1:
            # Where the descriptor limit stopped the measurement: the same
            # KiB per stream carried on, drawn as what it is, a projection.
            per_stream = (y[-1] - y[0]) / x[-1]
            ax.plot(
                [x[-1], limited["asked"]],
                [y[-1], y[0] + per_stream * limited["asked"]],
                ls=":",
                color=line.get_color(),
                label=f"{run['transport']} projected at {per_stream * 1024:.1f} KiB/stream",
            )
    if limited:
        ax.axvline(limited["cap"], color="grey", ls=":")
        ax.annotate(
            f"hard RLIMIT_NOFILE {limited['hard']:,} on this box:\nmeasured up to {limited['cap']:,} streams",
            (limited["cap"], 0),
            fontsize=7,
            xytext=(5, 10),
            textcoords="offset points",
        )
    streams = report.get("streams", [])
    if streams:
        base = min(run["baseline_rss_mib"] for run in streams)
        end = max(most, 100000)
        ax.plot(
            [0, end],
            [base, base + end * IDLE_KIB_GOAL / 1024],
            color="tab:red",
            ls="--",
            label=f"goal: {IDLE_KIB_GOAL:g} KiB per stream",
        )
    ax.set_xlabel("open idle authenticated streams")
    ax.set_ylabel("server RSS, MiB")
    ax.set_title("Server memory against open idle streams (one process)", fontsize=10)
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def draw(report: dict[str, Any], directory: str = DEFAULT_DIRECTORY) -> list[str]:
    """Draw every figure the report has data for into C{directory}; their paths."""
    plt = _pyplot()
    os.makedirs(directory, exist_ok=True)
    paths = []
    if report.get("http"):
        paths.append(_cpu(plt, report, os.path.join(directory, "cpu.png")))
        paths.append(
            _per_row(
                plt,
                report,
                "ops_per_s",
                "req/s (flows/s)",
                "Throughput",
                os.path.join(directory, "throughput.png"),
            )
        )
        paths.append(
            _per_row(plt, report, "p99_ms", "p99 ms", "p99 latency", os.path.join(directory, "p99.png"))
        )
    if report.get("streams"):
        paths.append(_streams(plt, report, os.path.join(directory, "streams.png")))
    return paths
