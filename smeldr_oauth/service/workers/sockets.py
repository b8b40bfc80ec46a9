# -*- test-case-name: tests.test_service_workers -*-
"""
The sockets the pool shares: what a C{--listen} description listens on,
the parent's listening sockets (open, never accepting), and how a child
accepts from the socket it adopted.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import Any, Optional

import attr
from twisted.internet import error
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

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


def socket_family(fd: int) -> int:
    """
    The address family of the socket at C{fd} (which stays open).
    """
    probe = socket.socket(fileno=fd)
    try:
        return int(probe.family)
    finally:
        probe.detach()
