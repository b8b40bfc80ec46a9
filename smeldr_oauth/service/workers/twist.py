# -*- test-case-name: tests.test_service_workers -*-
"""
C{twist smeldr-oauth --workers N}: the parent's services (the supervisor,
and the pool's metrics where C{--metrics-listen} asks for them) and a
child's (its listeners, and its gauges kept in the shared metrics files).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any, Optional

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall

from smeldr_oauth.service.workers.child import WorkerListeners
from smeldr_oauth.service.workers.spec import WorkerSpec
from smeldr_oauth.service.workers.stopping import exit_with_failure, ignore_repeated_stop_signals
from smeldr_oauth.service.workers.supervisor import Supervisor


def twist_command(subcommand: str, arguments: Sequence[str], spec: WorkerSpec) -> list[str]:
    """
    The command line of a child of C{twist ... SUBCOMMAND ARGUMENTS}: the
    same C{twist} options (log format, reactor, log file), the same
    arguments, plus the spec.  Nothing is added that was not on the
    parent's command line but the descriptors.
    """
    argv = sys.argv
    twist_options: list[str] = []
    if subcommand in argv[1:]:
        twist_options = argv[1 : argv.index(subcommand, 1)]
    return [sys.executable, "-m", "twisted", *twist_options, subcommand, *arguments, spec.argument()]


class _Pool(MultiService):
    """
    The parent's services; removes the metrics directory once the children
    have stopped.
    """

    def __init__(self, metrics_directory: Optional[str]) -> None:
        super().__init__()
        self.metrics_directory = metrics_directory

    def stopService(self) -> "Deferred[Any]":
        import shutil

        def remove(result: Any) -> Any:
            if self.metrics_directory:
                shutil.rmtree(self.metrics_directory, ignore_errors=True)
            return result

        return super().stopService().addBoth(remove)


def supervise(options: Any, reactor: Any = None) -> MultiService:
    """
    The parent's service for C{twist smeldr-oauth --workers N}.
    """
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    import tempfile

    metrics_directory = None
    env = dict(os.environ)
    if options["metrics-listen"]:
        # A private, empty directory per run (prometheus_client's
        # multiprocess mode: every child writes its own files there).
        metrics_directory = tempfile.mkdtemp(prefix="smeldr-metrics-")
        env["PROMETHEUS_MULTIPROC_DIR"] = metrics_directory
    top = _Pool(metrics_directory)

    def command(spec: WorkerSpec) -> list[str]:
        return twist_command("smeldr-oauth", options["argv"], spec)

    supervisor = Supervisor(
        reactor,
        options["workers"],
        options["listen"],
        command,
        env=env,
        on_failure=lambda: exit_with_failure(reactor),
    )
    supervisor.setServiceParent(top)
    reactor.callWhenRunning(ignore_repeated_stop_signals)
    if metrics_directory is not None:
        from twisted.application.strports import service as strports_service
        from twisted.web.server import Site

        from smeldr_oauth.service.metrics import PoolMetrics

        pool_metrics = PoolMetrics(metrics_directory, running=lambda: float(supervisor.running_children()))
        pool_metrics.observe_log().setServiceParent(top)
        strports_service(options["metrics-listen"], Site(pool_metrics.resource())).setServiceParent(top)
    return top


def serve_as_worker(options: Any, app_service: Any, reactor: Any = None) -> Service:
    """
    The listeners of a child of C{--workers}: the inherited sockets serve
    C{app_service.site}; it is ready once its OAuth store is.
    """
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    spec: WorkerSpec = options["worker"]
    metrics = getattr(app_service, "metrics", None)
    if metrics is not None:
        metrics.count_worker(spec.index)
    service = WorkerListeners(
        reactor, spec, options["listen"], app_service.site, ready=lambda: app_service.store.ready
    )
    if metrics is not None and metrics.multiprocess:
        top = MultiService()
        # First: its gauges are in the files before the child says ready.
        _Refresher(LoopingCall(metrics.refresh), reactor).setServiceParent(top)
        service.setServiceParent(top)
        return top
    return service


class _Refresher(Service):
    """
    Keeps a worker's function-backed gauges in its metrics files (the
    parent cannot call into the child at scrape time).
    """

    interval = 1.0

    def __init__(self, loop: LoopingCall, clock: Any) -> None:
        self.loop = loop
        self.loop.clock = clock

    def startService(self) -> None:
        super().startService()
        self.loop.start(self.interval, now=True)

    def stopService(self) -> Any:
        super().stopService()
        if self.loop.running:
            self.loop.stop()
