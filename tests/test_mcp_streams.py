"""Tests for L{smeldr_oauth.mcp.streams}: SSE framing, keepalives, slow consumers."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http import combinedLogFormatter
from twisted.web.server import Request
from twisted.web.test.requesthelper import DummyChannel, DummyRequest

from smeldr_oauth.mcp.streams import Deadlines, KeepaliveTimer, SSEStream, format_event


class AbortableTransport:
    aborted = False

    def abortConnection(self) -> None:
        self.aborted = True


class PushRequest(DummyRequest):
    """DummyRequest loops on pull producers; record push producers instead."""

    producer = None

    def registerProducer(self, producer: object, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None


class FormatTests(SynchronousTestCase):
    def test_fields(self) -> None:
        self.assertEqual(format_event("{}", "message", "7"), b"id: 7\nevent: message\ndata: {}\n\n")

    def test_newlines_cannot_inject_fields(self) -> None:
        self.assertEqual(format_event("a\nevent: x\r\nb", "m\nx"), b"event: m x\ndata: a\ndata: event: x\ndata: b\n\n")


class StreamTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.request = PushRequest([b"mcp"])
        self.request.channel = type("Channel", (), {"transport": AbortableTransport()})()
        self.closed: list = []
        self.stream = SSEStream(self.request, self.clock, keepalive_interval=5, max_queue=2, on_close=self.closed.append)
        self.done = self.stream.start()

    def test_headers_and_first_bytes(self) -> None:
        self.assertIs(self.request.producer, self.stream)
        self.assertEqual(self.request.responseHeaders.getRawHeaders(b"content-type"), [b"text/event-stream; charset=utf-8"])
        self.assertEqual(self.request.written, [b": stream open\n\n"])
        # Events carry one token owner's data: nothing may store them.
        self.assertEqual(self.request.responseHeaders.getRawHeaders(b"cache-control"), [b"no-store, no-transform"])

    def test_keepalive_on_clock(self) -> None:
        self.clock.advance(4.9)
        self.assertEqual(len(self.request.written), 1)
        self.clock.advance(0.1)
        self.assertEqual(self.request.written[-1], b": keepalive\n\n")
        self.clock.advance(5)
        self.assertEqual(len(self.request.written), 3)

    def test_paused_queue_then_resume(self) -> None:
        self.stream.pauseProducing()
        self.stream.send("1")
        self.stream.send("2")
        self.assertEqual(len(self.request.written), 1)
        self.stream.resumeProducing()
        self.assertEqual(self.request.written[1:], [b"data: 1\n\n", b"data: 2\n\n"])

    def test_slow_consumer_aborted(self) -> None:
        self.stream.pauseProducing()
        for n in range(3):
            self.stream.send(str(n))
        self.assertTrue(self.request.channel.transport.aborted)
        self.assertTrue(self.stream.closed)
        self.assertEqual(self.closed, [self.stream])
        # Keepalives stop with the stream.
        self.clock.advance(100)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_close_fires_done(self) -> None:
        self.stream.close()
        self.assertEqual(self.successResultOf(self.done), b"")
        self.stream.send("late")
        self.assertEqual(len(self.request.written), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_client_gone(self) -> None:
        self.done.cancel()
        self.failureResultOf(self.done)
        self.assertTrue(self.stream.closed)
        self.assertEqual(self.closed, [self.stream])


class SharedKeepaliveTests(SynchronousTestCase):
    """
    L{KeepaliveTimer}: one timer for many streams, keepalives spread over
    the interval, every stream's gaps exactly one interval.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.timer = KeepaliveTimer(self.clock, 5.0, slots=5)

    def open(self) -> tuple[PushRequest, SSEStream]:
        request = PushRequest([b"mcp"])
        request.channel = type("Channel", (), {"transport": AbortableTransport()})()
        stream = SSEStream(request, self.clock, keepalive_interval=99, keepalive_timer=self.timer)
        stream.start()
        return request, stream

    def keepalives(self, request: PushRequest) -> int:
        return request.written.count(b": keepalive\n\n")

    def test_no_timer_per_stream(self) -> None:
        streams = [self.open() for _ in range(10)]
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.assertEqual(len(self.timer), 10)
        for _, stream in streams:
            stream.close()
        self.assertEqual(len(self.timer), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_interval_and_spread(self) -> None:
        """
        A stream gets its first keepalive within one interval (not sooner
        than one tick short of it) and then one every interval; streams
        opened at different times are visited on different ticks.
        """
        first, _ = self.open()
        self.clock.advance(2.5)
        second, _ = self.open()
        self.clock.advance(1.5)
        self.assertEqual((self.keepalives(first), self.keepalives(second)), (0, 0))
        self.clock.advance(1.0)  # t=5
        self.assertEqual((self.keepalives(first), self.keepalives(second)), (1, 0))
        self.clock.advance(2.0)  # t=7: second opened at 2.5, due by 7.5
        self.assertEqual((self.keepalives(first), self.keepalives(second)), (1, 1))
        self.clock.advance(5.0)  # t=12
        self.assertEqual((self.keepalives(first), self.keepalives(second)), (2, 2))
        for _ in range(20):
            self.clock.advance(1.0)
        self.assertEqual((self.keepalives(first), self.keepalives(second)), (6, 6))

    def test_late_tick_does_not_drift(self) -> None:
        request, _ = self.open()
        self.clock.advance(1.7)  # the first tick runs 0.7 s late
        self.clock.advance(3.3)  # t=5
        self.assertEqual(self.keepalives(request), 1)
        self.clock.advance(5.0)
        self.assertEqual(self.keepalives(request), 2)

    def test_closed_stream_gets_no_keepalive(self) -> None:
        request, stream = self.open()
        other, _ = self.open()
        stream.close()
        self.clock.advance(5.0)
        self.assertEqual((self.keepalives(request), self.keepalives(other)), (0, 1))

    def test_paused_stream_queues_keepalive(self) -> None:
        request, stream = self.open()
        stream.pauseProducing()
        self.clock.advance(5.0)
        self.assertEqual(self.keepalives(request), 0)
        stream.resumeProducing()
        self.assertEqual(self.keepalives(request), 1)

    def test_bad_interval(self) -> None:
        self.assertRaises(ValueError, KeepaliveTimer, self.clock, 0)


class DeadlinesTests(SynchronousTestCase):
    """
    L{Deadlines}: one delayed call for many keys, deadlines rounded up to
    the granularity (never early), rescheduling and cancelling.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.fired: list[tuple[float, object]] = []
        self.deadlines = Deadlines(self.clock, lambda key: self.fired.append((self.clock.seconds(), key)))

    def test_fires_at_deadline_rounded_up(self) -> None:
        self.deadlines.schedule("a", 2.3)
        self.assertEqual(self.deadlines.when("a"), 3.0)
        self.clock.advance(2.9)
        self.assertEqual(self.fired, [])
        self.clock.advance(0.1)
        self.assertEqual(self.fired, [(3.0, "a")])
        self.assertNotIn("a", self.deadlines)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_one_timer_for_many(self) -> None:
        for n in range(100):
            self.deadlines.schedule(n, 10 + n / 100)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(10)
        self.assertEqual([key for _, key in self.fired], [0])
        self.clock.advance(1)  # the rest were rounded up to 11: one firing
        self.assertEqual(len(self.fired), 100)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_reschedule_and_cancel(self) -> None:
        self.deadlines.schedule("a", 5)
        self.deadlines.schedule("b", 6)
        self.deadlines.schedule("a", 8)  # replaces 5
        self.deadlines.cancel("b")
        self.clock.advance(7)
        self.assertEqual(self.fired, [])
        self.deadlines.schedule("a", 7.5)  # earlier than 8 again
        self.clock.advance(1)
        self.assertEqual(self.fired, [(8.0, "a")])
        self.assertEqual(len(self.deadlines), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_earlier_deadline_rearms(self) -> None:
        self.deadlines.schedule("late", 100)
        self.deadlines.schedule("soon", 1)
        self.clock.advance(1)
        self.assertEqual(self.fired, [(1.0, "soon")])
        self.clock.advance(99)
        self.assertEqual(self.fired[-1], (100.0, "late"))

    def test_handler_may_reschedule(self) -> None:
        def again(key: object) -> None:
            self.fired.append((self.clock.seconds(), key))
            if len(self.fired) < 3:
                self.deadlines.schedule(key, self.clock.seconds() + 30)

        self.deadlines = Deadlines(self.clock, again)
        self.deadlines.schedule("s", 30)
        for _ in range(10):
            self.clock.advance(30)
        self.assertEqual(self.fired, [(30.0, "s"), (60.0, "s"), (90.0, "s")])

    def test_past_deadline_fires_on_next_turn_not_inline(self) -> None:
        self.clock.advance(50)
        self.deadlines.schedule("x", 10)
        self.assertEqual(self.fired, [])
        self.clock.advance(0)
        self.assertEqual(self.fired, [(50.0, "x")])

    def test_handler_failure_logged_others_still_fire(self) -> None:
        def handler(key: object) -> None:
            if key == "bad":
                raise RuntimeError("boom")
            self.fired.append((self.clock.seconds(), key))

        self.deadlines = Deadlines(self.clock, handler)
        self.deadlines.schedule("bad", 1)
        self.deadlines.schedule("good", 1)
        self.clock.advance(1)
        self.assertEqual(self.fired, [(1.0, "good")])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_stale_entries_do_not_pile_up(self) -> None:
        for n in range(10000):
            self.deadlines.schedule("k", 1000 + n)
        self.assertLess(len(self.deadlines._heap), 200)
        self.clock.advance(10998)
        self.assertEqual(self.fired, [])
        self.clock.advance(1)
        self.assertEqual(self.fired, [(10999.0, "k")])

    def test_infinite_deadline_is_none(self) -> None:
        self.deadlines.schedule("k", 5)
        self.deadlines.schedule("k", float("inf"))
        self.assertNotIn("k", self.deadlines)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_bad_granularity(self) -> None:
        self.assertRaises(ValueError, Deadlines, self.clock, print, 0)


class SheddingTests(SynchronousTestCase):
    """
    An open stream's twisted.web request keeps only what is read after its
    headers went out: what the access log writes when the stream ends.
    """

    def _request(self) -> tuple[Request, DummyChannel]:
        channel = DummyChannel()
        request = Request(channel)
        request.method, request.uri, request.path, request.clientproto = b"GET", b"/mcp", b"/mcp", b"HTTP/1.1"
        for name, value in (
            (b"authorization", b"Bearer secret-token"),
            (b"accept", b"text/event-stream"),
            (b"host", b"example.com"),
            (b"user-agent", b"claude-user"),
            (b"referer", b"https://claude.ai/"),
            (b"x-forwarded-for", b"203.0.113.9"),
        ):
            request.requestHeaders.setRawHeaders(name, [value])
        request.gotLength(0)
        return request, channel

    def test_headers_shed_once_sent(self) -> None:
        request, channel = self._request()
        stream = SSEStream(request, Clock(), keepalive_interval=None)
        stream.start(headers={b"Mcp-Session-Id": b"abc"})
        sent = channel.transport.written.getvalue()
        self.assertIn(b"Mcp-Session-Id: abc", sent)
        self.assertIn(b"Cache-Control: no-store", sent)
        self.assertEqual(
            sorted(name for name, _ in request.requestHeaders.getAllRawHeaders()),
            [b"Referer", b"User-Agent", b"X-Forwarded-For"],
        )
        self.assertEqual(
            list(request.responseHeaders.getAllRawHeaders()), [(b"Content-Type", [b"text/event-stream; charset=utf-8"])]
        )
        self.assertIsNone(request.content)
        self.assertEqual(channel.transport.producers, [(stream, True)])
        stream.send("still", event="message")
        # What the route does with `done`: the response ends.
        stream.done.addCallback(lambda _: request.finish())
        stream.close()
        self.assertIsNone(request.producer)
        self.assertTrue(request.finished)
        line = combinedLogFormatter("now", request)
        self.assertIn('"GET /mcp HTTP/1.1" 200', line)
        self.assertTrue(line.endswith('"https://claude.ai/" "claude-user"'), line)

    def test_not_before_the_headers_are_sent(self) -> None:
        """A request that has not started its answer is left as it is."""
        from smeldr_oauth.mcp.shedding import shed as _shed

        request, _ = self._request()
        _shed(request)
        self.assertEqual(request.requestHeaders.getRawHeaders(b"authorization"), [b"Bearer secret-token"])
        self.assertIsNotNone(request.content)


class CompactedOverAChannelTests(SynchronousTestCase):
    """
    A stream's request and channel get small attribute tables once its
    headers are sent (L{smeldr_oauth.mcp.shedding._compact}), over a real
    twisted.web channel: the stream still writes, ends with its access-log
    line, and the connection then serves its next request.
    """

    def setUp(self) -> None:
        from twisted.internet.testing import StringTransport
        from twisted.web.resource import Resource
        from twisted.web.server import NOT_DONE_YET, Site

        streams: list[SSEStream] = []
        clock = Clock()

        class Leaf(Resource):
            isLeaf = True

            def render_GET(self, request: Request) -> object:
                if request.path == b"/plain":
                    return b"plain"
                stream = SSEStream(request, clock, keepalive_interval=None)
                streams.append(stream)
                # What the route does: finish on `done`, cancel it when
                # the client leaves.
                stream.done.addCallback(lambda _: request.finish())
                request.notifyFinish().addErrback(lambda _: stream.done.cancel())
                stream.start()
                return NOT_DONE_YET

        self.lines: list[str] = []
        site = Site(Leaf())
        site.log = lambda request: self.lines.append(combinedLogFormatter("now", request))  # type: ignore[method-assign]
        self.channel = site.buildProtocol(None)
        # The channel's idle timeout runs on the test's clock, not the reactor.
        self.channel.callLater = clock.callLater  # type: ignore[union-attr]
        self.transport = StringTransport()
        self.channel.makeConnection(self.transport)
        self.streams = streams

    def test_compacted(self) -> None:
        from smeldr_oauth.mcp.shedding import _DONE_WITH

        self.channel.dataReceived(
            b"GET /mcp?x=1 HTTP/1.1\r\nHost: example.com\r\nUser-Agent: claude-user\r\nCookie: a=b\r\n\r\n"
        )
        [stream] = self.streams
        request = stream._request
        kept = vars(request)
        self.assertEqual([name for name, value in kept.items() if getattr(type(request), name, object()) is value], [])
        # Small tables (464 bytes up to 21 names, 1,584 from 43 on).
        self.assertLessEqual(len(kept), 21)
        self.assertLessEqual(len(vars(request.channel)), 21)  # type: ignore[attr-defined]
        self.assertEqual(sorted(_DONE_WITH & set(vars(request))), [])
        self.transport.clear()
        stream.send("still", event="message")
        self.assertIn(b"event: message\ndata: still\n\n", self.transport.value())
        stream.close()
        self.assertTrue(self.transport.value().endswith(b"0\r\n\r\n"))
        self.assertEqual(len(self.lines), 1)
        self.assertIn('"GET /mcp?x=1 HTTP/1.1" 200', self.lines[0])
        self.assertTrue(self.lines[0].endswith('"-" "claude-user"'), self.lines[0])
        # The same connection answers its next request.
        self.transport.clear()
        self.channel.dataReceived(b"GET /plain HTTP/1.1\r\nHost: example.com\r\n\r\n")
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 200 OK"), self.transport.value())
        self.assertTrue(self.transport.value().endswith(b"plain"))
        self.assertEqual(len(self.lines), 2)

    def test_client_gone(self) -> None:
        """A client that leaves ends the stream as before."""
        from twisted.python.failure import Failure
        from twisted.internet.error import ConnectionDone

        self.channel.dataReceived(b"GET /mcp HTTP/1.1\r\nHost: example.com\r\n\r\n")
        [stream] = self.streams
        stream.done.addErrback(lambda _: None)
        self.assertFalse(stream.closed)
        self.channel.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(stream.closed)
