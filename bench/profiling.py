"""
Where the server's time goes under one row's load: C{py-spy record} against
the server process while the Python generator drives the row (the same load
as the full run, L{bench.rows.Bench}), then a readable summary of the
samples.

    python -m bench --profile refresh_rotation            # one row
    python -m bench --profile floor,bare --connections 10  # several
    python -m bench --profile baseline                    # the optimisation round's input

For each row it writes into C{bench/profiles/}: C{ROW.collapsed.gz} (py-spy's
raw collapsed stacks, by line, gzipped; unzip it and open it
in speedscope or feed it to flamegraph.pl) and C{ROW.txt} (the summary); C{baseline} also writes
C{BASELINE.md}, every row's summary in one file.

The summary puts each sample in one I{category}, so the categories add up
to 100% of the server's busy samples: the access log, logging events,
SQLite and the store, JSON, hyperlink and Werkzeug routing win wherever they
appear in a stack (the time spent inside them, whoever called them);
everything else goes to the innermost of Klein, Deferred glue, twisted.web,
the reactor and TCP, smeldr-oauth's own code, or "other".  Below that, the
top functions by self and by total (inclusive) share of the samples.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from typing import Any, Callable, Iterable, Optional

from bench import lifeline
from bench.rows import BY_NAME, Bench

HERE = os.path.dirname(os.path.abspath(__file__))
PROFILES = os.path.join(HERE, "profiles")
#: The rows the optimisation round starts from.
BASELINE_ROWS = (
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
SAMPLE_RATE = 200

_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")

Frame = tuple[str, str]  # (function, file)


def parse_frame(text: str) -> tuple[Frame, int]:
    """C{function (file:line)}: the frame, and the line it was at (0 if not given)."""
    match = _FRAME.match(text.strip())
    if match is None:
        return (text.strip(), ""), 0
    return (match.group("function"), match.group("file")), int(match.group("line") or 0)


Stack = tuple[list[Frame], int, int]  # frames (root first), the leaf's line, samples


def parse_collapsed(lines: Iterable[str]) -> list[Stack]:
    """py-spy's raw output: C{frame;frame;...;leaf COUNT} a line, root first."""
    stacks = []
    for line in lines:
        line = line.rstrip("\n")
        if not line:
            continue
        stack, _, count = line.rpartition(" ")
        parsed = [parse_frame(f) for f in stack.split(";") if f]
        # Leading "process ..." / "thread ..." pseudo-frames, when present.
        parsed = [(f, n) for f, n in parsed if f[1] or not f[0].startswith(("process ", "thread "))]
        leaf_line = parsed[-1][1] if parsed else 0
        stacks.append(([f for f, _ in parsed], leaf_line, int(count)))
    return stacks


def _commit_line() -> int:
    """
    The line of adbapi's C{_runInteraction} that commits: C{conn.commit} is
    the DB-API connection's own (C) method, reached through adbapi's
    C{__getattr__}, so a sample inside SQLite's COMMIT has that line as its
    innermost Python frame.
    """
    import inspect

    from twisted.enterprise import adbapi

    source, first = inspect.getsourcelines(adbapi.ConnectionPool._runInteraction)
    for offset, text in enumerate(source):
        if "conn.commit()" in text:
            return first + offset
    return -1


def _in(*parts: str) -> Callable[[Frame], bool]:
    return lambda frame: any(p in frame[1] for p in parts)


def _access_log(frame: Frame) -> bool:
    function, path = frame
    return (
        path.endswith("twisted/web/http.py") and function in ("log", "combinedLogFormatter", "_escape")
    ) or (function == "datetimeToLogString")


