"""
Tests for L{smeldr_oauth.service.web}: the request-body cap and trusted
forwarded headers, over real sockets.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, serverFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource

from smeldr_oauth.service.web import SmeldrSite, TrustedProxies


class Echo(Resource):
    isLeaf = True

    def render(self, request: Any) -> bytes:
        body = request.content.read()
        return f"{request.getClientAddress().host} {len(body)}".encode()


class Raw(Protocol):
    def __init__(self, request: bytes) -> None:
        self.request = request
        self.received = b""
        self.done: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.done.callback(self.received)


class SiteOverSocketTests(TestCase):
    async def exchange(self, site: SmeldrSite, request: bytes) -> bytes:
        port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(site)
        self.addCleanup(port.stopListening)
        protocol = Raw(request)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        await endpoint.connect(Factory.forProtocol(lambda: protocol))
        return await protocol.done

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
