"""
Not part of the suite (trial collects only C{test_*} modules): one process
of a pool, for L{tests.test_gateway_metrics}.

C{python gateway_metrics_worker.py CALLS}, with C{PROMETHEUS_MULTIPROC_DIR}
set as C{--workers} sets it for its children: the service's L{Metrics}
(multiprocess), a L{Gateway} in front of a real stdio upstream
(C{tests/upstreams/misbehaving.py}), its figures watched as the service
wiring watches them; it makes CALLS C{tools/call}s, refreshes its metrics
(a worker does every second), prints C{READY}, and stops when its stdin
closes.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.internet.stdio import StandardIO

from smeldr_oauth.gateway.config import Limits, UpstreamConfig
from smeldr_oauth.gateway.metrics import PrometheusFigures
from smeldr_oauth.gateway.proxy import Gateway
from smeldr_oauth.mcp import jsonrpc
from smeldr_oauth.mcp.calls import Outlet, Principal
from smeldr_oauth.service.metrics import Metrics

MISBEHAVING = os.path.join(os.path.dirname(os.path.abspath(__file__)), "upstreams", "misbehaving.py")
INIT = {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "pool", "version": "0"}}


class _Null(Outlet):
    can_request = False


class _UntilClosed(Protocol):
    def __init__(self) -> None:
        self.closed: Deferred = Deferred()

    def connectionLost(self, reason: Any = None) -> None:
        self.closed.callback(None)


async def main(calls: int) -> None:
    metrics = Metrics()
    assert metrics.multiprocess, "PROMETHEUS_MULTIPROC_DIR is not set"
    config = UpstreamConfig(
        name="notes", kind="stdio", command=(sys.executable, MISBEHAVING), limits=Limits(stop_grace=1)
    )
    gateway = Gateway(config, clock=reactor, reactor=reactor)
    metrics.watch(PrometheusFigures(metrics.registry, lambda: [gateway.metrics]))
    session = gateway.session(default_outlet=_Null())
    principal = Principal("alice", "client", frozenset(), None)
    await session.handle(jsonrpc.parse_message(jsonrpc.request(1, "initialize", INIT)), principal, None)
    for i in range(calls):
        request = jsonrpc.request(2 + i, "tools/call", {"name": "pid", "arguments": {}})
        await session.handle(jsonrpc.parse_message(request), principal, None)
    metrics.refresh()
    stdin = _UntilClosed()
    StandardIO(stdin)
    print("READY", flush=True)
    await stdin.closed
    await gateway.stop()


def run() -> None:
    status = []

    def go() -> None:
        d = Deferred.fromCoroutine(main(int(sys.argv[1])))
        d.addErrback(lambda f: (status.append(1), f.printTraceback(file=sys.stderr)))
        d.addBoth(lambda _: reactor.stop())  # type: ignore[attr-defined]

    reactor.callWhenRunning(go)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    sys.exit(1 if status else 0)


if __name__ == "__main__":
    run()
