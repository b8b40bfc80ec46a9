"""
L{smeldr_oauth.web.flow_events}: the site's hook publishes an C{http_step} for
discovery, the authorization page and 401/403 answers, and nothing for
every other request.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from smeldr_oauth.web.flow_events import request_finished


def finished(
    path: bytes, code: int, method: bytes = b"GET", args: Any = None, challenge: bool = False, location: bytes = b""
) -> list[dict[str, Any]]:
    request = DummyRequest(path.lstrip(b"/").split(b"/"))
    request.path = path
    request.method = method
    request.code = code
    request.args = args or {}
    if location:
        request.responseHeaders.setRawHeaders(b"location", [location])
    if challenge:
        request.responseHeaders.setRawHeaders(b"www-authenticate", [b'Bearer resource_metadata="x"'])
    with capturedLogs() as events:
        request_finished(request)
    return [e for e in events if e.get("smeldr_event") == "http_step"]


class RequestFinishedTests(SynchronousTestCase):
    def test_ordinary_requests_publish_nothing(self) -> None:
        self.assertEqual(finished(b"/oauth/token", 200, b"POST"), [])
        self.assertEqual(finished(b"/mcp", 200, b"POST"), [])
        self.assertEqual(finished(b"/oauth/authorize", 303, b"POST"), [])

    def test_discovery(self) -> None:
        [event] = finished(b"/.well-known/oauth-protected-resource/mcp", 200)
        self.assertEqual((event["path"], event["status"], event["challenge"]), ("/.well-known/oauth-protected-resource/mcp", 200, None))

    def test_authorization_page_keeps_client_and_resource_only(self) -> None:
        [event] = finished(
            b"/oauth/authorize",
            200,
            args={b"client_id": [b"c1"], b"resource": [b"https://x/mcp"], b"code_challenge": [b"secret-ish"], b"state": [b"s"]},
        )
        self.assertEqual((event["client_id"], event["resource"]), ("c1", "https://x/mcp"))
        self.assertNotIn("secret-ish", repr(event))

    def test_authorization_error_redirect(self) -> None:
        request_args = {b"client_id": [b"c1"], b"resource": [b"https://x/mcp/"]}
        [event] = finished(b"/oauth/authorize", 302, args=request_args, location=b"https://app/cb?error=invalid_target&state=s")
        self.assertEqual(event["error"], "invalid_target")

    def test_refusals_say_whether_the_challenge_was_sent(self) -> None:
        [with_header] = finished(b"/mcp", 401, b"POST", challenge=True)
        [without] = finished(b"/mcp", 403, b"POST")
        self.assertEqual((with_header["challenge"], without["challenge"]), ("yes", "no"))


class RoutineTests(SynchronousTestCase):
    def test_handed_to_the_timeline_directly(self) -> None:
        """
        One event per discovery request: when every other observer drops
        debug events (C{twist}'s file observer at info), it goes to the
        timeline without being built for the log (L{routine}).
        """
        from twisted.logger import FilteringLogObserver, Logger, LogLevel, LogLevelFilterPredicate, LogPublisher

        from smeldr_oauth.oauth.routine import RoutineEvents
        from smeldr_oauth.web import flow_events

        publisher = LogPublisher()
        written: list[dict[str, Any]] = []
        publisher.addObserver(FilteringLogObserver(written.append, [LogLevelFilterPredicate(LogLevel.info)]))
        events = RoutineEvents(publisher)
        timeline: list[dict[str, Any]] = []
        events.observe(timeline.append)
        logger = Logger(namespace=flow_events.log.namespace, observer=publisher)
        logged: list[Any] = []
        self.patch(logger, "emit", lambda *a, **kw: logged.append(a))
        self.patch(flow_events, "log", logger)
        self.patch(flow_events, "routine", events)
        request = DummyRequest([b".well-known", b"oauth-authorization-server"])
        request.path = b"/.well-known/oauth-authorization-server"
        request.code = 200
        request_finished(request)
        self.assertEqual(logged, [])
        [event] = timeline
        self.assertEqual((event["smeldr_event"], event["status"]), ("http_step", 200))
