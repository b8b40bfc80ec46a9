"""
Arbitrary bytes against every endpoint, through the real L{SmeldrSite}: raw
HTTP/1.1 requests are fed to the site's own protocol (C{HTTPChannel}), so
parsing, the site's request, Klein's routing, our routes and the error path
all run as they do behind a socket.  Whatever the bytes in the method,
path, query, headers and body, the answer is never a 5xx and nothing is
logged as a failure (no traceback).

The site is the standalone server's (every OAuth endpoint, the pages, the
MCP endpoints, site-wide error answers, metrics) on a memory store and a
L{Clock}, so every answer is complete when the bytes have been fed.  Some
requests carry a real access token, so the MCP paths are exercised past
authentication.
"""

from __future__ import annotations

import base64
import json
import os
import re
from typing import Any
from urllib.parse import urlencode

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from klein import Klein
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from smeldr_oauth.mcp import MCPApp
from smeldr_oauth.oauth import pkce
from smeldr_oauth.oauth.config import Config
from smeldr_oauth.oauth.model import Approval
from smeldr_oauth.oauth.server import OAuthServer
from smeldr_oauth.service.metrics import Metrics
from smeldr_oauth.service.wiring import mount
from smeldr_oauth.store.memory import MemoryStore
from smeldr_oauth.web.routes import direct_answers
from smeldr_oauth.web.site import SmeldrSite

ISSUER = "http://127.0.0.1:8080"

#: A deeper search: SMELDR_FUZZ_SCALE=20 runs twenty times the examples.
SCALE = int(os.environ.get("SMELDR_FUZZ_SCALE", "1"))
SITE_TOKEN = "fuzz-site-token"
VERIFIER = "v" * 50

#: Every endpoint, with the methods it answers (and some it does not).
ENDPOINTS = [
    "/",
    "/favicon.ico",
    "/healthz",
    "/.well-known/oauth-authorization-server",
    "/.well-known/oauth-protected-resource",
    "/.well-known/oauth-protected-resource/mcp",
    "/.well-known/openid-configuration",
    "/oauth/authorize",
    "/authorize",
    "/oauth/token",
    "/token",
    "/oauth/revoke",
    "/revoke",
    "/oauth/register",
    "/register",
    "/oauth/grants",
    "/mcp",
    "/mcp/message",
    "/nope",
    "/oauth/nope",
]
METHODS = [b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"TRACE"]
#: Every header some layer reads, and then any name.
HEADERS = [
    b"Authorization",
    b"Content-Type",
    b"Accept",
    b"Origin",
    b"Cookie",
    b"Host",
    b"X-Forwarded-For",
    b"Mcp-Session-Id",
    b"MCP-Protocol-Version",
    b"Last-Event-ID",
    b"Mcp-Method",
    b"Mcp-Name",
    b"If-None-Match",
    b"Range",
]
CONTENT_TYPES = [b"application/json", b"application/x-www-form-urlencoded", b"text/plain", b""]

#: No framing bytes: a CR or LF would make another request, not a
#: stranger one.
_framing = re.compile(rb"[\r\n]")


def no_framing(value: bytes) -> bytes:
    return _framing.sub(b"", value)


token_chars = st.sampled_from(list(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"))
header_names = st.one_of(
    st.sampled_from(HEADERS), st.lists(token_chars, min_size=1, max_size=20).map(bytes)
)
header_values = st.one_of(
    st.binary(max_size=80).map(no_framing),
    st.sampled_from(CONTENT_TYPES),
    # Hosts routing once choked on (found by this test).
    st.sampled_from([b"a..b", b".", b"x" * 64 + b".example", b"[::1", b"h:99999", b"\xff.example"]),
    st.text(max_size=40).map(lambda t: t.encode("utf-8", "surrogatepass")).map(no_framing),
)
methods = st.one_of(st.sampled_from(METHODS), st.binary(min_size=1, max_size=8).map(no_framing).filter(bytes.strip))


def path_bytes() -> Any:
    suffix = st.one_of(st.just(b""), st.binary(max_size=20).map(lambda b: re.sub(rb"[\r\n ]", b"", b)))
    return st.builds(lambda base, extra: base.encode("ascii") + extra, st.sampled_from(ENDPOINTS), suffix)


def query_bytes() -> Any:
    return st.one_of(
        st.just(b""),
        st.binary(max_size=60).map(lambda b: b"?" + re.sub(rb"[\r\n #]", b"", b)),
        st.dictionaries(st.text(max_size=10), st.text(max_size=20), max_size=5).map(
            lambda d: b"?" + urlencode(d).encode("ascii")
        ),
    )


HELLO = json.dumps(
    {
        "jsonrpc": "2.0",
        "id": 0,
        "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "f", "version": "1"}},
    }
).encode()
INITIALIZED = json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}).encode()


