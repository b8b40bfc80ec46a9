# -*- test-case-name: tests.test_web_transport -*-
"""
Answers sent when the reactor's turn ends: a TCP server transport that
gathers what a turn writes and sends it in one C{send} per connection after
the turn's events are handled, instead of registering the socket for
writing and sending on the next turn (C{docs/performance.md}, "Round nine:
answers sent when the reactor's turn ends").

Twisted's stock transport buffers every write and registers the socket for
writability (C{startWriting}: an C{epoll_ctl}); the reactor's next turn
returns from C{epoll_wait} with the socket writable, sends the bytes
(C{doWrite}) and unregisters (C{stopWriting}: another C{epoll_ctl}).  An
answer of a few hundred bytes therefore costs two system calls and one more
reactor turn, for bytes the kernel would have taken at once.  Round eight
sent each write at once instead: fewer system calls, but under 50
connections each answer went out in the middle of the turn, the clients'
next requests arrived one by one, and the server paid a reactor turn per
request (15-18 us a request more).  The stock deferred write is also a
batch (a turn's answers go out together on the next turn); this keeps the
batch and drops the system calls around it:

  - L{TurnEnd}, one per reactor, is one C{callLater(0)} per turn that has
    gathered anything.  The reactor runs it after the turn's events are
    handled (C{runUntilCurrent} follows C{doIteration}) and before its next
    C{epoll_wait}: the answers of a turn go out together, as they did on the
    next turn, but without the writer's registration, its removal and the
    C{epoll_wait} return between them;
  - L{Gathering.write} gathers (no system call) while the stock transport
    has nothing in hand: nothing buffered and no writer registered, no close
    or half-close asked for, no pull producer (resumed from C{doWrite}
    only) nor paused streaming producer, and less than C{bufferSize}
    gathered (a streaming producer is paused by the stock buffer past that).
    Anything else takes the stock path, with whatever was gathered first, so
    the bytes keep their order;
  - at the turn's end each connection's bytes are joined and sent; what the
    kernel does not take is handed to the stock C{write} (buffered, the
    writer registered, exactly as before).  A failed send (reset, C{EPIPE})
    is handed over the same way, so the reactor's next C{doWrite} finds the
    error and loses the connection through C{connectionLost}, once, as
    before.  The writes of one turn, a head and its body, an answer and
    the next pipelined one, are one C{send}; the access log line and the
    metrics, written when the request finishes, come before the answer is
    on the wire, as they did when the next turn sent it.

Only public Twisted names are used: C{tcp.Server} (subclassed),
C{writeSomeData}, C{startWriting}/C{stopWriting}, C{loseConnection},
C{loseWriteConnection}, C{abortConnection}, C{registerProducer}, the
C{connected}, C{disconnecting}, C{producer}, C{streamingProducer},
C{producerPaused}, C{bufferSize} and C{reactor} attributes, and the
reactor's C{callLater}.  The stock transport's state is followed through its
own calls (C{startWriting} means it holds something to send) rather than
read from its private buffers; C{tests.test_web_transport} fails if Twisted
stops making those calls.

L{adopt} changes only an exact C{tcp.Server}: TLS (the channel's transport
is the TLS protocol), UNIX sockets (their writes may carry descriptors) and
anything else keep their transport, deliberately.
"""

from __future__ import annotations

import weakref
from typing import Any, Iterable, Optional

from twisted.internet import tcp


class TurnEnd:
    """
    The connections of one reactor that gathered bytes in this turn, sent
    by one C{callLater(0)} when the turn's events are handled.
    """

    def __init__(self, reactor: Any) -> None:
        self._callLater = reactor.callLater
        self._waiting: list[Gathering] = []
        self._call: Any = None

    def add(self, connection: "Gathering") -> None:
        """Send C{connection}'s gathered bytes when this turn ends."""
        self._waiting.append(connection)
        if self._call is None:
            self._call = self._callLater(0, self.send)

    def send(self) -> None:
        """Send what every waiting connection gathered."""
        self._call = None
        waiting, self._waiting = self._waiting, []
        for connection in waiting:
            connection.sendGathered()


