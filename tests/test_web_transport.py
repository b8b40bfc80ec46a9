"""
Tests for L{smeldr_oauth.web.transport}: answers gathered during a reactor
turn and sent when it ends, over real sockets on 127.0.0.1.  The client is
a plain non-blocking socket, read from inside the server's own call stack
("not on the wire yet") or after the reactor has turned.
"""

from __future__ import annotations

import os
import socket
import struct
import tempfile
from typing import Any, Callable

from twisted.internet import reactor, tcp
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPullProducer, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from smeldr_oauth.web.site import SmeldrSite
from smeldr_oauth.web.transport import Gathering, TurnEnd, adopt, turnEnd


def peek(client: socket.socket) -> bytes:
    """What the client could read now, without reading it or waiting."""
    try:
        return client.recv(1 << 20, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return b""


async def turns(n: int) -> None:
    """Let the reactor turn C{n} times."""
    for _ in range(n):
        turned: Deferred[None] = Deferred()
        reactor.callLater(0, turned.callback, None)  # type: ignore[attr-defined]
        await turned


async def read_until(client: socket.socket, done: Callable[[bytes], bool]) -> bytes:
    """Read with the reactor running until C{done(received)} or end of file."""
    received = b""
    while not done(received):
        try:
            data = client.recv(1 << 20)
        except BlockingIOError:
            await turns(1)
            continue
        if data == b"":
            break
        received += data
    return received


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
    A L{SmeldrSite} on 127.0.0.1 with L{Probe} as its tree, and raw client
    sockets connected to it.
    """

    def __init__(self, case: TestCase, answer: Callable[[Any], Any]) -> None:
        self.case = case
        self.site = SmeldrSite(Probe(answer))
        self.port = reactor.listenTCP(0, self.site, interface="127.0.0.1")  # type: ignore[attr-defined]
        case.addCleanup(self.port.stopListening)
        self.client = self.connect()

    def connect(self) -> socket.socket:
        client = socket.create_connection(("127.0.0.1", self.port.getHost().port))
        self.case.addCleanup(client.close)
        client.setblocking(False)
        return client

    def send(self, request: bytes) -> None:
        self.client.sendall(request)

    async def read_until(self, done: Callable[[bytes], bool]) -> bytes:
        return await read_until(self.client, done)


GET = b"GET /x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def whole(received: bytes) -> bool:
    head, sep, body = received.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return body.endswith(b"0\r\n\r\n")


def recordCalls(transport: Any, name: str) -> list[Any]:
    """Record the arguments (and, for C{writeSomeData}, results) of a method."""
    calls: list[Any] = []
    method = getattr(transport, name)

    def recording(*args: Any) -> Any:
        result = method(*args)
        calls.append((bytes(args[0]), result) if name == "writeSomeData" else args)
        return result

    setattr(transport, name, recording)
    return calls


class TurnEndTests(SynchronousTestCase):
    """
    L{TurnEnd}: one delayed call a turn, whatever the number of connections
    that gathered in it.
    """

    def test_oneCallATurn(self) -> None:
        """
        Connections that gather in the same turn are sent by one
        C{callLater(0)}, in the order they gathered; the next turn
        schedules another.
        """
        clock = Clock()
        ends = TurnEnd(clock)
        sent: list[str] = []

        class Connection:
            def __init__(self, name: str) -> None:
                self.name = name

            def sendGathered(self) -> None:
                sent.append(self.name)

        ends.add(Connection("a"))  # type: ignore[arg-type]
        ends.add(Connection("b"))  # type: ignore[arg-type]
        self.assertEqual([call.getTime() for call in clock.getDelayedCalls()], [0])
        clock.advance(0)
        self.assertEqual(sent, ["a", "b"])
        self.assertEqual(clock.getDelayedCalls(), [])
        ends.add(Connection("c"))  # type: ignore[arg-type]
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        clock.advance(0)
        self.assertEqual(sent, ["a", "b", "c"])

    def test_onePerReactor(self) -> None:
        """L{turnEnd} keeps one L{TurnEnd} a reactor."""
        clock, other = Clock(), Clock()
        self.assertIs(turnEnd(clock), turnEnd(clock))
        self.assertIsNot(turnEnd(clock), turnEnd(other))


class GatheredAnswerTests(TestCase):
    """
    An answer written during a turn is on the wire when the turn ends, in
    one C{send}, without registering the socket for writing.
    """

    async def test_sentWhenTheTurnEnds(self) -> None:
        """
        When C{finish()} returns the answer is gathered, not yet on the
        wire, and the socket is not registered for writing; when the
        reactor has turned the client reads it whole, sent by one C{send}
        (head and body together), the writer never registered.
        """
        seen: list[bytes] = []
        writers: list[bool] = []
        record: dict[str, Any] = {}

        def answer(request: Any) -> bytes:
            transport = request.channel.transport
            record["sends"] = recordCalls(transport, "writeSomeData")
            record["startWriting"] = recordCalls(transport, "startWriting")

            def after(_: object) -> None:
                seen.append(peek(served.client))
                writers.append(transport in reactor.getWriters())  # type: ignore[attr-defined]

            request.notifyFinish().addCallback(after)
            request.setHeader(b"content-type", b"application/json")
            return b'{"ok":true}'

        served = Served(self, answer)
        served.send(GET)
        received = await served.read_until(whole)
        self.assertTrue(received.endswith(b'{"ok":true}'))
        self.assertEqual(seen, [b""])
        self.assertEqual(writers, [False])
        self.assertEqual(record["sends"], [(received, len(received))])
        self.assertEqual(record["startWriting"], [])

    async def test_everyKeepAliveAnswer(self) -> None:
        """On a kept-alive connection each answer is sent, in order."""
        count = [0]

        def answer(request: Any) -> bytes:
            count[0] += 1
            return b"answer %d" % (count[0],)

        served = Served(self, answer)
        for n in (1, 2, 3):
            served.send(GET)
            received = await served.read_until(whole)
            self.assertTrue(received.endswith(b"answer %d" % (n,)))

    async def test_connectionsOfOneTurnTogether(self) -> None:
        """
        Requests read in the same turn on two connections: both answers are
        sent by the same turn's end, each in one C{send}.
        """
        sends: list[tuple[str, bytes]] = []
        ended: list[int] = []
        ends = turnEnd(reactor)
        send = ends.send

        def counting() -> None:
            ended.append(len(ends._waiting))
            send()

        ends.send = counting  # type: ignore[method-assign]
        self.addCleanup(setattr, ends, "send", send)

        def answer(request: Any) -> bytes:
            name = request.path.decode()
            transport = request.channel.transport
            method = transport.writeSomeData
            transport.writeSomeData = lambda data: sends.append((name, bytes(data))) or method(data)
            return name.encode()

        served = Served(self, answer)
        other = served.connect()
        await turns(2)  # both accepted
        served.send(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
        other.sendall(b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n")
        first = await served.read_until(whole)
        second = await read_until(other, whole)
        self.assertTrue(first.endswith(b"/a"))
        self.assertTrue(second.endswith(b"/b"))
        self.assertEqual(sorted(name for name, _ in sends), ["/a", "/b"])
        self.assertIn(2, ended)

    async def test_largeBodyStock(self) -> None:
        """
        A body larger than the transport's C{bufferSize} is not gathered: it
        takes the stock path (buffered, the writer registered), and the
        client receives every byte in order.
        """
        body = bytes(range(256)) * (24 * 1024)  # 6 MiB
        writing: list[bool] = []

        def answer(request: Any) -> bytes:
            transport = request.channel.transport
            request.notifyFinish().addCallback(
                lambda _: writing.append(transport in reactor.getWriters())  # type: ignore[attr-defined]
            )
            return body

        served = Served(self, answer)
        served.send(GET)
        received = await served.read_until(whole)
        self.assertEqual(received.partition(b"\r\n\r\n")[2], body)
        self.assertEqual(writing, [True])

    async def test_streamHeadAndEvents(self) -> None:
        """
        A stream's head (C{write(b"")}) and each later event are sent when
        the turn that wrote them ends; the stream ends cleanly.
        """
        requests: list[Any] = []

        def answer(request: Any) -> Any:
            request.setHeader(b"content-type", b"text/event-stream")
            request.write(b"")
            requests.append(request)
            return NOT_DONE_YET

        served = Served(self, answer)
        served.send(GET)
        head = await served.read_until(lambda r: b"\r\n\r\n" in r)
        self.assertIn(b"text/event-stream", head)
        requests[0].write(b": keepalive\n\n")
        self.assertEqual(peek(served.client), b"")
        await turns(1)
        self.assertEqual(peek(served.client), b"d\r\n: keepalive\n\n\r\n")
        requests[0].finish()
        rest = await served.read_until(lambda r: r.endswith(b"0\r\n\r\n"))
        self.assertEqual(rest, b"d\r\n: keepalive\n\n\r\n0\r\n\r\n")

    async def test_closeAfterAnswer(self) -> None:
        """
        C{Connection: close}: the gathered answer goes to the stock path
        ahead of the close, and arrives whole before the end of file.
        """
        served = Served(self, lambda request: b"bye")
        served.send(b"GET /x HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        received = await served.read_until(lambda r: False)  # until the server closes
        self.assertTrue(received.endswith(b"\r\n\r\nbye"))

    async def test_loggedBeforeOnTheWire(self) -> None:
        """
        The access log's line is written before the client can read the
        answer, as when the reactor's next turn sent it.
        """
        atLog: list[bytes] = []
        served = Served(self, lambda request: b"whole")
        log = served.site.log
        served.site.log = lambda request: (atLog.append(peek(served.client)), log(request))  # type: ignore[method-assign]
        served.send(GET)
        received = await served.read_until(whole)
        self.assertTrue(received.endswith(b"whole"))
        self.assertEqual(atLog, [b""])

    async def test_pipelinedInOrder(self) -> None:
        """
        Two requests in one packet, the first answered a turn later: the
        answers come in order, each whole.
        """

        def answer(request: Any) -> Any:
            body = b"answer to " + request.path
            if request.path == b"/b":
                return body

            def later() -> None:
                request.setHeader(b"content-length", b"%d" % (len(body),))
                request.write(body)
                request.finish()

            reactor.callLater(0, later)  # type: ignore[attr-defined]
            return NOT_DONE_YET

        served = Served(self, answer)
        served.send(b"GET /a HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\nGET /b HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        received = await served.read_until(lambda r: r.endswith(b"answer to /b"))
        self.assertEqual(received.count(b"HTTP/1.1 200"), 2)
        self.assertLess(received.index(b"answer to /a"), received.index(b"answer to /b"))

    async def test_headAnswer(self) -> None:
        """A C{HEAD} answer goes out whole; the connection serves the next."""
        served = Served(self, lambda request: b"body")
        served.send(b"HEAD /x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        head = await served.read_until(lambda r: r.endswith(b"\r\n\r\n"))
        self.assertTrue(head.startswith(b"HTTP/1.1 200"))
        served.send(GET)
        received = await served.read_until(whole)
        self.assertTrue(received.endswith(b"\r\n\r\nbody"))


class Recording(Protocol):
    """A server protocol that adopts its transport and records its losses."""

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

    protocol: Recording
    client: socket.socket
    transport: Any

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
        self.transport = self.protocol.transport
        case.addCleanup(self.transport.abortConnection)
        return self

    async def read_to_end(self) -> bytes:
        return await read_until(self.client, lambda r: False)


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
    """
    Writes nothing when first resumed (registered), then C{chunks} one per
    C{resumeProducing}, then unregisters.
    """

    def __init__(self, transport: Any, chunks: list[bytes]) -> None:
        self.transport = transport
        self.chunks = list(chunks)
        self.resumed = 0

    def resumeProducing(self) -> None:
        self.resumed += 1
        if self.resumed == 1:
            return
        if self.chunks:
            self.transport.write(self.chunks.pop(0))
        else:
            self.transport.unregisterProducer()

    def stopProducing(self) -> None:
        pass


class TransportTests(TestCase):
    """
    L{Gathering} against the stock transport's contract: errors, producers,
    half-close, and which transports are adopted.
    """

    async def test_adopted(self) -> None:
        """A plain accepted TCP connection becomes a L{Gathering}, once."""
        connected = await Connected.make(self)
        self.assertIsInstance(connected.transport, Gathering)
        self.assertTrue(adopt(connected.transport))
        self.assertIs(type(connected.transport), Gathering)

    async def test_stockCallsFollowed(self) -> None:
        """
        The contract L{Gathering} relies on instead of the stock
        transport's private buffers: the stock C{write} calls
        C{startWriting} when it buffers, and C{doWrite} calls
        C{stopWriting} once the buffer is drained.  Fails if Twisted stops
        making those calls.
        """
        connected = await Connected.make(self)
        transport = connected.transport
        tcp.Server.write(transport, b"stock")
        self.assertTrue(transport._writing)
        self.assertIn(transport, reactor.getWriters())  # type: ignore[attr-defined]
        # While the stock transport holds bytes, writes queue behind them.
        transport.write(b" more")
        self.assertIsNone(transport._gathered)
        received = await read_until(connected.client, lambda r: len(r) >= 10)
        self.assertEqual(received, b"stock more")
        await turns(1)
        self.assertFalse(transport._writing)
        self.assertNotIn(transport, reactor.getWriters())  # type: ignore[attr-defined]
        # Gathering again once the stock buffer is empty.
        transport.write(b"again")
        self.assertEqual(transport._gathered, [b"again"])

    async def test_writesOfATurnOneSend(self) -> None:
        """
        C{write} and C{writeSequence} in one turn: one C{send} at its end.
        """
        connected = await Connected.make(self)
        sends = recordCalls(connected.transport, "writeSomeData")
        connected.transport.write(b"HTTP/1.1 200 OK\r\n")
        connected.transport.writeSequence([b"\r\n", b"body"])
        self.assertEqual(sends, [])
        self.assertEqual(peek(connected.client), b"")
        await turns(1)
        self.assertEqual(sends, [(b"HTTP/1.1 200 OK\r\n\r\nbody", 23)])
        self.assertEqual(peek(connected.client), b"HTTP/1.1 200 OK\r\n\r\nbody")

    async def test_partialSend(self) -> None:
        """
        What the kernel does not take at the turn's end goes to the stock
        path (buffered, the writer registered) and follows in order.
        """
        connected = await Connected.make(self)
        transport = connected.transport
        send = transport.writeSomeData
        states: list[bool] = []

        def short(data: Any) -> Any:
            if not states:
                states.append(False)
                return send(bytes(data)[:3])
            states.append(transport._writing)
            return send(data)

        transport.writeSomeData = short
        transport.write(b"abcdefgh")
        self.assertEqual(await read_until(connected.client, lambda r: len(r) >= 8), b"abcdefgh")
        self.assertEqual(states, [False, True])

    async def test_resetPeer(self) -> None:
        """
        A peer that reset the connection: the send at the turn's end fails,
        the bytes go to the stock path, and the reactor's next turns lose
        the connection through C{connectionLost}, once.
        """
        connected = await Connected.make(self)
        sends = recordCalls(connected.transport, "writeSomeData")
        # SO_LINGER 0: close sends a reset.
        connected.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        connected.client.close()
        handedOver: list[bool] = []
        sendGathered = connected.transport.sendGathered

        def recording() -> None:
            sendGathered()
            handedOver.append(connected.transport._writing)

        connected.transport.sendGathered = recording
        connected.transport.write(b"into the void")
        self.assertEqual(connected.protocol.lost, [])
        await connected.protocol.lostOnce
        await turns(3)
        self.assertEqual(len(connected.protocol.lost), 1)
        self.assertNotIsInstance(sends[0][1], int)
        self.assertEqual(handedOver, [True])

    async def test_pushProducer(self) -> None:
        """
        A streaming producer: a small write is gathered and pauses nothing;
        a write past C{bufferSize} takes the stock path, which pauses it,
        and resumes it once the client has read everything, in order.
        """
        connected = await Connected.make(self)
        producer = Pushing()
        connected.transport.registerProducer(producer, True)
        connected.transport.write(b"small")
        self.assertEqual(connected.transport._gathered, [b"small"])
        big = b"x" * (8 << 20)
        connected.transport.write(big)
        self.assertIsNone(connected.transport._gathered)
        self.assertEqual(producer.calls, ["pause"])
        received = await read_until(connected.client, lambda r: len(r) >= len(big) + 5)
        await turns(2)
        self.assertEqual(producer.calls, ["pause", "resume"])
        self.assertEqual(received, b"small" + big)

    async def test_pausedProducerStock(self) -> None:
        """A paused streaming producer: writes take the stock path."""
        connected = await Connected.make(self)
        connected.transport.registerProducer(Pushing(), True)
        connected.transport.producerPaused = True
        connected.transport.write(b"held")
        self.assertIsNone(connected.transport._gathered)
        self.assertTrue(connected.transport._writing)

    async def test_pullProducerStock(self) -> None:
        """
        A pull producer is resumed only from the reactor's C{doWrite}: what
        was gathered before it goes to the stock path when it is registered
        (so C{doWrite} runs and asks it for more, though its first
        C{resumeProducing} wrote nothing) and its writes take the stock path
        too, until it is done.
        """
        connected = await Connected.make(self)
        connected.transport.write(b"zero ")
        connected.transport.registerProducer(
            Pulling(connected.transport, [b"one ", b"two ", b"three"]), False
        )
        received = await read_until(connected.client, lambda r: r == b"zero one two three")
        self.assertEqual(received, b"zero one two three")

    async def test_halfClose(self) -> None:
        """
        C{loseWriteConnection}: what was gathered before it is sent ahead
        of the end of file, as the stock transport does; nothing is
        gathered after it.  Done from a timed call, whose turn's end comes
        after the reactor's next poll (and the C{doWrite} that half-closes).
        """
        connected = await Connected.make(self)

        def halfClose() -> None:
            connected.transport.write(b"before")
            connected.transport.loseWriteConnection()

        reactor.callLater(0, halfClose)  # type: ignore[attr-defined]
        self.assertEqual(await connected.read_to_end(), b"before")
        connected.transport.write(b"never")
        self.assertIsNone(connected.transport._gathered)

    async def test_loseConnection(self) -> None:
        """
        What was gathered is sent before the connection is closed, also
        when written from a timed call (whose turn's end comes after the
        C{doWrite} that closes).
        """
        connected = await Connected.make(self)

        def close() -> None:
            connected.transport.write(b"last words")
            connected.transport.loseConnection()

        reactor.callLater(0, close)  # type: ignore[attr-defined]
        self.assertEqual(await connected.read_to_end(), b"last words")

    async def test_abortConnection(self) -> None:
        """C{abortConnection} drops what was gathered: nothing is sent."""
        connected = await Connected.make(self)
        sends = recordCalls(connected.transport, "writeSomeData")
        connected.transport.write(b"dropped")
        connected.transport.abortConnection()
        await connected.protocol.lostOnce
        await turns(2)
        self.assertEqual(sends, [])

    def test_notBytes(self) -> None:
        """Not bytes: C{TypeError}, as from the stock transport."""
        transport = Gathering.__new__(Gathering)
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
        self.assertNotIsInstance(protocol.transport, Gathering)
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
        self.assertIsInstance(protocol.transport, Gathering)
