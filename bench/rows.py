"""
The HTTP rows of the benchmark: what each one asks of which server, and a
L{Bench} that owns the servers and the set-up they need, so that the full
run (L{bench.run}) and the profiler (L{bench.profile}) put exactly the same
load on the server.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from typing import Any, Optional

import attr

from bench import lifeline, loadgen, servers


@attr.s(auto_attribs=True, frozen=True)
class Row:
    """
    One benchmark row.

    @ivar server: C{"floor"}, C{"bare"} (the Klein ceiling) or C{"smeldr"}.
    @ivar scenario: a L{bench.loadgen.SCENARIOS} name.
    @ivar path: for C{fixed} rows, the GET; these can also be driven by wrk.
    @ivar group: the C{--only} name that selects the row (C{None}: always).
    @ivar goal: the row's server CPU per operation, at most this many times
        the floor's (issue 13), or C{None}.
    """

    name: str
    server: str
    scenario: str
    path: Optional[str] = None
    group: Optional[str] = None
    goal: Optional[float] = None
    about: str = ""


ROWS = [
    Row("floor", "floor", "fixed", "/floor", about="bare twisted.web Resource (the floor)"),
    Row("bare", "bare", "fixed", "/bare", about="bare Klein route (the ceiling)"),
    Row(
        "as_metadata",
        "smeldr",
        "fixed",
        "/.well-known/oauth-authorization-server",
        "metadata",
        1.15,
        "AS metadata (RFC 8414)",
    ),
    Row(
        "pr_metadata",
        "smeldr",
        "fixed",
        "/.well-known/oauth-protected-resource/mcp",
        "metadata",
        1.15,
        "protected-resource metadata (RFC 9728)",
    ),
    Row("healthz", "smeldr", "fixed", "/healthz", "metadata", 1.15, "GET /healthz"),
    Row(
        "refresh_rotation",
        "smeldr",
        "refresh",
        group="refresh",
        goal=2.2,
        about="refresh grant with rotation",
    ),
    Row("full_flow", "smeldr", "flow", group="flow", goal=9.0, about="consent + code exchange + tools/call"),
    Row(
        "tools_call_streamable",
        "smeldr",
        "streamable",
        group="tools",
        goal=2.5,
        about="tools/call, Streamable HTTP",
    ),
    Row("tools_call_sse", "smeldr", "legacy", group="tools", goal=2.5, about="tools/call, HTTP+SSE"),
    Row("floor_again", "floor", "fixed", "/floor", about="the floor again (drift)"),
]
BY_NAME = {row.name: row for row in ROWS}
#: Rows that are references, not goals.
REFERENCE_ROWS = ("floor", "floor_again", "bare")
#: The p99 at the largest connection count, at most this many times the floor's.
P99_GOAL = 1.5


class Bench:
    """The servers of the HTTP rows, started on first use, and their set-up."""

    def __init__(self, server_args: tuple[str, ...] = ()) -> None:
        self.server_args = server_args
        self.servers: dict[str, servers.Server] = {}
        self._database_pid: Optional[int] = None
        self._database_looked_up = False
        self._client_id: Optional[str] = None
        self._site_token: Optional[str] = None

    def server(self, name: str) -> servers.Server:
        if name not in self.servers:
            if name == "smeldr":
                self.servers[name] = servers.start_smeldr(self.server_args)
            else:
                self.servers[name] = servers.start_reference(name)
        return self.servers[name]

    def database_pid(self) -> Optional[int]:
        """
        The postmaster of the C{--database} PostgreSQL server, when it runs
        on this machine (L{servers.postmaster_pid}): the rows of the
        smeldr server then report the database's CPU as well.
        """
        if not self._database_looked_up:
            self._database_looked_up = True
            if "--database" in self.server_args:
                url = self.server_args[self.server_args.index("--database") + 1]
                self._database_pid = servers.postmaster_pid(url)
        return self._database_pid

    @property
    def smeldr(self) -> servers.OAuthServer:
        server = self.server("smeldr")
        assert isinstance(server, servers.OAuthServer)
        return server

    def _set_up(self) -> tuple[str, str]:
        if self._client_id is None or self._site_token is None:
            self._site_token = servers.create_site_token(self.smeldr)
            self._client_id = servers.register_client(self.smeldr)
        return self._client_id, self._site_token

    def states(self, row: Row, connections: int) -> tuple[list[Any], dict[str, Any]]:
        """Each virtual user's state for C{row}, and the target to aim at."""
        server = self.server(row.server)
        if row.scenario == "fixed":
            return [{"path": row.path}] * connections, server.target()
        client_id, site_token = self._set_up()
        target = server.target(resource=self.smeldr.resource)
        if row.scenario == "flow":
            state = {"client_id": client_id, "redirect_uri": servers.REDIRECT_URI, "site_token": site_token}
            return [state] * connections, target
        # refresh: one rotation chain per connection; tools: one session per
        # connection; each over its own grant.
        return servers.obtain_tokens(self.smeldr, client_id, site_token, connections), target

    def load(
        self, row: Row, connections: int, duration: float, warmup: float, processes: int
    ) -> dict[str, Any]:
        """Run C{row} with the Python generator; the figures of L{loadgen.run_load}."""
        states, target = self.states(row, connections)
        return loadgen.run_load(
            row.scenario,
            target,
            states,
            duration=duration,
            warmup=warmup,
            processes=processes,
            server_pid=self.server(row.server).pid,
            database_pid=self.database_pid() if row.server == "smeldr" else None,
        )

    def wrk(self, row: Row, connections: int, duration: float, warmup: float) -> dict[str, Any]:
        """Run a C{fixed} row with wrk."""
        assert row.path is not None
        return run_wrk(self.server(row.server), row.path, connections, duration, warmup)

    def stop(self) -> None:
        for server in self.servers.values():
            server.stop()
        self.servers.clear()

    def log(self) -> str:
        return self.servers["smeldr"].log() if "smeldr" in self.servers else ""


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
            **lifeline.popen_kwargs(),
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
