"""
Idle authenticated MCP streams on both transports: how much resident memory
each costs the server, whether every keepalive still leaves on time, and
whether the server still answers a plain request quickly while it holds
them, from a few to 100,000 in one server process.

Every stream is real and authenticated, what an idle ChatGPT or Claude
connection costs:

  - C{legacy}: a 2024-11-05 HTTP+SSE stream (C{GET /mcp} with a bearer
    token, no session id), which creates a session and starts its
    keepalives;
  - C{streamable}: a Streamable HTTP session (C{initialize}), then its own
    stream (C{GET /mcp} with C{Mcp-Session-Id}) on the same connection.

The streams are held by several generator processes (asyncio, one
connection per stream), each spreading its connections over several
loopback source addresses (127.0.0.2, 127.0.0.3, ...: bound before
connecting, with C{IP_BIND_ADDRESS_NO_PORT}), because one address pair
offers only the ephemeral port range (about 28,000 ports by default) and one
process only C{RLIMIT_NOFILE} descriptors.  The server's RSS comes from
C{/proc}; the probe of a plain request (C{GET /healthz}, one at a time on a
keep-alive connection) runs from this process while the streams idle.
"""

from __future__ import annotations

import asyncio
import gc
import http.client
import math
import multiprocessing
import os
import time
from typing import Any, Optional

from bench import lifeline
from bench.loadgen import STREAM_OPENERS, Connection, SSEReader, percentile, process_cpu

#: Connections per loopback source address: below the default ephemeral
#: range (32768-60999, 28,232 ports) with room for everything else.
PER_SOURCE = 20000
#: Streams per generator process: well inside a 20,000-descriptor limit.
PER_PROCESS = 10000
#: Descriptors the server needs besides its streams (listening socket,
#: databases and their WAL files, log, epoll, waker pipes, ...).
SERVER_RESERVE = 100


def source_addresses(count: int) -> list[str]:
    """Loopback source addresses for C{count} connections (at least two)."""
    return [f"127.0.0.{2 + i}" for i in range(max(2, math.ceil(count / PER_SOURCE)))]


def generator_processes(count: int) -> int:
    return max(2, math.ceil(count / PER_PROCESS))


# -- the generator processes --------------------------------------------------------


