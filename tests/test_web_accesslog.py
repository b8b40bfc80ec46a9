"""
Tests for L{smeldr_oauth.web.accesslog}: the buffered access log writes
every line, in C{twist}'s text shape, within its interval, and only where
that shape is what C{twist} would have written.
"""

from __future__ import annotations

import io
import sys
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, serverFromString
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatTime, jsonFileLogObserver, textFileLogObserver
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.http import combinedLogFormatter
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyChannel
from hypothesis import given, settings, strategies as st
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress

from smeldr_oauth.web.logfile import PIPE_BUF, BatchedWriter
from smeldr_oauth.web import accesslog
from smeldr_oauth.web.accesslog import BufferedAccessLog, combined, for_twist
from smeldr_oauth.web.site import SmeldrRequest, SmeldrSite, TrustedProxies
from tests.test_web_site import Raw


class Out(io.StringIO):
    """A text file that remembers each write."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


class BufferedAccessLogTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000.5)
        self.out = Out()
        self.log = BufferedAccessLog(BatchedWriter(self.out, self.clock, interval=0.25), self.clock)

    def test_shape(self) -> None:
        """
        C{<time> [twisted.python.log#info] <line>}, as C{twist}'s text
        observer writes twisted.web's lines.
        """
        self.log.line('"1.2.3.4" - - [x] "GET / HTTP/1.1" 200 2 "-" "-"')
        self.log.flush()
        self.assertEqual(
            self.out.getvalue(),
            f'{formatTime(1_700_000_000)} [twisted.python.log#info] "1.2.3.4" - - [x] "GET / HTTP/1.1" 200 2 "-" "-"\n',
        )

    def test_written_within_the_interval(self) -> None:
        """
        Lines wait at most the interval, and are written together.
        """
        self.log.line("a")
        self.clock.advance(0.1)
        self.log.line("b")
        self.assertEqual(self.out.writes, [])
        self.clock.advance(0.15)
        self.assertEqual(len(self.out.writes), 1)
        self.assertEqual([line.split("] ")[1] for line in self.out.getvalue().splitlines()], ["a", "b"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_default_next_turn(self) -> None:
        """
        By default the lines of one reactor turn are written together at
        the next turn (before twisted.web sends the responses).
        """
        log = BufferedAccessLog(BatchedWriter(self.out, self.clock), self.clock)
        log.line("a")
        log.line("b")
        self.assertEqual(self.out.writes, [])
        self.clock.advance(0)
        self.assertEqual(len(self.out.writes), 1)
        self.assertEqual(self.out.getvalue().count("\n"), 2)

    def test_flush_cancels_the_timer(self) -> None:
        self.log.line("a")
        self.log.flush()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.out.getvalue().count("\n"), 1)

    def test_writes_end_at_lines_and_fit_a_pipe(self) -> None:
        """
        Under load a batch is written as soon as it reaches C{PIPE_BUF}
        bytes, every write at most C{PIPE_BUF} bytes and ending at a line
        (workers sharing a pipe never interleave inside a line); nothing is
        lost.
        """
        for i in range(1000):
            self.log.line(f"line {i} " + "x" * 90)
        self.log.flush()
        self.assertGreater(len(self.out.writes), 10)
        for write in self.out.writes:
            self.assertLessEqual(len(write), PIPE_BUF)
            self.assertTrue(write.endswith("\n"))
        lines = self.out.getvalue().splitlines()
        self.assertEqual([line.split("] ")[1].split()[1] for line in lines], [str(i) for i in range(1000)])

    def test_timestamp_follows_the_clock(self) -> None:
        self.log.line("a")
        self.clock.advance(1)
        self.log.line("b")
        self.log.flush()
        first, second = self.out.getvalue().splitlines()
        self.assertTrue(first.startswith(formatTime(1_700_000_000) + " "))
        self.assertTrue(second.startswith(formatTime(1_700_000_001) + " "))


class Parent(dict):  # type: ignore[type-arg]
    pass


class Options(dict):  # type: ignore[type-arg]
    def __init__(self, parent: Any) -> None:
        super().__init__()
        self.parent = parent


class ForTwistTests(SynchronousTestCase):
    def options(self, **parent: Any) -> Any:
        values = dict(fileLogObserverFactory=textFileLogObserver, logFile=sys.stdout, logLevel=LogLevel.info)
        values.update(parent)
        return Options(Parent(values))

    def test_text(self) -> None:
        self.assertIsInstance(for_twist(self.options(), Clock()), BufferedAccessLog)

    def test_json(self) -> None:
        self.assertIsNone(for_twist(self.options(fileLogObserverFactory=jsonFileLogObserver), Clock()))

    def test_level_above_info(self) -> None:
        """
        C{--log-level=warn} drops twisted.web's lines; so does this.
        """
        self.assertIsNone(for_twist(self.options(logLevel=LogLevel.warn), Clock()))
        self.assertIsInstance(for_twist(self.options(logLevel=LogLevel.debug), Clock()), BufferedAccessLog)

    def test_not_under_twist(self) -> None:
        self.assertIsNone(for_twist({}, Clock()))


class Hello(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        return b"hi"


class SiteTests(TestCase):
    async def test_every_request_logged(self) -> None:
        """
        Over a real socket: each request's combined-log line reaches the
        buffered log (and not twisted.web's), and stopping the site writes
        what is still queued.
        """
        out = Out()
        access = BufferedAccessLog(BatchedWriter(out, reactor, interval=60), reactor)
        site = SmeldrSite(Hello(), access_log=access)
        port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(site)
        for n in range(3):
            protocol = Raw(b"GET /hello/%d HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % (n,))
            endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
            await endpoint.connect(Factory.forProtocol(lambda p=protocol: p))  # type: ignore[misc]
            await protocol.done
        self.assertEqual(out.getvalue(), "")
        await port.stopListening()
        lines = out.getvalue().splitlines()
        self.assertEqual(len(lines), 3)
        for n, line in enumerate(lines):
            self.assertIn(f'"GET /hello/{n} HTTP/1.1" 200 2', line)
            self.assertIn('[twisted.python.log#info] "127.0.0.1"', line)


class Held(Resource):
    """
    Answers nothing until the client goes away: C{/held} writes nothing,
    C{/stream} starts an answer (an event stream's head and one event).
    Fires C{arrived} with each request it is given, and C{gone} when its
    client has gone.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.arrived: Deferred[Any] = Deferred()
        self.gone: Deferred[Any] = Deferred()

    def render_GET(self, request: Any) -> Any:
        if request.path == b"/stream":
            request.setHeader(b"content-type", b"text/event-stream")
            request.write(b"data: 1\n\n")
        gone, self.gone = self.gone, Deferred()
        request.notifyFinish().addErrback(lambda _: gone.callback(request))
        arrived, self.arrived = self.arrived, Deferred()
        arrived.callback(request)
        return NOT_DONE_YET


class ClientGoneTests(TestCase):
    async def test_client_gone_logged(self) -> None:
        """
        Over a real socket: a request whose client hangs up before its
        answer is finished still gets its access-log line, once: C{499}
        (nginx's "client closed request") when nothing was sent, the
        status and bytes sent when an answer had started (an event
        stream the client closes).  The request was handled (a token may
        have been issued); without its line the log did not show it.
        """
        out = Out()
        access = BufferedAccessLog(BatchedWriter(out, reactor, interval=60), reactor)
        held = Held()
        site = SmeldrSite(held, access_log=access)
        port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(site)
        for path in (b"/held", b"/stream"):
            gone, arrived = held.gone, held.arrived
            protocol = Raw(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % (path,))
            endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
            client = await endpoint.connect(Factory.forProtocol(lambda p=protocol: p))  # type: ignore[misc]
            await arrived
            client.transport.loseConnection()
            await gone
        await port.stopListening()
        lines = out.getvalue().splitlines()
        self.assertEqual(len(lines), 2, lines)
        self.assertIn('"GET /held HTTP/1.1" 499 -', lines[0])
        self.assertIn('"GET /stream HTTP/1.1" 200 9', lines[1])


def _request(
    peer: Any = None,
    method: bytes = b"POST",
    uri: bytes = b"/oauth/token",
    referer: Any = None,
    agent: Any = None,
    code: int = 200,
    length: int = 312,
    forwarded: Any = None,
) -> SmeldrRequest:
    """A finished request as the access log sees it."""
    channel = DummyChannel()
    if peer is not None:
        channel.transport.getPeer = lambda: peer  # type: ignore[method-assign]
    if forwarded is not None:
        channel.site = SmeldrSite(Resource(), trusted_proxies=TrustedProxies(["10.0.0.0/8"]))
    request = SmeldrRequest(channel)
    if peer is not None:
        request.client = peer
    request.method = method
    request.uri = uri
    request.clientproto = b"HTTP/1.1"
    request.code = code
    request.sentLength = length
    if referer is not None:
        request.requestHeaders.setRawHeaders(b"referer", [referer])
    if agent is not None:
        request.requestHeaders.setRawHeaders(b"user-agent", [agent])
    if forwarded is not None:
        request.requestHeaders.setRawHeaders(b"x-forwarded-for", [forwarded])
    return request


class CombinedTests(SynchronousTestCase):
    """
    L{combined} writes exactly twisted.web's combined-format line, however
    often a field repeats.
    """

    def assertSameLine(self, request: SmeldrRequest) -> None:
        expected = combinedLogFormatter("[04/Dec/2026:15:30:00 +0000]", request)
        # Twice: the second time from what the first remembered.
        self.assertEqual(combined("[04/Dec/2026:15:30:00 +0000]", request), expected)
        self.assertEqual(combined("[04/Dec/2026:15:30:00 +0000]", request), expected)

    def test_site_default(self) -> None:
        """Every site writes its access log with L{combined}."""
        self.assertIs(SmeldrSite(Resource())._logFormatter, combined)

    def test_addresses(self) -> None:
        self.assertTrue(combined("[t]", _request(IPv4Address("TCP", "203.0.113.9", 1234))).startswith('"203.0.113.9" - - [t]'))
        self.assertTrue(combined("[t]", _request(UNIXAddress(b"/tmp/socket"))).startswith('"-" - - [t]'))
        forwarded = _request(IPv4Address("TCP", "10.0.0.1", 1), forwarded=b"198.51.100.7")
        self.assertTrue(combined("[t]", forwarded).startswith('"198.51.100.7" - - [t]'))
        self.assertSameLine(_request(IPv4Address("TCP", "203.0.113.9", 1234)))
        self.assertSameLine(_request(IPv6Address("TCP", "2001:db8::1", 1234)))
        self.assertSameLine(_request(UNIXAddress(b"/tmp/socket")))
        self.assertSameLine(_request(IPv4Address("TCP", "10.0.0.1", 1), forwarded=b"198.51.100.7"))

    def test_empty_answer(self) -> None:
        self.assertSameLine(_request(code=304, length=0))

    def test_quotes_and_bytes(self) -> None:
        self.assertSameLine(
            _request(referer=b'https://x/"a\\b\'c', agent=b"caf\xc3\xa9 \x00\x7f\"quoted\"", uri=b"/p?q=%22'")
        )

    def test_long_values_not_kept(self) -> None:
        """
        A value longer than the cache keeps is escaped right but not
        remembered; the cache never holds more than its bound.
        """
        accesslog._ESCAPED.clear()
        long_uri = b"/oauth/authorize?state=" + b"s" * 1000
        self.assertSameLine(_request(uri=long_uri))
        self.assertNotIn(long_uri, accesslog._ESCAPED)
        # The short fields of that line are remembered.
        self.assertEqual(accesslog._ESCAPED[b"POST"], "POST")
        for i in range(accesslog._MAX_ESCAPED * 2):
            self.assertSameLine(_request(uri=b"/p/%d" % (i,)))
        self.assertLessEqual(len(accesslog._ESCAPED), accesslog._MAX_ESCAPED)

    @settings(max_examples=200, deadline=None)
    @given(
        method=st.binary(min_size=1, max_size=12),
        uri=st.binary(max_size=300),
        referer=st.none() | st.binary(max_size=40),
        agent=st.none() | st.binary(max_size=40),
        code=st.integers(100, 599),
        length=st.integers(0, 10**6),
    )
    def test_any_request(self, method: bytes, uri: bytes, referer: Any, agent: Any, code: int, length: int) -> None:
        self.assertSameLine(_request(method=method, uri=uri, referer=referer, agent=agent, code=code, length=length))
