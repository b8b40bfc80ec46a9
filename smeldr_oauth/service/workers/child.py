# -*- test-case-name: tests.test_service_workers -*-
"""
A child of C{--workers N} (L{WorkerListeners}): the ordinary service,
started with the parent's command line plus the hidden argument naming the
descriptors it was given (L{WorkerSpec}):

  - one listening socket per C{--listen}, in order, from descriptor 3 on,
    which it adopts;
  - a I{lifeline} (L{smeldr_oauth.service.lifeline}): end of file on it
    means the parent is gone (even by C{kill -9}), and the child stops;
  - a I{status} pipe back to the parent, where the child writes C{ready}
    once it serves.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python.failure import Failure

from smeldr_oauth.service.lifeline import connect_to_parent
from smeldr_oauth.service.workers.sockets import accept_one_at_a_time, listener_kind, socket_family
from smeldr_oauth.service.workers.spec import READY, WorkerSpec
from smeldr_oauth.service.workers.stopping import ignore_repeated_stop_signals, stop_reactor

log = Logger()


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
        from twisted.protocols.tls import TLSMemoryBIOFactory

        super().startService()
        for fd, description in zip(self.spec.listening, self.descriptions):
            kind = listener_kind(description)
            factory = self.factory
            if kind is not None and kind.tls is not None:
                factory = TLSMemoryBIOFactory(kind.tls, False, factory)
            family = socket_family(fd)
            port = self.reactor.adoptStreamPort(fd, family, factory)
            accept_one_at_a_time(port)
            self.ports.append(port)
            # adoptStreamPort serves a duplicate of it.
            os.close(fd)
        self._control = connect_to_parent(self.reactor, self.spec.lifeline, self.spec.status, self._parent_gone)
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