class _Holder:
    """One generator process's streams, driven by commands from the parent."""

    def __init__(self, target: dict[str, Any], token: str, transport: str, sources: list[str]) -> None:
        self.target = target
        self.token = token
        self.open_one = STREAM_OPENERS[transport]
        self.sources = sources
        self.held: list[tuple[Connection, SSEReader]] = []
        self.opened_total = 0

    async def open(self, count: int, parallel: int = 64) -> dict[str, Any]:
        gate = asyncio.Semaphore(parallel)
        failures: list[str] = []
        began = time.monotonic()

        async def one(index: int) -> None:
            async with gate:
                source = self.sources[index % len(self.sources)]
                try:
                    self.held.append(
                        await asyncio.wait_for(self.open_one(self.target, self.token, source), 60)
                    )
                except Exception as e:
                    failures.append(f"{type(e).__name__}: {e}"[:200])

        first = self.opened_total
        self.opened_total += count
        await asyncio.gather(*(one(first + i) for i in range(count)))
        return {
            "held": len(self.held),
            "failures": len(failures),
            "samples": failures[:3],
            "seconds": time.monotonic() - began,
        }

    async def watch(self, seconds: float, keepalive: float) -> dict[str, Any]:
        for _, reader in self.held:
            reader.keepalives.clear()
        await asyncio.sleep(seconds)
        lateness: list[float] = []
        expected = max(0, int(seconds // keepalive) - 1)
        short = 0
        for _, reader in self.held:
            times = reader.keepalives
            if len(times) < expected:
                short += 1
            lateness.extend((b - a) - keepalive for a, b in zip(times, times[1:]))
        alive = sum(1 for conn, _ in self.held if not conn.lost.done())
        return {"lateness": lateness, "short": short, "alive": alive}

    def close(self) -> None:
        for conn, _ in self.held:
            conn.close()
        self.held.clear()


async def _serve(pipe: Any, holder: _Holder) -> None:
    loop = asyncio.get_running_loop()
    while True:
        command, argument = await loop.run_in_executor(None, pipe.recv)
        if command == "open":
            pipe.send(await holder.open(argument))
        elif command == "watch":
            pipe.send(await holder.watch(*argument))
        else:
            holder.close()
            await asyncio.sleep(0.1)  # let the FINs go out
            pipe.send({})
            return


def _generator(
    pipe: Any, parent_pid: int, target: dict[str, Any], token: str, transport: str, sources: list[str]
) -> None:
    lifeline.die_with_parent(parent_pid)
    holder: Optional[_Holder] = None

    async def main() -> None:
        nonlocal holder
        holder = _Holder(target, token, transport, sources)
        await _serve(pipe, holder)

    try:
        asyncio.run(main())
    except Exception as e:  # report, never hang the parent
        pipe.send({"error": repr(e)})


class Generators:
    """The generator processes of one measurement."""

    def __init__(
        self, target: dict[str, Any], token: str, transport: str, processes: int, sources: list[str]
    ) -> None:
        context = multiprocessing.get_context("fork")
        self.pipes = []
        self.processes = []
        for index in range(processes):
            parent, child = context.Pipe()
            # Each process starts on its own source address, so small
            # counts still use every address.
            mine = sources[index % len(sources) :] + sources[: index % len(sources)]
            p = context.Process(
                target=_generator, args=(child, os.getpid(), target, token, transport, mine), daemon=True
            )
            p.start()
            child.close()
            self.pipes.append(parent)
            self.processes.append(p)

    def ask(self, command: str, arguments: list[Any]) -> list[dict[str, Any]]:
        for pipe, argument in zip(self.pipes, arguments):
            pipe.send((command, argument))
        replies = []
        for pipe in self.pipes:
            try:
                reply = pipe.recv()
            except EOFError:
                reply = {"error": "generator process died"}
            if "error" in reply:
                raise RuntimeError(f"stream generator failed: {reply['error']}")
            replies.append(reply)
        return replies

    def open(self, count: int) -> dict[str, Any]:
        """Open C{count} more streams, shared out between the processes."""
        n = len(self.pipes)
        shares = [count // n + (1 if i < count % n else 0) for i in range(n)]
        replies = self.ask("open", shares)
        return {
            "held": sum(r["held"] for r in replies),
            "failures": sum(r["failures"] for r in replies),
            "samples": [s for r in replies for s in r["samples"]][:3],
        }

    def close(self) -> None:
        try:
            self.ask("close", [None] * len(self.pipes))
        finally:
            for p in self.processes:
                p.join(10)
                if p.is_alive():
                    p.kill()


# -- the probe ----------------------------------------------------------------------------


def probe(port: int, seconds: float, path: str = "/healthz", interval: float = 0.02) -> dict[str, Any]:
    """
    C{GET path} one at a time on a keep-alive connection for C{seconds}, a
    request every C{interval}: the latency a health check or a new client
    sees from a server holding the streams.
    """
    latencies = []
    errors = 0
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            began = time.monotonic()
            try:
                connection.request("GET", path)
                response = connection.getresponse()
                response.read()
                if response.status != 200:
                    errors += 1
                else:
                    latencies.append(time.monotonic() - began)
            except (OSError, http.client.HTTPException):
                errors += 1
                connection.close()
            time.sleep(max(0.0, interval - (time.monotonic() - began)))
    finally:
        connection.close()

    def ms(value: Optional[float]) -> Optional[float]:
        return None if value is None else value * 1000

    return {
        "path": path,
        "requests": len(latencies),
        "errors": errors,
        "p50_ms": ms(percentile(latencies, 0.5)),
        "p99_ms": ms(percentile(latencies, 0.99)),
        "max_ms": ms(max(latencies) if latencies else None),
    }


# -- the measurement ---------------------------------------------------------------------------


def measure(
    server: Any,
    token: str,
    transport: str,
    counts: list[int],
    keepalive: float,
    observe: float,
    settle: float = 1.0,
    processes: Optional[int] = None,
    spread_for: int = 0,
    metrics_port: Optional[int] = None,
) -> dict[str, Any]:
    """
    Open C{transport} streams up to each of C{counts} in turn, reading the
    server's RSS at each step; at the largest, watch the keepalives for
    C{observe} seconds while probing a plain request.

    @param server: a L{bench.servers.OAuthServer} started with
        C{--keepalive keepalive}.
    @param spread_for: lay the generator processes and source addresses out
        for this many streams (the count asked for, when the descriptor
        limit caps C{counts}).
    @param metrics_port: the server's C{--metrics-listen} port: the longest
        garbage-collection pauses are read there at the end.
    """
    target = server.target()
    largest = max(max(counts), spread_for)
    sources = source_addresses(largest)
    procs = processes or generator_processes(largest)
    generators = Generators(target, token, transport, procs, sources)
    try:
        # Warm the code paths (imports, caches) first, so the baseline is a
        # server that has served a stream and a probe.
        warm = Generators(target, token, transport, 1, sources)
        try:
            warm.open(1)
        finally:
            warm.close()
        idle_probe = probe(server.port, min(2.0, observe / 4))
        gc.collect()
        time.sleep(settle)
        baseline = server.rss_bytes()
        steps = []
        held = 0
        failures = 0
        samples: list[str] = []
        for count in sorted(set(counts)):
            began = time.monotonic()
            opened = generators.open(count - held)
            elapsed = time.monotonic() - began
            held = opened["held"]
            failures += opened["failures"]
            samples.extend(opened["samples"])
            time.sleep(settle)
            rss = server.rss_bytes()
            steps.append(
                {
                    "tcp_kernel_mib": tcp_kernel_mib(),
                    "streams": held,
                    "asked": count,
                    "failures": opened["failures"],
                    "open_seconds": elapsed,
                    "server_rss_mib": rss / 2**20,
                    "per_stream_kib": (rss - baseline) / max(1, held) / 1024,
                }
            )
        cpu0 = process_cpu(server.pid)
        watch_began = time.monotonic()
        for pipe in generators.pipes:
            pipe.send(("watch", (observe, keepalive)))
        # The probe runs while the generators watch, and ends before they do.
        loaded_probe = probe(server.port, max(0.5, observe - 1.0))
        replies = []
        for pipe in generators.pipes:
            replies.append(pipe.recv())
        watched = time.monotonic() - watch_began
        cpu = (process_cpu(server.pid) - cpu0) / watched
    finally:
        generators.close()
    collector = gc_figures(metrics_port) if metrics_port else {}
    lateness = [x for r in replies for x in r["lateness"]]
    p50, p99 = percentile(lateness, 0.5), percentile(lateness, 0.99)
    return {
        "transport": transport,
        "processes": procs,
        "source_addresses": sources,
        "baseline_rss_mib": baseline / 2**20,
        "steps": steps,
        "failures": failures,
        "failure_samples": samples[:3],
        "keepalive_interval_s": keepalive,
        "observed_s": watched,
        "streams_alive": sum(r["alive"] for r in replies),
        "keepalive_gaps": len(lateness),
        "keepalive_late_p50_ms": None if p50 is None else p50 * 1000,
        "keepalive_late_p99_ms": None if p99 is None else p99 * 1000,
        "keepalive_late_max_ms": max(lateness) * 1000 if lateness else None,
        "keepalives_late_over_1s": sum(1 for x in lateness if x > 1.0),
        "streams_missing_keepalives": sum(r["short"] for r in replies),
        "server_cpu_idle": cpu,
        "probe_idle": idle_probe,
        "probe_loaded": loaded_probe,
        **collector,
    }


def gc_figures(port: int) -> dict[str, Any]:
    """
    The server's garbage-collection figures from its metrics page
    (L{smeldr_oauth.service.collector}): the longest full (generation 2)
    and young pause since it started, in ms, and the full collections.
    """
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", "/metrics")
        page = connection.getresponse().read().decode("utf-8", "replace")
    except OSError:
        return {}
    finally:
        connection.close()
    values: dict[str, float] = {}
    for line in page.splitlines():
        if line.startswith("smeldr_gc_"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    if not values:
        return {}
    return {
        "gc_longest_full_ms": values.get('smeldr_gc_pause_longest_seconds{generation="2"}', 0.0) * 1000,
        "gc_longest_young_ms": max(
            values.get(f'smeldr_gc_pause_longest_seconds{{generation="{g}"}}', 0.0) for g in (0, 1)
        )
        * 1000,
        "gc_full_collections": int(values.get('smeldr_gc_collections_total{generation="2"}', 0)),
    }


def tcp_kernel_mib() -> Optional[float]:
    """
    The kernel's TCP buffer memory for the whole box (C{/proc/net/sockstat},
    C{TCP: ... mem PAGES}, what C{net.ipv4.tcp_mem} limits), both ends of
    every loopback stream included.
    """
    try:
        with open("/proc/net/sockstat") as f:
            for line in f:
                if line.startswith("TCP:"):
                    fields = line.split()
                    pages = int(fields[fields.index("mem") + 1])
                    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        pass
    return None


def kernel_settings() -> dict[str, Optional[str]]:
    """The kernel settings many streams depend on, as this box has them."""
    names = {
        "fs.file-max": "/proc/sys/fs/file-max",
        "fs.nr_open": "/proc/sys/fs/nr_open",
        "net.ipv4.ip_local_port_range": "/proc/sys/net/ipv4/ip_local_port_range",
        "net.core.somaxconn": "/proc/sys/net/core/somaxconn",
        "net.ipv4.tcp_max_syn_backlog": "/proc/sys/net/ipv4/tcp_max_syn_backlog",
        "net.ipv4.tcp_mem": "/proc/sys/net/ipv4/tcp_mem",
    }
    found: dict[str, Optional[str]] = {}
    for name, path in names.items():
        try:
            with open(path) as f:
                found[name] = " ".join(f.read().split())
        except OSError:
            found[name] = None
    return found