#: Categories that claim a sample wherever they appear in its stack (first match wins).
ANYWHERE: list[tuple[str, Callable[[Frame], bool]]] = [
    ("access log (twisted.web, through the legacy log)", _access_log),
    ("logging events (twisted.logger)", lambda f: _logging(f)),
    ("SQLite statements and the store", lambda f: _store(f)),
    ("JSON", _in("json/")),
    ("hyperlink (URL parsing and building)", _in("hyperlink/")),
    ("Werkzeug routing", _in("werkzeug/")),
]
#: Categories for the rest, by the innermost frame that matches.
INNERMOST: list[tuple[str, Callable[[Frame], bool]]] = [
    ("Klein (dispatch, request glue)", _in("klein/")),
    ("Deferred glue", _in("twisted/internet/defer.py")),
    ("twisted.web HTTP (parse, headers, finish)", _in("twisted/web/")),
    ("reactor and TCP", _in("twisted/internet/", "twisted/python/")),
    ("smeldr-oauth code", _in("smeldr_oauth/", "bench/bare.py")),
]


def _logging(frame: Frame) -> bool:
    function, path = frame
    if "twisted/logger/" in path or "txaio/" in path:
        return True
    # twisted.python.log wraps every reactor callback in callWithLogger:
    # that is not logging.
    return path.endswith("twisted/python/log.py") and function not in ("callWithLogger", "callWithContext")


#: Where a request's dispatch chain runs (every sample of a request is in
#: them): not worth listing among the top functions by total time.
GLUE = (
    "twisted/internet/",
    "twisted/protocols/",
    "twisted/python/",
    "twisted/application/",
    "runpy",
    "__main__",
)


def _store(frame: Frame) -> bool:
    path = frame[1]
    return (
        "twisted/enterprise/" in path
        or "smeldr_oauth/store/" in path
        or "smeldr_oauth/db/" in path
        or path.endswith("smeldr_oauth/site/db.py")
        or "sqlite3/" in path
    )


COMMIT = "SQLite COMMIT (the connection's commit())"
#: Python frames whose only work is a DB-API C{commit()}: a sample with one
#: of them innermost is inside the database's COMMIT (the database layer's
#: own commit, L{smeldr_oauth.db.database._commit}).
COMMIT_FRAMES = {("_commit", "smeldr_oauth/db/database.py")}


def categorise(frames: list[Frame], leaf_line: int = 0, commit_line: int = -1) -> str:
    if frames and (
        frames[-1] in COMMIT_FRAMES
        or (frames[-1] == ("_runInteraction", "twisted/enterprise/adbapi.py") and leaf_line == commit_line)
    ):
        return COMMIT
    for name, matches in ANYWHERE:
        if any(matches(f) for f in frames):
            return name
    for frame in reversed(frames):
        for name, matches in INNERMOST:
            if matches(frame):
                return name
    return "other (standard library, attrs, ...)"


