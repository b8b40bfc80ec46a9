"""
Real worker processes under a L{Supervisor} in the test's own process, on
a real socket, their output in a log file beside the test's other files:
the set-up of L{tests.test_service_workers} (tiny workers and C{twist
smeldr-oauth} ones) and L{tests.test_service_affinity} (pinned workers on
PostgreSQL).  Not a test module (trial collects only C{test_*}).

Why here: the set-up (the log, the children's descriptors, the service
stopped at the test's end, the log shown when the pool cannot start) was
written twice, and a fix to one (a cleanup, a timeout) missed the other.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

import attr
from twisted.internet import reactor

from smeldr_oauth.service.workers import Supervisor, WorkerSpec
from tests import e2e

#: Where the workers listen: a free port on the loopback.
LISTEN = "tcp:0:interface=127.0.0.1"


@attr.s(auto_attribs=True, frozen=True)
class Supervised:
    """A started L{Supervisor} and its workers' log."""

    supervisor: Supervisor
    log_path: str

    def log(self) -> str:
        """Everything the workers have written so far."""
        with open(self.log_path) as f:
            return f.read()

    def port(self) -> int:
        """The port of the pool's first listener."""
        return self.supervisor.listeners[0].getHost().port  # type: ignore[attr-defined, no-any-return]


def supervise(
    case: Any,
    count: int,
    descriptions: Sequence[str],
    command: Callable[[WorkerSpec], list[str]],
    env: Optional[Mapping[str, str]] = None,
    on_failure: Callable[[], None] = lambda: None,
) -> Supervised:
    """
    Start C{count} workers made by C{command} on C{descriptions} (their
    environment C{env}, else the suite's subprocess one), their standard
    output and error in a log file of the test C{case}'s; the pool is
    stopped when the test ends.
    """
    log = open(os.path.abspath(case.mktemp()) + ".log", "wb")
    case.addCleanup(log.close)
    supervisor = Supervisor(
        reactor,
        count,
        list(descriptions),
        command,
        env=e2e.subprocessEnvironment() if env is None else env,
        on_failure=on_failure,
        stdio={0: 0, 1: log.fileno(), 2: log.fileno()},
    )
    supervisor.startService()
    case.addCleanup(supervisor.stopService)
    return Supervised(supervisor, log.name)


async def twist_workers(
    case: Any, count: int, arguments: Sequence[str], env: Optional[Mapping[str, str]] = None
) -> Supervised:
    """
    C{count} real C{twist smeldr-oauth} workers with these C{arguments}
    (C{--listen} is L{LISTEN}'s), each given its hidden worker argument,
    once they are all ready; the test fails with their log if they cannot
    start.
    """

    def command(spec: WorkerSpec) -> list[str]:
        return [
            sys.executable, "-m", "twisted", "--log-format=text", "smeldr-oauth",
            "--listen", LISTEN, *arguments, spec.argument(),
        ]

    supervised = supervise(case, count, [LISTEN], command, env)
    try:
        await supervised.supervisor.ready().addTimeout(90, reactor)
    except RuntimeError:
        case.fail(supervised.log())
    return supervised
