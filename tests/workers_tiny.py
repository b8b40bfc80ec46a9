"""
Not part of the suite (trial collects only C{test_*} modules): a tiny
server run by L{tests.test_service_workers} to drive
L{smeldr_oauth.service.workers} over real processes and real sockets
without a database.

  - C{python workers_tiny.py child [--fail] DESCRIPTION... --smeldr-worker=...}:
    a worker, wired by the same L{serve_as_worker} as C{twist smeldr-oauth}'s,
    whose site answers C{GET /} with its pid and records metrics like the
    real one (a constant "open streams" gauge of 1). C{--fail} ends it
    with status 3 before it is ready.
  - C{python workers_tiny.py pool N DESCRIPTION...}: a parent, a
    L{Supervisor} of N such workers that prints C{POOL <json>} (its
    port and its children's pids) once they are all ready, and stops them
    on SIGTERM as C{twist} would.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import attr
from twisted.internet import reactor
from twisted.internet.defer import succeed
from twisted.logger import globalLogBeginner, textFileLogObserver
from twisted.web.resource import Resource

from smeldr_oauth.service.metrics import Metrics
from smeldr_oauth.web.site import SmeldrSite
from smeldr_oauth.service.workers import Supervisor, serve_as_worker, take_worker_argument


class PidResource(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"text/plain")
        return str(os.getpid()).encode()


@attr.s(auto_attribs=True)
class _Store:
    @property
    def ready(self) -> Any:
        return succeed(self)


@attr.s(auto_attribs=True)
class TinyService:
    """
    What L{serve_as_worker} needs of C{StandaloneService}.
    """

    site: Any
    metrics: Metrics
    store: _Store = attr.Factory(_Store)


def child(arguments: list[str]) -> None:
    arguments, spec = take_worker_argument(arguments)
    assert spec is not None, "a child needs its --smeldr-worker argument"
    if "--fail" in arguments:
        sys.stderr.write("tiny worker: failing on purpose\n")
        sys.exit(3)
    metrics = Metrics(open_streams=lambda: 1.0)
    app = TinyService(site=SmeldrSite(PidResource(), metrics=metrics), metrics=metrics)
    service = serve_as_worker({"worker": spec, "listen": arguments}, app, reactor)
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()


def command(descriptions: list[str], fail: bool = False) -> Any:
    """
    The L{Supervisor} command that starts a tiny worker.
    """

    def build(spec: Any) -> list[str]:
        return [sys.executable, os.path.abspath(__file__), "child", *(["--fail"] if fail else []), *descriptions, spec.argument()]

    return build


def pool(count: int, descriptions: list[str]) -> None:
    supervisor = Supervisor(reactor, count, descriptions, command(descriptions))
    supervisor.startService()
    reactor.addSystemEventTrigger("before", "shutdown", supervisor.stopService)

    def report(_: Any) -> None:
        ports = [port.getHost().port for port in supervisor.listeners]  # type: ignore[attr-defined]
        sys.stdout.write("POOL " + json.dumps({"ports": ports, "pids": supervisor.pids()}) + "\n")
        sys.stdout.flush()

    supervisor.ready().addCallback(report)
    reactor.run()


if __name__ == "__main__":
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
    if sys.argv[1] == "child":
        child(sys.argv[2:])
    else:
        pool(int(sys.argv[2]), sys.argv[3:])
