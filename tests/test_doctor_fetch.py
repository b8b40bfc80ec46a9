"""
Tests for L{smeldr_oauth.doctor.fetch} over real sockets on 127.0.0.1:
what an exchange records (body cap, redirects, refusals, timeouts), the
certificate read in a real TLS handshake, and the timing of a real event
stream whose events the test server writes on reactor timers.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor as _globalReactor
from twisted.internet import ssl
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ServerEndpoint
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from smeldr_oauth.doctor.fetch import MAX_BODY, Fetcher, guarded_fetcher, load_trust_root
from smeldr_oauth.doctor.guard import guard_around
from smeldr_oauth.doctor.session import rpc_answer
from smeldr_oauth.doctor.sse import CLOSED, FAILED, WATCHED
from tests.e2e import freePort
from tests.haproxy import makeTestCA

reactor: Any = _globalReactor

#: The guard of a run against a URL on 127.0.0.1 (the test servers').
LOOPBACK = guard_around(["127.0.0.1"])


class Paths(Resource):
    """
    A test server: each path a behaviour.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.pending: list[Any] = []

    def render_GET(self, request: Any) -> Any:
        path = request.path
        if path == b"/big":
            request.setHeader(b"content-type", b"application/json")
            return b"x" * (MAX_BODY * 2)
        if path == b"/moved":
            request.setResponseCode(302)
            request.setHeader(b"location", b"/doc")
            return b""
        if path == b"/doc":
            request.setHeader(b"content-type", b"application/json")
            return b'{"ok": true}'
        if path == b"/silent":
            # Never answers: not even headers.
            self.pending.append(request)
            return NOT_DONE_YET
        if path.startswith(b"/stream"):
            return self.stream(request, close=path == b"/stream-closing")
        request.setResponseCode(404)
        return b"no"

    def stream(self, request: Any, close: bool) -> Any:
        request.setHeader(b"content-type", b"text/event-stream")
        request.write(b": stream open\n\n")
        calls: list[Any] = []

        def keepalive() -> None:
            request.write(b": keepalive\n\n")
            calls.append(reactor.callLater(0.2, keepalive))

        calls.append(reactor.callLater(0.2, keepalive))
        if close:
            calls.append(reactor.callLater(0.3, request.finish))

        def gone(_: Any) -> None:
            for call in calls:
                if call.active():
                    call.cancel()

        request.notifyFinish().addBoth(gone)
        self.pending.append(request)
        return NOT_DONE_YET


async def serveOnLoopback(test: TestCase, resource: Any) -> str:
    """
    Serve C{resource} (with a C{pending} list of held requests, finished at
    the end) on 127.0.0.1 for C{test}; its base URL.
    """
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(resource))
    test.addCleanup(port.stopListening)

    def finishPending() -> None:
        for request in resource.pending:
            if not request.finished and not getattr(request, "_disconnected", False):
                request.finish()

    test.addCleanup(finishPending)
    return f"http://127.0.0.1:{port.getHost().port}"


class FetchTests(TestCase):
    async def serve(self) -> str:
        return await serveOnLoopback(self, Paths())

    def fetcher(self, timeout: float = 5.0) -> Fetcher:
        return guarded_fetcher(reactor, load_trust_root(None), timeout, LOOPBACK)

    async def test_bodyCapped(self) -> None:
        base = await self.serve()
        fetched = await self.fetcher().get(base + "/big")
        self.assertEqual(fetched.status, 200)
        self.assertEqual(len(fetched.body), MAX_BODY)

    async def test_redirectFollowed(self) -> None:
        base = await self.serve()
        fetched = await self.fetcher().get(base + "/moved")
        self.assertEqual((fetched.status, fetched.url, fetched.final_url), (200, base + "/moved", base + "/doc"))
        self.assertEqual(fetched.json_object()[0], {"ok": True})
        self.assertIsNotNone(fetched.received_at)

    async def test_refused(self) -> None:
        fetched = await self.fetcher().get(f"http://127.0.0.1:{freePort()}/x")
        self.assertEqual((fetched.status, fetched.error), (None, "connection refused"))

    async def test_timeout(self) -> None:
        base = await self.serve()
        fetched = await self.fetcher(timeout=0.3).get(base + "/silent")
        self.assertIsNone(fetched.status)
        self.assertIn("timed out", fetched.error or "")

    async def test_streamWatched(self) -> None:
        """
        A stream still open when the watch ends is C{WATCHED}, its events
        timed from the start.  The window (1.5 s) leaves the server's two
        keepalives (0.2 and 0.4 s after it takes the request) a second of
        slack on a loaded machine: with 0.5 s, a request taken late saw
        only one of them.
        """
        base = await self.serve()
        observed = await self.fetcher().stream(base + "/stream", {}, 1.5)
        self.assertEqual((observed.status, observed.content_type, observed.ended), (200, "text/event-stream", WATCHED))
        kinds = [kind for _, kind in observed.events]
        self.assertEqual(kinds[:3], ["comment"] * 3)
        times = [at for at, _ in observed.events]
        self.assertEqual(times, sorted(times))
        self.assertLess(times[-1], 1.5)
        self.assertGreaterEqual(observed.ended_at, 1.5)

    async def test_streamClosed(self) -> None:
        base = await self.serve()
        observed = await self.fetcher().stream(base + "/stream-closing", {}, 2.0)
        self.assertEqual(observed.ended, CLOSED)
        self.assertLess(observed.ended_at, 1.0)
        self.assertEqual(len(observed.events), 2)

    async def test_streamNoHeaders(self) -> None:
        base = await self.serve()
        observed = await self.fetcher().stream(base + "/silent", {}, 0.3)
        self.assertEqual((observed.status, observed.ended), (None, FAILED))
        self.assertIn("timed out", observed.error or "")

    async def test_streamNotAStream(self) -> None:
        base = await self.serve()
        observed = await self.fetcher().stream(base + "/doc", {}, 1.0)
        self.assertEqual((observed.status, observed.content_type, observed.ended), (200, "application/json", CLOSED))


