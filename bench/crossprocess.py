"""
Cross-process delivery: how long an answer takes from a legacy
C{POST /mcp/message} on process B to the session's stream held by process
A, both C{twist smeldr-oauth --database postgresql://…} processes on one
database, against the same path within one process (the POST to A) in the
same run.

    python -m bench.crossprocess [--database URL] [--seconds 3] [--sessions 1 50]
                                 [--rate N] [--profile DIR]

Without C{--database} a throwaway PostgreSQL cluster is started (as
C{python -m tests.postgres} does).  Each row: C{sessions} legacy streams
open on A, for C{--seconds}, each with one client sending C{ping}s:

  - closed loop (the default): the next when the previous answer arrived
    on the stream, as fast as the box allows (at 50 sessions that
    saturates a small machine, and the figure is mostly queueing);
  - open loop (C{--rate N}): each session sends N a second on a fixed
    schedule whatever the answers do (sessions start at evenly spread
    phases), and a latency is counted from the I{scheduled} send time, so
    a stall delays every message behind it and shows in the p99.

Each row also reports the CPU the processes used meanwhile (A, B and the
PostgreSQL server when this command started it), as cores and as
microseconds per message: on a shared box, CPU per message is the figure
to compare.  C{--profile DIR} records C{py-spy} on A and B during each
cross-process row (C{DIR/xp-SESSIONS-A.txt}, C{-B.txt}, raw collapsed
stacks).  Prints one JSON line per row, and the ratio of the
cross-process p50/p99 to the same-process ones.

C{--seam N} measures the routing seam alone instead, in this process: two
L{PostgresDelivery} (A holding a Streamable HTTP session's stream, B a
copy) on the database, B sending N messages one at a time through the
event log to A, three ways: the log and the route each through the pool
(C{pooled}), the log through the pool and the route on the listening
connection (C{route-only}), and both on the listening connection, one
statement each (C{deliver_logged}); each mode twice, alternated.  Prints one JSON line
per mode: p50/p99 to arrival, and this process's CPU per message (A and B
together, their database threads included).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any, Optional

import treq
from twisted.internet import defer, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.web.client import HTTPConnectionPool

from bench.profiling import py_spy_record
from bench.servers import create_site_token, obtain_tokens, register_client, start_smeldr


class Stream(Protocol):
    """A legacy SSE stream: the endpoint, and a waiter per answer id."""

    def __init__(self) -> None:
        self.buffer = b""
        self.endpoint: defer.Deferred[str] = defer.Deferred()
        self.waiting: dict[Any, defer.Deferred[float]] = {}

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\n\n" in self.buffer:
            event, self.buffer = self.buffer.split(b"\n\n", 1)
            for line in event.split(b"\n"):
                if line.startswith(b"data: /") and not self.endpoint.called:
                    self.endpoint.callback(line[6:].decode())
                elif line.startswith(b"data: {"):
                    message = json.loads(line[6:])
                    waiter = self.waiting.pop(message.get("id"), None)
                    if waiter is not None:
                        waiter.callback(time.perf_counter())


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def open_session(reactor: Any, holder: int, token: str, host: str) -> tuple[Stream, str]:
    stream = Stream()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", holder), stream)
    stream.transport.write(  # type: ignore[attr-defined]
        f"GET /mcp HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
    )
    endpoint = await stream.endpoint
    return stream, endpoint


async def post(pool: Any, port: int, path: str, token: str, message: dict[str, Any]) -> None:
    response = await treq.post(
        f"http://127.0.0.1:{port}{path}",
        json.dumps(message).encode(),
        headers={"Authorization": [f"Bearer {token}"], "Content-Type": ["application/json"]},
        pool=pool,
    )
    await response.content()
    if response.code != 202:
        raise RuntimeError(f"POST {path} answered {response.code}")


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of C{pids} so far (gone processes count 0)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def postgres_pids(cluster: Any) -> list[int]:
    """The PostgreSQL server's processes (postmaster and its children)."""
    if cluster is None:
        return []
    with open(os.path.join(cluster.data_dir, "postmaster.pid")) as f:
        postmaster = int(f.readline())
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rpartition(")")[2].split()[1]) == postmaster:
                        children.append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    return [postmaster, *children]


