"""
Tests for L{smeldr_oauth.web.health}: L{HealthCheck}, the store's
reachability asked by a timer, and the C{/healthz} answer made from it.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from smeldr_oauth.db.errors import StoreUnavailable
from smeldr_oauth.web.health import HealthCheck


class Store:
    """count_clients answers from C{self.answer}: a value, an exception, or a Deferred."""

    def __init__(self) -> None:
        self.answer: Any = 0
        self.calls = 0

    def count_clients(self) -> "Deferred[int]":
        self.calls += 1
        if isinstance(self.answer, Deferred):
            return self.answer
        if isinstance(self.answer, Exception):
            return fail(self.answer)
        return succeed(self.answer)


class HealthCheckTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.store = Store()
        self.check = HealthCheck(self.store, self.clock, interval=1.0)
        self.addCleanup(self.check.stop)
        self.resource = self.check.resource()

    def get(self) -> tuple[int, bytes, Any]:
        request = DummyRequest([b""])
        result = self.resource.render(request)
        if result is not NOT_DONE_YET:
            request.write(result)
            request.finish()
        return request.responseCode or 200, b"".join(request.written), request

    def test_unknown_asks_the_store(self) -> None:
        """
        Before the first check has answered, a request asks the store
        itself.
        """
        code, body, request = self.get()
        self.assertEqual((code, body, self.store.calls), (200, b'{"status":"ok"}', 1))
        self.assertEqual(request.responseHeaders.getRawHeaders(b"cache-control"), [b"no-store"])
        self.assertEqual(request.responseHeaders.getRawHeaders(b"content-type"), [b"application/json"])

    def test_answers_from_the_last_check(self) -> None:
        self.check.start()
        self.assertEqual((self.check.healthy, self.store.calls), (True, 1))
        for _ in range(3):
            self.assertEqual(self.get()[:2], (200, b'{"status":"ok"}'))
        self.assertEqual(self.store.calls, 1)

    def test_failure_within_an_interval(self) -> None:
        """
        A store that fails is seen at the next tick: 503; logged once, not
        once a tick; 200 again when it answers again.
        """
        self.check.start()
        self.store.answer = RuntimeError("gone")
        with capturedLogs() as events:
            self.clock.advance(1.0)
            code, body, request = self.get()
            self.assertEqual((code, body), (503, b'{"reason":"database error","status":"unavailable"}'))
            self.assertEqual(request.responseHeaders.getRawHeaders(b"retry-after"), [b"1"])
            self.clock.advance(1.0)
            self.clock.advance(1.0)
        self.assertEqual(len([e for e in events if e.get("log_failure") is not None]), 1)
        self.flushLoggedErrors(RuntimeError)
        self.store.answer = 0
        self.clock.advance(1.0)
        self.assertEqual(self.get()[0], 200)

    def test_unreachable(self) -> None:
        """
        A database that cannot be reached (L{StoreUnavailable}) is named as
        such, with its C{Retry-After}; a warning, not a traceback.
        """
        self.check.start()
        self.store.answer = StoreUnavailable("connection refused", retry_after=3)
        with capturedLogs() as events:
            self.clock.advance(1.0)
        code, body, request = self.get()
        self.assertEqual((code, body), (503, b'{"reason":"database unreachable","status":"unavailable"}'))
        self.assertEqual(request.responseHeaders.getRawHeaders(b"retry-after"), [b"3"])
        self.assertEqual([e.get("log_failure") for e in events], [None])

    def test_upstreams(self) -> None:
        """
        With the OAuth gateway's upstreams, a healthy answer lists their
        state; an unhealthy one does not.
        """
        self.check.upstreams = lambda: {"everything": {"instances": 1}}
        self.check.start()
        self.assertEqual(
            json.loads(self.get()[1]), {"status": "ok", "upstreams": {"everything": {"instances": 1}}}
        )

    def test_hung_store(self) -> None:
        """
        A check that has not answered within an interval counts as a
        failure: a hung database is not healthy.
        """
        self.check.start()
        self.store.answer = Deferred()
        self.clock.advance(1.0)
        self.assertEqual(self.get()[0], 200)
        self.clock.advance(1.0)
        self.assertEqual(self.get()[0], 503)
        self.store.answer.callback(0)
        self.assertEqual(self.get()[0], 200)

    def test_stop(self) -> None:
        self.check.start()
        self.check.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_gone_client(self) -> None:
        """
        A client that leaves before the first check answers gets nothing
        written after it has gone.
        """
        self.store.answer = Deferred()
        code, body, request = self.get()
        request.processingFailed(Failure(ConnectionDone()))
        self.store.answer.callback(0)
        self.assertEqual((request.written, request.finished), ([], 0))
