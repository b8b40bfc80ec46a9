"""
Tests for L{smeldr_oauth.web.logfile}: C{twist}'s text lines, byte for
byte, written in batches, nothing lost at shutdown; and over a real
C{twist smeldr-oauth} process, every line present and whole after a stop.
"""

from __future__ import annotations

import io
import threading
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, Logger, jsonFileLogObserver, textFileLogObserver
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from smeldr_oauth.web.logfile import PIPE_BUF, BatchedWriter, BufferedTextObserver, for_twist
from tests import e2e
from tests.test_conformance import httpClient
from tests.test_web_accesslog import Options, Out, Parent


def events() -> list[dict[str, Any]]:
    """Events as loggers make them: a format, a system, a failure, no time."""
    captured: list[dict[str, Any]] = []
    log = Logger(namespace="smeldr_oauth.x", observer=captured.append)
    log.info("served {issuer}", issuer="https://a.example")
    log.warn("two\nlines {n}", n=2)
    try:
        raise ZeroDivisionError("division by zero")
    except ZeroDivisionError:
        log.failure("it failed", Failure())
    captured.append(
        {"log_format": "legacy", "log_system": "HTTPChannel,0,127.0.0.1", "log_time": 1.5e9 + 0.7}
    )
    captured.append({"log_format": "no time at all", "log_level": LogLevel.info, "log_namespace": "n"})
    captured.append({"log_format": "no namespace, no level"})
    for event in captured[:3]:
        event["log_time"] = 1_700_000_000.25
    fields = {"x": 3.25, "s": "a\nb", "d": {"k": "v"}, "f": lambda: "called", "b": b"\xff"}
    formats: list[Any] = [
        "{x!r} {x:>8} {x.real} {s!a} {d[k]} {b} {{literal}} {f()}",
        "{nope}",
        "{}",
        "{x.nope()}",
        "",
        b"bytes {x}",
        7,
        "multi\nline {s}",
    ]
    systems: list[Any] = [None, "sys\ntem", 42]
    for n, fmt in enumerate(formats):
        for system in systems:
            event = dict(fields, log_format=fmt, log_time=1_700_000_000.0 + n, log_namespace="ns")
            if system is not None:
                event["log_system"] = system
            if n % 2:
                event["log_level"] = LogLevel.warn
            captured.append(event)
    return captured


class BufferedTextObserverTests(SynchronousTestCase):
    def test_same_text_as_twist(self) -> None:
        """
        Every event is written exactly as C{twist}'s text observer writes
        it (timestamp, system, indented continuation lines, tracebacks).
        """
        clock = Clock()
        expected, out = io.StringIO(), Out()
        reference = textFileLogObserver(expected)
        ours = BufferedTextObserver(BatchedWriter(out, clock))
        for event in events():
            reference(event)
            ours(event)
        clock.advance(0)
        self.assertEqual(out.getvalue(), expected.getvalue())
        self.assertIn("ZeroDivisionError", out.getvalue())

    def test_timestamp_follows_the_event(self) -> None:
        """The once-a-second timestamp changes with the second."""
        expected, out = io.StringIO(), io.StringIO()
        reference = textFileLogObserver(expected)
        ours = BufferedTextObserver(BatchedWriter(out, Clock()))
        for when in (1_700_000_000.1, 1_700_000_000.9, 1_700_000_001.0, 1_699_999_999.99):
            event = {"log_format": "x", "log_time": when, "log_level": LogLevel.info, "log_namespace": "n"}
            reference(event)
            ours(event)
        ours._writer.flush()
        self.assertEqual(out.getvalue(), expected.getvalue())


class BatchedWriterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.out = Out()
        self.writer = BatchedWriter(self.out, self.clock)

    def test_next_turn(self) -> None:
        self.writer.write("a\n")
        self.writer.write("b\n")
        self.assertEqual(self.out.writes, [])
        self.clock.advance(0)
        self.assertEqual(self.out.writes, ["a\nb\n"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_full_batch_at_once(self) -> None:
        """A batch of C{PIPE_BUF} bytes is written without waiting."""
        line = "x" * 99 + "\n"
        count = PIPE_BUF // 100 + 1
        for _ in range(count):
            self.writer.write(line)
        self.assertEqual(self.out.getvalue(), line * count)
        for write in self.out.writes:
            self.assertLessEqual(len(write), PIPE_BUF)

    def test_stop(self) -> None:
        """
        At the reactor's shutdown what waits is written, and every line
        after it (the reactor's own last lines) at once: its timers will
        not run again.
        """
        self.writer.write("a\n")
        self.writer.stop()
        self.assertEqual(self.out.getvalue(), "a\n")
        self.writer.write("b\n")
        self.assertEqual(self.out.getvalue(), "a\nb\n")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_other_thread(self) -> None:
        """
        A line logged by another thread (a database pool's) is written at
        once, without touching the reactor's queue or timers.
        """
        self.writer.write("a\n")
        thread = threading.Thread(target=self.writer.write, args=("b\n",))
        thread.start()
        thread.join()
        self.assertEqual(self.out.writes, ["b\n"])
        self.clock.advance(0)
        self.assertEqual(self.out.writes, ["b\n", "a\n"])


class ForTwistTests(SynchronousTestCase):
    def options(self, **parent: Any) -> Any:
        values = dict(fileLogObserverFactory=textFileLogObserver, logFile=Out(), logLevel=LogLevel.info)
        values.update(parent)
        return Options(Parent(values))

    def test_replaces_twists_observer(self) -> None:
        """
        C{twist} builds its observer from its options after the plugin made
        its service: ours, on the writer the access log shares, flushed at
        the reactor's shutdown.
        """
        options = self.options()
        out = options.parent["logFile"]
        fake = MemoryReactorClock()
        writer = for_twist(options, fake)
        assert writer is not None
        self.assertIs(for_twist(options, fake), writer)
        observer = options.parent["fileLogObserverFactory"](out)
        self.assertIsInstance(observer, BufferedTextObserver)
        observer({"log_format": "hello", "log_time": 1.0, "log_level": LogLevel.info, "log_namespace": "n"})
        self.assertEqual(out.getvalue(), "")
        self.assertEqual(fake.triggers["after"]["shutdown"], [(writer.stop, (), {})])
        writer.stop()
        self.assertIn("[n#info] hello\n", out.getvalue())

    def test_json(self) -> None:
        options = self.options(fileLogObserverFactory=jsonFileLogObserver)
        self.assertIsNone(for_twist(options, Clock()))
        self.assertIs(options.parent["fileLogObserverFactory"], jsonFileLogObserver)

    def test_not_under_twist(self) -> None:
        self.assertIsNone(for_twist({}, Clock()))


class ProcessTests(TestCase):
    timeout = 60

    async def test_lines_complete_after_stop(self) -> None:
        """
        A real C{twist --log-format=text smeldr-oauth}: its events and its
        access log reach the log whole, in order, up to the reactor's last
        line, after a SIGTERM.
        """
        server = await e2e.startServer(self, reactor, [])
        http = httpClient(self)
        for n in range(20):
            response = await http.get(f"{server.issuer}/healthz?n={n}")
            await response.content()
        server._process.signalProcess("TERM")
        await server._collector.ended
        log = server.log()
        lines = log.splitlines()
        self.assertIn("Main loop terminated", lines[-1], server.annotate("last line"))
        self.assertIn("smeldr-oauth serving issuer", log)
        seen = [int(line.split("?n=")[1].split(" ")[0]) for line in lines if "/healthz?n=" in line]
        self.assertEqual(seen, list(range(20)), server.annotate("access log"))
        for line in lines:
            if line.startswith("\t") or not line:
                continue
            self.assertRegex(
                line, r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[[^\]]+\] ", server.annotate(line)
            )
