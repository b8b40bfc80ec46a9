"""
Tests for L{smeldr_oauth.web.transport}: answers written at once, over real
sockets on 127.0.0.1.  The client side is a plain non-blocking socket read
from inside the server's own call stack, so "on the wire" means before the
reactor turns again.
"""

from __future__ import annotations

import os
import socket
import struct
import tempfile
from typing import Any, Callable

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPullProducer, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from smeldr_oauth.web.site import SmeldrSite
from smeldr_oauth.web.transport import WrittenAtOnce, adopt


def peek(client: socket.socket) -> bytes:
    """What the client could read now, without reading it or waiting."""
    try:
        return client.recv(1 << 20, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return b""


class Probe(Resource):
    """Answers with C{self.answer(request)}."""

    isLeaf = True

    def __init__(self, answer: Callable[[Any], Any]) -> None:
        super().__init__()
        self.answer = answer

    def render(self, request: Any) -> Any:
        return self.answer(request)


class Served:
    """
    A L{SmeldrSite} on 127.0.0.1 with L{Probe} as its tree, and a raw client
    socket connected to it.
    """

    def __init__(self, case: TestCase, answer: Callable[[Any], Any]) -> None:
        self.site = SmeldrSite(Probe(answer))
        self.port = reactor.listenTCP(0, self.site, interface="127.0.0.1")  # type: ignore[attr-defined]
        case.addCleanup(self.port.stopListening)
        self.client = socket.create_connection(("127.0.0.1", self.port.getHost().port))
        case.addCleanup(self.client.close)
        self.client.setblocking(False)

    def send(self, request: bytes) -> None:
        self.client.sendall(request)

    async def read_until(self, done: Callable[[bytes], bool]) -> bytes:
        """Read with the reactor running until C{done(received)}."""
        received = b""
        while not done(received):
            try:
                data = self.client.recv(1 << 20)
            except BlockingIOError:
                data = None
            if data == b"":
                break
            if data:
                received += data
                continue
            # Nothing yet: let the reactor turn once.
            turned: Deferred[None] = Deferred()
            reactor.callLater(0, turned.callback, None)  # type: ignore[attr-defined]
            await turned
        return received


def answered(request: Any) -> Deferred[None]:
    return request.notifyFinish()  # type: ignore[no-any-return]


GET = b"GET /x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def whole(received: bytes) -> bool:
    head, sep, body = received.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return body.endswith(b"0\r\n\r\n")


class WrittenAtOnceTests(TestCase):
    """
    An answer is on the wire before the reactor turns again; the stock
    transport's buffering takes over for whatever the kernel does not take.
    """

    async def test_answerBeforeTheReactorTurns(self) -> None:
        """
        When C{finish()} returns, the client can read the whole answer,
        without the reactor having turned since; the socket is not left
        registered for writing.
        """
        seen: list[bytes] = []
        writers: list[bool] = []

        def answer(request: Any) -> bytes:
            transport = request.channel.transport

            def after(_: object) -> None:
                seen.append(peek(served.client))
                writers.append(transport in reactor.getWriters())  # type: ignore[attr-defined]

            answered(request).addCallback(after)
            request.setHeader(b"content-type", b"application/json")
            return b'{"ok":true}'

        served = Served(self, answer)
        served.send(GET)
        received = await served.read_until(whole)
        self.assertTrue(received.endswith(b'{"ok":true}'))
        self.assertEqual(seen, [received])
        self.assertEqual(writers, [False])

    async def test_everyKeepAliveAnswerAtOnce(self) -> None:
        """
        On a kept-alive connection each answer goes out at once, in order.
        """
        seen: list[bytes] = []
        count = [0]

        def answer(request: Any) -> bytes:
            count[0] += 1
            body = b"answer %d" % (count[0],)
            answered(request).addCallback(lambda _: seen.append(peek(served.client)))
            return body

        served = Served(self, answer)
        for n in (1, 2, 3):
            served.send(GET)
            received = await served.read_until(whole)
            self.assertTrue(received.endswith(b"answer %d" % (n,)))
            self.assertEqual(seen[-1], received)

    async def test_largeBodyArrivesWhole(self) -> None:
        """
        A body larger than the socket buffers: the kernel takes part of it
        at once, the rest is buffered, the socket registered for writing,
        and the client still receives every byte in order.
        """
        body = bytes(range(256)) * (24 * 1024)  # 6 MiB
        state: dict[str, Any] = {}

        def answer(request: Any) -> bytes:
            transport = request.channel.transport

            def after(_: object) -> None:
                state["early"] = len(peek(served.client))
                state["buffered"] = transport._tempDataLen + len(transport.dataBuffer) - transport.offset
                state["writing"] = transport in reactor.getWriters()  # type: ignore[attr-defined]

            answered(request).addCallback(after)
            return body

        served = Served(self, answer)
        served.send(GET)
        received = await served.read_until(whole)
        self.assertEqual(received.partition(b"\r\n\r\n")[2], body)
        self.assertGreater(state["early"], 0)
        self.assertGreater(state["buffered"], 0)
        self.assertTrue(state["writing"])

    async def test_streamHeadAndEventsAtOnce(self) -> None:
        """
        A stream's head (C{write(b"")}) and each later event go out when
        written, not on the reactor's next turn; the stream ends cleanly.
        """
        seen: list[bytes] = []
        requests: list[Any] = []

        def answer(request: Any) -> Any:
            request.setHeader(b"content-type", b"text/event-stream")
            request.write(b"")
            seen.append(peek(served.client))
            requests.append(request)
            return NOT_DONE_YET

        served = Served(self, answer)
        served.send(GET)
        head = await served.read_until(lambda r: b"\r\n\r\n" in r)
        self.assertEqual(seen, [head])
        self.assertIn(b"text/event-stream", head)
        requests[0].write(b": keepalive\n\n")
        self.assertEqual(peek(served.client), b"d\r\n: keepalive\n\n\r\n")
        requests[0].finish()
        self.assertEqual(peek(served.client), b"d\r\n: keepalive\n\n\r\n0\r\n\r\n")
        rest = await served.read_until(lambda r: r.endswith(b"0\r\n\r\n"))
        self.assertEqual(rest, b"d\r\n: keepalive\n\n\r\n0\r\n\r\n")

    async def test_closeAfterAnswer(self) -> None:
        """
        C{Connection: close}: the answer goes out at once and the connection
        is closed afterwards through the stock path.
        """
        seen: list[bytes] = []

        def answer(request: Any) -> bytes:
            answered(request).addCallback(lambda _: seen.append(peek(served.client)))
            return b"bye"

        served = Served(self, answer)
        served.send(b"GET /x HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        received = await served.read_until(lambda r: False)  # until the server closes
        self.assertTrue(received.endswith(b"bye"))
        self.assertEqual(seen, [received])


class Recording(Protocol):
    """A server protocol that records its transport and its losses."""

    def __init__(self) -> None:
        self.made: Deferred[None] = Deferred()
        self.lost: list[Any] = []
        self.lostOnce: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        adopt(self.transport)
        self.made.callback(None)

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.append(reason)
        if not self.lostOnce.called:
            self.lostOnce.callback(None)


class Connected:
    """A L{Recording} server connection on 127.0.0.1 and its raw client."""

    @classmethod
    async def make(cls, case: TestCase) -> "Connected":
        self = cls()
        self.protocol = Recording()
        factory = Factory.forProtocol(lambda: self.protocol)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
        case.addCleanup(port.stopListening)
        self.client = socket.create_connection(("127.0.0.1", port.getHost().port))
        case.addCleanup(self.client.close)
        self.client.setblocking(False)
        await self.protocol.made
        self.transport: Any = self.protocol.transport
        case.addCleanup(self.transport.abortConnection)
        return self


async def turns(n: int) -> None:
    for _ in range(n):
        turned: Deferred[None] = Deferred()
        reactor.callLater(0, turned.callback, None)  # type: ignore[attr-defined]
        await turned


@implementer(IPushProducer)
class Pushing:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def pauseProducing(self) -> None:
        self.calls.append("pause")

    def resumeProducing(self) -> None:
        self.calls.append("resume")

    def stopProducing(self) -> None:
        self.calls.append("stop")


@implementer(IPullProducer)
class Pulling:
    """Writes C{chunks} one per C{resumeProducing}, then unregisters."""

    def __init__(self, transport: Any, chunks: list[bytes]) -> None:
        self.transport = transport
        self.chunks = list(chunks)

    def resumeProducing(self) -> None:
        if self.chunks:
            self.transport.write(self.chunks.pop(0))
        else:
            self.transport.unregisterProducer()

    def stopProducing(self) -> None:
        pass


class TransportTests(TestCase):
    """
    L{WrittenAtOnce} against the stock transport's contract: errors,
    producers, half-close, and which transports are adopted.
    """

    async def test_adopted(self) -> None:
        """A plain accepted TCP connection becomes a L{WrittenAtOnce}."""
        connected = await Connected.make(self)
        self.assertIsInstance(connected.transport, WrittenAtOnce)

    async def test_resetPeer(self) -> None:
        """
        A write to a peer that has reset the connection: the send fails
        inside C{write()}, which returns without losing the connection
        there; the reactor's next turns lose it through C{connectionLost},
        once, and nothing is logged as an error.
        """
        connected = await Connected.make(self)
        tries: list[Any] = []
        send = connected.transport.writeSomeData

        def recording(data: Any) -> Any:
            result = send(data)
            tries.append(result)
            return result

        connected.transport.writeSomeData = recording
        # SO_LINGER 0: close sends a reset.
        connected.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        connected.client.close()
        connected.transport.write(b"into the void")
        self.assertEqual(len(tries), 1)
        self.assertNotIsInstance(tries[0], int)
        self.assertEqual(connected.protocol.lost, [])
        await connected.protocol.lostOnce
        await turns(3)
        self.assertEqual(len(connected.protocol.lost), 1)

    async def test_pushProducerPausedAndResumed(self) -> None:
        """
        A streaming producer: a write the kernel takes whole pauses nothing;
        one that leaves more than the buffer's size pauses it, and it is
        resumed once the client has read everything.
        """
        connected = await Connected.make(self)
        producer = Pushing()
        connected.transport.registerProducer(producer, True)
        connected.transport.write(b"small")
        self.assertEqual(peek(connected.client), b"small")
        self.assertEqual(producer.calls, [])
        big = b"x" * (8 << 20)
        connected.transport.write(big)
        self.assertEqual(producer.calls, ["pause"])
        received = b""
        while len(received) < len(big) + 5:
            try:
                received += connected.client.recv(1 << 20)
            except BlockingIOError:
                await turns(1)
        await turns(2)
        self.assertEqual(producer.calls, ["pause", "resume"])
        self.assertEqual(len(received), len(big) + 5)

    async def test_pullProducerStock(self) -> None:
        """
        A pull producer is resumed only from the reactor's C{doWrite}: its
        writes are buffered as the stock transport buffers them, so that it
        is asked for more, until it has written everything.
        """
        connected = await Connected.make(self)
        chunks = [b"one ", b"two ", b"three"]
        connected.transport.registerProducer(Pulling(connected.transport, chunks), False)
        received = b""
        while received != b"one two three":
            try:
                received += connected.client.recv(1 << 20)
            except BlockingIOError:
                await turns(1)
        self.assertEqual(received, b"one two three")

    async def test_halfClose(self) -> None:
        """
        C{loseWriteConnection}: a write before it goes out at once; one
        after it (before the reactor has turned) is buffered and sent ahead
        of the end of file, as the stock transport does.
        """
        connected = await Connected.make(self)
        connected.transport.write(b"before")
        self.assertEqual(peek(connected.client), b"before")
        connected.transport.loseWriteConnection()
        connected.transport.write(b"after")
        self.assertEqual(peek(connected.client), b"before")
        received = b""
        while True:
            try:
                data = connected.client.recv(1 << 20)
            except BlockingIOError:
                await turns(1)
                continue
            if not data:
                break
            received += data
        self.assertEqual(received, b"beforeafter")

    async def test_writeSequenceOneSend(self) -> None:
        """C{writeSequence} on an idle connection is one C{send}."""
        connected = await Connected.make(self)
        tries: list[Any] = []
        send = connected.transport.writeSomeData
        connected.transport.writeSomeData = lambda data: tries.append(bytes(data)) or send(data)
        connected.transport.writeSequence([b"HTTP/1.1 200 OK\r\n", b"\r\n", b"body"])
        self.assertEqual(tries, [b"HTTP/1.1 200 OK\r\n\r\nbody"])
        self.assertEqual(peek(connected.client), b"HTTP/1.1 200 OK\r\n\r\nbody")

    def test_notBytes(self) -> None:
        """Not bytes: C{TypeError}, as from the stock transport."""
        transport = WrittenAtOnce.__new__(WrittenAtOnce)
        self.assertRaises(TypeError, transport.write, "text")  # type: ignore[arg-type]
        self.assertRaises(TypeError, transport.writeSequence, ["text"])

    async def test_unixKeepsStock(self) -> None:
        """
        A UNIX socket connection keeps the stock transport (its writes may
        carry descriptors): L{adopt} leaves it.
        """
        directory = tempfile.mkdtemp()
        path = os.path.join(directory, "s")
        protocol = Recording()
        port = reactor.listenUNIX(path, Factory.forProtocol(lambda: protocol))  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        client = socket.socket(socket.AF_UNIX)
        self.addCleanup(client.close)
        client.connect(path)
        await protocol.made
        self.addCleanup(protocol.transport.abortConnection)  # type: ignore[union-attr]
        self.assertNotIsInstance(protocol.transport, WrittenAtOnce)
        self.assertFalse(adopt(protocol.transport))

    async def test_adoptedStreamPort(self) -> None:
        """
        The workers' children serve an inherited listening socket through
        C{adoptStreamPort}: its connections are adopted too.
        """
        listener = socket.socket(socket.AF_INET)
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.setblocking(False)
        protocol = Recording()
        port = reactor.adoptStreamPort(  # type: ignore[attr-defined]
            listener.fileno(), socket.AF_INET, Factory.forProtocol(lambda: protocol)
        )
        self.addCleanup(port.stopListening)
        client = socket.create_connection(listener.getsockname())
        self.addCleanup(client.close)
        await protocol.made
        self.addCleanup(protocol.transport.abortConnection)  # type: ignore[union-attr]
        self.assertIsInstance(protocol.transport, WrittenAtOnce)
        protocol.transport.write(b"now")  # type: ignore[union-attr]
        client.setblocking(False)
        self.assertEqual(peek(client), b"now")

