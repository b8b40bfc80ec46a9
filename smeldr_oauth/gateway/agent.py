# -*- test-case-name: tests.test_gateway_agent -*-
"""
The HTTP/1.1 client for HTTP upstreams: persistent connections
(L{smeldr_oauth.gateway.connection}), one request at a time on each, a
bounded set of idle ones kept per origin.

Why not C{twisted.web.client.Agent}: under load its HTTP/1.1 client
protocol (a request object, a body writer, a line parser, a transfer
decoder, C{Headers} normalising every header name, and a Deferred chain
for each of them) took about a third of the gateway front's CPU per
relayed call (docs/gateway.md).  This agent does what the gateway needs
and nothing else.  It provides C{IAgent}, so the channel
(L{smeldr_oauth.gateway.http}) does not know which agent it talks to
(its rule tests use treq's in-memory one).

What the channel relies on stays: redirects are never followed, nothing
is added to the request but C{Host} and C{Content-Length} (no cookies,
no credentials of its own), a header value with CR, LF or NUL fails the
request before anything is written, TLS is verified as a browser does,
bodies are delivered to an C{IProtocol} whose transport's
C{stopProducing} drops the connection.  Idle connections are closed after
L{IDLE_TIMEOUT} (one timer for all, and never reused past it even
before the timer runs); a request on a reused connection
that the upstream closed before answering is sent again once on a new one
when its method is idempotent and the agent is not closed (as Twisted's
pool does; a C{POST} is never sent twice).  The request goes to the socket
at once when the connection has nothing queued
(L{smeldr_oauth.gateway.connection.write_now}).
"""

from __future__ import annotations

import re
from typing import Any, Optional

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure
from twisted.web.client import URI, BrowserLikePolicyForHTTPS, ResponseNeverReceived
from twisted.web.error import SchemeNotSupported
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IAgentEndpointFactory
from zope.interface import implementer

from smeldr_oauth.gateway.connection import TOKEN, Connection, Exchange

#: Connections kept idle per upstream origin: calls to it run side by side
#: (Twisted's pool keeps 2 by default, and every call over that pays a TCP
#: handshake).  Busy connections are not capped here: the upstream's
#: instances and requests in flight are (C{max_instances},
#: C{max_in_flight}), and each GET event stream holds one for its life.
PERSISTENT_PER_ORIGIN = 64
#: Seconds an idle connection is kept and reused.  Below the 5 s after
#: which Node (server-everything, the TypeScript SDK), uvicorn and
#: hypercorn (the Python SDK) close idle connections: a POST sent on a
#: connection the upstream is closing at that moment fails and cannot be
#: sent again (it may have run), and on a loaded box the upstream's FIN
#: can wait unread for a second or more (the bench saw three tool calls in
#: 4,000 fail so with connections idle 6 s).  A new connection after 4 s
#: of quiet costs a TCP handshake.
IDLE_TIMEOUT = 4.0
#: Origins (and request targets) remembered: the configured URLs and their
#: legacy endpoints, a handful.
_MAX_ORIGINS = 64
_MAX_TARGETS = 256

_BAD_VALUE = re.compile(rb"[\r\n\0]")
_NOT_IN_TARGET = re.compile(rb"[\x00-\x20\x7f]")


class KeptHeaders(Headers):
    """
    Request headers sent again and again (a channel's POST headers for one
    session and caller): this agent keeps their checked wire lines with
    them, so a request after the first neither walks nor checks them again.
    Any change drops the lines; to any other agent they are C{Headers}.

    Why: building the upstream request's C{Headers} (each name normalised,
    each value checked) and encoding them were 3-4% of the front's profiled
    time per relayed call, for the same few lines each time
    (docs/performance.md, round nine).
    """

    wire: Optional[bytes] = None

    def setRawHeaders(self, name: Any, values: Any) -> None:
        self.wire = None
        super().setRawHeaders(name, values)

    def addRawHeader(self, name: Any, value: Any) -> None:
        self.wire = None
        super().addRawHeader(name, value)

    def removeHeader(self, name: Any) -> None:
        self.wire = None
        super().removeHeader(name)