class FuzzSite:
    """
    The standalone site's routes on a memory store, and a way to send it
    raw bytes.
    """

    def __init__(self, direct: bool = False) -> None:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.store = MemoryStore(self.clock)
        config = Config(
            issuer=ISSUER,
            verify_bearer=lambda pasted: Approval(subject="alice") if pasted == SITE_TOKEN else None,
            # Fuzzing sends many requests from one address.
            token_requests_per_minute_per_address=10**9,
            token_requests_per_minute_per_client=10**9,
            registrations_per_minute=10**9,
            paste_failures_per_minute=10**9,
        )
        self.oauth = OAuthServer(config, self.store, self.clock)
        tools = MCPApp(name="fuzz", version="1")

        @tools.tool(description="Echo.")
        def echo(text: str) -> str:
            return text

        app = Klein()
        self.mounted = mount(app, self.oauth, tools, reactor=self.clock, whole_site=True, keepalive_interval=0)
        self.site = SmeldrSite(
            app.resource(),
            max_body=4096,
            metrics=Metrics(),
            direct=direct_answers(self.mounted.routes) if direct else None,
        )
        self.site.displayTracebacks = False
        self.client_id, self.token = self.authorize()

    def authorize(self) -> tuple[str, str]:
        """
        A registered client and a live access token, through the protocol.
        """

        def drive(coroutine: Any) -> Any:
            results: list[Any] = []
            Deferred.fromCoroutine(coroutine).addBoth(results.append)
            [result] = results
            if isinstance(result, Exception) or hasattr(result, "raiseException"):
                result.raiseException()
            return result

        client_id = drive(
            self.oauth.register({"redirect_uris": ["http://127.0.0.1:9/cb"], "grant_types": ["authorization_code"]})
        )["client_id"]
        params = {
            "response_type": ["code"],
            "client_id": [client_id],
            "redirect_uri": ["http://127.0.0.1:9/cb"],
            "code_challenge": [pkce.s256(VERIFIER)],
            "code_challenge_method": ["S256"],
        }
        request = drive(self.oauth.validate_authorization_request(params))
        location = drive(self.oauth.approve(request, Approval(subject="alice")))
        code = re.search(r"code=([^&]+)", location).group(1)  # type: ignore[union-attr]
        tokens = drive(
            self.oauth.token(
                {
                    "grant_type": ["authorization_code"],
                    "code": [code],
                    "code_verifier": [VERIFIER],
                    "client_id": [client_id],
                }
            )
        )
        return client_id, tokens["access_token"]

    def connect(self, raw: bytes) -> tuple[Any, StringTransport]:
        """
        Feed C{raw} to a new connection of the site, and leave it open.
        """
        protocol = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        assert protocol is not None
        protocol.callLater = self.clock.callLater  # type: ignore[attr-defined]
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        protocol.makeConnection(transport)
        protocol.dataReceived(raw)
        return protocol, transport

    def send(self, raw: bytes) -> bytes:
        """
        Feed C{raw} to a new connection of the site; what it answered.
        """
        protocol, transport = self.connect(raw)
        answer = transport.value()
        protocol.connectionLost(Failure(ConnectionDone()))
        return answer

    def bearer(self, *extra: tuple[bytes, bytes]) -> list[tuple[bytes, bytes]]:
        return [
            (b"Authorization", b"Bearer " + self.token.encode()),
            (b"Accept", b"application/json, text/event-stream"),
            (b"Content-Type", b"application/json"),
            *extra,
        ]

    def streamable_session(self) -> bytes:
        """
        An initialized Streamable HTTP session's id.
        """
        answer = self.send(request_bytes(b"POST", b"/mcp", self.bearer(), HELLO))
        session = re.search(rb"Mcp-Session-Id: ([^\r]+)", answer).group(1)  # type: ignore[union-attr]
        self.send(request_bytes(b"POST", b"/mcp", self.bearer((b"Mcp-Session-Id", session)), INITIALIZED))
        return session

    def legacy_session(self) -> tuple[bytes, Any]:
        """
        A legacy HTTP+SSE stream's session id, and its open connection.
        """
        protocol, transport = self.connect(request_bytes(b"GET", b"/mcp", self.bearer(), b""))
        session = re.search(rb"session_id=([A-Za-z0-9_\-]+)", transport.value()).group(1)  # type: ignore[union-attr]
        protocol.stream_transport = transport
        target = b"/mcp/message?session_id=" + session
        for frame in (HELLO, INITIALIZED):
            self.send(request_bytes(b"POST", target, self.bearer(), frame))
        return session, protocol


