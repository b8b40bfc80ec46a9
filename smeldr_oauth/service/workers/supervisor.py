# -*- test-case-name: tests.test_service_workers -*-
"""
The parent of C{--workers N} (L{Supervisor}): it listens, starts the
children with the shared sockets and their two pipes, restarts a child
that dies, and stops them all.

Start-up policy: a child that ends before it ever said C{ready} (a
database it cannot reach, a port it cannot adopt, a broken C{--app}) makes
the whole pool stop and C{twist} exit with status 1: the next child would
fail the same way, and a server that restarts forever at start-up hides
the one line that says why.  A child that was ready once and then dies is
restarted, with a delay that doubles while its replacements keep dying
quickly (L{Supervisor.min_delay} to L{Supervisor.max_delay}), for as long
as the parent runs: a runtime failure (a database restart) is usually
transient, and the other children serve meanwhile.

Twisted's own L{twisted.runner.procmon.ProcessMonitor} has the restart
policy but cannot pass descriptors to its children (no C{childFDs}), hence
this module.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

import attr
from twisted.application.service import Service
from twisted.internet import error
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from smeldr_oauth.service.lifeline import child_pipes
from smeldr_oauth.service.workers.sockets import open_shared_listeners
from smeldr_oauth.service.workers.spec import READY, WorkerSpec
from smeldr_oauth.service.workers.stopping import stop_reactor

log = Logger()


def _cancelling(result: Any, call: Any) -> Any:
    if call.active():
        call.cancel()
    return result


def describe_exit(reason: Failure) -> str:
    """
    How a child ended, in words: C{"exit status 3"}, C{"signal 9 (SIGKILL)"}.
    """
    value = reason.value
    number = getattr(value, "signal", None)
    if number:
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = "?"
        return f"signal {number} ({name})"
    return f"exit status {getattr(value, 'exitCode', 0) or 0}"


@attr.s(auto_attribs=True)
class _Slot:
    """
    One place in the pool, and the child that holds it now.
    """

    index: int
    process: Any = None
    pid: Optional[int] = None
    started_at: float = 0.0
    ready: bool = False
    ever_ready: bool = False
    quick_deaths: int = 0
    restart: Any = None
    start_timeout: Any = None
    ended: Optional["Deferred[None]"] = None


class _ChildProtocol(ProcessProtocol):
    def __init__(self, supervisor: "Supervisor", slot: _Slot, status_fd: int) -> None:
        self.supervisor = supervisor
        self.slot = slot
        self.status_fd = status_fd
        self.buffer = b""

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD != self.status_fd:
            return
        self.buffer = (self.buffer + data)[-64:]
        if READY in self.buffer:
            self.buffer = b""
            self.supervisor._child_ready(self.slot)

    def processEnded(self, reason: Failure) -> None:
        self.supervisor._child_ended(self.slot, reason)


class Supervisor(Service):
    """
    The parent of C{--workers N}: listens, keeps N children serving, stops
    them.

    @ivar failed: The pool could not start (see the module's start-up
        policy); C{twist} should exit with a failure status.
    @ivar listeners: The shared listening ports, once started.
    """

    #: Seconds before restarting a child that died after a stable run.
    min_delay = 1.0
    #: The longest delay between restarts of children that keep dying.
    max_delay = 30.0
    #: A child that served this long before dying was "stable": the next
    #: restart waits L{min_delay} again.
    stable_after = 30.0
    #: A child not ready after this long is killed (and counts as failed).
    start_timeout = 60.0
    #: Seconds between SIGTERM and SIGKILL when stopping.
    kill_after = 10.0

    def __init__(
        self,
        reactor: Any,
        count: int,
        descriptions: Sequence[str],
        command: Callable[[WorkerSpec], list[str]],
        env: Optional[Mapping[str, str]] = None,
        on_failure: Optional[Callable[[], None]] = None,
        listen: Callable[[Any, Sequence[str]], list[IListeningPort]] = open_shared_listeners,
        stdio: Optional[Mapping[int, int]] = None,
    ) -> None:
        """
        @param command: The child's command line (executable first) for a
            spec; it must hand the spec to the child (L{WorkerSpec.argument}).
        @param env: The children's environment [default: this process's].
        @param on_failure: Called once when the pool cannot start [default:
            stop the reactor].
        @param listen: Opens the shared sockets (L{open_shared_listeners}).
        @param stdio: The children's descriptors 0, 1 and 2, as descriptors
            of this process [default: the same as this process's, so their
            log goes where the parent's goes].
        """
        self.reactor = reactor
        self.count = count
        self.descriptions = list(descriptions)
        self.command = command
        self.env = dict(os.environ if env is None else env)
        self.on_failure = on_failure if on_failure is not None else lambda: stop_reactor(reactor)
        self._listen = listen
        self._stdio = dict({0: 0, 1: 1, 2: 2} if stdio is None else stdio)
        self.listeners: list[IListeningPort] = []
        self.failed = False
        self._slots = [_Slot(index) for index in range(count)]
        self._stopping = False
        self._waiting_ready: list[Deferred[None]] = []

    # -- lifecycle

    def privilegedStartService(self) -> None:
        """
        Open the listening sockets (before privileges are dropped, where a
        runner such as C{twistd} drops them; C{twist} goes straight to
        L{startService}).
        """
        super().privilegedStartService()
        self._open()

    def _open(self) -> bool:
        if self.listeners or self.failed:
            return not self.failed
        try:
            self.listeners = self._listen(self.reactor, self.descriptions)
        except error.CannotListenError as e:
            log.critical("cannot listen: {error}; stopping", error=str(e))
            self._fail()
            return False
        return True

    def startService(self) -> None:
        if not self._open():
            return
        super().startService()
        log.info(
            "starting {count} workers on {listeners}",
            count=self.count,
            listeners=", ".join(self.descriptions),
        )
        # Children are reaped through the reactor's SIGCHLD handling, which
        # is in place once it runs.
        self.reactor.callWhenRunning(self._start_all)

    def stopService(self) -> "Deferred[None]":
        """
        SIGTERM every child, SIGKILL those still running after
        L{kill_after} seconds, then close the sockets.
        """
        super().stopService()
        self._stopping = True
        waits = []
        for slot in self._slots:
            for call in (slot.restart, slot.start_timeout):
                if call is not None and call.active():
                    call.cancel()
            if slot.process is not None and slot.ended is not None:
                waits.append(slot.ended)
                self._signal(slot, "TERM")
                killer = self.reactor.callLater(
                    self.kill_after, self._kill, slot, f"still running {self.kill_after:g}s after SIGTERM"
                )
                slot.ended.addBoth(_cancelling, killer)
        if waits:
            log.info("stopping {count} workers", count=len(waits))

        def close(_: Any) -> "Deferred[Any]":
            ports, self.listeners = self.listeners, []
            return DeferredList([maybeDeferred(port.stopListening) for port in ports])

        done: Deferred[Any] = DeferredList(waits).addCallback(close)
        return done.addCallback(lambda _: None)

    def ready(self) -> "Deferred[None]":
        """
        Fires when every slot has a child that said it is ready (at once if
        they all have).
        """
        if all(slot.ready for slot in self._slots):
            return succeed(None)
        waiting: Deferred[None] = Deferred()
        self._waiting_ready.append(waiting)
        return waiting

    def pids(self) -> list[Optional[int]]:
        """
        The pid of the child in each slot (C{None} while it waits to be
        restarted).
        """
        return [slot.pid for slot in self._slots]

    def running_children(self) -> int:
        """
        How many children are running now.
        """
        return sum(1 for slot in self._slots if slot.process is not None)

    # -- children

    def _start_all(self) -> None:
        for slot in self._slots:
            if self._stopping:
                return
            self._spawn(slot)

    def _spawn(self, slot: _Slot) -> None:
        slot.restart = None
        spec = WorkerSpec.for_slot(slot.index, len(self.listeners))
        child_fds: dict[int, Any] = dict(self._stdio)
        for fd, port in zip(spec.listening, self.listeners):
            child_fds[fd] = port.fileno()  # type: ignore[attr-defined]
        child_fds.update(child_pipes(spec.lifeline, spec.status))
        argv = self.command(spec)
        protocol = _ChildProtocol(self, slot, spec.status)
        slot.ready = False
        slot.ended = Deferred()
        slot.started_at = self.reactor.seconds()
        try:
            slot.process = self.reactor.spawnProcess(
                protocol, argv[0], argv, env=self.env, childFDs=child_fds
            )
        except Exception as e:
            slot.ended = None
            log.critical("worker {index} could not be started: {error}", index=slot.index, error=str(e))
            self._fail()
            return
        slot.pid = slot.process.pid
        slot.start_timeout = self.reactor.callLater(
            self.start_timeout, self._kill, slot, f"not ready after {self.start_timeout:g}s"
        )
        log.info("worker {index} started (pid {pid})", index=slot.index, pid=slot.pid)

    def _child_ready(self, slot: _Slot) -> None:
        if slot.ready or slot.process is None:
            return
        slot.ready = True
        slot.ever_ready = True
        if slot.start_timeout is not None and slot.start_timeout.active():
            slot.start_timeout.cancel()
        log.info("worker {index} ready (pid {pid})", index=slot.index, pid=slot.pid)
        if all(s.ready for s in self._slots):
            waiting, self._waiting_ready = self._waiting_ready, []
            for d in waiting:
                d.callback(None)

    def _child_ended(self, slot: _Slot, reason: Failure) -> None:
        pid, was_ready, ran = slot.pid, slot.ready, self.reactor.seconds() - slot.started_at
        ended, slot.ended = slot.ended, None
        slot.process = None
        slot.pid = None
        slot.ready = False
        if slot.start_timeout is not None and slot.start_timeout.active():
            slot.start_timeout.cancel()
        how = describe_exit(reason)
        restart = not self._stopping and not self.failed and slot.ever_ready
        delay = None
        if restart:
            if was_ready and ran >= self.stable_after:
                slot.quick_deaths = 0
            delay = min(self.max_delay, self.min_delay * 2**slot.quick_deaths)
            slot.quick_deaths += 1
        # The metrics count this event (smeldr_event) and forget the
        # child's live gauges.
        log_event = {"smeldr_event": "worker_exited", "pid": pid, "index": slot.index, "restarting": restart}
        if self._stopping:
            log.info("worker {index} (pid {pid}) stopped: {how}", how=how, **log_event)
        elif restart:
            slot.restart = self.reactor.callLater(delay, self._spawn, slot)
            log.warn(
                "worker {index} (pid {pid}) ended ({how}); restarting it in {delay:g}s",
                how=how,
                delay=delay,
                **log_event,
            )
        elif not self.failed:
            log.critical(
                "worker {index} (pid {pid}) ended before it was ready ({how}); its log above says "
                "why. Not restarting it (a new one would fail the same way): stopping",
                how=how,
                **log_event,
            )
            self._fail()
        else:
            log.info("worker {index} (pid {pid}) ended: {how}", how=how, **log_event)
        if ended is not None:
            ended.callback(None)

    def _fail(self) -> None:
        if self.failed:
            return
        self.failed = True
        # Start-up failures can happen before the reactor runs, when it
        # cannot be stopped yet.
        self.reactor.callWhenRunning(self.on_failure)
        waiting, self._waiting_ready = self._waiting_ready, []
        for d in waiting:
            d.errback(RuntimeError("the worker pool could not start"))

    def _signal(self, slot: _Slot, name: str) -> None:
        if slot.process is None:
            return
        try:
            slot.process.signalProcess(name)
        except error.ProcessExitedAlready:
            pass

    def _kill(self, slot: _Slot, why: str) -> None:
        if slot.process is not None:
            log.warn("worker {index} (pid {pid}) {why}: SIGKILL", index=slot.index, pid=slot.pid, why=why)
            self._signal(slot, "KILL")
