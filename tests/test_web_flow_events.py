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
