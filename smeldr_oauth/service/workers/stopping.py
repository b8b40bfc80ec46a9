# -*- test-case-name: tests.test_service_workers -*-
"""
How the pool's processes stop: the reactor stopped once (however many
signals arrive), and C{twist} made to exit with a failure status when the
pool could not start.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any, Callable

from twisted.internet import error


def stop_reactor(reactor: Any) -> None:
    """
    Stop the reactor unless it is stopping already (a SIGTERM came first).
    """
    try:
        reactor.stop()
    except error.ReactorNotRunning:
        pass


def exit_with_failure(reactor: Any, status: int = 1) -> None:
    """
    Stop the reactor and make the process exit with C{status} once C{twist}
    is done (it would exit 0 after a reactor stop).
    """
    import atexit

    def leave() -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(status)

    # Registered last, so it runs first among the exit handlers, after the
    # reactor and twist are done.
    atexit.register(leave)
    stop_reactor(reactor)


def ignore_repeated_stop_signals() -> None:
    """
    Let SIGTERM and SIGINT reach the reactor's handlers once, then ignore
    them: a worker often gets both its parent's SIGTERM and the signal the
    parent got (Ctrl-C reaches the whole process group, some platforms
    signal every process), and a second C{reactor.stop()} is logged as a
    critical error.  A worker that hangs while stopping is still killed by
    its parent (L{Supervisor.kill_after
    <smeldr_oauth.service.workers.supervisor.Supervisor.kill_after>}), and
    the parent's own stop is bounded by that.
    """
    for number in (signal.SIGTERM, signal.SIGINT):
        handler = signal.getsignal(number)
        if callable(handler):
            signal.signal(number, _once(handler))


def _once(handler: Callable[[int, Any], Any]) -> Callable[[int, Any], None]:
    def first(number: int, frame: Any) -> None:
        for other in (signal.SIGTERM, signal.SIGINT):
            signal.signal(other, signal.SIG_IGN)
        handler(number, frame)

    return first
