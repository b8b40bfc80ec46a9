"""
The whole gateway over HTTP, against the same HTTP upstream called directly.

An upstream MCP server (the official C{server-everything} over Streamable
HTTP, or with C{--upstream sdk} one built with the official Python SDK,
C{tests/upstreams/sdk_server.py}, JSON answers) runs in its own process;
the front (C{MCPHTTP} with the gateway's sessions, bearer check included,
its event log and access log written as C{twist} writes them, the garbage
collector settled as the server settles it)
runs in another, and a bare asyncio HTTP client
(L{bench.loadgen.Connection}) calls the C{echo} tool over Streamable HTTP:

  - one connection, one call at a time: p50 and p99 direct and through
    the gateway, and the overhead;
  - C{--connections} connections (each its own MCP session) for
    C{--seconds}: calls per second direct and through the gateway, and
    the ratio (the two sides take C{--rounds} turns each, alternating, so
    that the box's load changing meanwhile falls on both; each turn opens
    its connections afresh, so that none idles past the upstream's 5 s
    keep-alive while the other side has its turn);
  - the CPU each process spent per call in that phase (from C{/proc}):
    the upstream alone (direct), the front and the upstream (through the
    gateway), and the load generator; and the CPU ratio, the upstream's
    CPU per direct call over the front's plus the upstream's per relayed
    call;
  - the front's resident memory per idle session (C{--idle-sessions}
    initialized, never called; each has its own upstream session here).

Why the CPU ratio: the front, the upstream and this generator share the
machine's cores (two on the shared box).  When they are busy, the
throughput ratio is roughly the share of the cores each setup gets (and on
a box loaded by others, the scheduler's fair share per process: a setup
with one more process gets more of the box), not what the gateway costs.
CPU per call does not depend on who else runs; the CPU ratio is the
throughput ratio the two setups would have on cores of their own that the
generator does not share.

Usage: python -m bench.gateway_front [--calls N] [--connections N] [--seconds S] [--rounds N] [--idle-sessions N] [--json]

One run, one box: the numbers compare within the run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from typing import Any, Optional

from bench.loadgen import Connection, build, connect

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SDK_SERVER = os.path.join(CHECKOUT, "tests", "upstreams", "sdk_server.py")
TOKEN = "bench-gateway-front-token"
INIT = {
    "jsonrpc": "2.0",
    "id": 0,
    "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "bench", "version": "1"}},
}


def serve(upstream: str) -> None:
    """The front, in this process: prints C{PORT n} once it listens."""
    from klein import Klein
    from twisted.internet import reactor
    from twisted.internet.defer import succeed
    from zope.interface import implementer

    from smeldr_oauth.gateway.configfile import load
    from smeldr_oauth.gateway.agent import upstream_agent
    from smeldr_oauth.gateway.proxy import Gateway
    from smeldr_oauth.mcp.http import MCPHTTP
    from smeldr_oauth.oauth.interfaces import IAccessVerifier
    from smeldr_oauth.oauth.model import AccessInfo
    from smeldr_oauth.service.collector import settle
    from smeldr_oauth.web.accesslog import BufferedAccessLog
    from smeldr_oauth.web.logfile import BatchedWriter
    from smeldr_oauth.web.site import SmeldrSite

    @implementer(IAccessVerifier)
    class OneToken:
        def __init__(self, resource: str) -> None:
            self.info = AccessInfo(
                subject="bench", client_id="bench", scopes=frozenset(), resource=resource, grant_id="g", expires_at=1e12
            )

        def verify_access_token(self, token: str) -> Any:
            return succeed(self.info if token == TOKEN else None)

    # One upstream session per downstream session, as the direct side
    # has: the comparison is of the gateway, not of sharing.
    toml = f'[upstreams.bench]\nurl = "{upstream}"\nisolation = "session"\nlimits = {{ max_instances = 256 }}\n'
    config = load((), toml).upstreams[0]
    gateway = Gateway(config, clock=reactor, reactor=reactor, http_agent=upstream_agent(reactor))
    app = Klein()
    # The log as C{twist} keeps it (text, level info, the access log's
    # lines batched into the same file), so that the front pays what the
    # server pays and no more: without it the access lines went through
    # the global log publisher (3.5% of the front's profiled time) into
    # its start-up buffer, and debug events were kept (a routine event
    # could not skip the log).
    out = _log_file()
    _log_as_twist(out)
    access_log = BufferedAccessLog(BatchedWriter(out, reactor), reactor)
    site = SmeldrSite(app.resource(), access_log=access_log)
    port = reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[attr-defined]
    resource = f"http://127.0.0.1:{port.getHost().port}/mcp"
    front = MCPHTTP(
        reactor,
        None,
        OneToken(resource),
        resource_url=resource,
        resource_metadata_url=resource + "/metadata",
        challenge_scope="",
        session_factory=gateway.session,
        max_sessions_per_grant=1000,
        max_sessions_per_subject=1000,
    )
    front.register(app, "/mcp")
    # As the server does once it is up (smeldr_oauth.service.collector):
    # start-up objects frozen out of the collector, a higher young-generation
    # threshold.  Without it this front paid about 0.25 ms of garbage
    # collection per call that the server does not (0.1 ms with it).
    reactor.callWhenRunning(settle)  # type: ignore[attr-defined]
    print(f"PORT {port.getHost().port}", flush=True)
    reactor.run()  # type: ignore[attr-defined]


def _log_file() -> Any:
    """The front's log file: a temporary file, gone when the front exits."""
    import tempfile

    return tempfile.TemporaryFile("w+", prefix="gateway-front-", suffix=".log")


