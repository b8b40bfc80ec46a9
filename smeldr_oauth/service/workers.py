# -*- test-case-name: tests.test_service_workers -*-
"""
C{--workers N}: one C{twist smeldr-oauth} on every core.

The usual Twisted way (the "Using Processes" HOWTO and the web server's
"multiple processes" recipe): the parent creates the listening sockets, and
N children each C{adoptStreamPort} the inherited descriptors. The kernel
hands every connection to whichever child accepts it first; no
C{SO_REUSEPORT} and no proxy in between.

The parent (L{Supervisor}) never answers HTTP: it listens, starts the
children, restarts a child that dies, stops them all on SIGTERM or SIGINT,
and serves the aggregate metrics. The children (L{WorkerListeners}) are the
ordinary service, started with the same command line plus one hidden
argument (L{WORKER_OPTION}) naming the descriptors they were given:

  - one listening socket per C{--listen}, in order, from descriptor 3 on;
  - a I{lifeline}: the read end of a pipe whose write end only the parent
    holds. End of file on it means the parent is gone (even by C{kill
    -9}): the child stops. Portable, and it needs no signal handling in
    the child before its reactor runs (the end of file waits for it);
  - a I{status} pipe back to the parent, where the child writes
    C{ready} once it serves.

Start-up policy: a child that ends before it ever said C{ready} (a
database it cannot reach, a port it cannot adopt, a broken C{--app}) makes
the whole pool stop and C{twist} exit with status 1: the next child would
fail the same way, and a server that restarts forever at start-up hides
the one line that says why. A child that was ready once and then dies is
restarted, with a delay that doubles while its replacements keep dying
quickly (L{Supervisor.min_delay} to L{Supervisor.max_delay}), for as long
as the parent runs: a runtime failure (a database restart) is usually
transient, and the other children serve meanwhile.

Twisted's own L{twisted.runner.procmon.ProcessMonitor} has the restart
policy but cannot pass descriptors to its children (no C{childFDs}), hence
this module.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

import attr
from twisted.application.service import MultiService, Service
from twisted.internet import error
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

log = Logger()

#: The hidden argument a child is started with (always the last one).
WORKER_OPTION = "--smeldr-worker"

#: The first descriptor a child finds its listening sockets at.
FIRST_LISTENING_FD = 3

#: What a child writes on its status pipe once it serves.
READY = b"ready\n"


def worker_count(value: str) -> int:
    """
    The C{--workers} value: a whole number of processes, at least one.
    """
    try:
        number = int(value)
    except ValueError:
        raise usage.UsageError(f"--workers must be a whole number of processes, got {value!r}")
    if number < 1:
        raise usage.UsageError(f"--workers must be at least 1, got {value!r}")
    return number


@attr.s(auto_attribs=True, frozen=True)
class WorkerSpec:
    """
    What a child was given by its parent: the descriptors it inherited.

    @ivar index: The child's place in the pool, C{0} to C{N-1}; a restarted
        child keeps the index of the one it replaces.
    @ivar listening: One listening socket per C{--listen}, in order.
    @ivar lifeline: Read end of a pipe only the parent writes to: end of
        file means the parent is gone.
    @ivar status: Write end of a pipe the parent reads: L{READY} goes there.
    """

    index: int
    listening: tuple[int, ...]
    lifeline: int
    status: int

    @classmethod
    def for_slot(cls, index: int, listeners: int) -> "WorkerSpec":
        """
        The descriptors a child in slot C{index} gets, with C{listeners}
        listening sockets: those from L{FIRST_LISTENING_FD} on, then the
        lifeline, then the status pipe.
        """
        first = FIRST_LISTENING_FD
        return cls(
            index=index,
            listening=tuple(range(first, first + listeners)),
            lifeline=first + listeners,
            status=first + listeners + 1,
        )

    def argument(self) -> str:
        """
        This spec as the hidden command-line argument.
        """
        value = {"index": self.index, "listen": list(self.listening), "lifeline": self.lifeline, "status": self.status}
        return f"{WORKER_OPTION}={json.dumps(value, separators=(',', ':'))}"

    @classmethod
    def parse(cls, value: str) -> "WorkerSpec":
        """
        The spec in L{argument}'s value.

        @raise ValueError: It is not one.
        """
        try:
            data = json.loads(value)
            spec = cls(
                index=_descriptor(data["index"]),
                listening=tuple(_descriptor(fd) for fd in data["listen"]),
                lifeline=_descriptor(data["lifeline"]),
                status=_descriptor(data["status"]),
            )
        except (TypeError, KeyError, ValueError) as e:
            raise ValueError(f"{WORKER_OPTION} is for the worker processes --workers starts ({e})") from None
        return spec


def _descriptor(value: Any) -> int:
    if type(value) is not int or value < 0:
        raise ValueError(f"not a descriptor: {value!r}")
    return value


def take_worker_argument(argv: Sequence[str]) -> tuple[list[str], Optional[WorkerSpec]]:
    """
    Split the hidden L{WORKER_OPTION} off a command line.

    It is not an ordinary option so that C{--help} does not offer it: it is
    only meaningful with the descriptors a parent set up.

    @return: The other arguments, and the spec (C{None} in the parent or a
        single process).
    @raise usage.UsageError: The argument is malformed.
    """
    rest: list[str] = []
    spec = None
    prefix = WORKER_OPTION + "="
    for argument in argv:
        if argument.startswith(prefix):
            try:
                spec = WorkerSpec.parse(argument[len(prefix) :])
            except ValueError as e:
                raise usage.UsageError(str(e))
        else:
            rest.append(argument)
    return rest, spec


# --- What a --listen description listens on ----------------------------------------------

#: The listeners --workers shares.  Not C{unix:}: Twisted's UNIX port
#: removes its socket file when it closes, even an adopted one, so one
#: worker stopping would take the path away from the others (and
#: C{systemd:} sockets are adopted, which may be UNIX ones).
SHAREABLE = frozenset({"tcp", "ssl"})


@attr.s(auto_attribs=True, frozen=True)
class ListenerKind:
    """
    How an endpoint description listens.

    @ivar kind: C{"tcp"}, C{"ssl"}, C{"unix"} or C{"adopted"} (an inherited
        socket, as C{systemd:} endpoints are).
    @ivar tls: For C{ssl}, the server's TLS context factory: a child wraps
        the socket it adopts in it, as C{listenSSL} would have.
    """

    kind: str
    tls: Any = None


class _ListenRecorder:
    """
    A stand-in reactor that records what an endpoint would listen on,
    instead of listening: the public way to read an endpoint description
    as Twisted parses it (the same C{serverFromString}, the same
    certificate loading for C{ssl:}).
    """

    def __init__(self) -> None:
        self.kind: Optional[ListenerKind] = None

    def listenTCP(self, *args: Any, **kwargs: Any) -> None:
        self.kind = ListenerKind("tcp")

    def listenSSL(self, port: Any, factory: Any, contextFactory: Any, *args: Any, **kwargs: Any) -> None:
        self.kind = ListenerKind("ssl", contextFactory)

    def listenUNIX(self, *args: Any, **kwargs: Any) -> None:
        self.kind = ListenerKind("unix")

    def adoptStreamPort(self, *args: Any, **kwargs: Any) -> None:
        self.kind = ListenerKind("adopted")


def listener_kind(description: str) -> Optional[ListenerKind]:
    """
    What C{description} listens on, or C{None} when it is not a stream
    socket a child could adopt (an endpoint plugin that does something
    else).
    """
    recorder = _ListenRecorder()
    try:
        endpoint = serverFromString(recorder, description)
    except Exception:
        return None
    outcome: list[Any] = []
    endpoint.listen(Factory()).addBoth(outcome.append)
    if outcome and isinstance(outcome[0], Failure):
        return None
    return recorder.kind


def shared_store_problem(options: Mapping[str, Any]) -> Optional[str]:
    """
    Why the store these options select cannot be shared by several worker
    processes, or C{None} when it can.

    The one place that decides it: every store option answers here.
    PostgreSQL (C{--database}) can be shared.  SQLite files (C{--oauth-db},
    C{--site-db}) cannot: one process owns them (one writer at a time, and
    the state that other processes reach through PostgreSQL, such as
    revocations pushed with C{NOTIFY}, would only be polled).
    """
    if options.get("database"):
        return None
    return (
        "--workers above 1 needs --database postgresql://...: the SQLite files "
        "(--oauth-db, --site-db) must be served by one process"
    )


def check_options(options: Mapping[str, Any]) -> None:
    """
    Refuse, in one line, what C{--workers} cannot do with these options.

    @raise usage.UsageError: With the reason.
    """
    if options["workers"] <= 1 or options.get("worker") is not None:
        return
    problem = shared_store_problem(options)
    if problem is not None:
        raise usage.UsageError(problem)
    for description in options["listen"]:
        kind = listener_kind(description)
        if kind is None or kind.kind not in SHAREABLE:
            raise usage.UsageError(f"--listen {description!r} cannot be shared by --workers: use tcp:, tcp6: or ssl:")


# --- The parent ---------------------------------------------------------------------------


class _Refuse(Factory):
    """
    The factory the parent listens with: it never accepts (its sockets
    stop reading at once), and would close anything it did.
    """

    noisy = False

    def logPrefix(self) -> str:
        return "shared socket (for the workers)"

    def buildProtocol(self, addr: Any) -> Optional[Protocol]:
        return None


def open_shared_listeners(reactor: Any, descriptions: Sequence[str]) -> list[IListeningPort]:
    """
    Listen on every description, as a single process would, then stop
    accepting: the sockets are there for the children.

    @raise error.CannotListenError: One of them cannot listen (the port is
        in use, the address is not ours); those opened so far are closed.
    """
    ports: list[IListeningPort] = []
    for description in descriptions:
        outcome: list[Any] = []
        serverFromString(reactor, description).listen(_Refuse()).addBoth(outcome.append)
        reason: Any = None
        if not outcome:
            reason = "it did not listen at once"
        elif isinstance(outcome[0], Failure):
            reason = outcome[0].value
        else:
            ports.append(outcome[0])
            if not hasattr(outcome[0], "fileno"):
                reason = "it is not a socket"
        if reason is not None:
            for port in ports:
                port.stopListening()
            raise error.CannotListenError(None, description, reason)
        outcome[0].stopReading()
    return ports


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
        child_fds[spec.lifeline] = "w"
        child_fds[spec.status] = "r"
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


# --- The child ----------------------------------------------------------------------------


class _Lifeline(Protocol):
    """
    The child's end of its two pipes to the parent: end of file on the
    lifeline means the parent is gone.
    """

    def __init__(self, gone: Callable[[], None]) -> None:
        self.gone = gone

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.gone()


class WorkerListeners(Service):
    """
    A child's side: serve C{factory} on the sockets the parent gave it,
    tell the parent when it is ready, stop when the parent is gone.
    """

    #: After the parent is gone, the most seconds a clean stop may take.
    orphan_deadline = 30.0

    def __init__(
        self,
        reactor: Any,
        spec: WorkerSpec,
        descriptions: Sequence[str],
        factory: Any,
        ready: Callable[[], "Deferred[Any]"] = lambda: succeed(None),
    ) -> None:
        """
        @param descriptions: The C{--listen} descriptions, in the parent's
            order: C{ssl:} ones are wrapped in TLS here.
        @param ready: Fires when the service behind C{factory} can serve
            (its store is open); a failure is logged and not reported as
            ready, so the parent sees the child end before it was ready.
        """
        if len(descriptions) != len(spec.listening):
            raise ValueError(
                f"{len(spec.listening)} inherited sockets for {len(descriptions)} --listen descriptions"
            )
        self.reactor = reactor
        self.spec = spec
        self.descriptions = list(descriptions)
        self.factory = factory
        self._ready = ready
        self.ports: list[IListeningPort] = []
        self._control: Any = None
        self._stopping = False

    def startService(self) -> None:
        from twisted.internet.stdio import StandardIO
        from twisted.protocols.tls import TLSMemoryBIOFactory

        super().startService()
        for fd, description in zip(self.spec.listening, self.descriptions):
            kind = listener_kind(description)
            factory = self.factory
            if kind is not None and kind.tls is not None:
                factory = TLSMemoryBIOFactory(kind.tls, False, factory)
            family = _family(fd)
            port = self.reactor.adoptStreamPort(fd, family, factory)
            accept_one_at_a_time(port)
            self.ports.append(port)
            # adoptStreamPort serves a duplicate of it.
            os.close(fd)
        self._control = StandardIO(  # type: ignore[call-arg]
            _Lifeline(self._parent_gone), stdin=self.spec.lifeline, stdout=self.spec.status, reactor=self.reactor
        )
        self.reactor.callWhenRunning(self._announce)
        self.reactor.callWhenRunning(ignore_repeated_stop_signals)

    def _announce(self) -> None:
        def ready(_: Any) -> None:
            if self._control is not None and not self._stopping:
                self._control.write(READY)
                log.info(
                    "worker {index} serving (pid {pid})", index=self.spec.index, pid=os.getpid()
                )

        def failed(f: Failure) -> None:
            # The service that failed logs why, in full; this says what it
            # means for the pool.
            log.error(
                "worker {index} cannot serve: {error}", index=self.spec.index, error=f.getErrorMessage()
            )

        self._ready().addCallbacks(ready, failed)

    def _parent_gone(self) -> None:
        self._control = None
        if self._stopping:
            return
        log.warn(
            "worker {index}: the parent process is gone; stopping", index=self.spec.index
        )
        # A stop that hangs must not leave an orphan holding the port.
        self.reactor.callLater(self.orphan_deadline, os._exit, 1)
        stop_reactor(self.reactor)

    def stopService(self) -> "Deferred[Any]":
        super().stopService()
        self._stopping = True
        if self._control is not None:
            self._control.loseConnection()
        ports, self.ports = self.ports, []
        return DeferredList([port.stopListening() or succeed(None) for port in ports])


def accept_one_at_a_time(port: Any) -> None:
    """
    Make C{port} accept one connection each time it is readable, where
    Twisted accepts as many as are waiting (up to a hundred, adapting).

    Every worker is woken when a connection arrives on the shared socket;
    with batches, the first to run takes all that are waiting.  Under a
    load generator that opens its connections at once (C{wrk -c 50}, two
    workers) one worker got every connection in two runs out of three
    while the other idled; one at a time, the busier worker's share was
    52 to 63% over three runs.  The cost is one more trip through the
    reactor per accepted connection, which keep-alive makes rare.
    """
    if not hasattr(port, "numberAccepts"):
        return
    accept = port.doRead

    def doRead() -> Any:
        port.numberAccepts = 1
        return accept()

    port.doRead = doRead


def ignore_repeated_stop_signals() -> None:
    """
    Let SIGTERM and SIGINT reach the reactor's handlers once, then ignore
    them: a worker often gets both its parent's SIGTERM and the signal the
    parent got (Ctrl-C reaches the whole process group, some platforms
    signal every process), and a second C{reactor.stop()} is logged as a
    critical error.  A worker that hangs while stopping is still killed by
    its parent (L{Supervisor.kill_after}), and the parent's own stop is
    bounded by that.
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


def _family(fd: int) -> int:
    """
    The address family of the socket at C{fd} (which stays open).
    """
    probe = socket.socket(fileno=fd)
    try:
        return int(probe.family)
    finally:
        probe.detach()


# --- Wiring for twist smeldr-oauth -------------------------------------------------------


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


def stop_reactor(reactor: Any) -> None:
    """
    Stop the reactor unless it is stopping already (a SIGTERM came first).
    """
    try:
        reactor.stop()
    except error.ReactorNotRunning:
        pass


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
