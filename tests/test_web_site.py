"""
Tests for L{smeldr_oauth.web.site}: the request-body cap, requests refused
before routing, and trusted
forwarded headers, over real sockets.
"""

from __future__ import annotations

import re

from typing import Any, Callable, Optional

from klein import Klein
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, serverFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.http import Request
from twisted.web.resource import Resource
from twisted.web.test.requesthelper import DummyChannel

from twisted.web.server import version

from smeldr_oauth.web.site import HTTPDate, SmeldrRequest, SmeldrSite, TrustedProxies, routable_host, routable_host_header


class Echo(Resource):
    isLeaf = True

    def render(self, request: Any) -> bytes:
        body = request.content.read()
        return f"{request.getClientAddress().host} {len(body)}".encode()


class Raw(Protocol):
    """
    Sends C{request} and collects the answer until the server closes, or,
    with C{until}, until C{until(received)} says so (then it hangs up).
    """

    def __init__(self, request: bytes, until: Any = None) -> None:
        self.request = request
        self.until = until
        self.received = b""
        self.done: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.until is not None and not self.done.called and self.until(self.received):
            self.done.callback(self.received)
            self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        if not self.done.called:
            self.done.callback(self.received)


async def exchange(case: TestCase, site: SmeldrSite, request: bytes) -> bytes:
    """
    Send C{request} to C{site} over a real socket and return all it answers.
    """
    port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(site)
    case.addCleanup(port.stopListening)
    protocol = Raw(request)
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
    await endpoint.connect(Factory.forProtocol(lambda: protocol))
    return await protocol.done