def _log_as_twist(out: Any) -> None:
    """Log as C{twist --log-level info} does: text lines, debug dropped."""
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )

    observer = FilteringLogObserver(textFileLogObserver(out), [LogLevelFilterPredicate(LogLevel.info)])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


def _spawn(argv: list[str]) -> tuple[subprocess.Popen, int]:
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=CHECKOUT, text=True)
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line.startswith("PORT "):
        process.kill()
        raise SystemExit(f"{argv[1]} did not start: {line!r}")
    return process, int(line.split()[1])


def _headers(session: Optional[str]) -> dict[str, str]:
    headers = {
        "Authorization": f"Bearer {TOKEN}",
        "Content-Type": "application/json",
        "Accept": "application/json, text/event-stream",
    }
    if session is not None:
        headers.update({"Mcp-Session-Id": session, "MCP-Protocol-Version": "2025-11-25"})
    return headers


class Session:
    """One connection with one MCP session on it."""

    def __init__(self, conn: Connection, port: int, session: str) -> None:
        self.conn, self.port, self.host, self.headers, self.ids = conn, port, f"127.0.0.1:{port}", _headers(session), 0

    async def reconnect(self) -> None:
        """
        The same MCP session on a new connection (a Streamable HTTP session
        is not tied to one): for a turn after the other side's, which may
        have been longer than the upstream's keep-alive.
        """
        self.conn.close()
        self.conn = await connect("127.0.0.1", self.port)

    @classmethod
    async def open(cls, port: int) -> "Session":
        conn = await connect("127.0.0.1", port)
        host = f"127.0.0.1:{port}"
        response = await conn.request(build("POST", "/mcp", host, _headers(None), json.dumps(INIT).encode()))
        if response.status != 200:
            raise SystemExit(f"initialize answered {response.status}: {response.body[:200]!r}")
        self = cls(conn, port, response.headers[b"mcp-session-id"].decode())
        note = json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}).encode()
        await conn.request(build("POST", "/mcp", host, self.headers, note))
        return self

    async def echo(self) -> None:
        self.ids += 1
        arguments = {"text": "x", "message": "x"}
        body = {"jsonrpc": "2.0", "id": self.ids, "method": "tools/call", "params": {"name": "echo", "arguments": arguments}}
        response = await self.conn.request(build("POST", "/mcp", self.host, self.headers, json.dumps(body).encode()))
        if response.status != 200 or b'"result"' not in response.body:
            raise SystemExit(f"tools/call answered {response.status}: {response.body[:200]!r}")


