"""
The whole gateway over HTTP, against the same HTTP upstream called directly.

An upstream MCP server (the official C{server-everything} over Streamable
HTTP, or with C{--upstream sdk} one built with the official Python SDK,
C{tests/upstreams/sdk_server.py}, JSON answers) runs in its own process;
the front runs in another, as production runs it: C{twist smeldr-oauth}
with that upstream configured (L{start_front}: the site's direct routes,
the authorization server's token check, the flow timeline, its event log and
access log in a file, the garbage collector settled), called with a token
obtained through the real consent; and a bare asyncio HTTP client
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
#: The scope of an upstream whose configuration maps none
#: (L{smeldr_oauth.gateway.front.BASE_SCOPE}): what the consent grants here.
SCOPE = "mcp"
#: The direct side's bearer token: the upstream ignores it (it has no OAuth).
DIRECT_TOKEN = "bench-gateway-front-token"
INIT = {
    "jsonrpc": "2.0",
    "id": 0,
    "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "bench", "version": "1"}},
}


#: The gateway's upstream, as an operator would configure it for this
#: comparison: one upstream session per downstream session, as the direct
#: side has (the comparison is of the gateway, not of sharing), and room
#: for every session the bench opens.
UPSTREAM_TOML = """\
[upstreams.bench]
url = "{url}"
isolation = "session"
limits = {{ max_instances = 1024 }}
"""


def front_arguments(config_path: str) -> tuple[str, ...]:
    """
    What C{twist smeldr-oauth} is given besides its listener and databases
    (L{bench.servers.start_smeldr} adds those): the upstream's configuration
    file, and session limits above the bench's sessions, which all belong to
    one grant.
    """
    return (
        "--upstream-config",
        config_path,
        "--max-sessions-per-grant",
        "1000",
        "--max-sessions-per-user",
        "1000",
    )


def start_front(upstream_url: str) -> tuple[Any, str]:
    """
    The front as production runs it: C{twist smeldr-oauth} with the
    upstream (L{bench.servers.start_smeldr}: fresh databases, text log to a
    file, the installed package), and an access token for its C{/mcp}
    obtained through the real consent and code exchange.

    Why the real server: until round nine this bench mounted L{MCPHTTP} on
    a Klein app of its own, while C{twist smeldr-oauth --upstream} answers
    C{/mcp} through the site's direct routes
    (L{smeldr_oauth.web.routes.direct_answers}, no Werkzeug routing, no
    Klein glue), checks tokens with the authorization server's verifier
    and records the flow timeline: the bench measured a front nobody runs.

    @return: the server (C{stop()} it) and the access token.
    """
    import tempfile

    from bench.servers import create_site_token, obtain_tokens, register_client, start_smeldr

    # The file is read when the server parses its options; the server's
    # own directory (databases, log) goes when it stops.
    with tempfile.TemporaryDirectory(prefix="smeldr-bench-gateway-") as directory:
        config_path = os.path.join(directory, "upstreams.toml")
        with open(config_path, "w", encoding="utf-8") as f:
            f.write(UPSTREAM_TOML.format(url=upstream_url))
        # In this process's session, as the upstream and the generator are:
        # with the kernel's autogroup scheduling a session of its own is a
        # share of a busy box of its own, and the gateway side (the front
        # in its own group) got more of the box than the direct side
        # (throughput ratio 0.94-1.03 against 0.65-0.72 for the old bench
        # in the same minutes, load 6-12).
        server = start_smeldr(front_arguments(config_path), new_session=False)
    try:
        client_id = register_client(server)
        token = obtain_tokens(server, client_id, create_site_token(server), 1, scope=SCOPE)[0]["access_token"]
    except Exception:
        server.stop()
        raise
    return server, token


def _spawn(argv: list[str]) -> tuple[subprocess.Popen, int]:
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=CHECKOUT, text=True)
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line.startswith("PORT "):
        process.kill()
        raise SystemExit(f"{argv[1]} did not start: {line!r}")
    return process, int(line.split()[1])


def _headers(session: Optional[str], token: str) -> dict[str, str]:
    headers = {
        "Authorization": f"Bearer {token}",
        "Content-Type": "application/json",
        "Accept": "application/json, text/event-stream",
    }
    if session is not None:
        headers.update({"Mcp-Session-Id": session, "MCP-Protocol-Version": "2025-11-25"})
    return headers


class Session:
    """One connection with one MCP session on it."""

    def __init__(self, conn: Connection, port: int, session: str, token: str) -> None:
        self.conn, self.port, self.host, self.ids = conn, port, f"127.0.0.1:{port}", 0
        self.headers = _headers(session, token)

    async def reconnect(self) -> None:
        """
        The same MCP session on a new connection (a Streamable HTTP session
        is not tied to one): for a turn after the other side's, which may
        have been longer than the upstream's keep-alive.
        """
        self.conn.close()
        self.conn = await connect("127.0.0.1", self.port)

    @classmethod
    async def open(cls, port: int, token: str) -> "Session":
        conn = await connect("127.0.0.1", port)
        host = f"127.0.0.1:{port}"
        response = await conn.request(build("POST", "/mcp", host, _headers(None, token), json.dumps(INIT).encode()))
        if response.status != 200:
            raise SystemExit(f"initialize answered {response.status}: {response.body[:200]!r}")
        self = cls(conn, port, response.headers[b"mcp-session-id"].decode(), token)
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


async def idle_sessions(port: int, pid: int, count: int, token: str) -> float:
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
        response = await conn.request(build("POST", "/mcp", host, _headers(None, token), json.dumps(INIT).encode()))
        if response.status != 200:
            raise SystemExit(f"initialize answered {response.status}: {response.body[:200]!r}")
        headers = _headers(response.headers[b"mcp-session-id"].decode(), token)
        await conn.request(build("POST", "/mcp", host, headers, note))
    after = rss_kib(pid)
    conn.close()
    return (after - before) * 1024 / count


def cpu_seconds(pid: int) -> float:
    """
    CPU seconds a process's live threads have run (Linux C{/proc}: each
    thread's C{schedstat}, in nanoseconds); where the kernel keeps no
    scheduler statistics, user plus system time from C{stat}.

    Why nanoseconds: C{stat} counts clock ticks (10 ms), which over the
    ~170 one-connection calls of a turn is 0.02 ms a call, the size of a
    change to the front's work (docs/performance.md, round nine).  A
    thread that ended during a measurement takes its time with it; the
    processes measured here keep theirs.
    """
    total = 0
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/schedstat") as schedstat:
                total += int(schedstat.read().split()[0])
    except (OSError, ValueError, IndexError):
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total / 1e9


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


class Side:
    """
    One side of the comparison (direct or through the gateway): its port,
    the processes whose CPU it spends, and what was measured on it.
    """

    def __init__(self, port: int, processes: dict[str, int], token: str = DIRECT_TOKEN) -> None:
        self.port = port
        self.token = token
        self.processes = processes
        self.latencies: list[float] = []
        self.done = 0
        self.elapsed = 0.0
        self.cpu = {name: 0.0 for name in [*processes, "generator"]}
        #: CPU seconds of each process in the one-connection calls.
        self.cpu_one = {name: 0.0 for name in processes}

    async def latency(self, calls: int) -> None:
        """C{calls} calls one at a time on one connection (after a warm-up)."""
        one = await Session.open(self.port, self.token)
        for _ in range(max(5, calls // 10)):
            await one.echo()
        cpu_before = {name: cpu_seconds(pid) for name, pid in self.processes.items()}
        for _ in range(calls):
            began = time.perf_counter()
            await one.echo()
            self.latencies.append(time.perf_counter() - began)
        for name, pid in self.processes.items():
            self.cpu_one[name] += cpu_seconds(pid) - cpu_before[name]
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
            # What each process spends on a call when nothing else is in
            # flight: the work on the one-connection latency's path, which
            # the box's load does not change as it changes the p50s.
            "cpu_ms_per_call_one_connection": {
                name: used * 1000 / max(len(self.latencies), 1) for name, used in self.cpu_one.items()
            },
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
    sessions = {
        side.port: [await Session.open(side.port, side.token) for _ in range(connections)] for side in (direct, gateway)
    }
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
        front, token = start_front(f"http://127.0.0.1:{upstream_port}/mcp")
        direct, gateway = asyncio.run(
            measure(
                Side(upstream_port, {"upstream": upstream.pid}),
                Side(front.port, {"front": front.pid, "upstream": upstream.pid}, token),
                calls,
                connections,
                seconds,
                rounds,
            )
        )
        if idle:
            gateway["bytes_per_idle_session"] = round(asyncio.run(idle_sessions(front.port, front.pid, idle, token)))
    finally:
        if front is not None:
            front.stop()
        upstream.kill()
        upstream.wait()
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
    args = parser.parse_args(argv)
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
    d1, g1 = d["cpu_ms_per_call_one_connection"], g["cpu_ms_per_call_one_connection"]
    print(
        f"  CPU per call at 1 connection: direct: upstream {d1['upstream']:.3f} ms; gateway: front {g1['front']:.3f}"
        f" + upstream {g1['upstream']:.3f} ms"
    )
    if "bytes_per_idle_session" in g:
        print(f"  idle session in the front (its own upstream session each): {g['bytes_per_idle_session'] / 1024:.1f} KiB RSS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