class CertificateTests(TestCase):
    async def tlsServer(self, hosts: tuple[str, ...] = ("127.0.0.1",)) -> tuple[str, str]:
        ca = makeTestCA(self, hosts=hosts)
        with open(ca.serverPEM) as f:
            options = ssl.PrivateCertificate.loadPEM(f.read()).options()
        port = await SSL4ServerEndpoint(reactor, 0, options, interface="127.0.0.1").listen(Site(Resource()))
        self.addCleanup(port.stopListening)
        return f"https://127.0.0.1:{port.getHost().port}/mcp", ca.caFile

    async def test_trusted(self) -> None:
        url, caFile = await self.tlsServer()
        trust = load_trust_root(caFile)
        certificate = await guarded_fetcher(reactor, trust, 5, LOOPBACK).certificate(url)
        self.assertIsNone(certificate.error)
        self.assertIn("smeldr test CA", certificate.issuer)
        assert certificate.not_after is not None and certificate.not_before is not None
        self.assertAlmostEqual(certificate.not_after - certificate.not_before, 90 * 86400 + 300, delta=5)

    async def test_untrusted(self) -> None:
        """
        Verified against the platform's CAs the test CA fails; the dates
        are still read (to tell an expiry apart).
        """
        url, _ = await self.tlsServer()
        trust = load_trust_root(None)
        certificate = await guarded_fetcher(reactor, trust, 5, LOOPBACK).certificate(url)
        self.assertIn("TLS", certificate.error or "")
        self.assertIsNotNone(certificate.not_after)

    async def test_wrongHost(self) -> None:
        url, caFile = await self.tlsServer(hosts=("localhost",))
        trust = load_trust_root(caFile)
        certificate = await guarded_fetcher(reactor, trust, 5, LOOPBACK).certificate(url)
        self.assertIn("TLS", certificate.error or "")

    async def test_stalledHandshake(self) -> None:
        """
        A server that accepts but never speaks TLS: the handshake gives up
        after the timeout and leaves nothing open.
        """
        from twisted.internet.protocol import Factory, Protocol

        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory.forProtocol(Protocol))
        self.addCleanup(port.stopListening)
        trust = load_trust_root(None)
        certificate = await guarded_fetcher(reactor, trust, 0.3, LOOPBACK).certificate(
            f"https://127.0.0.1:{port.getHost().port}/mcp"
        )
        self.assertEqual(certificate.error, "no answer within 0.3 s (timed out)")
        self.assertIsNone(certificate.not_after)

    async def test_nothingListening(self) -> None:
        trust = load_trust_root(None)
        certificate = await guarded_fetcher(reactor, trust, 5, LOOPBACK).certificate(
            f"https://127.0.0.1:{freePort()}/mcp"
        )
        self.assertEqual(certificate.error, "connection refused")
        self.assertIsNone(certificate.not_after)


class RPCAnswerTests(TestCase):
    def test_json(self) -> None:
        from smeldr_oauth.doctor.model import Fetched

        body = b'{"jsonrpc": "2.0", "id": 1, "result": {}}'
        self.assertEqual(
            rpc_answer(Fetched(url="u", status=200, headers={"content-type": ("application/json",)}, body=body)),
            {"jsonrpc": "2.0", "id": 1, "result": {}},
        )

    def test_stream(self) -> None:
        from smeldr_oauth.doctor.model import Fetched

        body = (
            b': hi\n\nevent: message\ndata: {"jsonrpc":"2.0","method":"notifications/progress"}\n\n'
            b'event: message\ndata: {"jsonrpc":"2.0","id":1,\ndata: "result":{"ok":1}}\n\n'
        )
        answer = rpc_answer(Fetched(url="u", status=200, headers={"content-type": ("text/event-stream",)}, body=body))
        self.assertEqual(answer, {"jsonrpc": "2.0", "id": 1, "result": {"ok": 1}})
        self.assertIsNone(
            rpc_answer(Fetched(url="u", status=200, headers={"content-type": ("text/event-stream",)}, body=b"data: x\n\n"))
        )