class SiteOverSocketTests(TestCase):
    async def exchange(self, site: SmeldrSite, request: bytes) -> bytes:
        return await exchange(self, site, request)

    async def test_body_cap_by_length(self) -> None:
        site = SmeldrSite(Echo(), max_body=10)
        answer = await self.exchange(
            site, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\nConnection: close\r\n\r\n" + b"a" * 11
        )
        self.assertIn(b" 413 ", answer.split(b"\r\n")[0])

    async def test_body_cap_chunked(self) -> None:
        site = SmeldrSite(Echo(), max_body=10)
        chunks = b"6\r\naaaaaa\r\n6\r\naaaaaa\r\n0\r\n\r\n"
        answer = await self.exchange(
            site,
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + chunks,
        )
        self.assertIn(b" 413 ", answer.split(b"\r\n")[0])

    async def test_body_under_cap(self) -> None:
        site = SmeldrSite(Echo(), max_body=10)
        answer = await self.exchange(
            site, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\nConnection: close\r\n\r\n" + b"a" * 10
        )
        self.assertTrue(answer.endswith(b"127.0.0.1 10"), answer)

    async def asked(self, method: str, read: Callable[[Any], Any]) -> tuple[bytes, list[Any], list[object]]:
        """
        Three requests on one connection, each reading C{read(request)}:
        the answer, what each read, and the transports asked through
        C{tcp.Server}'s C{method}.
        """
        from twisted.internet import tcp

        asked: list[object] = []
        ask = getattr(tcp.Server, method)

        def counted(transport: Any) -> Any:
            asked.append(transport)
            return ask(transport)

        self.patch(tcp.Server, method, counted)
        seen: list[Any] = []

        class Reader(Resource):
            isLeaf = True

            def render_GET(self, request: Any) -> bytes:
                seen.append(read(request))
                return b"ok"

        answer = await self.exchange(
            SmeldrSite(Reader()),
            b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /c HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        return answer, seen, asked

    async def test_local_address_asked_once(self) -> None:
        """
        Each request knows the connection's local address
        (C{request.getHost()}), but the socket is asked for it once per
        connection, not once per request.
        """
        answer, seen, asked = await self.asked("getHost", lambda request: request.getHost())
        self.assertEqual(answer.count(b"200 OK"), 3)
        self.assertEqual(len(seen), 3)
        self.assertEqual({(a.type, a.host) for a in seen}, {("TCP", "127.0.0.1")})
        self.assertEqual(len(set(seen)), 1)
        self.assertEqual(len(asked), 1)

    async def test_peer_address_asked_once(self) -> None:
        """
        Each request knows its peer (C{request.getClientAddress()}), but
        the transport is asked for it once per connection, not once per
        request.
        """
        answer, seen, asked = await self.asked("getPeer", lambda request: request.getClientAddress())
        self.assertEqual(answer.count(b"200 OK"), 3)
        self.assertEqual(len(seen), 3)
        self.assertEqual({(a.type, a.host) for a in seen}, {("TCP", "127.0.0.1")})
        self.assertEqual(len(asked), 1)

    async def test_client_address_once_a_request(self) -> None:
        """
        The client's address is worked out once a request (the token
        endpoint and the access log both ask), from the peer and, for a
        trusted proxy, its C{X-Forwarded-For}.
        """
        worked: list[object] = []
        work = SmeldrRequest._client_address

        def counted(request: Any) -> Any:
            worked.append(request)
            return work(request)

        self.patch(SmeldrRequest, "_client_address", counted)
        seen: list[str] = []

        class Twice(Resource):
            isLeaf = True

            def render_GET(self, request: Any) -> bytes:
                seen.append(request.getClientAddress().host)
                seen.append(request.getClientAddress().host)
                return b"ok"

        site = SmeldrSite(Twice(), trusted_proxies=TrustedProxies(["127.0.0.1/32"]))
        answer = await self.exchange(
            site,
            b"GET /a HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 203.0.113.9\r\n\r\n"
            b"GET /b HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 203.0.113.10\r\nConnection: close\r\n\r\n",
        )
        self.assertEqual(answer.count(b"200 OK"), 2)
        self.assertEqual(seen, ["203.0.113.9"] * 2 + ["203.0.113.10"] * 2)
        self.assertEqual(len(worked), 2)

    async def test_date_header(self) -> None:
        """
        Every answer carries C{Server} and C{Date} (as twisted.web's
        C{Request.process} sets them), the date from L{http_date}.
        """
        from smeldr_oauth.web import site as site_module

        self.patch(site_module, "http_date", lambda: b"Sun, 06 Nov 1994 08:49:37 GMT")
        site = SmeldrSite(Echo())
        answer = await self.exchange(site, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        head = answer.split(b"\r\n\r\n")[0].split(b"\r\n")
        self.assertIn(b"Date: Sun, 06 Nov 1994 08:49:37 GMT", head)
        self.assertIn(b"Server: " + version, head)

    async def test_forwarded_ignored_by_default(self) -> None:
        site = SmeldrSite(Echo())
        answer = await self.exchange(
            site, b"GET / HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 203.0.113.9\r\nConnection: close\r\n\r\n"
        )
        self.assertTrue(answer.endswith(b"127.0.0.1 0"), answer)

    async def test_forwarded_from_trusted_proxy(self) -> None:
        site = SmeldrSite(Echo(), trusted_proxies=TrustedProxies(["127.0.0.0/8"]))
        answer = await self.exchange(
            site,
            b"GET / HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 198.51.100.7, 203.0.113.9\r\n"
            b"Connection: close\r\n\r\n",
        )
        self.assertTrue(answer.endswith(b"203.0.113.9 0"), answer)


def klein_app() -> Klein:
    app = Klein()

    @app.route("/x/<name>")
    def x(request: Any, name: str) -> bytes:
        return name.encode("utf-8")

    return app


class RefusedBeforeRoutingTests(TestCase):
    """
    What Klein cannot route (a path that percent-decodes to bytes that are
    not UTF-8, a method that is not a token, a Host that is not ASCII) is a
    400 from the site itself: no traceback, and no log line beyond the
    access log's (Klein logs a multi-line traceback for each).
    """

    async def exchange(self, request: bytes) -> tuple[bytes, list[dict[str, Any]]]:
        site = SmeldrSite(klein_app().resource())
        port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(site)
        self.addCleanup(port.stopListening)
        protocol = Raw(request)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        with capturedLogs() as events:
            await endpoint.connect(Factory.forProtocol(lambda: protocol))
            answer = await protocol.done
        # The factory's start and stop lines and the access log are all a
        # request may log.
        return answer, [
            e for e in events if "log_io" not in e and e.get("log_namespace") != "twisted.internet.protocol.Factory"
        ]

    async def test_bad_percent_encoding(self) -> None:
        answer, events = await self.exchange(b"GET /x/%ff HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        self.assertIn(b" 400 ", answer.split(b"\r\n")[0])
        self.assertIn(b"text/html", answer)
        self.assertEqual(events, [])

    async def test_bad_percent_encoding_on_api_path(self) -> None:
        answer, events = await self.exchange(b"GET /oauth/%ff HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        self.assertIn(b" 400 ", answer.split(b"\r\n")[0])
        self.assertIn(b'"error":"invalid_request"', answer)
        self.assertEqual(events, [])

    async def test_good_percent_encoding(self) -> None:
        answer, _ = await self.exchange(b"GET /x/%C3%A9 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        self.assertIn(b" 200 ", answer.split(b"\r\n")[0])
        self.assertIn("\u00e9".encode("utf-8"), answer)

    async def test_bad_host(self) -> None:
        answer, events = await self.exchange(b"GET /x/a HTTP/1.1\r\nHost: \xff\xfe\r\nConnection: close\r\n\r\n")
        self.assertIn(b" 400 ", answer.split(b"\r\n")[0])
        self.assertEqual(events, [])

    async def test_bad_host_name(self) -> None:
        """
        An ASCII C{Host} that is no host name (an empty label, a label over
        63 characters): Werkzeug refused it with a traceback; found by the
        fuzz test.
        """
        for host in (b"a..b", b".", b"x" * 64 + b".example", b"a..b:8080"):
            answer, events = await self.exchange(b"GET /x/a HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n")
            self.assertIn(b" 400 ", answer.split(b"\r\n")[0], host)
            self.assertEqual(events, [], host)
        answer, _ = await self.exchange(b"GET /x/a HTTP/1.1\r\nHost: [::1]:8080\r\nConnection: close\r\n\r\n")
        self.assertIn(b" 200 ", answer.split(b"\r\n")[0])

    async def test_absolute_form(self) -> None:
        """
        An absolute-form target (RFC 9112 section 3.2.2: a server must
        accept it) routes by its path, its authority standing for the
        C{Host} header; it was routed whole, a 404.
        """
        for target in (b"http://x/x/a", b"HTTPS://x:8443/x/a?q=1", b"http://[::1]/x/a"):
            answer, events = await self.exchange(
                b"GET " + target + b" HTTP/1.1\r\nHost: elsewhere\r\nConnection: close\r\n\r\n"
            )
            self.assertIn(b" 200 ", answer.split(b"\r\n")[0], target)
            self.assertEqual(answer.split(b"\r\n\r\n", 1)[1], b"1\r\na\r\n0\r\n\r\n", target)
            self.assertEqual(events, [], target)

    async def test_other_targets(self) -> None:
        """
        A target that is neither a path nor an http(s) URL, or whose
        authority is no host name, or holds a user name, is a 400.
        """
        for target in (b"x", b"ftp://x/x/a", b"http:///x/a", b"http://a..b/x/a", b"http://u@x/x/a"):
            answer, events = await self.exchange(
                b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            self.assertIn(b" 400 ", answer.split(b"\r\n")[0], target)
            self.assertEqual(events, [], target)

    async def test_two_hosts_whatever_the_target(self) -> None:
        """
        Two C{Host} lines are a 400 whatever the target's form (RFC 9112
        section 3.2: "any request message"); an absolute-form target's
        authority replaced them, so the request was served (200) where
        the same request in origin form is refused.
        """
        for target in (b"/x/a", b"http://x/x/a"):
            answer, events = await self.exchange(
                b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nHost: y\r\nConnection: close\r\n\r\n"
            )
            self.assertIn(b" 400 ", answer.split(b"\r\n")[0], target)
            self.assertEqual(events, [], target)

    async def test_bad_method(self) -> None:
        answer, events = await self.exchange(b"G\xffT /x/a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        self.assertIn(b" 400 ", answer.split(b"\r\n")[0])
        self.assertEqual(events, [])


class TrustedProxiesTests(SynchronousTestCase):
    def test_untrusted_peer(self) -> None:
        proxies = TrustedProxies(["10.0.0.0/8"])
        self.assertIsNone(proxies.client_of("192.0.2.1", [b"203.0.113.9"]))

    def test_chain(self) -> None:
        """
        The client is the nearest hop that is not a trusted proxy: a client
        cannot choose its address by prepending to the header.
        """
        proxies = TrustedProxies(["10.0.0.0/8"])
        self.assertEqual(proxies.client_of("10.0.0.2", [b"1.2.3.4, 203.0.113.9, 10.0.0.5"]), "203.0.113.9")
        self.assertEqual(proxies.client_of("10.0.0.2", [b"1.2.3.4", b"203.0.113.9"]), "203.0.113.9")

    def test_garbage(self) -> None:
        proxies = TrustedProxies(["10.0.0.0/8"])
        self.assertIsNone(proxies.client_of("10.0.0.2", [b"not-an-ip"]))
        self.assertIsNone(proxies.client_of("10.0.0.2", []))
        self.assertIsNone(proxies.client_of("10.0.0.2", [b"10.0.0.3"]))
        self.assertFalse(TrustedProxies())


def mounted_app(issuer: str) -> tuple[Any, Any]:
    """
    The standalone server's app (L{mount} with C{whole_site}) on a memory
    store, and what was mounted.
    """
    from twisted.internet.task import Clock

    from smeldr_oauth.mcp import MCPApp
    from smeldr_oauth.oauth.config import Config
    from smeldr_oauth.oauth.server import OAuthServer
    from smeldr_oauth.service.wiring import mount
    from smeldr_oauth.store.memory import MemoryStore

    clock = Clock()
    oauth = OAuthServer(Config(issuer=issuer, verify_bearer=lambda t: False), MemoryStore(clock), clock)
    tools = MCPApp(name="t", version="1")

    @tools.tool()
    def echo(text: str) -> str:
        return text

    app = Klein()
    return app, mount(app, oauth, tools, reactor=clock, whole_site=True)


def unnonced(answer: tuple[list[bytes], bytes]) -> tuple[list[bytes], bytes]:
    """
    A L{normalised} answer without its page's style nonce (new on every
    page).
    """
    lines, body = answer
    nonce = re.compile(rb"nonce-?[=\"']*[A-Za-z0-9_-]{16,}")
    return [nonce.sub(b"nonce", line) for line in lines], nonce.sub(b"nonce", body)


def normalised(answer: bytes) -> tuple[list[bytes], bytes]:
    """
    An answer's status line and headers, in order, without C{Date} and the
    framing (Klein streams its body chunked where a twisted.web resource
    gives a C{Content-Length}), and its body, de-chunked.
    """
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    chunked = b"transfer-encoding: chunked" in head.lower()
    lines = [
        line
        for line in lines
        if not line.lower().startswith((b"date:", b"content-length:", b"transfer-encoding:"))
    ]
    if chunked:
        data = b""
        while body:
            size, _, rest = body.partition(b"\r\n")
            n = int(size, 16)
            data, body = data + rest[:n], rest[n + 2 :]
        body = data
    return lines, body


class StaticAnswersTests(TestCase):
    """
    L{SmeldrSite.static} with L{static_answers}: the metadata documents are
    answered without Klein, byte for byte as Klein's routes answer them.
    """

    async def exchange(self, site: SmeldrSite, request: bytes) -> bytes:
        return await exchange(self, site, request)

    def sites(self) -> tuple[SmeldrSite, SmeldrSite, dict[bytes, Any]]:
        from smeldr_oauth.web.routes import static_answers

        app, mounted = mounted_app("https://as.example/auth")
        self.addCleanup(mounted.shutdown)
        static = static_answers(mounted.routes)
        return SmeldrSite(app.resource()), SmeldrSite(app.resource(), static=static), static

    def test_which(self) -> None:
        """
        Both metadata documents at both of their paths, nothing else.
        """
        _, _, static = self.sites()
        self.assertEqual(
            sorted(static),
            [
                b"/.well-known/oauth-authorization-server",
                b"/.well-known/oauth-authorization-server/auth",
                b"/.well-known/oauth-protected-resource",
                b"/.well-known/oauth-protected-resource/auth/mcp",
            ],
        )

    async def test_same_answer(self) -> None:
        """
        C{GET} (with or without a query), C{HEAD} and C{OPTIONS} on each
        static path answer exactly as the Klein routes do, headers in the
        same order, the same body (framed with a C{Content-Length} rather
        than chunked).
        """
        routed, fast, static = self.sites()
        for path in static:
            for method, suffix in ((b"GET", b""), (b"GET", b"?x=1"), (b"HEAD", b""), (b"OPTIONS", b"")):
                request = (
                    method + b" " + path + suffix + b" HTTP/1.1\r\nHost: as.example\r\nConnection: close\r\n\r\n"
                )
                expected = normalised(await self.exchange(routed, request))
                self.assertEqual(normalised(await self.exchange(fast, request)), expected)
                self.assertIn(b" 204 " if method == b"OPTIONS" else b" 200 ", expected[0][0])
                if method == b"GET":
                    self.assertTrue(expected[1].startswith(b'{"'), expected[1])

    async def test_bypasses_routing(self) -> None:
        """
        The static C{GET} never reaches the site's resource tree (Klein);
        other methods do.
        """
        _, _, static = self.sites()
        seen: list[bytes] = []

        class Tree(Resource):
            isLeaf = True

            def render(self, request: Any) -> bytes:
                seen.append(request.method)
                return b""

        site = SmeldrSite(Tree(), static=static)
        for method in (b"GET", b"POST"):
            await self.exchange(
                site,
                method + b" /.well-known/oauth-authorization-server HTTP/1.1\r\nHost: x\r\n"
                b"Content-Length: 0\r\nConnection: close\r\n\r\n",
            )
        self.assertEqual(seen, [b"POST"])


class DirectRoutesTests(TestCase):
    """
    L{SmeldrSite.direct} with L{direct_answers}: the token, revocation and
    registration endpoints answered without Klein, as Klein's routes
    answer them, errors included.
    """

    def sites(self) -> tuple[SmeldrSite, SmeldrSite, dict[bytes, Any]]:
        from smeldr_oauth.web.routes import direct_answers

        app, mounted = mounted_app("https://as.example/auth")
        self.addCleanup(mounted.shutdown)
        direct = direct_answers(mounted.routes)
        return SmeldrSite(app.resource()), SmeldrSite(app.resource(), direct=direct), direct

    def test_which(self) -> None:
        """
        Every JSON and JSON-RPC route; those whose C{GET} handler answers
        C{HEAD} leave C{HEAD} to Klein.
        """
        _, _, direct = self.sites()
        for prefix in ("/auth/oauth", ""):
            for name in ("/token", "/register", "/revoke"):
                self.assertEqual(direct[(prefix + name).encode()].skip, frozenset())
        self.assertEqual(direct[b"/auth/mcp/message"].skip, frozenset())
        self.assertEqual(direct[b"/auth/mcp"].skip, frozenset())
        self.assertEqual(direct[b"/.well-known/oauth-authorization-server"].skip, frozenset([b"HEAD"]))
        # The authorization endpoint too (Route.direct), but its HEAD.
        self.assertEqual(direct[b"/auth/oauth/authorize"].skip, frozenset([b"HEAD"]))
        self.assertEqual(direct[b"/authorize"].skip, frozenset([b"HEAD"]))
        self.assertNotIn(b"/connected-apps", direct)
        self.assertNotIn(b"/healthz", [path for path, route in direct.items() if not route.skip])

    async def test_same_answers(self) -> None:
        routed, fast, _ = self.sites()
        form = b"application/x-www-form-urlencoded"
        cases: list[tuple[bytes, bytes, Optional[bytes], bytes]] = [
            # method and path, extra headers, content type, body
            (b"POST /auth/oauth/token", b"", form, b""),
            (b"POST /token", b"", b"application/json", b"{}"),
            (b"POST /auth/oauth/token", b"Authorization: Basic !!\r\n", form, b""),
            (b"POST /auth/oauth/token", b"", form, b"grant_type=refresh_token&refresh_token=nope&client_id=nobody"),
            (b"POST /auth/oauth/token", b"", form, b"grant_type=password&grant_type=x&client_id="),
            (b"OPTIONS /auth/oauth/token", b"Origin: https://app.example\r\n", None, b""),
            (b"GET /auth/oauth/token", b"", None, b""),
            (b"HEAD /auth/oauth/revoke", b"", None, b""),
            (b"POST /auth/oauth/revoke", b"", form, b"token=x&client_id=no"),
            (b"POST /register", b"", b"application/json", b"[1]"),
            (b"POST /register", b"", b"application/json", b'{"redirect_uris":"x"}'),
        ]
        for line, extra, content_type, body in cases:
            request = line + b" HTTP/1.1\r\nHost: as.example\r\nConnection: close\r\n" + extra
            if content_type is not None:
                request += b"Content-Type: %s\r\nContent-Length: %d\r\n" % (content_type, len(body))
            request += b"\r\n" + body
            case = line + b" " + body
            expected = normalised(await self.exchange(routed, request))
            self.assertEqual(normalised(await self.exchange(fast, request)), expected, case)
            self.assertNotIn(b" 500 ", expected[0][0], case)

    async def test_same_pages(self) -> None:
        """
        The authorization endpoint's pages and redirects, as Klein answers
        them (but the nonce, new on every page).
        """
        routed, fast, _ = self.sites()
        form = b"application/x-www-form-urlencoded"
        consent = (
            b"response_type=code&client_id=nobody&redirect_uri=https%3A%2F%2Fapp.example%2Fcb"
            b"&code_challenge=x&code_challenge_method=S256&decision=approve&site_token=t"
        )
        cases: list[tuple[bytes, Optional[bytes], bytes]] = [
            (b"GET /auth/oauth/authorize", None, b""),
            (b"GET /auth/oauth/authorize?client_id=nobody", None, b""),
            (b"GET /authorize?client_id=a&client_id=b", None, b""),
            (b"HEAD /auth/oauth/authorize", None, b""),
            (b"POST /auth/oauth/authorize", form, b""),
            (b"POST /auth/oauth/authorize", form, consent),
            (b"POST /authorize", b"application/json", b"{}"),
            (b"POST /auth/oauth/authorize", form, b"client_id=%ff%fe"),
            (b"PUT /auth/oauth/authorize", form, b""),
            (b"OPTIONS /auth/oauth/authorize", None, b""),
        ]
        for line, content_type, body in cases:
            request = line + b" HTTP/1.1\r\nHost: as.example\r\nConnection: close\r\n"
            if content_type is not None:
                request += b"Content-Type: %s\r\nContent-Length: %d\r\n" % (content_type, len(body))
            request += b"\r\n" + body
            case = line + b" " + body
            expected = unnonced(normalised(await self.exchange(routed, request)))
            self.assertEqual(unnonced(normalised(await self.exchange(fast, request))), expected, case)
            self.assertNotIn(b" 500 ", expected[0][0], case)

    async def test_success(self) -> None:
        """
        A registration through each: the same status and headers.
        """
        routed, fast, _ = self.sites()
        body = b'{"redirect_uris":["https://app.example/cb"],"token_endpoint_auth_method":"none"}'
        request = (
            b"POST /auth/oauth/register HTTP/1.1\r\nHost: as.example\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % (len(body),)
        ) + body
        expected = normalised(await self.exchange(routed, request))
        answer = normalised(await self.exchange(fast, request))
        self.assertIn(b" 201 ", expected[0][0])
        self.assertEqual(answer[0], expected[0])
        self.assertNotEqual(answer[1], expected[1])

    async def exchange(self, site: SmeldrSite, request: bytes) -> bytes:
        return await exchange(self, site, request)


class MCPSites:
    """
    The standalone app with a token for its MCP endpoint, served by a site
    that routes through Klein (C{routed}) and one with L{DirectRoute}s
    (C{fast}).
    """

    def setUp(self) -> None:
        import attr

        self.sessions: dict[SmeldrSite, bytes] = {}

        from smeldr_oauth.oauth.secrets import hash_secret
        from smeldr_oauth.web.routes import direct_answers
        from tests.test_store_memory import access, make_code, make_grant

        app, mounted = mounted_app("https://as.example/auth")
        self.addCleanup(mounted.shutdown)  # type: ignore[attr-defined]
        store = mounted.oauth.store
        # The memory store's clock stands at 0.
        grant = attr.evolve(make_grant("g1"), resource="https://as.example/auth/mcp", created_at=0.0)
        self.successResultOf(store.create_grant(grant, make_code("c1", "g1", now=0.0)))  # type: ignore[attr-defined]
        record = attr.evolve(
            access("x", now=0.0, scopes=tuple(mounted.oauth.config.all_scopes)),
            token_hash=hash_secret("the-token"),
            grant_id="g1",
            resource="https://as.example/auth/mcp",
        )
        self.successResultOf(store.add_tokens("g1", record, None))  # type: ignore[attr-defined]
        self.routed = SmeldrSite(app.resource())
        self.fast = SmeldrSite(app.resource(), direct=direct_answers(mounted.routes))
        self.mcp_http = mounted.mcp_http


class DirectMCPTests(MCPSites, TestCase):
    """
    The MCP endpoint's C{POST}s and C{DELETE} through L{DirectRoute}: the
    same answers as through Klein, session by session.
    """

    def request(self, method: bytes, path: bytes, body: bytes = b"", headers: bytes = b"") -> bytes:
        head = method + b" " + path + b" HTTP/1.1\r\nHost: as.example\r\nConnection: close\r\n" + headers
        if method in (b"POST", b"DELETE"):
            head += b"Content-Type: application/json\r\nContent-Length: %d\r\n" % (len(body),)
        return head + b"\r\n" + body

    async def both(self, request: Any, headers: bytes = b"") -> tuple[Any, Any]:
        """
        C{request(headers_for_site)} through each site, normalised, without
        the session ids (they differ) but with their presence.
        """
        answers = []
        for site in (self.routed, self.fast):
            raw = await exchange(self, site, request(self.sessions.get(site, b"")))
            lines, body = normalised(raw)
            for line in lines:
                if line.lower().startswith(b"mcp-session-id:"):
                    self.sessions[site] = b"Mcp-Session-Id: " + line.split(b":", 1)[1].strip() + b"\r\n"
            answers.append(([line for line in lines if not line.lower().startswith(b"mcp-session-id:")], body))
        return answers[0], answers[1]

    async def test_same_answers(self) -> None:
        bearer = b"Authorization: Bearer the-token\r\nAccept: application/json, text/event-stream\r\n"
        initialize = (
            b'{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18",'
            b'"capabilities":{},"clientInfo":{"name":"t","version":"1"}}}'
        )
        steps = [
            lambda s: self.request(b"POST", b"/auth/mcp", initialize, b"Accept: application/json\r\n"),
            lambda s: self.request(b"POST", b"/auth/mcp", initialize, bearer + b"Origin: https://evil.example\r\n"),
            lambda s: self.request(b"OPTIONS", b"/auth/mcp", b"", b"Origin: https://as.example\r\n"),
            lambda s: self.request(b"PUT", b"/auth/mcp", b"", bearer),
            lambda s: self.request(b"POST", b"/auth/mcp", b"{", bearer),
            lambda s: self.request(b"POST", b"/auth/mcp", initialize, bearer),
            lambda s: self.request(
                b"POST", b"/auth/mcp", b'{"jsonrpc":"2.0","method":"notifications/initialized"}', bearer + s
            ),
            lambda s: self.request(
                b"POST",
                b"/auth/mcp",
                b'{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"echo","arguments":{"text":"hi"}}}',
                bearer + s + b"MCP-Protocol-Version: 2025-06-18\r\n",
            ),
            lambda s: self.request(b"POST", b"/auth/mcp/message?sessionId=nope", b"{}", bearer),
            lambda s: self.request(b"DELETE", b"/auth/mcp", b"", bearer + s),
        ]
        statuses = []
        for step in steps:
            routed, fast = await self.both(step)
            self.assertEqual(fast, routed)
            statuses.append(routed[0][0].split(b" ")[1])
            if len(statuses) == 8:
                self.assertIn(b'"text":"hi"', routed[1].replace(b": ", b":"))
        self.assertEqual(statuses, [b"401", b"403", b"204", b"405", b"400", b"200", b"202", b"200", b"400", b"204"])


def first_event(received: bytes) -> bool:
    """Has an SSE answer's first event come?"""
    _, sep, body = received.partition(b"\r\n\r\n")
    return bool(sep) and b"\n\n" in body


class DirectStreamTests(MCPSites, TestCase):
    """
    A legacy SSE stream opened through L{DirectRoute}: the same headers and
    first event as through Klein, and when the client hangs up the stream
    is cancelled and forgotten.
    """

    async def open(self, site: SmeldrSite) -> bytes:
        port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(site)
        self.addCleanup(port.stopListening)
        protocol = Raw(
            b"GET /auth/mcp HTTP/1.1\r\nHost: as.example\r\nAuthorization: Bearer the-token\r\n"
            b"Accept: text/event-stream\r\n\r\n",
            until=first_event,
        )
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        await endpoint.connect(Factory.forProtocol(lambda: protocol))
        return await protocol.done

    async def test_stream(self) -> None:
        from twisted.internet.task import deferLater

        answers = []
        for site in (self.routed, self.fast):
            raw = await self.open(site)
            head, _, body = raw.partition(b"\r\n\r\n")
            lines = [line for line in head.split(b"\r\n") if not line.lower().startswith(b"date:")]
            answers.append((lines, body.split(b"session_id=")[0]))
            while self.mcp_http.stream_count:
                await deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(answers[1], answers[0])
        self.assertIn(b" 200 ", answers[0][0][0])
        self.assertIn(b"event: endpoint", answers[0][1])


class HostHeaderTests(SynchronousTestCase):
    """
    L{routable_host_header} answers from the raw C{Host} value what
    L{routable_host} answers from the request's C{getRequestHostname}
    (which it replaces on the hot path).
    """

    def test_as_twisted_reads_it(self) -> None:
        values = [
            b"x", b"x:80", b"as.example:8443", b"[::1]:8080", b"[::1]", b"a..b", b"a..b:80",
            b"[a..b]:1", b"", b":80", b"x:", b"\xff\xfe", b"ex ample", b"a" * 64 + b".example",
        ]
        for value in values:
            request = Request(DummyChannel())
            request.requestHeaders.setRawHeaders(b"host", [value])
            expected = routable_host(request.getRequestHostname())
            self.assertEqual(routable_host_header(value), expected, value)


class HTTPDateTests(SynchronousTestCase):
    def test_once_a_second(self) -> None:
        """
        The C{Date} text is RFC 9110's, of the current second, formatted
        once a second however many answers that second has.
        """
        from smeldr_oauth.web import site as site_module
        from twisted.web.http import datetimeToString

        made: list[int] = []

        def counted(second: int) -> bytes:
            made.append(second)
            return datetimeToString(second)

        self.patch(site_module, "datetimeToString", counted)
        now = [784111777.25]
        date = HTTPDate(lambda: now[0])
        self.assertEqual(date(), b"Sun, 06 Nov 1994 08:49:37 GMT")
        now[0] = 784111777.9
        self.assertEqual(date(), b"Sun, 06 Nov 1994 08:49:37 GMT")
        self.assertEqual(made, [784111777])
        now[0] = 784111778.0
        self.assertEqual(date(), b"Sun, 06 Nov 1994 08:49:38 GMT")
        self.assertEqual(made, [784111777, 784111778])
        # A clock set back is followed too.
        now[0] = 784111700.5
        self.assertEqual(date(), datetimeToString(784111700))


class RouteFollowsTwistedTests(SynchronousTestCase):
    def test_process_unchanged(self) -> None:
        """
        L{SmeldrRequest._route} is a copy of twisted.web's
        C{Request.process} with one change (the C{Date} header): a Twisted
        whose C{process} reads otherwise (a header added, a new step before
        rendering) fails here, so that the copy is brought up to date
        rather than silently left behind.
        """
        import inspect
        from twisted.web.server import Request as ServerRequest

        source = inspect.getsource(ServerRequest.process)
        # The code alone: no docstring, comments or blank lines.
        body = source.split('"""')[-1]
        code = [line.strip() for line in body.splitlines() if line.strip() and not line.strip().startswith("#")]
        self.assertEqual(
            code,
            [
                "self.site = self.channel.site",
                'self.setHeader(b"Server", version)',
                'self.setHeader(b"Date", datetimeToString())',
                "self.prepath = []",
                'self.postpath = list(map(unquote, self.path[1:].split(b"/")))',
                'if self.path == b"*":',
                "self._handleStar()",
                "return",
                "try:",
                "resrc = self.site.getResourceFor(self)",
                "if resource._IEncodingResource.providedBy(resrc):",
                "encoder = resrc.getEncoder(self)",
                "if encoder is not None:",
                "self._encoder = encoder",
                "self.render(resrc)",
                "except BaseException:",
                "self.processingFailed(failure.Failure())",
            ],
            "twisted.web's Request.process changed: bring SmeldrRequest._route up to date with it",
        )