def request_bytes(
    method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes
) -> bytes:
    lines = [method + b" " + target + b" HTTP/1.1"]
    if not any(name.lower() == b"host" for name, _ in headers):
        lines.append(b"Host: 127.0.0.1:8080")
    lines += [name + b": " + value for name, value in headers]
    lines.append(b"Content-Length: " + str(len(body)).encode("ascii"))
    lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


_STATUS = re.compile(rb"HTTP/1\.[01] ([0-9]{3}) ")

#: JSON-RPC frames worth sending inside a session: real methods with
#: hostile parameters, and broken frames.
FRAMES = [
    json.dumps(frame).encode()
    for frame in (
        {"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
        {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "echo", "arguments": {"text": "x"}}},
        {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "echo", "arguments": {"text": 5}}},
        {"jsonrpc": "2.0", "id": 4, "method": "tools/call", "params": {"name": "nope"}},
        {"jsonrpc": "2.0", "id": 5, "method": "tools/call", "params": "x"},
        {"jsonrpc": "2.0", "id": [1], "method": "ping"},
        {"jsonrpc": "2.0", "id": 6, "method": "resources/read", "params": {"uri": "\u0000"}},
        {"jsonrpc": "2.0", "id": 7, "method": "logging/setLevel", "params": {"level": "nope"}},
        {"jsonrpc": "2.0", "id": 8, "result": {}},
        {"jsonrpc": "2.0", "id": 9, "error": {"code": "x"}},
        {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": {}}},
        {"jsonrpc": "1.0", "id": 10, "method": "ping"},
        {"id": 11},
        {"jsonrpc": "2.0", "id": 12, "method": "initialize", "params": {"protocolVersion": 7}},
    )
]