def summarise(stacks: list[Stack], top: int = 20, commit_line: Optional[int] = None) -> dict[str, Any]:
    if commit_line is None:
        commit_line = _commit_line()
    total = sum(count for _, _, count in stacks) or 1
    categories: Counter[str] = Counter()
    self_time: Counter[Frame] = Counter()
    inclusive: Counter[Frame] = Counter()
    for frames, leaf_line, count in stacks:
        categories[categorise(frames, leaf_line, commit_line)] += count
        if frames:
            self_time[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count

    def share(
        counter: Counter[Any], n: int, below: float = 1.01, skip: tuple[str, ...] = ()
    ) -> list[tuple[Any, float, float]]:
        rows = []
        for key, count in counter.most_common():
            if count / total >= below or any(part in key[1] for part in skip):
                continue
            rows.append((key, 100.0 * self_time[key] / total, 100.0 * inclusive[key] / total))
            if len(rows) == n:
                break
        return rows

    return {
        "samples": total,
        "categories": [(name, 100.0 * count / total) for name, count in categories.most_common()],
        "top_self": share(self_time, top),
        # The reactor loop and the request's dispatch chain are in (nearly)
        # every sample: they say nothing.
        "top_total": share(inclusive, top, below=0.75, skip=GLUE),
    }


def _label(frame: Frame) -> str:
    return f"`{frame[0]}` ({frame[1]})"


def render(name: str, summary: dict[str, Any], load: Optional[dict[str, Any]], seconds: float) -> str:
    row = BY_NAME.get(name)
    lines = [f"## {name}: {row.about if row else ''}", ""]
    if load:
        cpu = load.get("server_cpu")
        ops = load["ops_per_s"]
        lines.append(
            f"{load['connections']} connections, Python generator; {summary['samples']:,} samples at "
            f"{SAMPLE_RATE} Hz over {seconds:g} s (busy samples only); during the profile the server did "
            f"{ops:,.0f} ops/s at {cpu or 0:.2f} core, {cpu * 1e6 / ops if cpu and ops else 0:,.0f} µs of CPU per "
            f"operation (py-spy's pauses included)."
        )
        lines.append("")
    lines += ["| where the time goes | % of samples |", "|---|---:|"]
    lines += [f"| {category} | {share:.1f} |" for category, share in summary["categories"]]
    lines += ["", "| top functions by self time | self % | total % |", "|---|---:|---:|"]
    lines += [f"| {_label(frame)} | {s:.1f} | {t:.1f} |" for frame, s, t in summary["top_self"]]
    lines += ["", "| top functions by total time | self % | total % |", "|---|---:|---:|"]
    lines += [f"| {_label(frame)} | {s:.1f} | {t:.1f} |" for frame, s, t in summary["top_total"]]
    return "\n".join(lines) + "\n"


def py_spy_record(pid: int, seconds: float, output: str, rate: int = SAMPLE_RATE, *extra: str) -> list[str]:
    """
    The C{py-spy record} command line for C{pid} over C{seconds}, raw
    collapsed stacks into C{output}: the one place the bench finds py-spy.
    """
    py_spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(py_spy):
        raise RuntimeError("py-spy not found: pip install -r requirements-test.txt")
    return [
        py_spy,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(max(1, round(seconds))),
        "--rate",
        str(rate),
        *extra,
        "--format",
        "raw",
        "--output",
        output,
    ]


def record(pid: int, seconds: float, output: str) -> None:
    """
    C{py-spy record} on C{pid} for C{seconds}, raw collapsed stacks by line
    (the tables aggregate by function; the COMMIT category needs the line).
    """
    subprocess.run(
        py_spy_record(pid, seconds, output),
        check=True,
        capture_output=True,
        timeout=seconds + 60,
        **lifeline.popen_kwargs(),
    )


def profile_row(
    bench: Bench, name: str, connections: int, seconds: float, warmup: float, processes: int, directory: str
) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """Drive row C{name} and sample the server meanwhile; the collapsed file, summary and load figures."""
    row = BY_NAME[name]
    server = bench.server(row.server)
    # Set-up (grants) happens before the clock starts, here, not in the thread.
    states, target = bench.states(row, connections)
    from bench import loadgen

    outcome: dict[str, Any] = {}

    def drive() -> None:
        outcome["load"] = loadgen.run_load(
            row.scenario,
            target,
            states,
            duration=seconds + 1.0,
            warmup=warmup,
            processes=processes,
            server_pid=server.pid,
        )

    # The load runs in a thread; py-spy is started from this (the main)
    # thread, which outlives it, so that lifeline's signal is not sent when
    # a short-lived thread ends.
    driver = threading.Thread(target=drive, daemon=True)
    driver.start()
    time.sleep(0.2 + warmup)
    os.makedirs(directory, exist_ok=True)
    collapsed = os.path.join(directory, f"{name}.collapsed")
    record(server.pid, seconds, collapsed)
    driver.join()
    with open(collapsed) as f:
        summary = summarise(parse_collapsed(f))
    with open(collapsed, "rb") as f, gzip.open(collapsed + ".gz", "wb") as z:
        shutil.copyfileobj(f, z)
    os.remove(collapsed)
    return collapsed + ".gz", summary, outcome.get("load", {})


def main(spec: str, settings: Any, seconds: float, directory: str = PROFILES) -> int:
    names = list(BASELINE_ROWS) if spec == "baseline" else spec.split(",")
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        print(f"unknown rows: {', '.join(unknown)}; rows: {', '.join(BY_NAME)}", file=sys.stderr)
        return 2
    connections = max(settings.connections) if settings.connections else 50
    processes = settings.processes or (1 if connections < 8 else 2)
    warmup = settings.warmup
    sections = []
    summaries: dict[str, dict[str, Any]] = {}
    loads: dict[str, dict[str, Any]] = {}
    bench = Bench(settings.server_args)
    try:
        for name in names:
            collapsed, summary, load = profile_row(
                bench, name, connections, seconds, warmup, processes, directory
            )
            text = render(name, summary, load, seconds)
            with open(os.path.join(directory, f"{name}.txt"), "w") as f:
                f.write(text)
            print(text, flush=True)
            print(f"wrote {collapsed}", flush=True)
            sections.append(text)
            summaries[name] = summary
            loads[name] = load
    finally:
        bench.stop()
    if spec == "baseline":
        write_baseline([matrix(summaries, loads), *sections], settings, connections, seconds, directory)
    return 0


def matrix(summaries: dict[str, dict[str, Any]], loads: dict[str, dict[str, Any]]) -> str:
    """Every row's categories side by side, in µs of server CPU per operation and in %."""
    names = list(summaries)
    categories = list(dict.fromkeys(c for summary in summaries.values() for c, _ in summary["categories"]))

    def us(name: str) -> Optional[float]:
        load = loads.get(name) or {}
        cpu, ops = load.get("server_cpu"), load.get("ops_per_s")
        return cpu * 1e6 / ops if cpu and ops else None

    lines = [
        "## All rows side by side",
        "",
        "Server CPU per operation during the profile, split by category: µs (% of the row's samples).",
        "",
        "| category | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
        "| **µs of CPU per operation** | "
        + " | ".join(f"**{us(n):,.0f}**" if us(n) else "-" for n in names)
        + " |",
    ]
    for category in categories:
        cells = []
        for name in names:
            share = dict(summaries[name]["categories"]).get(category)
            cost = us(name)
            if share is None:
                cells.append("-")
            elif cost is None:
                cells.append(f"{share:.0f}%")
            else:
                cells.append(f"{cost * share / 100:,.0f} ({share:.0f}%)")
        lines.append(f"| {category} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_baseline(
    sections: list[str], settings: Any, connections: int, seconds: float, directory: str
) -> None:
    from bench.run import machine

    m = machine()
    head = f"""# Baseline profiles (the starting point of an optimisation round)

Written by `python -m bench --profile baseline` on {m["date"]} ({m["nproc"]} cores, {m["cpu"]},
Python {m["python"]}, Twisted {m["twisted"]}, Klein {m["klein"]}; load average {m["loadavg_start"]}; the box
is shared with other engineers' test runs). Each row: the Python generator at {connections} connections
({settings.warmup:g} s warm-up), `py-spy record --rate {SAMPLE_RATE}` on the server process for
{seconds:g} s. Server arguments: {" ".join(settings.server_args) or "defaults (`--db-threads 0`)"}.
The `ROW.collapsed.gz` files beside this one are the raw stacks (`gunzip -k`, then speedscope opens them).

How to read it: "where the time goes" puts each busy sample in one category, so they add up to 100%.
SQLite's COMMIT (samples inside the connection's `commit()`) is counted first; then the access log, logging
events, SQLite statements with the store code around them (adbapi, `smeldr_oauth/db/`, `smeldr_oauth/store/`), JSON, hyperlink and Werkzeug routing claim a sample wherever they appear in its stack; the rest
goes to the innermost of Klein, Deferred glue, twisted.web, the reactor and TCP, smeldr-oauth's code
and "other". "self %" is time in the function itself, "total %" time in it and what it calls (the reactor
loop and the request's dispatch chain, in nearly every sample, are left out of the "total" list).
Compare a row with `floor` (twisted.web alone) and `bare` (Klein's routing on top).

"""
    with open(os.path.join(directory, "BASELINE.md"), "w") as f:
        f.write(head + "\n".join(sections))
    print(f"wrote {os.path.join(directory, 'BASELINE.md')}")