@implementer(IAgentEndpointFactory)
class _Endpoints:
    """
    One endpoint per origin, made once: Twisted's default factory builds a
    new one (IDNA encoding, a TLS policy lookup) on every request.
    """

    def __init__(self, reactor: Any, tls: Any) -> None:
        self.reactor = reactor
        self.tls = tls
        self.made: dict[tuple[bytes, bytes, int], Any] = {}

    def endpointForURI(self, uri: Any) -> Any:
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self.made.get(key)
        if endpoint is None:
            if uri.scheme not in (b"http", b"https"):
                raise SchemeNotSupported(f"unsupported scheme: {uri.scheme!r}")
            host = uri.host.decode("ascii")
            endpoint = HostnameEndpoint(self.reactor, host, uri.port)
            if uri.scheme == b"https":
                endpoint = wrapClientTLS(self.tls.creatorForNetloc(uri.host, uri.port), endpoint)
            if len(self.made) >= _MAX_ORIGINS:
                self.made.clear()
            self.made[key] = endpoint
        return endpoint


class _Target:
    """A request target parsed once: its origin, endpoint and request-line start."""

    __slots__ = ("origin", "endpoint", "head")

    def __init__(self, origin: "_Origin", endpoint: Any, head: bytes) -> None:
        self.origin = origin
        self.endpoint = endpoint
        self.head = head


class _Origin(Factory):
    """
    One upstream origin (scheme, host, port): the factory of its
    connections and the idle ones among them, newest last.
    """

    def __init__(self, agent: "UpstreamAgent", key: tuple[bytes, bytes, int]) -> None:
        self.agent = agent
        self.key = key
        self.idle: list[Connection] = []

    def buildProtocol(self, addr: Any) -> Connection:
        return Connection(self.agent, self)


