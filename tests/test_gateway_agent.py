"""
Tests for L{smeldr_oauth.gateway.agent}: the HTTP/1.1 client of HTTP
upstreams, driven byte by byte over in-memory connections (a C{Clock} for
its timers), and once over a real socket.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import PotentialDataLoss, ResponseDone, ResponseFailed, ResponseNeverReceived, readBody
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import Site

from smeldr_oauth.gateway import agent as agent_module
from smeldr_oauth.gateway.agent import IDLE_TIMEOUT, KeptHeaders, UpstreamAgent, upstream_agent
from smeldr_oauth.gateway.connection import MAX_HEAD_BYTES
from smeldr_oauth.gateway.http import _BytesProducer

URL = b"http://up.example:9000/mcp?x=1"


class Link:
    """One in-memory connection: the agent's protocol and its transport."""

    def __init__(self, protocol: Any) -> None:
        self.protocol = protocol
        self.transport = StringTransport()
        protocol.makeConnection(self.transport)

    def sent(self) -> bytes:
        data = self.transport.value()
        self.transport.clear()
        return data

    def receive(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def lose(self, reason: Any = None) -> None:
        self.protocol.connectionLost(Failure(reason or ConnectionDone()))

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)


class Endpoints:
    """An endpoint factory whose connections are L{Link}s (or fail)."""

    def __init__(self) -> None:
        self.links: list[Link] = []
        self.refuse = False
        self.hold: Optional[Deferred] = None

    def endpointForURI(self, uri: Any) -> "Endpoints":
        return self

    def connect(self, factory: Any) -> Deferred:
        if self.refuse:
            return fail(ConnectionRefusedError())
        if self.hold is not None:
            return self.hold
        link = Link(factory.buildProtocol(None))
        self.links.append(link)
        return succeed(link.protocol)


class Body(Protocol):
    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.reason: Optional[Failure] = None

    def dataReceived(self, data: bytes) -> None:
        self.data.append(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.reason = reason

    @property
    def bytes(self) -> bytes:
        return b"".join(self.data)


OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
SSE = b'event: message\ndata: {"jsonrpc":"2.0","id":1,"result":{}}\n\n'
CHUNKED = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    + b"%x;ext=1\r\n" % len(SSE)
    + SSE
    + b"\r\n0\r\nX-Trailer: t\r\n\r\n"
)


class AgentTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.endpoints = Endpoints()
        self.agent = UpstreamAgent(self.clock, endpoints=self.endpoints)

    def request(self, method: bytes = b"POST", body: Optional[bytes] = b"{}", headers: Any = None) -> Deferred:
        if headers is None:
            headers = Headers({b"Accept": [b"application/json, text/event-stream"]})
        return self.agent.request(method, URL, headers, _BytesProducer(body) if body is not None else None)

    def respond(self, link: Link, data: bytes) -> tuple[Any, Body]:
        d = self._pending
        link.receive(data)
        response = self.successResultOf(d)
        body = Body()
        response.deliverBody(body)
        return response, body

    def start(self, **kwargs: Any) -> Link:
        self._pending = self.request(**kwargs)
        return self.endpoints.links[-1]

    # -- requests -----------------------------------------------------------------

    def test_request_bytes(self) -> None:
        """
        One write: the request line, C{Host} with its port, the caller's
        headers, C{Content-Length}, the body; a C{Host} or a length the
        caller gave is not sent twice.
        """
        headers = Headers({b"X-Token": [b"up-secret"], b"Host": [b"evil.example"], b"Content-Length": [b"99"]})
        self.request(headers=headers, body=b'{"a":1}')
        link = self.endpoints.links[0]
        self.assertEqual(len(link.transport.io.getvalue()), len(link.transport.value()))
        self.assertEqual(
            link.sent(),
            b"POST /mcp?x=1 HTTP/1.1\r\nHost: up.example:9000\r\nX-Token: up-secret\r\nContent-Length: 7\r\n\r\n"
            b'{"a":1}',
        )

    def test_no_body_no_length(self) -> None:
        self.request(method=b"GET", body=None, headers=Headers())
        self.assertEqual(self.endpoints.links[0].sent(), b"GET /mcp?x=1 HTTP/1.1\r\nHost: up.example:9000\r\n\r\n")

    def test_header_injection_refused(self) -> None:
        """A header value with CR or LF never reaches the wire: the request fails first."""

        class Raw:
            def getAllRawHeaders(self) -> Any:
                return iter([(b"X-Subject", [b"alice\r\nX-Admin: yes"])])

        self.failureResultOf(self.agent.request(b"POST", URL, Raw(), None), ValueError)
        self.assertEqual(self.endpoints.links, [])

    def test_kept_headers_encoded_once(self) -> None:
        """
        L{KeptHeaders} sent again go out as the lines checked the first
        time, without being walked again; a change to them is sent (and
        checked) as any new header is.
        """
        headers = KeptHeaders({b"X-Token": [b"up-secret"]})
        walked: list[Any] = []
        lines = agent_module._header_lines
        self.patch(agent_module, "_header_lines", lambda h: walked.append(h) or lines(h))
        expected = b"POST /mcp?x=1 HTTP/1.1\r\nHost: up.example:9000\r\nX-Token: up-secret\r\nContent-Length: 2\r\n\r\n{}"
        self.request(headers=headers)
        self.request(headers=headers)
        self.assertEqual([link.sent() for link in self.endpoints.links], [expected, expected])
        self.assertEqual(walked, [headers])
        headers.setRawHeaders(b"X-Token", [b"other"])
        self.request(headers=headers)
        self.assertIn(b"X-Token: other\r\n", self.endpoints.links[-1].sent())
        self.assertEqual(len(walked), 2)
        headers.addRawHeader(b"X-Bad", b"a\0b")
        self.failureResultOf(self.request(headers=headers), ValueError)
        self.assertEqual(len(self.endpoints.links), 3)
        headers.removeHeader(b"X-Bad")
        self.request(headers=headers)
        self.assertNotIn(b"X-Bad", self.endpoints.links[-1].sent())

    def test_target_with_space_refused(self) -> None:
        self.failureResultOf(self.agent.request(b"GET", b"http://up.example/a b", Headers(), None), ValueError)
        self.assertEqual(self.endpoints.links, [])

    # -- responses and the pool ----------------------------------------------------

    def test_length_body_and_reuse(self) -> None:
        """A C{Content-Length} response is read; the connection serves the next request."""
        link = self.start()
        response, body = self.respond(link, OK)
        self.assertEqual((response.code, response.phrase, response.length), (200, b"OK", 2))
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])
        self.assertEqual(response.headers.getRawHeaders("Content-Type"), ["application/json"])
        self.assertTrue(response.headers.hasHeader(b"Content-Length"))
        self.assertEqual(body.bytes, b"{}")
        self.assertTrue(body.reason.check(ResponseDone))
        link.sent()
        self._pending = self.request()
        self.assertEqual(len(self.endpoints.links), 1)
        self.assertTrue(link.sent().startswith(b"POST /mcp"))
        second = self.respond(link, OK)[1]
        self.assertEqual(second.bytes, b"{}")
        # Every complete body ends with the same Failure, made once (none
        # is built per response, docs/performance.md, "Round ten (gateway)").
        self.assertIs(second.reason, body.reason)

    def test_chunked_in_any_pieces(self) -> None:
        """
        A chunked event stream read in pieces of every size (extensions and
        trailers dropped) gives the same body, and the connection is reused.
        """
        for size in (1, 2, 3, 7, 64, len(CHUNKED)):
            link = self.start()
            pieces = [CHUNKED[i : i + size] for i in range(0, len(CHUNKED), size)]
            for piece in pieces[:-1]:
                link.receive(piece)
            d = self._pending
            if not d.called:
                link.receive(pieces[-1])
                pieces = []
            response = self.successResultOf(d)
            body = Body()
            response.deliverBody(body)
            for piece in pieces[-1:]:
                link.receive(piece)
            self.assertEqual(body.bytes, SSE, size)
            self.assertTrue(body.reason.check(ResponseDone), size)
            self.assertEqual(len(self.endpoints.links), 1, size)

    def test_trickled_one_byte_at_a_time(self) -> None:
        """
        A response trickled in one byte at a time (a head near its bound,
        a long chunk line, trailers with a long line) gives the same response, and each
        reader looks at every byte a bounded number of times, not at the
        whole head again on each read (which was quadratic).
        """
        from smeldr_oauth.gateway import connection

        head = b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-H%d: %s\r\n" % (n, b"v" * 200) for n in range(150))
        head += b"Transfer-Encoding: chunked\r\n\r\n"
        trailers = b"X-Long: " + b"t" * 8000 + b"\r\n" + b"X-T: t\r\n" * 500 + b"\r\n"
        data = head + b"2;" + b"e" * 3000 + b"\r\n{}\r\n0\r\n" + trailers
        self.assertGreater(len(head), 30_000)
        looked: list[int] = []

        def counting(reader: Any) -> Any:
            def read(conn: Any, data: bytes, scanned: int) -> bytes:
                looked.append(len(data) - scanned)
                return reader(conn, data, scanned)

            return read

        self.patch(connection, "_READERS", tuple(counting(r) for r in connection._READERS))
        link = self.start()
        for n in range(len(data)):
            link.receive(data[n : n + 1])
            if n == len(head) - 1:
                response = self.successResultOf(self._pending)
                body = Body()
                response.deliverBody(body)
        self.assertEqual(response.headers.getRawHeaders(b"x-h149"), [b"v" * 200])
        self.assertEqual(body.bytes, b"{}")
        self.assertTrue(body.reason.check(ResponseDone))
        self.assertLess(sum(looked), 4 * len(data))
        self.assertEqual(len(self.endpoints.links), 1)
        self.assertFalse(link.closed)

    def test_header_values_trimmed(self) -> None:
        """Blanks around a value are not part of it; repeated names keep every value in order."""
        link = self.start()
        response, _ = self.respond(
            link, b"HTTP/1.1 200 OK\r\nX-A:  one \t\r\nx-a:two\r\nX-Empty:\r\nContent-Length: 0\r\n\r\n"
        )
        self.assertEqual(response.headers.getRawHeaders(b"X-A"), [b"one", b"two"])
        self.assertEqual(response.headers.getRawHeaders(b"x-empty"), [b""])

    def test_lf_only_head(self) -> None:
        link = self.start()
        response, body = self.respond(link, b"HTTP/1.1 200 OK\nContent-Length: 2\n\n{}")
        self.assertEqual(body.bytes, b"{}")

    def test_informational_skipped(self) -> None:
        link = self.start()
        response, body = self.respond(link, b"HTTP/1.1 100 Continue\r\n\r\n" + OK)
        self.assertEqual((response.code, body.bytes), (200, b"{}"))

    def test_no_content(self) -> None:
        link = self.start()
        response, body = self.respond(link, b"HTTP/1.1 202 Accepted\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        self.assertEqual((response.code, body.bytes), (202, b""))
        self.assertTrue(body.reason.check(ResponseDone))
        self.assertFalse(link.closed)
        link2 = self.start()
        self.assertIs(link2, link)
        response, body = self.respond(link, b"HTTP/1.1 204 No Content\r\n\r\n")
        self.assertEqual((response.code, body.bytes), (204, b""))
        self.assertFalse(link.closed)

    def test_until_close(self) -> None:
        """Without a length the body runs to the close, and the connection is not reused."""
        link = self.start()
        response, body = self.respond(link, b"HTTP/1.1 200 OK\r\n\r\npart one, ")
        link.receive(b"part two")
        link.lose()
        self.assertEqual(body.bytes, b"part one, part two")
        self.assertTrue(body.reason.check(PotentialDataLoss))
        self.start()
        self.assertEqual(len(self.endpoints.links), 2)

    def test_connection_close_not_reused(self) -> None:
        for head in (b"HTTP/1.1 200 OK\r\nConnection: close\r\n", b"HTTP/1.0 200 OK\r\n"):
            link = self.start()
            self.respond(link, head + b"Content-Length: 2\r\n\r\n{}")
            self.assertTrue(link.closed)
        self.start()
        self.assertEqual(len(self.endpoints.links), 3)

    def test_lost_mid_body(self) -> None:
        link = self.start()
        response, body = self.respond(link, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}")
        link.lose(ConnectionLost())
        self.assertEqual(body.bytes, b"{}")
        self.assertTrue(body.reason.check(ResponseFailed))
        self.start()
        self.assertEqual(len(self.endpoints.links), 2)

    def test_body_before_delivery_kept(self) -> None:
        """What arrives before C{deliverBody} (and the end) is handed over then."""
        link = self.start()
        link.receive(CHUNKED)
        response = self.successResultOf(self._pending)
        body = Body()
        response.deliverBody(body)
        self.assertEqual(body.bytes, SSE)
        self.assertTrue(body.reason.check(ResponseDone))
        self.assertRaises(RuntimeError, response.deliverBody, Body())

    def test_bad_responses(self) -> None:
        """Bytes that are not an acceptable response fail the request and drop the connection."""
        bad = [
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"ICY 200 OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n folded: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
            b"HTTP/1.1 200 OK\r\nContent-Length: -2\r\n\r\n{}",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n{}",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n" + b"X-A: b\r\n" * 300 + b"\r\n",
            b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * MAX_HEAD_BYTES,
        ]
        for data in bad:
            link = self.start()
            link.receive(data)
            self.failureResultOf(self._pending, ResponseFailed)
            self.assertTrue(link.closed, data[:60])
        self.start()
        self.assertEqual(len(self.endpoints.links), len(bad) + 1)

    def test_bad_chunk(self) -> None:
        for tail in (b"zz\r\n", b"2\r\n{}XX", b"1" * 5000):
            link = self.start()
            response, body = self.respond(link, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + tail)
            self.assertTrue(body.reason.check(ResponseFailed), tail[:10])
            self.assertTrue(link.closed)

    def test_bytes_after_response(self) -> None:
        """
        Bytes after a complete response (a second response nobody asked
        for) never answer the next request: the connection is closed.
        """
        link = self.start()
        response, body = self.respond(link, OK + OK)
        self.assertEqual(body.bytes, b"{}")
        self.assertTrue(link.closed)
        self.start()
        self.assertEqual(len(self.endpoints.links), 2)
        # And bytes on an idle connection close it.
        self.respond(self.endpoints.links[1], OK)
        self.endpoints.links[1].receive(OK)
        self.assertTrue(self.endpoints.links[1].closed)
        self.start()
        self.assertEqual(len(self.endpoints.links), 3)

    def test_cancel_before_response(self) -> None:
        link = self.start()
        self._pending.cancel()
        self.failureResultOf(self._pending, CancelledError)
        self.assertTrue(link.closed)
        link.lose(ConnectionLost())
        self.start()
        self.assertEqual(len(self.endpoints.links), 2)

    def test_cancel_while_connecting(self) -> None:
        cancelled: list[bool] = []
        self.endpoints.hold = Deferred(lambda _: cancelled.append(True))
        d = self.request()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(cancelled, [True])

    def test_stop_body(self) -> None:
        """C{stopProducing} on the body's transport drops the connection; the body ends as failed."""
        link = self.start()
        response, body = self.respond(link, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n")
        body.transport.stopProducing()
        self.assertTrue(link.closed)
        self.assertTrue(body.reason.check(ResponseFailed))
        link.receive(b"0\r\n\r\n")
        self.assertEqual(body.bytes, b"{}")
        self.start()
        self.assertEqual(len(self.endpoints.links), 2)

    def test_ended_body_leaves_the_connection_alone(self) -> None:
        """
        Once a body has ended its connection serves the next request: a
        late stop or pause from the old body's transport is ignored.
        """
        link = self.start()
        _, old = self.respond(link, OK)
        self.assertTrue(old.reason.check(ResponseDone))
        self._pending = self.request()
        old.transport.pauseProducing()
        old.transport.stopProducing()
        self.assertFalse(link.closed)
        self.assertEqual(link.transport.producerState, "producing")
        self.assertEqual(len(self.endpoints.links), 1)
        self.assertEqual(self.respond(link, OK)[1].bytes, b"{}")

    def test_connect_fails(self) -> None:
        self.endpoints.refuse = True
        failure = self.failureResultOf(self.request(), ResponseNeverReceived)
        self.assertTrue(failure.value.reasons[0].check(ConnectionRefusedError))

    def test_lost_before_response(self) -> None:
        link = self.start()
        link.lose(ConnectionLost())
        self.failureResultOf(self._pending, ResponseNeverReceived)

    def test_retry_idempotent_on_reused(self) -> None:
        """
        A reused connection closed before any answer: a GET goes again on a
        new connection, a POST fails (it may have been done).
        """
        link = self.start(method=b"GET", body=None)
        self.respond(link, OK)
        get = self._pending = self.request(method=b"GET", body=None)
        link.lose()
        self.assertEqual(len(self.endpoints.links), 2)
        self.assertNoResult(get)
        self.respond(self.endpoints.links[1], OK)
        post = self._pending = self.request()
        self.endpoints.links[1].lose()
        self.failureResultOf(post, ResponseNeverReceived)
        self.assertEqual(len(self.endpoints.links), 2)

    def test_no_retry_after_close(self) -> None:
        """
        Once the agent is closed, a reused connection lost before its
        answer fails the request: no new connection for the retry.
        """
        link = self.start(method=b"GET", body=None)
        self.respond(link, OK)
        get = self.request(method=b"GET", body=None)
        self.agent.close()
        link.lose()
        self.failureResultOf(get, ResponseNeverReceived)
        self.assertEqual(len(self.endpoints.links), 1)

    def test_idle_bound(self) -> None:
        """At most C{persistent_per_origin} idle connections are kept; the rest are closed."""
        agent = UpstreamAgent(self.clock, endpoints=self.endpoints, persistent_per_origin=1)
        first = agent.request(b"GET", URL, Headers(), None)
        second = agent.request(b"GET", URL, Headers(), None)
        one, two = self.endpoints.links
        one.receive(OK)
        two.receive(OK)
        for d in (first, second):
            self.successResultOf(d).deliverBody(Body())
        self.assertEqual((one.closed, two.closed), (False, True))

    def test_idle_timeout(self) -> None:
        """An idle connection is closed after the idle timeout; one timer serves them all."""
        link = self.start()
        self.respond(link, OK)
        self.clock.advance(IDLE_TIMEOUT / 2)
        link2 = self.start()
        self.assertIs(link2, link)
        self.respond(link, OK)
        self.clock.advance(IDLE_TIMEOUT / 2 + 1)
        self.assertFalse(link.closed)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(IDLE_TIMEOUT / 2)
        self.assertTrue(link.closed)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.start()
        self.assertEqual(len(self.endpoints.links), 2)

    def test_idle_too_long_not_reused(self) -> None:
        """
        A connection idle past the timeout is not reused even if its timer
        has not run yet (a busy reactor): the upstream may be closing it.
        """
        link = self.start()
        self.respond(link, OK)
        self.clock.rightNow += IDLE_TIMEOUT
        self.start()
        self.assertTrue(link.closed)
        self.assertEqual(len(self.endpoints.links), 2)

    def test_close(self) -> None:
        """C{close} closes the idle connections, and those that finish later."""
        first = self.request()
        second = self.request()
        link, busy = self.endpoints.links
        link.receive(OK)
        self.successResultOf(first).deliverBody(Body())
        self.agent.close()
        self.assertTrue(link.closed)
        self.assertFalse(busy.closed)
        busy.receive(OK)
        self.successResultOf(second).deliverBody(Body())
        self.assertTrue(busy.closed)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_headers_as_wrappers_change_them(self) -> None:
        """treq's content decoder rewrites a response's headers: they can be."""
        link = self.start()
        response, _ = self.respond(link, OK)
        response.headers.setRawHeaders(b"Content-Encoding", [b"gzip"])
        response.headers.removeHeader("content-type")
        self.assertEqual(response.headers.getRawHeaders(b"content-encoding"), [b"gzip"])
        self.assertFalse(response.headers.hasHeader(b"Content-Type"))


class EndpointTests(SynchronousTestCase):
    """The agent's endpoints: one per origin, TLS for https, nothing else."""

    def test_endpoints(self) -> None:
        from twisted.internet.endpoints import HostnameEndpoint
        from twisted.internet.testing import MemoryReactorClock
        from twisted.web.client import URI, BrowserLikePolicyForHTTPS
        from twisted.web.error import SchemeNotSupported

        from smeldr_oauth.gateway.agent import _Endpoints

        endpoints = _Endpoints(MemoryReactorClock(), BrowserLikePolicyForHTTPS())
        plain = endpoints.endpointForURI(URI.fromBytes(b"http://10.0.0.5:9000/mcp"))
        self.assertIsInstance(plain, HostnameEndpoint)
        self.assertIs(endpoints.endpointForURI(URI.fromBytes(b"http://10.0.0.5:9000/mcp/message?s=1")), plain)
        self.assertIsNot(endpoints.endpointForURI(URI.fromBytes(b"http://10.0.0.5:9001/mcp")), plain)
        secure = endpoints.endpointForURI(URI.fromBytes(b"https://tools.example.com/mcp"))
        self.assertNotIsInstance(secure, HostnameEndpoint)  # wrapped in TLS
        self.assertIsNot(endpoints.endpointForURI(URI.fromBytes(b"http://tools.example.com/mcp")), secure)
        with self.assertRaises(SchemeNotSupported):
            endpoints.endpointForURI(URI.fromBytes(b"ftp://tools.example.com/mcp"))


class Echo(Resource):
    isLeaf = True

    def render_POST(self, request: Any) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        return request.content.read()


class RealSocketTests(TestCase):
    """The agent against twisted.web on 127.0.0.1: requests reuse one connection."""

    def test_round_trips(self) -> Deferred:
        connections: list[Any] = []
        site = Site(Echo())
        build = site.buildProtocol

        def counted(addr: Any) -> Any:
            connections.append(addr)
            return build(addr)

        site.buildProtocol = counted  # type: ignore[method-assign]
        port = reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        agent = upstream_agent(reactor)
        self.addCleanup(agent.close)
        url = b"http://127.0.0.1:%d/mcp" % port.getHost().port

        async def calls() -> None:
            for n in range(3):
                response = await agent.request(b"POST", url, Headers(), _BytesProducer(b'{"n":%d}' % n))
                self.assertEqual(await readBody(response), b'{"n":%d}' % n)
            self.assertEqual(len(connections), 1)

        return Deferred.fromCoroutine(calls())

    def test_request_sent_at_once(self) -> None:
        """
        A request on an idle connection goes to the socket as it is made,
        not at the reactor's next turn (the transport is never watched for
        writability); this pins the Twisted internals the agent reads.
        """
        port = reactor.listenTCP(0, Site(Echo()), interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        agent = upstream_agent(reactor)
        self.addCleanup(agent.close)
        url = b"http://127.0.0.1:%d/mcp" % port.getHost().port

        async def calls() -> None:
            response = await agent.request(b"POST", url, Headers(), _BytesProducer(b"{}"))
            await readBody(response)
            second = agent.request(b"POST", url, Headers(), _BytesProducer(b'{"n":2}'))
            self.assertEqual([c for o in agent._origins.values() for c in o.idle], [])  # the second took it
            writers = [w for w in reactor.getWriters() if w is not port]  # type: ignore[attr-defined]
            self.assertEqual(writers, [])
            self.assertEqual(await readBody(await second), b'{"n":2}')

        return Deferred.fromCoroutine(calls())
