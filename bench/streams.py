"""
Idle authenticated SSE streams: how much resident memory each costs the
server, and whether keepalive comments still leave on time when there are
thousands of them.

Every stream is a real 2024-11-05 HTTP+SSE stream (C{GET /mcp} with a bearer
token): it authenticates, creates a session and starts its keepalive timer,
which is what an idle ChatGPT or Claude connection costs.  All are held by
this process with asyncio; the server's RSS comes from C{/proc}.
"""

from __future__ import annotations

import asyncio
import gc
import time
from typing import Any

from bench.loadgen import Connection, SSEReader, open_legacy_stream, percentile, process_cpu


async def _open_many(
    target: dict[str, Any], token: str, count: int, parallel: int = 100
) -> tuple[list[tuple[Connection, SSEReader]], int]:
    gate = asyncio.Semaphore(parallel)
    opened: list[tuple[Connection, SSEReader]] = []
    failures = 0

    async def one() -> None:
        nonlocal failures
        async with gate:
            try:
                opened.append(await asyncio.wait_for(open_legacy_stream(target, token), 30))
            except Exception:
                failures += 1

    await asyncio.gather(*(one() for _ in range(count)))
    return opened, failures


async def _settle(server: Any, seconds: float) -> int:
    """The server's RSS once it has been quiet for C{seconds}."""
    await asyncio.sleep(seconds)
    return int(server.rss_bytes())


async def measure(
    server: Any, token: str, counts: list[int], keepalive: float, observe: float, settle: float = 1.0
) -> dict[str, Any]:
    """
    Open streams up to each of C{counts} in turn, reading the server's RSS
    at each step; at the largest, watch the keepalives for C{observe}
    seconds.

    @param server: a L{bench.servers.OAuthServer} started with
        C{--keepalive keepalive}.
    """
    target = server.target()
    # Warm the code paths (imports, caches) with one stream first, so the
    # baseline is a server that has served a stream.
    warm, _ = await _open_many(target, token, 1)
    for conn, _ in warm:
        conn.close()
    gc.collect()
    baseline = await _settle(server, settle)
    steps = []
    held: list[tuple[Connection, SSEReader]] = []
    total_failures = 0
    for count in sorted(counts):
        began = time.monotonic()
        more, failures = await _open_many(target, token, count - len(held))
        held.extend(more)
        total_failures += failures
        elapsed = time.monotonic() - began
        rss = await _settle(server, settle)
        steps.append(
            {
                "streams": len(held),
                "asked": count,
                "failures": failures,
                "open_seconds": elapsed,
                "server_rss_mib": rss / 2**20,
                "per_stream_kib": (rss - baseline) / max(1, len(held)) / 1024,
            }
        )
    # Keepalives: reset what was seen while opening, watch, then judge gaps.
    for _, reader in held:
        reader.keepalives.clear()
    cpu0 = process_cpu(server.pid)
    watch_began = time.monotonic()
    await asyncio.sleep(observe)
    watched = time.monotonic() - watch_began
    cpu = (process_cpu(server.pid) - cpu0) / watched
    lateness = []
    expected = max(0, int(observe // keepalive) - 1)
    short = 0
    for _, reader in held:
        times = reader.keepalives
        if len(times) < expected:
            short += 1
        lateness.extend((b - a) - keepalive for a, b in zip(times, times[1:]))
    alive = sum(1 for conn, _ in held if not conn.lost.done())
    for conn, _ in held:
        conn.close()
    p50, p99 = percentile(lateness, 0.5), percentile(lateness, 0.99)
    return {
        "baseline_rss_mib": baseline / 2**20,
        "steps": steps,
        "failures": total_failures,
        "keepalive_interval_s": keepalive,
        "observed_s": watched,
        "streams_alive": alive,
        "keepalive_gaps": len(lateness),
        "keepalive_late_p50_ms": None if p50 is None else p50 * 1000,
        "keepalive_late_p99_ms": None if p99 is None else p99 * 1000,
        "keepalive_late_max_ms": max(lateness) * 1000 if lateness else None,
        "streams_missing_keepalives": short,
        "server_cpu_idle": cpu,
    }


def run(
    server: Any, token: str, counts: list[int], keepalive: float, observe: float, settle: float = 1.0
) -> dict[str, Any]:
    return asyncio.run(measure(server, token, counts, keepalive, observe, settle))
