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
from twisted.internet.endpoints import TCP4ClientEndpoint, serverFromString
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatTime, jsonFileLogObserver, textFileLogObserver
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource

from smeldr_oauth.web.logfile import PIPE_BUF, BatchedWriter
from smeldr_oauth.web.accesslog import BufferedAccessLog, for_twist
from smeldr_oauth.web.site import SmeldrSite
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
