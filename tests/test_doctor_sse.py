"""
Tests for L{smeldr_oauth.doctor.sse}: splitting a stream into timed events,
and judging crafted timelines (buffering, proxy timeouts, good streams).
"""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from smeldr_oauth.doctor.model import FAIL, OK, SKIP
from smeldr_oauth.doctor.sse import CLOSED, FAILED, WATCHED, EventTimeline, StreamObservation, judge, slack, watch_time

URL = "https://example.com/mcp"


class TimelineTests(SynchronousTestCase):
    def test_events(self) -> None:
        timeline = EventTimeline()
        timeline.feed(0.1, b": stream open\n\n: keep")
        timeline.feed(1.0, b"alive\n\nevent: endpoint\r\ndata: /mcp/message\r\n\r\n")
        timeline.feed(1.5, b"id: 3\ndata: {}\n\n\n\n")
        self.assertEqual(timeline.events, [(0.1, "comment"), (1.0, "comment"), (1.0, "endpoint"), (1.5, "message")])

    @given(st.lists(st.binary(max_size=50), max_size=20))
    def test_splitAnywhere(self, pieces: list[bytes]) -> None:
        """
        However the bytes are cut, the events are the same.
        """
        stream = b"".join(pieces) + b"\n\n: keepalive\n\nevent: message\ndata: x\n\n"
        whole = EventTimeline()
        whole.feed(0, stream)
        cut = EventTimeline()
        for i in range(0, len(stream), 3):
            cut.feed(0, stream[i : i + 3])
        self.assertEqual([k for _, k in whole.events], [k for _, k in cut.events])

    def test_crlfAcrossChunks(self) -> None:
        timeline = EventTimeline()
        for piece in (b": a\r", b"\n\r", b"\n: b\r\n\r\n"):
            timeline.feed(0, piece)
        self.assertEqual(timeline.events, [(0, "comment"), (0, "comment")])

    def test_bounded(self) -> None:
        timeline = EventTimeline(limit=10)
        timeline.feed(0, b"x" * 100)
        timeline.feed(0, b"\n\n: ok\n\n")
        self.assertEqual(timeline.events[-1], (0, "comment"))


def observation(events: Any = (), ended: str = WATCHED, ended_at: float = 3.0, **changes: Any) -> StreamObservation:
    values: dict[str, Any] = {
        "url": URL,
        "status": 200,
        "content_type": "text/event-stream",
        "headers_at": 0.05,
        "events": tuple(events),
        "ended": ended,
        "ended_at": ended_at,
    }
    values.update(changes)
    return StreamObservation(**values)


class JudgeTests(SynchronousTestCase):
    """
    With a keepalive interval of 2 s: a keepalive is late after 3 s.
    """

    def test_timing(self) -> None:
        self.assertEqual((slack(2), watch_time(2)), (1.0, 3.0))
        self.assertEqual((slack(15), watch_time(15)), (3.75, 18.75))

    def test_good(self) -> None:
        verdict = judge(observation([(0.06, "comment"), (2.0, "comment")]), 2)
        self.assertEqual(verdict.status, OK)
        self.assertIn("1 keepalive(s)", verdict.summary)

    def test_nothingWhileOpen(self) -> None:
        verdict = judge(observation([]), 2)
        self.assertEqual(verdict.status, FAIL)
        self.assertIn("buffers", verdict.summary)

    def test_firstBytesOnlyThenSilence(self) -> None:
        verdict = judge(observation([(0.06, "comment")], ended_at=3.5), 2)
        self.assertEqual(verdict.status, FAIL)
        self.assertIn("no event for 3.4 s", verdict.summary)
        self.assertIn("proxy_buffering off", verdict.fix)

    def test_lateKeepalive(self) -> None:
        """
        Held back for a while, then released (a buffer filled): the gap
        names buffering even though a keepalive came.
        """
        verdict = judge(observation([(0.06, "comment"), (3.5, "comment"), (3.5, "comment")], ended_at=4.0), 2)
        self.assertEqual(verdict.status, FAIL)
        self.assertIn("buffers", verdict.summary)

    def test_cutBeforeKeepalive(self) -> None:
        verdict = judge(observation([(0.06, "comment")], ended=CLOSED, ended_at=1.05), 2)
        self.assertEqual(verdict.status, FAIL)
        self.assertIn("closed after 1.0 s, before the first keepalive", verdict.summary)
        self.assertIn("timeout server", verdict.fix)

    def test_cutAfterKeepalives(self) -> None:
        verdict = judge(observation([(0.06, "comment"), (2.0, "comment")], ended=CLOSED, ended_at=2.5), 2)
        self.assertIn("although keepalives arrived", verdict.summary)

    def test_burstAtClose(self) -> None:
        """
        Everything at once when the stream ended: a buffer flushed at the
        end.
        """
        verdict = judge(
            observation([(4.9, "comment"), (4.9, "comment"), (4.95, "comment")], ended=CLOSED, ended_at=5.0), 2
        )
        self.assertIn("buffered", verdict.summary)

    def test_headersHeldBack(self) -> None:
        verdict = judge(
            observation(status=None, headers_at=None, ended=FAILED, ended_at=3.0, error="no answer within 3 s (timed out)"),
            2,
        )
        self.assertEqual(verdict.status, FAIL)
        self.assertIn("not even the response headers", verdict.summary)

    def test_refused(self) -> None:
        verdict = judge(observation(status=None, ended=FAILED, error="connection refused"), 2)
        self.assertIn("connection refused", verdict.summary)
        verdict = judge(observation(status=404, content_type="application/json", ended=CLOSED), 2)
        self.assertIn("not an event stream", verdict.summary)

    def test_onlyEventsNoKeepalive(self) -> None:
        verdict = judge(observation([(0.06, "endpoint"), (1.5, "message")], ended_at=2.5), 2)
        self.assertEqual(verdict.status, FAIL)
        self.assertIn("no keepalive", verdict.summary)

    def test_skipped(self) -> None:
        self.assertEqual(judge(None, 2).status, SKIP)
        self.assertEqual(judge(None, 2, "initialize answered 401").summary, "initialize answered 401")