_turnEnds: "weakref.WeakKeyDictionary[Any, TurnEnd]" = weakref.WeakKeyDictionary()


def turnEnd(reactor: Any) -> TurnEnd:
    """The L{TurnEnd} of C{reactor}."""
    found = _turnEnds.get(reactor)
    if found is None:
        found = _turnEnds[reactor] = TurnEnd(reactor)
    return found


class Gathering(tcp.Server):
    """
    A TCP server connection whose writes are gathered and sent when the
    reactor's turn ends, when the stock transport has nothing in hand;
    otherwise exactly the stock transport.
    """

    #: The bytes written in this turn, to be sent when it ends, or C{None}.
    _gathered: Optional[list[bytes]] = None
    _gatheredLength = 0
    #: The stock transport has asked the reactor for writability: it holds
    #: bytes to send, or a close, a half-close or a pull producer waits.
    _writing = False
    #: C{loseWriteConnection} was called: no more sends of our own.
    _halfClosed = False
    _turnEnd: TurnEnd

    def startWriting(self) -> None:
        self._writing = True
        super().startWriting()

    def stopWriting(self) -> None:
        self._writing = False
        super().stopWriting()

    def _mayGather(self, length: int) -> bool:
        producer = self.producer
        return bool(
            self.connected
            and not self.disconnecting
            and not self._writing
            and not self._halfClosed
            and (producer is None or (self.streamingProducer and not self.producerPaused))
            and self._gatheredLength + length <= self.bufferSize
        )

    def write(self, data: bytes) -> None:
        if type(data) is bytes and data and self._mayGather(len(data)):
            gathered = self._gathered
            if gathered is None:
                self._gathered = [data]
                self._turnEnd.add(self)
            else:
                gathered.append(data)
            self._gatheredLength += len(data)
            return
        self._handOver()
        super().write(data)

    def writeSequence(self, iovec: Iterable[bytes]) -> None:
        iovec = list(iovec)
        for data in iovec:
            if not isinstance(data, bytes):
                raise TypeError("Data must be bytes")
        length = sum(map(len, iovec))
        if length and self._mayGather(length):
            gathered = self._gathered
            if gathered is None:
                self._gathered = iovec
                self._turnEnd.add(self)
            else:
                gathered.extend(iovec)
            self._gatheredLength += length
            return
        self._handOver()
        super().writeSequence(iovec)

    def _handOver(self) -> None:
        """Give what was gathered to the stock transport, to keep the order."""
        gathered = self._gathered
        if gathered:
            self._gathered = None
            self._gatheredLength = 0
            super().writeSequence(gathered)

    def sendGathered(self) -> None:
        """
        The turn has ended: send what was gathered, in one C{send}; what the
        kernel does not take, or a failed send, goes to the stock transport.
        """
        gathered = self._gathered
        if not gathered:
            return
        self._gathered = None
        self._gatheredLength = 0
        if not self.connected:
            return
        data = gathered[0] if len(gathered) == 1 else b"".join(gathered)
        sent = self.writeSomeData(data)
        if type(sent) is int:
            if sent == len(data):
                return
            data = data[sent:]
        # Partly sent, or the connection is gone: the stock path buffers
        # the rest and its doWrite sends it, or finds the error and loses
        # the connection as usual, on the reactor's next turn.
        super().write(data)

    def loseConnection(self) -> None:
        self._handOver()
        super().loseConnection()

    def loseWriteConnection(self) -> None:
        self._handOver()
        self._halfClosed = True
        super().loseWriteConnection()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self._handOver()
        super().registerProducer(producer, streaming)

    def abortConnection(self) -> None:
        self._gathered = None
        self._gatheredLength = 0
        super().abortConnection()

    def connectionLost(self, reason: Any) -> None:
        self._gathered = None
        self._gatheredLength = 0
        super().connectionLost(reason)


def adopt(transport: Any) -> bool:
    """
    Make a plain accepted TCP connection a L{Gathering}; leave any other
    transport as it is.  C{True} when adopted (now or before).
    """
    kind = type(transport)
    if kind is Gathering:
        return True
    if kind is tcp.Server:
        transport._turnEnd = turnEnd(transport.reactor)
        transport.__class__ = Gathering
        return True
    return False