async def idle_sessions(port: int, pid: int, count: int) -> float:
    """
    Bytes of the front's resident memory per idle session: C{count}
    sessions initialized (no call) on one connection, the process's RSS
    before and after.
    """
    from bench.gateway import rss_kib

    conn = await connect("127.0.0.1", port)
    host = f"127.0.0.1:{port}"
    note = json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}).encode()
    before = rss_kib(pid)
    for _ in range(count):
        response = await conn.request(build("POST", "/mcp", host, _headers(None), json.dumps(INIT).encode()))
        if response.status != 200:
            raise SystemExit(f"initialize answered {response.status}: {response.body[:200]!r}")
        headers = _headers(response.headers[b"mcp-session-id"].decode())
        await conn.request(build("POST", "/mcp", host, headers, note))
    after = rss_kib(pid)
    conn.close()
    return (after - before) * 1024 / count


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds a process has used (Linux C{/proc})."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


class Side:
    """
    One side of the comparison (direct or through the gateway): its port,
    the processes whose CPU it spends, and what was measured on it.
    """

    def __init__(self, port: int, processes: dict[str, int]) -> None:
        self.port = port
        self.processes = processes
        self.latencies: list[float] = []
        self.done = 0
        self.elapsed = 0.0
        self.cpu = {name: 0.0 for name in [*processes, "generator"]}

    async def latency(self, calls: int) -> None:
        """C{calls} calls one at a time on one connection (after a warm-up)."""
        one = await Session.open(self.port)
        for _ in range(max(5, calls // 10)):
            await one.echo()
        for _ in range(calls):
            began = time.perf_counter()
            await one.echo()
            self.latencies.append(time.perf_counter() - began)
        one.conn.close()

    async def throughput(self, sessions: list[Session], seconds: float) -> None:
        """
        Every session calls for C{seconds} (on a connection of this turn's:
        none has idled meanwhile); count the calls and the CPU they took.
        """
        for session in sessions:
            await session.reconnect()
        deadline = time.monotonic() + seconds

        async def loop(session: Session) -> None:
            while time.monotonic() < deadline:
                await session.echo()
                self.done += 1

        cpu_before = {name: cpu_seconds(pid) for name, pid in self.processes.items()}
        generator_before = time.process_time()
        began = time.monotonic()
        await asyncio.gather(*(loop(s) for s in sessions))
        self.elapsed += time.monotonic() - began
        self.cpu["generator"] += time.process_time() - generator_before
        for name, pid in self.processes.items():
            self.cpu[name] += cpu_seconds(pid) - cpu_before[name]

    def report(self) -> dict[str, Any]:
        return {
            "p50_ms": _percentile(self.latencies, 0.5),
            "p99_ms": _percentile(self.latencies, 0.99),
            "calls_per_second": self.done / self.elapsed,
            "cpu_ms_per_call": {name: used * 1000 / max(self.done, 1) for name, used in self.cpu.items()},
        }


async def measure(
    direct: Side, gateway: Side, calls: int, connections: int, seconds: float, rounds: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """
    p50/p99 at one connection, then calls per second at C{connections}
    (each its own session) and the CPU milliseconds per call of each
    process, for both sides.  The sides take turns, C{rounds} times each,
    so that a change in the box's load in the meantime falls on both.
    """
    for _ in range(rounds):
        for side in (direct, gateway):
            await side.latency(max(1, calls // rounds))
    sessions = {side.port: [await Session.open(side.port) for _ in range(connections)] for side in (direct, gateway)}
    for _ in range(rounds):
        for side in (direct, gateway):
            await side.throughput(sessions[side.port], seconds / rounds)
    for opened in sessions.values():
        for session in opened:
            session.conn.close()
    return direct.report(), gateway.report()


def _everything() -> tuple[subprocess.Popen, int]:
    """server-everything over Streamable HTTP on a free port (it takes PORT from the environment)."""
    import shutil
    import socket

    from bench.gateway import EVERYTHING

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    node = shutil.which("node")
    if node is None or not os.path.exists(EVERYTHING):
        raise SystemExit("needs node and server-everything: bash scripts/setup-upstreams.sh")
    process = subprocess.Popen(
        [node, EVERYTHING, "streamableHttp"],
        env={**os.environ, "PORT": str(port)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return process, port
        time.sleep(0.05)
    process.kill()
    raise SystemExit("server-everything did not listen")


def run(
    calls: int, connections: int, seconds: float, upstream_kind: str = "everything", idle: int = 0, rounds: int = 3
) -> dict[str, Any]:
    if upstream_kind == "sdk":
        upstream, upstream_port = _spawn([sys.executable, SDK_SERVER, "--json-response"])
    else:
        upstream, upstream_port = _everything()
    front = None
    try:
        front, front_port = _spawn(
            [sys.executable, "-m", "bench.gateway_front", "--serve", f"http://127.0.0.1:{upstream_port}/mcp"]
        )
        direct, gateway = asyncio.run(
            measure(
                Side(upstream_port, {"upstream": upstream.pid}),
                Side(front_port, {"front": front.pid, "upstream": upstream.pid}),
                calls,
                connections,
                seconds,
                rounds,
            )
        )
        if idle:
            gateway["bytes_per_idle_session"] = round(asyncio.run(idle_sessions(front_port, front.pid, idle)))
    finally:
        for process in (front, upstream):
            if process is not None:
                process.kill()
                process.wait()
    return {
        "upstream": (
            "Python SDK server (JSON answers)" if upstream_kind == "sdk" else "server-everything (Node)"
        )
        + " over Streamable HTTP, tools/call echo",
        "connections": connections,
        "rounds": rounds,
        "direct": direct,
        "gateway": gateway,
        "overhead_p50_ms": gateway["p50_ms"] - direct["p50_ms"],
        "throughput_ratio": gateway["calls_per_second"] / direct["calls_per_second"],
        "cpu_ratio": direct["cpu_ms_per_call"]["upstream"]
        / max(gateway["cpu_ms_per_call"]["front"] + gateway["cpu_ms_per_call"]["upstream"], 1e-9),
        "load_average": os.getloadavg()[0],
    }


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gateway_front", description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument(
        "--rounds", type=int, default=3, help="turns each side takes, alternating (the seconds and calls are split)"
    )
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--upstream", choices=["everything", "sdk"], default="everything")
    parser.add_argument(
        "--idle-sessions", type=int, default=200, metavar="N",
        help="then open N idle sessions and report the front's memory per session (0: skip)",
    )
    parser.add_argument("--serve", metavar="UPSTREAM_URL", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve)
        return 0
    result = run(args.calls, args.connections, args.seconds, args.upstream, args.idle_sessions, max(1, args.rounds))
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    d, g = result["direct"], result["gateway"]
    print(f"{result['upstream']}")
    print(f"  1 connection   direct p50 {d['p50_ms']:.3f} ms p99 {d['p99_ms']:.3f} ms")
    print(f"                 gateway p50 {g['p50_ms']:.3f} ms p99 {g['p99_ms']:.3f} ms  overhead p50 {result['overhead_p50_ms']:.3f} ms")
    print(f"  {result['connections']} connections direct {d['calls_per_second']:.0f} calls/s, gateway {g['calls_per_second']:.0f} calls/s  (ratio {result['throughput_ratio']:.2f})")
    dc, gc = d["cpu_ms_per_call"], g["cpu_ms_per_call"]
    print(
        f"  CPU per call   direct: upstream {dc['upstream']:.2f} ms; gateway: front {gc['front']:.2f} + upstream"
        f" {gc['upstream']:.2f} = {gc['front'] + gc['upstream']:.2f} ms  (CPU ratio {result['cpu_ratio']:.2f});"
        f" generator {dc['generator']:.2f} / {gc['generator']:.2f} ms; load {result['load_average']:.1f}"
    )
    if "bytes_per_idle_session" in g:
        print(f"  idle session in the front (its own upstream session each): {g['bytes_per_idle_session'] / 1024:.1f} KiB RSS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
