"""
The gateway's cost, measured against the same upstream without it.

  - C{tools/call} round trip, one call at a time, to a warm stdio upstream
    (server-everything's C{echo}): a bare stdio JSON-RPC client (the floor:
    what any client pays) against the gateway's proxy core (downstream
    session -> link -> upstream client -> pipe) in the same process; p50 and
    p99 of each and the overhead;
  - resident memory of one warm upstream process (from C{/proc});
  - Python heap per idle downstream gateway session (tracemalloc).

Usage: python -m bench.gateway [--calls N] [--sessions N] [--json]

Needs C{bash scripts/setup-upstreams.sh}.  One run, one box: numbers are
for comparison within the run, not across machines.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import time
import tracemalloc
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol

from smeldr_oauth.gateway.config import Limits, UpstreamConfig
from smeldr_oauth.gateway.proxy import Gateway
from smeldr_oauth.mcp import jsonrpc
from smeldr_oauth.mcp.calls import Outlet, Principal

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVERYTHING = os.path.join(
    CHECKOUT, "tests", "upstreams", "node_modules", "@modelcontextprotocol", "server-everything", "dist", "index.js"
)
PRINCIPAL = Principal("bench", "bench-client", frozenset(), None)
INIT = {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "bench", "version": "0"}}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class DirectClient(ProcessProtocol):
    """The floor: newline JSON-RPC straight to the upstream process."""

    def __init__(self) -> None:
        self.buffer = b""
        self.waiting: dict[int, Deferred] = {}
        self.next_id = 0
        self.ended: Deferred = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            message = json.loads(line)
            d = self.waiting.pop(message.get("id"), None) if "method" not in message else None
            if d is not None:
                d.callback(message)

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(None)

    def request(self, method: str, params: dict) -> Deferred:
        self.next_id += 1
        d: Deferred = Deferred()
        self.waiting[self.next_id] = d
        self.transport.write(jsonrpc.encode(jsonrpc.request(self.next_id, method, params)) + b"\n")  # type: ignore[union-attr]
        return d


async def direct(command: list[str], calls: int) -> dict[str, Any]:
    client = DirectClient()
    process = reactor.spawnProcess(client, command[0], command, env=dict(os.environ))  # type: ignore[attr-defined]
    await client.request("initialize", INIT)
    client.transport.write(jsonrpc.encode(jsonrpc.notification("notifications/initialized", {})) + b"\n")  # type: ignore[union-attr]
    latencies = []
    for i in range(calls + calls // 10):
        started = time.perf_counter()
        await client.request("tools/call", {"name": "echo", "arguments": {"message": f"m{i}"}})
        if i >= calls // 10:  # the first tenth warms up
            latencies.append(time.perf_counter() - started)
    rss = rss_kib(process.pid)
    client.transport.closeStdin()  # type: ignore[union-attr]
    await client.ended
    return {"p50_ms": percentile(latencies, 0.5) * 1000, "p99_ms": percentile(latencies, 0.99) * 1000, "upstream_rss_kib": rss}


class _Null(Outlet):
    can_request = True


async def through_gateway(command: list[str], calls: int, sessions: int) -> dict[str, Any]:
    config = UpstreamConfig(name="bench", kind="stdio", command=tuple(command), env_inherit=tuple(os.environ), limits=Limits(stop_grace=1))
    gateway = Gateway(config, clock=reactor, reactor=reactor)
    session = gateway.session(default_outlet=_Null())
    ids = iter(range(1, 1 << 30))

    def send(method: str, params: dict) -> Deferred:
        return session.handle(jsonrpc.parse_message(jsonrpc.request(next(ids), method, params)), PRINCIPAL, None)

    await send("initialize", INIT)
    latencies = []
    for i in range(calls + calls // 10):
        started = time.perf_counter()
        await send("tools/call", {"name": "echo", "arguments": {"message": f"m{i}"}})
        if i >= calls // 10:
            latencies.append(time.perf_counter() - started)
    # Idle downstream sessions of the same user, on the same warm process.
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    idle = []
    for _ in range(sessions):
        other = gateway.session(default_outlet=_Null())
        await other.handle(jsonrpc.parse_message(jsonrpc.request(1, "initialize", INIT)), PRINCIPAL, None)
        idle.append(other)
    gc.collect()
    per_session = (tracemalloc.get_traced_memory()[0] - before) / sessions
    tracemalloc.stop()
    await gateway.stop()
    return {
        "p50_ms": percentile(latencies, 0.5) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "bytes_per_idle_session": round(per_session),
    }


async def run(calls: int, sessions: int) -> dict[str, Any]:
    node = shutil.which("node")
    if node is None or not os.path.exists(EVERYTHING):
        raise SystemExit("bench.gateway needs node and server-everything: bash scripts/setup-upstreams.sh")
    command = [node, EVERYTHING, "stdio"]
    bare = await direct(command, calls)
    gateway = await through_gateway(command, calls, sessions)
    return {
        "upstream": "server-everything (stdio), tools/call echo, 1 in flight",
        "calls": calls,
        "direct": bare,
        "gateway": gateway,
        "overhead_p50_ms": gateway["p50_ms"] - bare["p50_ms"],
        "ratio_p50": gateway["p50_ms"] / bare["p50_ms"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gateway", description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result: dict[str, Any] = {}

    def go() -> None:
        d = Deferred.fromCoroutine(run(args.calls, args.sessions))
        d.addCallback(result.update).addErrback(lambda f: result.update(error=f.getErrorMessage())).addBoth(lambda _: reactor.stop())  # type: ignore[attr-defined]

    reactor.callWhenRunning(go)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    if "error" in result:
        print(result["error"], file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        d, g = result["direct"], result["gateway"]
        print(f"{result['upstream']}, {result['calls']} calls")
        print(f"  direct stdio client   p50 {d['p50_ms']:.3f} ms  p99 {d['p99_ms']:.3f} ms")
        print(f"  through the gateway   p50 {g['p50_ms']:.3f} ms  p99 {g['p99_ms']:.3f} ms")
        print(f"  overhead p50 {result['overhead_p50_ms']:.3f} ms  (x{result['ratio_p50']:.2f})")
        print(f"  warm upstream process RSS {d['upstream_rss_kib'] / 1024:.1f} MiB")
        print(f"  idle downstream gateway session {g['bytes_per_idle_session']} bytes of Python heap")
    return 0


if __name__ == "__main__":
    sys.exit(main())