class FuzzTests(SynchronousTestCase):
    """
    No bytes make a 5xx or a traceback.
    """

    direct = False

    def setUp(self) -> None:
        self.fuzz = FuzzSite(direct=self.direct)
        self.addCleanup(lambda: self.fuzz.mounted.shutdown())

    def check(self, raw: bytes) -> None:
        with capturedLogs() as events:
            answer = self.fuzz.send(raw)
        failures = [e for e in events if e.get("log_failure") is not None or e.get("isError")]
        self.assertEqual(failures, [], raw[:300])
        match = _STATUS.match(answer)
        if match is None:
            # Twisted's parser may close the connection on a request it
            # cannot read, answering nothing or a bare 400.
            self.assertFalse(answer.startswith(b"HTTP/1.1 5"), answer[:200])
            return
        self.assertLess(int(match.group(1)), 500, (raw[:300], answer[:300]))

    def test_known_answers(self) -> None:
        """
        The harness itself: a good request gets a 200, a bad path its 400.
        """
        answer = self.fuzz.send(request_bytes(b"GET", b"/healthz", [], b""))
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer)
        answer = self.fuzz.send(request_bytes(b"GET", b"/%ff", [], b""))
        self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), answer)
        # Inside a session, on both transports, a tool call works.
        session = self.fuzz.streamable_session()
        answer = self.fuzz.send(
            request_bytes(b"POST", b"/mcp", self.fuzz.bearer((b"Mcp-Session-Id", session)), FRAMES[1])
        )
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer)
        self.assertIn(b'"result"', answer)
        legacy, stream = self.fuzz.legacy_session()
        answer = self.fuzz.send(
            request_bytes(b"POST", b"/mcp/message?session_id=" + legacy, self.fuzz.bearer(), FRAMES[1])
        )
        self.assertTrue(answer.startswith(b"HTTP/1.1 202 "), answer)
        self.assertIn(b'"result"', stream.stream_transport.value())
        stream.connectionLost(Failure(ConnectionDone()))

    @settings(max_examples=400 * SCALE, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        methods,
        path_bytes(),
        query_bytes(),
        st.lists(st.tuples(header_names, header_values), max_size=6),
        st.binary(max_size=300),
    )
    def test_anything(
        self, method: bytes, path: bytes, query: bytes, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> None:
        self.check(request_bytes(method, path + query, headers, body))

    @settings(max_examples=300 * SCALE, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        st.sampled_from([b"GET", b"POST", b"DELETE", b"OPTIONS"]),
        st.sampled_from(["/mcp", "/mcp/message", "/oauth/token", "/oauth/revoke", "/oauth/register"]),
        query_bytes(),
        st.lists(st.tuples(header_names, header_values), max_size=5),
        st.one_of(
            st.binary(max_size=200),
            st.builds(
                lambda method, params, msg_id: json.dumps(
                    {"jsonrpc": "2.0", "id": msg_id, "method": method, "params": params}
                ).encode(),
                st.sampled_from(["initialize", "tools/list", "tools/call", "ping", "nope"]),
                st.dictionaries(st.text(max_size=8), st.one_of(st.text(max_size=8), st.integers()), max_size=3),
                st.one_of(st.integers(), st.text(max_size=5), st.none()),
            ),
        ),
        st.sampled_from([b"application/json", b"application/x-www-form-urlencoded", b"application/json\xff"]),
        st.booleans(),
    )
    def test_authenticated(
        self,
        method: bytes,
        path: str,
        query: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        content_type: bytes,
        basic: bool,
    ) -> None:
        """
        With a live bearer token (or Basic client credentials at the OAuth
        endpoints), so the bytes reach what lies behind authentication.
        """
        if basic:
            credentials = base64.b64encode(self.fuzz.client_id.encode() + b":")
            authorization = b"Basic " + credentials
        else:
            authorization = b"Bearer " + self.fuzz.token.encode()
        extra = [(b"Authorization", authorization), (b"Content-Type", content_type), (b"Accept", b"application/json, text/event-stream")]
        self.check(request_bytes(method, path.encode() + query, extra + headers, body))

    @settings(max_examples=200 * SCALE, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        st.booleans(),
        st.sampled_from([b"POST", b"GET", b"DELETE"]),
        st.lists(st.tuples(header_names, header_values), max_size=4),
        st.one_of(st.binary(max_size=200), st.sampled_from(FRAMES), st.lists(st.sampled_from(FRAMES), max_size=3).map(
            lambda frames: b"[" + b",".join(frames) + b"]"
        )),
    )
    def test_in_session(
        self, legacy: bool, method: bytes, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> None:
        """
        Inside an initialized MCP session, on either transport.
        """
        if legacy:
            session, stream = self.fuzz.legacy_session()
            target = b"/mcp/message?session_id=" + session
            extra = self.fuzz.bearer()
        else:
            session, stream = self.fuzz.streamable_session(), None
            target = b"/mcp"
            extra = self.fuzz.bearer((b"Mcp-Session-Id", session))
        try:
            self.check(request_bytes(method if not legacy else b"POST", target, extra + headers, body))
        finally:
            if stream is not None:
                with capturedLogs():
                    stream.connectionLost(Failure(ConnectionDone()))

    @settings(max_examples=200 * SCALE, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(HEADERS), st.binary(min_size=1, max_size=40).map(no_framing), st.sampled_from(ENDPOINTS))
    def test_high_bytes_in_headers(self, name: bytes, value: bytes, path: str) -> None:
        """
        Bytes 0x80-0xFF (legal in HTTP) in every header we read.
        """
        value = bytes(b | 0x80 for b in value)
        for method in (b"GET", b"POST"):
            self.check(request_bytes(method, path.encode(), [(name, value)], b"a=b"))

    def test_reported_cases(self) -> None:
        """
        The requests the review answered with a 500: a non-UTF-8
        C{Authorization} or C{Content-Type} at each endpoint.
        """
        for path in ("/oauth/token", "/oauth/revoke", "/oauth/register", "/oauth/authorize", "/token"):
            for name in (b"Authorization", b"Content-Type"):
                for value in (b"Basic \xff\xfe", b"\xe9t\xe9", b"application/x-www-form-urlencoded\xff"):
                    raw = request_bytes(b"POST", path.encode(), [(name, value)], b"grant_type=x")
                    self.check(raw)
                    answer = self.fuzz.send(raw)
                    self.assertRegex(answer[:12], rb"HTTP/1.1 4[0-9][0-9]")

    def test_unauthorized_bad_authorization(self) -> None:
        """
        A bad C{Authorization} at the token endpoint is C{invalid_client}
        (401), and a bad C{Content-Type} is C{invalid_request} (400).
        """
        answer = self.fuzz.send(
            request_bytes(
                b"POST",
                b"/oauth/token",
                [(b"Authorization", b"Basic \xff"), (b"Content-Type", b"application/x-www-form-urlencoded")],
                b"grant_type=refresh_token&refresh_token=x",
            )
        )
        self.assertTrue(answer.startswith(b"HTTP/1.1 401 "), answer[:100])
        self.assertIn(b'"error":"invalid_client"', answer)
        answer = self.fuzz.send(
            request_bytes(b"POST", b"/oauth/token", [(b"Content-Type", b"application/\xffjson")], b"grant_type=x")
        )
        self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), answer[:100])
        self.assertIn(b'"error":"invalid_request"', answer)


class DirectFuzzTests(FuzzTests):
    """
    The same, with the routes the standalone server answers without Klein
    (the token, revocation, registration, authorization and MCP endpoints)
    answered so.
    """

    direct = True
