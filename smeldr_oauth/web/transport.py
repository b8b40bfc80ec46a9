# -*- test-case-name: tests.test_web_transport -*-
"""
Answers written at once: a TCP server transport whose C{write} sends
straight away when nothing is waiting to be sent (C{docs/performance.md},
"Round eight: answers written at once").

Twisted's stock transport buffers every write and registers the socket for
writability (C{startWriting}: an C{epoll_ctl}); the reactor's next turn
returns from C{epoll_wait}, sends the bytes (C{doWrite}) and unregisters
(C{stopWriting}: another C{epoll_ctl}).  An answer therefore costs two
system calls, one more reactor turn and that turn's latency, for bytes the
kernel would have taken at once: an answer is a few hundred bytes and the
socket's send buffer is empty between requests.

L{WrittenAtOnce.write} tries C{send()} first when the buffer is empty,
nothing has asked to close or half-close, and no pull producer nor paused
streaming producer is registered; what the kernel does not take is buffered
and C{startWriting} called exactly as the stock transport does, so partial
sends, C{EAGAIN}, the producers' pausing (C{_maybePauseProducer}) and
C{loseConnection} after a write all take the stock path from there.  A
failed send (the peer reset the connection, C{EPIPE}) is not acted on
inside C{write()}: the bytes are buffered and the writer registered as
before, so the reactor's next turn finds the error in C{doWrite} and the
connection is lost through the normal C{connectionLost} path, once, never
re-entrantly from the application's call stack.

Why this seam (the narrowest of the three tried on paper):

  - a C{tcp.Port} subclass with C{transport = WrittenAtOnce} would need its
    own endpoint for every C{--listen} description, another for the
    workers' C{adoptStreamPort}, and the gateway bench's C{listenTCP};
  - the HTTP channel (L{smeldr_oauth.web.site.SmeldrChannel}) is built for
    every connection any of those accept, so it adopts its transport in
    C{connectionMade} with L{adopt}: one place covers C{tcp:} listeners,
    the workers' adopted sockets and any other endpoint that hands the
    site a plain TCP server connection;
  - L{adopt} changes only an exact C{tcp.Server}.  TLS (C{ssl:}: the
    channel's transport is the TLS protocol, which writes to its own TCP
    transport), UNIX sockets (C{unix.Server}: its writes may carry file
    descriptors), and the metrics listener (twisted.web's stock C{Site}, no
    channel of ours) keep the stock transport, deliberately.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp
from twisted.internet.abstract import _dataMustBeBytes


class WrittenAtOnce(tcp.Server):
    """
    A TCP server connection whose writes are sent at once when nothing is
    waiting to be sent; otherwise exactly the stock transport.
    """

    def _idle(self) -> bool:
        """
        Could a write go out now, ahead of nothing?  Connected, no close or
        half-close asked for, nothing buffered (which also means the socket
        is not registered for writing), and no producer that expects the
        transport to call it back when the buffer drains: a pull producer is
        resumed from C{doWrite} only, and a paused streaming producer waits
        for that too.
        """
        return bool(
            self.connected
            and not self.disconnecting
            and not self._writeDisconnecting
            and not self._writeDisconnected
            and not self._tempDataLen
            and self.offset == len(self.dataBuffer)
            and (self.producer is None or (self.streamingProducer and not self.producerPaused))
        )

    def write(self, data: bytes) -> None:
        if type(data) is bytes and data and self._idle():
            sent = self.writeSomeData(data)
            if not isinstance(sent, int):
                # The connection is gone: leave it to doWrite, on the
                # reactor's next turn, to find out and lose it as usual.
                pass
            elif sent == len(data):
                return
            elif sent:
                data = data[sent:]
        super().write(data)

    def writeSequence(self, iovec: Any) -> None:
        if iovec and self._idle():
            for i in iovec:
                _dataMustBeBytes(i)
            self.write(b"".join(iovec))
            return
        super().writeSequence(iovec)


def adopt(transport: Any) -> bool:
    """
    Make a plain accepted TCP connection a L{WrittenAtOnce}; leave any other
    transport as it is.  C{True} when adopted.
    """
    if type(transport) is tcp.Server:
        transport.__class__ = WrittenAtOnce
        return True
    return False
