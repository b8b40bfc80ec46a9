"""
Tests for L{smeldr_oauth.web.routes} and L{smeldr_oauth.web.errors}: the
one routing idiom and the one error path, through Klein with
L{treq.testing.StubTreq}.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from klein import Klein
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from smeldr_oauth.oauth import errors as oauth_errors
from smeldr_oauth.web import errors
from smeldr_oauth.web.responses import json_response
from smeldr_oauth.web.routes import CORS, Route, mount_routes


class Answer:
    def __init__(self, status: int, headers: Any, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def header(self, name: str) -> Optional[str]:
        values = self.headers.getRawHeaders(name)
        return None if values is None else values[0]

    @property
    def json(self) -> Any:
        return json.loads(self.body)


class RoutesTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.app = Klein()
        self.calls: list[str] = []

    def request(self, method: str, path: str, **kw: Any) -> Answer:
        treq = StubTreq(self.app.resource())
        d: Deferred[Any] = treq.request(method, "http://x.example" + path, **kw)
        response = self.successResultOf(d)
        body = self.successResultOf(treq.content(response))
        return Answer(response.code, response.headers, body)

    def assertJSONError(self, answer: Answer, status: int, code: str) -> None:
        self.assertEqual(answer.status, status)
        self.assertEqual(answer.header("content-type"), "application/json")
        self.assertEqual(answer.header("cache-control"), "no-store")
        self.assertEqual(answer.json["error"], code)

    def assertPage(self, answer: Answer, status: int) -> None:
        self.assertEqual(answer.status, status)
        self.assertEqual(answer.header("content-type"), "text/html; charset=utf-8")
        self.assertEqual(answer.header("x-frame-options"), "DENY")
        self.assertIn("frame-ancestors 'none'", answer.header("content-security-policy") or "")
        self.assertTrue(answer.body.startswith(b"<!doctype html>"), answer.body[:100])


class RouteTests(RoutesTestCase):
    def setUp(self) -> None:
        super().setUp()

        def get(request: Any) -> bytes:
            self.calls.append("GET")
            return json_response(request, {"ok": True})

        async def post(request: Any) -> bytes:
            self.calls.append("POST")
            return json_response(request, {"posted": True}, 201)

        mount_routes(
            self.app,
            [
                Route(path="/api", methods={"GET": get, "POST": post}, cors=CORS(allow_headers="Content-Type")),
                Route(path="/page", methods={"POST": post}, dialect=errors.PAGE),
                Route(path="/rpc", methods={"POST": post}, dialect=errors.JSONRPC),
            ],
        )

    def test_methods(self) -> None:
        self.assertEqual(self.request("GET", "/api").json, {"ok": True})
        self.assertEqual(self.request("POST", "/api").status, 201)
        head = self.request("HEAD", "/api")
        self.assertEqual((head.status, head.body), (200, b""))
        self.assertEqual(self.calls, ["GET", "POST", "GET"])

    def test_compact_json(self) -> None:
        """
        A JSON answer is compact (no space after a separator), with
        anything outside ASCII escaped, and uncacheable.
        """
        self.app.route("/doc")(lambda request: json_response(request, {"a": [1, None], "b": "\u00e9"}))
        answer = self.request("GET", "/doc")
        self.assertEqual(answer.body, b'{"a":[1,null],"b":"\\u00e9"}')
        self.assertEqual(answer.header("cache-control"), "no-store")

    def test_cors_on_every_answer(self) -> None:
        self.assertEqual(self.request("GET", "/api").header("access-control-allow-origin"), "*")
        self.assertEqual(self.request("PUT", "/api").header("access-control-allow-origin"), "*")

    def test_preflight(self) -> None:
        answer = self.request("OPTIONS", "/api")
        self.assertEqual(answer.status, 204)
        self.assertEqual(answer.header("access-control-allow-methods"), "GET, HEAD, OPTIONS, POST")
        self.assertEqual(answer.header("allow"), "GET, HEAD, OPTIONS, POST")
        self.assertEqual(answer.header("access-control-allow-headers"), "Content-Type")
        self.assertEqual(answer.header("access-control-max-age"), "86400")
        self.assertEqual(self.calls, [])

    def test_no_preflight_without_cors(self) -> None:
        answer = self.request("OPTIONS", "/page")
        self.assertPage(answer, 405)
        self.assertEqual(answer.header("allow"), "POST")
        self.assertIsNone(answer.header("access-control-allow-origin"))

    def test_method_not_allowed_json(self) -> None:
        for method in ("PUT", "DELETE", "PATCH", "BREW"):
            answer = self.request(method, "/api")
            self.assertJSONError(answer, 405, "invalid_request")
            self.assertEqual(answer.header("allow"), "GET, HEAD, OPTIONS, POST")
        self.assertEqual(self.calls, [])

    def test_method_not_allowed_page(self) -> None:
        answer = self.request("GET", "/page")
        self.assertPage(answer, 405)
        self.assertIn(b"Method not allowed", answer.body)

    def test_method_not_allowed_jsonrpc(self) -> None:
        answer = self.request("GET", "/rpc")
        self.assertEqual(answer.status, 405)
        self.assertEqual(answer.json["error"]["code"], -32600)
        self.assertIsNone(answer.json["id"])

    def test_no_head(self) -> None:
        """
        C{head=False}: a C{GET} that opens a stream does not answer C{HEAD}.
        """
        mount_routes(self.app, [Route(path="/stream", methods={"GET": lambda r: b"x"}, head=False)])
        answer = self.request("HEAD", "/stream")
        self.assertEqual((answer.status, answer.header("allow")), (405, "GET"))

    def test_trailing_slash_is_another_path(self) -> None:
        """
        C{branch} is off: C{/api/} is not C{/api} (and, the app not being
        the whole site, its 404 is Klein's own).
        """
        self.assertEqual(self.request("GET", "/api/").status, 404)
        self.assertEqual(self.calls, [])


class ErrorPathTests(RoutesTestCase):
    """
    Handlers raise; the error path answers in the route's format.
    """

    def mount(self, dialect: errors.Dialect, error: BaseException, **route: Any) -> None:
        def fail(request: Any) -> bytes:
            raise error

        async def fail_later(request: Any) -> bytes:
            raise error

        mount_routes(
            self.app,
            [
                Route(path="/now", methods={"GET": fail}, dialect=dialect, **route),
                Route(path="/later", methods={"GET": fail_later}, dialect=dialect, **route),
            ],
        )

    def test_http_error(self) -> None:
        self.mount(errors.JSON, errors.too_many_requests(7))
        for path in ("/now", "/later"):
            answer = self.request("GET", path)
            self.assertJSONError(answer, 429, "temporarily_unavailable")
            self.assertEqual(answer.header("retry-after"), "7")

    def test_http_error_page(self) -> None:
        self.mount(errors.PAGE, errors.body_too_large())
        self.assertPage(self.request("GET", "/later"), 413)

    def test_jsonrpc_body(self) -> None:
        body = {"jsonrpc": "2.0", "id": 3, "error": {"code": -32602, "message": "no"}}
        self.mount(errors.JSONRPC, errors.HTTPError(400, "invalid_request", "no", body=body))
        answer = self.request("GET", "/now")
        self.assertEqual((answer.status, answer.json), (400, body))

    def test_oauth_error(self) -> None:
        self.mount(errors.JSON, oauth_errors.invalid_grant("nope"))
        answer = self.request("GET", "/later")
        self.assertEqual(answer.status, 400)
        self.assertEqual(answer.json, {"error": "invalid_grant", "error_description": "nope"})

    def test_invalid_client_basic(self) -> None:
        """
        A 401 C{invalid_client} after Basic authentication asks for Basic
        again (RFC 6749 section 5.2); without Basic it does not.
        """
        self.mount(errors.JSON, oauth_errors.invalid_client("who?"))
        answer = self.request("GET", "/now", headers={"Authorization": "Basic eDp5"})
        self.assertEqual(answer.status, 401)
        self.assertEqual(answer.header("www-authenticate"), 'Basic realm="oauth"')
        self.assertIsNone(self.request("GET", "/now").header("www-authenticate"))

    def test_rate_limited(self) -> None:
        self.mount(errors.JSON, oauth_errors.RateLimited(30))
        answer = self.request("GET", "/now")
        self.assertJSONError(answer, 429, "temporarily_unavailable")
        self.assertEqual(answer.header("retry-after"), "30")

    def test_untrusted_redirect(self) -> None:
        self.mount(errors.PAGE, oauth_errors.UntrustedRedirect("Unknown application", "Who?", 429, retry_after=60))
        answer = self.request("GET", "/later")
        self.assertPage(answer, 429)
        self.assertEqual(answer.header("retry-after"), "60")
        self.assertIn(b"Unknown application", answer.body)

    def test_authorize_redirect(self) -> None:
        self.mount(
            errors.PAGE,
            oauth_errors.AuthorizeRedirectError(
                "https://c.example/cb?x=1", "s&t", oauth_errors.invalid_scope("no"), issuer="https://as.example"
            ),
        )
        answer = self.request("GET", "/now", allow_redirects=False)
        self.assertEqual(answer.status, 303)
        self.assertEqual(
            answer.header("location"),
            "https://c.example/cb?x=1&error=invalid_scope&error_description=no&state=s%26t&iss=https%3A%2F%2Fas.example",
        )

    def test_bug(self) -> None:
        """
        Anything else is a 500 in the route's format, logged once with its
        traceback, and says nothing of what went wrong.
        """
        self.mount(errors.JSON, ZeroDivisionError("secret detail"))
        with capturedLogs() as events:
            answer = self.request("GET", "/later")
        self.assertJSONError(answer, 500, "server_error")
        self.assertNotIn(b"secret", answer.body)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertEqual(len([e for e in events if e.get("log_failure")]), 1)

    def test_bug_page(self) -> None:
        self.mount(errors.PAGE, KeyError("x"))
        self.assertPage(self.request("GET", "/now"), 500)
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)

    def test_before(self) -> None:
        """
        A route's C{before} check runs for every method, OPTIONS included,
        and its refusal is written like the handler's.
        """

        def before(request: Any) -> None:
            raise errors.HTTPError(403, "forbidden", "Origin not allowed")

        self.mount(errors.JSONRPC, ZeroDivisionError(), before=before, cors=CORS(allow_headers="X"))
        for method in ("GET", "OPTIONS", "PUT"):
            answer = self.request(method, "/now")
            self.assertEqual(answer.status, 403)
            self.assertEqual(answer.json["error"]["message"], "Origin not allowed")

    def test_foreign_routes_untouched(self) -> None:
        """
        Mounted into someone else's app (not site-wide), their routes'
        errors and their 404s stay theirs.
        """
        self.mount(errors.JSON, ZeroDivisionError())

        @self.app.route("/theirs")
        def theirs(request: Any) -> bytes:
            raise ValueError("theirs")

        @self.app.handle_errors(ValueError)
        def their_handler(request: Any, failure: Any) -> bytes:
            request.setResponseCode(418)
            return b"mine"

        answer = self.request("GET", "/theirs")
        self.assertEqual((answer.status, answer.body), (418, b"mine"))
        self.assertNotEqual(self.request("GET", "/nope").header("content-type"), "application/json")
        self.flushLoggedErrors(ZeroDivisionError)


class SiteWideTests(RoutesTestCase):
    """
    When the app is the whole site, every unknown path and method gets the
    project's own answer: JSON on API paths, the site's page elsewhere.
    """

    def setUp(self) -> None:
        super().setUp()
        mount_routes(self.app, [Route(path="/oauth/grants", methods={"GET": lambda r: b"ok"}, dialect=errors.PAGE)])

        @self.app.route("/theirs", methods=["GET"])
        def theirs(request: Any) -> bytes:
            raise ValueError("bug")

        errors.install_error_handlers(self.app, site_wide=True)

    def test_unknown_path_page(self) -> None:
        for path in ("/nope", "/", "/a/b/c", "/oauth"):
            answer = self.request("GET", path)
            self.assertPage(answer, 404)
            self.assertIn(b"Not found", answer.body)

    def test_unknown_api_path(self) -> None:
        for path in ("/oauth/nope", "/.well-known/nope", "/mcp/x", "/healthz/x", "/token/"):
            self.assertJSONError(self.request("GET", path), 404, "not_found")

    def test_unknown_method(self) -> None:
        answer = self.request("PUT", "/oauth/grants")
        self.assertPage(answer, 405)
        self.assertEqual(answer.header("allow"), "GET, HEAD")

    def test_werkzeug_method_not_allowed(self) -> None:
        """
        A route restricted by method (someone else's, on the same site)
        answers 405 in our format too, with a sorted C{Allow}.
        """
        answer = self.request("DELETE", "/theirs")
        self.assertPage(answer, 405)
        self.assertEqual(answer.header("allow"), "GET, HEAD")

    def test_foreign_bug(self) -> None:
        self.assertPage(self.request("GET", "/theirs"), 500)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_extra_api_prefixes(self) -> None:
        errors.install_error_handlers(self.app, site_wide=True, api_prefixes=["/auth/oauth/"])
        self.assertJSONError(self.request("GET", "/auth/oauth/x"), 404, "not_found")
        self.assertPage(self.request("GET", "/auth/x"), 404)


class DirectRouteTests(SynchronousTestCase):
    """
    L{DirectRoute}: a route's answers without Klein, when the handler's
    result comes later, fails later, or is no longer wanted.
    """

    def render(self, handler: Any, method: bytes = b"POST") -> tuple[Any, Any]:
        from twisted.web.server import NOT_DONE_YET
        from twisted.web.test.requesthelper import DummyRequest

        from smeldr_oauth.web.routes import DirectRoute

        resource = DirectRoute(Route(path="/x", methods={"POST": handler}, cors=CORS(allow_headers="A")))
        request = DummyRequest([b"x"])
        request.method = method
        result = resource.render(request)
        if result is not NOT_DONE_YET:
            request.write(result)
            request.finish()
        return request, result

    def test_at_once(self) -> None:
        request, result = self.render(lambda r: b"now")
        self.assertEqual((result, request.finished), (b"now", 1))
        self.assertEqual(request.responseHeaders.getRawHeaders(b"access-control-allow-origin"), [b"*"])

    def test_later(self) -> None:
        d: Deferred[bytes] = Deferred()
        request, _ = self.render(lambda r: d)
        self.assertEqual(request.finished, 0)
        d.callback(b"later")
        self.assertEqual((request.written, request.finished), ([b"later"], 1))

    def test_later_framed_by_length(self) -> None:
        """
        A body that comes later (a refresh, after its group commit) is
        sent whole, with a C{Content-Length}, as one returned at once is:
        not as a chunk and the closing chunk.
        """
        from twisted.web.server import NOT_DONE_YET, Request
        from twisted.web.test.requesthelper import DummyChannel

        from smeldr_oauth.web.routes import DirectRoute

        d: Deferred[bytes] = Deferred()
        resource = DirectRoute(Route(path="/x", methods={"POST": lambda r: d}))
        channel = DummyChannel()
        request = Request(channel)
        request.method, request.clientproto, request.uri, request.path = b"POST", b"HTTP/1.1", b"/x", b"/x"
        self.assertIs(resource.render(request), NOT_DONE_YET)
        d.callback(b"later")
        head, _, body = channel.transport.written.getvalue().partition(b"\r\n\r\n")
        self.assertEqual(body, b"later")
        self.assertIn(b"\r\nContent-Length: 5", head)
        self.assertNotIn(b"Transfer-Encoding", head)

    def test_later_error(self) -> None:
        d: Deferred[bytes] = Deferred()
        request, _ = self.render(lambda r: d)
        d.errback(oauth_errors.invalid_grant("no"))
        self.assertEqual((request.responseCode, request.finished), (400, 1))
        self.assertEqual(json.loads(b"".join(request.written))["error"], "invalid_grant")

    def test_raises(self) -> None:
        def handler(request: Any) -> bytes:
            raise oauth_errors.invalid_request("bad")

        request, _ = self.render(handler)
        self.assertEqual(request.responseCode, 400)
        request, _ = self.render(handler, b"PUT")
        self.assertEqual((request.responseCode, request.responseHeaders.getRawHeaders(b"allow")), (405, [b"OPTIONS, POST"]))

    def test_coroutine(self) -> None:
        async def handler(request: Any) -> bytes:
            return b"done"

        request, result = self.render(handler)
        self.assertEqual(result, b"done")

    def test_client_gone(self) -> None:
        """
        The client went away: the handler's Deferred is cancelled, nothing
        is written.
        """
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        cancelled: list[Any] = []
        d: Deferred[bytes] = Deferred(cancelled.append)
        request, _ = self.render(lambda r: d)
        with capturedLogs():
            request.processingFailed(Failure(ConnectionDone()))
        self.assertEqual(len(cancelled), 1)
        self.assertEqual((request.written, request.finished), ([], 0))


class DirectCoroutineTests(DirectRouteTests):
    """
    L{DirectRoute} running a coroutine handler itself (L{_Driven}), where
    it awaits a L{Deferred} that fires later: answered, failed, cancelled
    as through C{ensureDeferred}.
    """

    def test_not_through_ensure_deferred(self) -> None:
        """
        A coroutine that waits is resumed by a plain callback, not by
        Twisted's coroutine driver (a cancellable Deferred, a status, a
        context copy and a callback chain a request).
        """
        from twisted.internet import defer

        driven: list[Any] = []
        original = defer._cancellableInlineCallbacks

        def counted(coro: Any) -> Any:
            driven.append(coro)
            return original(coro)

        self.patch(defer, "_cancellableInlineCallbacks", counted)
        d: Deferred[bytes] = Deferred()

        async def handler(request: Any) -> bytes:
            return await d

        request, _ = self.render(handler)
        d.callback(b"later")
        self.assertEqual((request.written, request.finished), ([b"later"], 1))
        self.assertEqual(driven, [])

    def test_later(self) -> None:
        first: Deferred[bytes] = Deferred()
        second: Deferred[bytes] = Deferred()

        async def handler(request: Any) -> bytes:
            return await first + await second

        request, _ = self.render(handler)
        self.assertEqual(request.finished, 0)
        first.callback(b"la")
        self.assertEqual(request.finished, 0)
        second.callback(b"ter")
        self.assertEqual((request.written, request.finished), ([b"later"], 1))
        # The awaited Deferreds are left with no result to report.
        self.assertIsNone(self.successResultOf(first))

    def test_later_framed_by_length(self) -> None:
        from twisted.web.server import NOT_DONE_YET, Request
        from twisted.web.test.requesthelper import DummyChannel

        from smeldr_oauth.web.routes import DirectRoute

        d: Deferred[bytes] = Deferred()

        async def handler(request: Any) -> bytes:
            return await d

        resource = DirectRoute(Route(path="/x", methods={"POST": handler}))
        channel = DummyChannel()
        request = Request(channel)
        request.method, request.clientproto, request.uri, request.path = b"POST", b"HTTP/1.1", b"/x", b"/x"
        self.assertIs(resource.render(request), NOT_DONE_YET)
        d.callback(b"later")
        head, _, body = channel.transport.written.getvalue().partition(b"\r\n\r\n")
        self.assertEqual(body, b"later")
        self.assertIn(b"\r\nContent-Length: 5", head)

    def test_later_error(self) -> None:
        d: Deferred[bytes] = Deferred()

        async def handler(request: Any) -> bytes:
            return await d

        request, _ = self.render(handler)
        d.errback(oauth_errors.invalid_grant("no"))
        self.assertEqual((request.responseCode, request.finished), (400, 1))
        self.assertEqual(json.loads(b"".join(request.written))["error"], "invalid_grant")
        self.assertIsNone(self.successResultOf(d))

    def test_error_raised_where_awaited(self) -> None:
        """
        A failure is raised at the C{await}: the coroutine may catch it
        and answer.
        """
        d: Deferred[bytes] = Deferred()

        async def handler(request: Any) -> bytes:
            try:
                return await d
            except oauth_errors.OAuthError as e:
                return e.error.encode()

        request, _ = self.render(handler)
        d.errback(oauth_errors.invalid_grant("no"))
        self.assertEqual((request.written, request.finished), ([b"invalid_grant"], 1))

    def test_at_once_error(self) -> None:
        async def handler(request: Any) -> bytes:
            raise oauth_errors.invalid_request("bad")

        request, _ = self.render(handler)
        self.assertEqual((request.responseCode, request.finished), (400, 1))

    def test_client_gone(self) -> None:
        """
        The client went away: what the coroutine awaits is cancelled, the
        coroutine sees the C{CancelledError}, nothing is written and
        nothing logged.
        """
        from twisted.internet.defer import CancelledError
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        seen: list[Any] = []
        d: Deferred[bytes] = Deferred()

        async def handler(request: Any) -> bytes:
            try:
                return await d
            except CancelledError as e:
                seen.append(e)
                raise

        request, _ = self.render(handler)
        with capturedLogs() as events:
            request.processingFailed(Failure(ConnectionDone()))
        self.assertEqual(len(seen), 1)
        self.assertEqual((request.written, request.finished), ([], 0))
        self.assertEqual([e for e in events if e.get("log_failure") is not None and "after its answer" in e.get("log_format", "")], [])

    def test_awaits_something_else(self) -> None:
        """
        Only Deferreds can be awaited here: anything else is raised into
        the coroutine as a C{TypeError}, which answers as any bug does.
        """

        class Other:
            def __await__(self) -> Any:
                yield 42

        async def handler(request: Any) -> bytes:
            return await Other()  # type: ignore[no-any-return]

        from twisted.web.server import Request
        from twisted.web.test.requesthelper import DummyChannel

        from smeldr_oauth.web.routes import DirectRoute

        resource = DirectRoute(Route(path="/x", methods={"POST": handler}))
        channel = DummyChannel()
        request = Request(channel)
        request.method, request.clientproto, request.uri, request.path = b"POST", b"HTTP/1.1", b"/x", b"/x"
        with capturedLogs():
            body = resource.render(request)
        self.assertEqual(request.code, 500)
        self.assertEqual(json.loads(body)["error"], "server_error")
        self.assertEqual(len(self.flushLoggedErrors(TypeError)), 1)
