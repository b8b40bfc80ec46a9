# -*- test-case-name: tests.test_conformance -*-
"""
A loopback reverse proxy that adds a bearer token to every request for the
MCP endpoint, so that a client which cannot authenticate (the MCP
conformance suite's C{server} command) can reach an OAuth-protected
smeldr-oauth server.

It is deliberately transparent otherwise:

  - responses are relayed as they arrive, byte for byte (an SSE stream is
    never buffered), and a client that goes away closes the upstream
    connection, so the server sees the disconnect too;
  - the proxy's own origin stands for the server's: a request whose C{Host}
    (or C{Origin}) names the proxy is forwarded with the server's, so the
    server judges it as if the client had come straight to it; any other
    C{Host} or C{Origin} (a DNS-rebinding probe's C{evil.example.com}) is
    forwarded untouched, for the server to refuse.

Only C{/mcp} and what lies below it are forwarded: the token never goes
anywhere else, and every other path is a 404 from the proxy itself.

Test tooling only: it listens on 127.0.0.1 and trusts its one upstream.
"""

from __future__ import annotations

from typing import Any, Optional

import attr
import hyperlink
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IListeningPort, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from zope.interface import implementer

log = Logger()

#: Headers that describe one connection, not the message (RFC 9110 7.6.1),
#: plus those the proxy sets itself.
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
_SET_BY_PROXY = frozenset({b"host", b"authorization", b"content-length"})


@implementer(IBodyProducer)
class _Body:
    """
    A request body already in memory, written at once (no cooperator, so
    no hidden use of the global reactor).
    """

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.length = len(data)

    def startProducing(self, consumer: Any) -> Deferred[None]:
        consumer.write(self._data)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _Relay(Protocol):
    """
    Write each chunk of the upstream response to the downstream request as
    it arrives, and finish the request when the upstream body ends.
    """

    def __init__(self, request: Any) -> None:
        self.request = request
        self.finished = False

    def dataReceived(self, data: bytes) -> None:
        if not self.finished:
            self.request.write(data)

    def connectionLost(self, reason: Failure = ResponseDone()) -> None:  # type: ignore[assignment]
        if self.finished:
            return
        self.finished = True
        if not reason.check(ResponseDone, PotentialDataLoss):
            log.info(
                "conformance proxy: upstream body ended early: {why}",
                why=reason.getErrorMessage(),
            )
        self.request.finish()

    def downstreamGone(self) -> None:
        """
        The client went away: stop reading upstream, which closes that
        connection, so the server sees the disconnect as well.
        """
        self.finished = True
        if self.transport is not None:
            # The body's transport is the response's producer.
            IPushProducer(self.transport).stopProducing()


class BearerProxy(Resource):
    """
    Forward requests for C{/mcp} and below to the same path on C{upstream}
    with C{Authorization: Bearer <token>}.

    @param upstream: The server's base URL (C{http://127.0.0.1:PORT}).
    @param agent: How to reach it (an L{Agent} on the test's reactor).
    @param token: The access token to present.
    @param public: This proxy's own base URL, once it is listening: requests
        naming it in C{Host} or C{Origin} are forwarded with C{upstream}'s.
    """

    isLeaf = True

    def __init__(self, upstream: hyperlink.URL, agent: Any, token: str) -> None:
        super().__init__()
        self.upstream = upstream
        self.agent = agent
        self.token = token
        self.public: Optional[hyperlink.URL] = None

    @staticmethod
    def _authority(url: hyperlink.URL) -> bytes:
        return f"{url.host}:{url.port}".encode("ascii")

    @staticmethod
    def _origin(url: hyperlink.URL) -> bytes:
        return f"{url.scheme}://{url.host}:{url.port}".encode("ascii")

    def _forwardedHeaders(self, request: Any) -> Headers:
        headers = Headers()
        for name, values in request.requestHeaders.getAllRawHeaders():
            lowered = name.lower()
            if lowered in _HOP_BY_HOP or lowered in _SET_BY_PROXY:
                continue
            if lowered == b"origin" and self.public is not None:
                values = [
                    self._origin(self.upstream) if v.rstrip(b"/").lower() == self._origin(self.public) else v
                    for v in values
                ]
            headers.setRawHeaders(name, values)
        host = request.requestHeaders.getRawHeaders(b"host") or []
        if self.public is None or host == [self._authority(self.public)] or not host:
            host = [self._authority(self.upstream)]
        headers.setRawHeaders(b"host", host)
        headers.setRawHeaders(b"authorization", [f"Bearer {self.token}".encode("ascii")])
        return headers

    def render(self, request: Any) -> Any:
        path = request.path
        if path != b"/mcp" and not path.startswith(b"/mcp/"):
            request.setResponseCode(404)
            request.setHeader(b"content-type", b"text/plain")
            return b"the conformance proxy forwards only /mcp\n"
        target = self.upstream.to_text().rstrip("/").encode("ascii") + request.uri
        request.content.seek(0)
        data = request.content.read()
        body = _Body(data) if data or request.method in (b"POST", b"PUT") else None
        pending = self.agent.request(request.method, target, self._forwardedHeaders(request), body)
        state: dict[str, Any] = {"relay": None, "gone": False}

        def gone(_: object) -> None:
            state["gone"] = True
            if state["relay"] is not None:
                state["relay"].downstreamGone()
            else:
                pending.cancel()

        request.notifyFinish().addErrback(gone)

        def respond(response: Any) -> None:
            relay = _Relay(request)
            if state["gone"]:
                # The client left while the server was answering.
                relay.finished = True
                response.deliverBody(relay)
                relay.downstreamGone()
                return
            request.setResponseCode(response.code, response.phrase)
            request.defaultContentType = None
            for name, values in response.headers.getAllRawHeaders():
                lowered = name.lower()
                if lowered in _HOP_BY_HOP:
                    continue
                if lowered == b"content-length" and response.length is UNKNOWN_LENGTH:
                    continue
                request.responseHeaders.setRawHeaders(name, values)
            state["relay"] = relay
            response.deliverBody(relay)

        def failed(reason: Failure) -> None:
            if state["gone"]:
                return
            log.info(
                "conformance proxy: upstream request failed: {why}",
                why=reason.getErrorMessage(),
            )
            request.setResponseCode(502)
            request.setHeader(b"content-type", b"text/plain")
            request.write(b"upstream request failed\n")
            request.finish()

        pending.addCallbacks(respond, failed)
        return NOT_DONE_YET


@attr.s(auto_attribs=True)
class RunningProxy:
    """
    A listening L{BearerProxy}.

    @ivar url: The proxied MCP endpoint, C{http://127.0.0.1:PORT/mcp}.
    """

    url: str
    port: IListeningPort
    pool: HTTPConnectionPool

    async def stop(self) -> None:
        await maybeDeferred(self.port.stopListening)
        await self.pool.closeCachedConnections()


async def startProxy(reactor: Any, upstream: str, token: str) -> RunningProxy:
    """
    Listen on a free port of 127.0.0.1 and forward to C{upstream} (a base
    URL such as C{http://127.0.0.1:8080}) with C{token}.
    """
    pool = HTTPConnectionPool(reactor, persistent=False)
    resource = BearerProxy(hyperlink.URL.from_text(upstream), Agent(reactor, pool=pool), token)
    site = Site(resource)
    site.displayTracebacks = False
    site.noisy = False
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
    base = hyperlink.URL(scheme="http", host="127.0.0.1", port=port.getHost().port)
    resource.public = base
    return RunningProxy(url=base.child("mcp").to_text(), port=port, pool=pool)


__all__ = ["BearerProxy", "RunningProxy", "startProxy"]