def start_profile(pid: int, seconds: float, output: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        py_spy_record(pid, seconds, output, 250, "--nonblocking"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def row(
    reactor: Any,
    a: Any,
    b: Any,
    token: str,
    sessions: int,
    seconds: float,
    sender: Any,
    rate: Optional[float] = None,
    pg: Optional[list[int]] = None,
    profile: Optional[str] = None,
) -> dict[str, Any]:
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = sessions + 4
    host = a.issuer.split("//")[1]
    opened = [await open_session(reactor, a.port, token, host) for _ in range(sessions)]
    init = {
        "jsonrpc": "2.0",
        "id": 0,
        "method": "initialize",
        "params": {"protocolVersion": "2024-11-05", "capabilities": {}},
    }
    for stream, endpoint in opened:
        answered = stream.waiting[0] = defer.Deferred()
        await post(pool, sender.port, endpoint, token, init)
        await answered
        await post(
            pool, sender.port, endpoint, token, {"jsonrpc": "2.0", "method": "notifications/initialized"}
        )
    latencies: list[float] = []
    pids = {"a_cpu": [a.pid], "b_cpu": [b.pid], "pg_cpu": pg or []}
    before = {k: cpu_seconds(v) for k, v in pids.items()}
    profilers = []
    if profile is not None and sender is b:
        profilers = [
            start_profile(server.pid, seconds, os.path.join(profile, f"xp-{sessions}-{name}.txt"))
            for name, server in (("A", a), ("B", b))
        ]
    begun = time.perf_counter()
    deadline = begun + seconds

    async def paced(index: int, stream: Stream, endpoint: str) -> None:
        assert rate is not None
        interval = 1 / rate
        first = begun + interval * index / sessions
        n = 0
        sends = []

        def arrived(at: float, scheduled: float) -> None:
            latencies.append(at - scheduled)

        while True:
            n += 1
            scheduled = first + (n - 1) * interval
            if scheduled >= deadline:
                break
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await task.deferLater(reactor, delay, lambda: None)
            answer = stream.waiting[n] = defer.Deferred()
            answer.addCallback(arrived, scheduled)
            sends.append(answer)
            sends.append(
                defer.ensureDeferred(
                    post(pool, sender.port, endpoint, token, {"jsonrpc": "2.0", "id": n, "method": "ping"})
                )
            )
        await defer.gatherResults(sends)

    async def client(stream: Stream, endpoint: str) -> None:
        n = 0
        while time.perf_counter() < deadline:
            n += 1
            arrived = stream.waiting[n] = defer.Deferred()
            started = time.perf_counter()
            sent = defer.ensureDeferred(
                post(pool, sender.port, endpoint, token, {"jsonrpc": "2.0", "id": n, "method": "ping"})
            )
            latencies.append(await arrived - started)
            await sent

    if rate is None:
        await defer.gatherResults([defer.ensureDeferred(client(s, e)) for s, e in opened])
    else:
        await defer.gatherResults([defer.ensureDeferred(paced(i, s, e)) for i, (s, e) in enumerate(opened)])
    elapsed = time.perf_counter() - begun
    used = {k: cpu_seconds(v) - before[k] for k, v in pids.items()}
    for profiler in profilers:
        profiler.wait()
    for stream, _ in opened:
        stream.transport.loseConnection()  # type: ignore[attr-defined]
    await pool.closeCachedConnections()
    figures: dict[str, Any] = {
        "sessions": sessions,
        "path": "B -> A" if sender is b else "A -> A",
        "load": "closed" if rate is None else f"{rate:g}/s per session",
        "messages": len(latencies),
        "per_s": round(len(latencies) / elapsed),
        "p50_ms": round(percentile(latencies, 0.5) * 1000, 3),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 3),
    }
    for name, cpu in used.items():
        if pids[name]:
            figures[name] = round(cpu / elapsed, 2)
            figures[name.replace("cpu", "us_per_msg")] = round(cpu / len(latencies) * 1e6)
    return figures


class _Arrivals:
    """A sink on A that fires a Deferred at each message's arrival."""

    def __init__(self) -> None:
        self.waiting: Optional[defer.Deferred[float]] = None

    def send(self, data: str, event_id: Optional[int]) -> None:
        waiting, self.waiting = self.waiting, None
        if waiting is not None:
            waiting.callback(time.perf_counter())

    def end(self) -> None:
        pass

    def refresh(self, record: Any) -> None:
        pass


async def seam(reactor: Any, url: str, messages: int) -> None:
    from smeldr_oauth.db import open_database
    from smeldr_oauth.mcp.state.memory import append_then_deliver
    from smeldr_oauth.mcp.state.postgres import PostgresDelivery, PostgresEventLog

    databases = [open_database(url, reactor, threads=4) for _ in range(2)]
    a, b = (PostgresDelivery(db, reactor) for db in databases)
    try:
        await a.start()
        await b.start()
        arrivals, session_id = _Arrivals(), f"seam-{time.time()}"
        a.attach(session_id, arrivals)
        a.stream_held(session_id, True)
        b.attach(session_id, _Arrivals())
        await a.settled()
        await b.settled()
        events = PostgresEventLog(databases[1], reactor)
        listener = b._listener
        for _ in range(2):
            for mode in ("pooled", "route-only", "deliver_logged"):
                latencies = []
                cpu = time.process_time()
                for i in range(messages):
                    arrived = arrivals.waiting = defer.Deferred()
                    data = json.dumps({"i": i})
                    started = time.perf_counter()
                    if mode == "deliver_logged":
                        sent = b.deliver_logged(session_id, data, events)
                    else:
                        # Without the listening connection, B routes through the pool.
                        b._listener = None if mode == "pooled" else listener
                        sent = append_then_deliver(b, session_id, data, events)
                        b._listener = listener
                    latencies.append(await arrived - started)
                    await sent
                used = time.process_time() - cpu
                print(
                    json.dumps(
                        {
                            "seam": mode,
                            "messages": messages,
                            "p50_ms": round(percentile(latencies, 0.5) * 1000, 3),
                            "p99_ms": round(percentile(latencies, 0.99) * 1000, 3),
                            "cpu_us_per_msg": round(used / messages * 1e6),
                        }
                    ),
                    flush=True,
                )
    finally:
        await b.stop()
        await a.stop()
        for db in databases:
            db.close()


async def run(reactor: Any, args: argparse.Namespace) -> None:
    cluster: Optional[Any] = None
    url = args.database
    if url is None:
        from tests.postgres import Cluster, find_bindir

        bindir = find_bindir()
        if bindir is None:
            raise SystemExit("PostgreSQL is not installed; run: bash scripts/setup-postgres.sh")
        cluster = Cluster(bindir)
        cluster.start()
        _, url = cluster.create_database()
    if args.seam:
        try:
            await seam(reactor, url, args.seam)
        finally:
            if cluster is not None:
                cluster.destroy()
        return
    a = start_smeldr(("--database", url))
    b = start_smeldr(("--database", url, "--issuer", a.issuer))
    try:
        token = obtain_tokens(a, register_client(a), create_site_token(a), 1)[0]["access_token"]
        for sessions in args.sessions:
            pg = postgres_pids(cluster)
            local = await row(reactor, a, b, token, sessions, args.seconds, a, args.rate, pg)
            remote = await row(reactor, a, b, token, sessions, args.seconds, b, args.rate, pg, args.profile)
            for figures in (local, remote):
                print(json.dumps(figures), flush=True)
            print(
                json.dumps(
                    {
                        "sessions": sessions,
                        "p50_vs_same_process": round(remote["p50_ms"] / local["p50_ms"], 2),
                        "p99_vs_same_process": round(remote["p99_ms"] / local["p99_ms"], 2),
                    }
                ),
                flush=True,
            )
    finally:
        b.stop()
        a.stop()
        if cluster is not None:
            cluster.destroy()


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--database", metavar="URL")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 50])
    parser.add_argument("--rate", type=float, help="open loop: messages a second per session [closed loop]")
    parser.add_argument("--profile", metavar="DIR", help="py-spy A and B during the cross-process rows")
    parser.add_argument("--seam", type=int, metavar="N", help="the routing seam alone: N messages per mode")
    args = parser.parse_args(argv)
    task.react(lambda reactor: defer.ensureDeferred(run(reactor, args)))


if __name__ == "__main__":
    main(sys.argv[1:])