@implementer(IAgent)
class UpstreamAgent:
    """
    Persistent HTTP/1.1 connections to upstream origins.

    @param reactor: connects (C{IReactorTCP}) and times (C{IReactorTime}).
    @param tls: an C{IPolicyForHTTPS} (default: verified as a browser does).
    @param endpoints: an C{IAgentEndpointFactory} (tests; default one
        endpoint per origin, made once).
    """

    def __init__(
        self,
        reactor: Any,
        tls: Any = None,
        *,
        endpoints: Any = None,
        persistent_per_origin: int = PERSISTENT_PER_ORIGIN,
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        self.reactor = reactor
        self.endpoints = endpoints or _Endpoints(reactor, tls or BrowserLikePolicyForHTTPS())
        self.persistent_per_origin = persistent_per_origin
        self.idle_timeout = idle_timeout
        self._targets: dict[tuple[bytes, bytes], _Target] = {}
        self._origins: dict[tuple[bytes, bytes, int], _Origin] = {}
        self._sweep: Optional[IDelayedCall] = None
        #: Set by L{close}: no connection is kept, or opened again for a retry.
        self.closed = False

    # -- IAgent --------------------------------------------------------------------

    def request(self, method: bytes, uri: bytes, headers: Any = None, bodyProducer: Any = None) -> Deferred:
        """
        Send a request; fire with its L{Response} once its headers are in.

        @param headers: a C{Headers} (or anything with C{getAllRawHeaders}).
        @param bodyProducer: an C{IBodyProducer} of known length that
            writes its body when started (the channel's bytes).
        """
        try:
            target = self._target(method, uri)
            data = self._encode(target, headers, bodyProducer)
        except Exception:
            result: Deferred = Deferred()
            result.errback()
            return result
        exchange = Exchange(target, data, method)
        idle = target.origin.idle
        if idle:
            oldest = self.reactor.seconds() - self.idle_timeout
            while idle:
                connection = idle.pop()
                if connection.idle_since > oldest:
                    exchange.reused = True
                    connection.send(exchange)
                    return exchange.result
                # Past the timeout (its timer has not run yet): the upstream may be closing it.
                connection.close()
        self.connect(exchange)
        return exchange.result

    def close(self) -> None:
        """
        Close every idle connection, and from now on each one a request
        leaves (the service stops; a test ends): no connection or timer
        outlives this.
        """
        self.closed = True
        if self._sweep is not None and self._sweep.active():
            self._sweep.cancel()
        self._sweep = None
        for origin in self._origins.values():
            idle, origin.idle = origin.idle, []
            for connection in idle:
                connection.close()

    # -- requests ------------------------------------------------------------------

    def _target(self, method: bytes, uri: bytes) -> _Target:
        key = (method, uri)
        target = self._targets.get(key)
        if target is None:
            parsed = URI.fromBytes(uri)
            endpoint = self.endpoints.endpointForURI(parsed)
            default = 443 if parsed.scheme == b"https" else 80
            host = parsed.host if parsed.port == default else parsed.host + b":%d" % parsed.port
            path = parsed.originForm or b"/"
            if TOKEN.match(method) is None or _NOT_IN_TARGET.search(path + host) is not None:
                raise ValueError("a request line with a space or a control character")
            line = method + b" " + path + b" HTTP/1.1\r\nHost: " + host + b"\r\n"
            where = (parsed.scheme, parsed.host, parsed.port)
            origin = self._origins.get(where)
            if origin is None:
                # Never forgotten: idle connections hang on it (a handful,
                # one per configured URL and legacy endpoint).
                origin = self._origins[where] = _Origin(self, where)
            target = _Target(origin, endpoint, line)
            if len(self._targets) >= _MAX_TARGETS:
                self._targets.clear()
            self._targets[key] = target
        return target

    def _encode(self, target: _Target, headers: Any, body: Any) -> bytes:
        parts = [target.head]
        if headers is not None:
            wire = headers.wire if type(headers) is KeptHeaders else None
            if wire is None:
                wire = _header_lines(headers)
                if type(headers) is KeptHeaders:
                    headers.wire = wire
            parts.append(wire)
        if body is None:
            parts.append(b"\r\n")
            return b"".join(parts)
        data = getattr(body, "data", None)
        if not isinstance(data, bytes):
            data = _produced(body)
        parts.append(b"Content-Length: %d\r\n\r\n" % len(data))
        parts.append(data)
        return b"".join(parts)

    def connect(self, exchange: Exchange) -> None:
        connecting = exchange.target.endpoint.connect(exchange.target.origin)
        exchange.connecting = connecting

        def connected(connection: Connection) -> None:
            # Not after a cancel: that cancelled C{connecting} too, and a
            # cancelled Deferred ignores its result (the endpoint's to close).
            exchange.connecting = None
            connection.send(exchange)

        def failed(failure: Failure) -> None:
            if exchange.connecting is None:
                return  # cancelled: the request fails with CancelledError
            exchange.connecting = None
            if not exchange.result.called:
                exchange.result.errback(Failure(ResponseNeverReceived([failure])))

        connecting.addCallbacks(connected, failed)

    # -- the pool --------------------------------------------------------------------

    def release(self, connection: Connection) -> None:
        idle = connection.origin.idle
        if self.closed or len(idle) >= self.persistent_per_origin:
            connection.close()
            return
        connection.idle_since = self.reactor.seconds()
        idle.append(connection)
        if self._sweep is None:
            self._sweep = self.reactor.callLater(self.idle_timeout, self._expire)

    def forget(self, connection: Connection) -> None:
        idle = connection.origin.idle
        if idle and connection in idle:
            idle.remove(connection)

    def _expire(self) -> None:
        """Close the connections idle for longer than the timeout (one timer for all)."""
        self._sweep = None
        now = self.reactor.seconds()
        oldest: Optional[float] = None
        for origin in self._origins.values():
            idle = origin.idle
            for connection in list(idle):
                if now - connection.idle_since >= self.idle_timeout:
                    idle.remove(connection)
                    connection.close()
                elif oldest is None or connection.idle_since < oldest:
                    oldest = connection.idle_since
        if oldest is not None:
            self._sweep = self.reactor.callLater(max(0.0, oldest + self.idle_timeout - now), self._expire)


def _header_lines(headers: Any) -> bytes:
    """
    The wire lines of C{headers}, checked: a name that is not a token or a
    value with CR, LF or NUL refuses the request.
    """
    lines = []
    for name, values in headers.getAllRawHeaders():
        if TOKEN.match(name) is None:
            raise ValueError(f"header name {name!r} is not a token")
        lower = name.lower()
        if lower in (b"host", b"content-length", b"transfer-encoding"):
            continue  # the agent's to write
        for value in values:
            if _BAD_VALUE.search(value) is not None:
                raise ValueError(f"header {name!r} has a control character")
            lines.append(name + b": " + value + b"\r\n")
    return b"".join(lines)


class _Collect:
    """A consumer that keeps what a body producer writes."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.parts.append(data)


def _produced(body: Any) -> bytes:
    """
    The bytes of a body producer that writes them when started (the
    gateway's messages are whole and in memory); any other producer is
    refused rather than waited for.
    """
    consumer = _Collect()
    done = body.startProducing(consumer)
    outcome: list[Any] = []
    if done is not None:
        done.addBoth(outcome.append)
        if not outcome:
            body.stopProducing()
            raise ValueError("the request body was not written at once")
        if isinstance(outcome[0], Failure):
            outcome[0].raiseException()
    data = b"".join(consumer.parts)
    if body.length is not UNKNOWN_LENGTH and body.length != len(data):
        raise ValueError("the request body's length is not what it said")
    return data


def upstream_agent(reactor: Any, tls: Any = None) -> UpstreamAgent:
    """The agent for HTTP upstreams (see the module's docstring); C{close} it at shutdown."""
    return UpstreamAgent(reactor, tls)
