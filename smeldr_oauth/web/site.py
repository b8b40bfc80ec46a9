# -*- test-case-name: tests.test_web_site -*-
"""
The HTTP site: L{SmeldrSite} and its request, L{SmeldrRequest}, which does
what has to happen before any routing:

  - the request-body cap: twisted.web buffers any body it is sent, so the
    limit lives in C{handleContentChunk} (as synapse does); past
    C{site.max_body} bytes nothing more is stored and the answer is 413,
    whatever the path;
  - a request line or C{Host} that routing cannot read (a method that is
    not an HTTP token, a path that percent-decodes to bytes that are not
    UTF-8, such as C{/%ff}, a C{Host} that is no ASCII host name, such as
    C{a..b}) is a 400 at once: Klein would log a traceback for each;
  - the client address, from C{X-Forwarded-For} only when the peer is a
    proxy the operator trusts (L{TrustedProxies});
  - the request's duration, for the metrics.

And two things that make the hottest answers cheap (see
C{docs/performance.md}): the documents known at start-up (the metadata)
are answered by a plain twisted.web resource found by exact path, without
Klein's routing (L{SmeldrSite.static}, filled by the service from the
routes: L{smeldr_oauth.web.routes.static_answers}); and the access log can
go through a buffered writer (L{smeldr_oauth.web.accesslog}).
"""

from __future__ import annotations

import functools
import ipaddress
import re
import time
import weakref
from typing import Any, Iterable, Mapping, Optional

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.python.failure import Failure
from twisted.web import resource as _resource
from twisted.web.http import datetimeToString
from twisted.web.resource import IResource
from twisted.web.server import Request, Site, unquote, version

from smeldr_oauth.web.flow_events import request_finished
from smeldr_oauth.web import errors
from smeldr_oauth.web.accesslog import BufferedAccessLog, combined
from smeldr_oauth.web.transport import adopt

DEFAULT_MAX_BODY = 1 << 20

#: RFC 9110 section 9.1: a method is a token.
_METHOD = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
#: A Host header routing can use: visible ASCII, no spaces.
_HOST = re.compile(rb"[\x21-\x7e]*")
#: Methods known to be tokens, so that the usual request skips L{_METHOD}.
_TOKEN_METHODS = frozenset((b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS"))


class HTTPDate:
    """
    The C{Date} header's text (RFC 9110 section 6.6.1: to the second),
    formatted once a second rather than once a request: twisted.web's
    C{Request.process} calls C{datetimeToString} (a C{gmtime} and a
    nine-field format) for every answer, about 1% of a refresh
    (docs/performance.md, round twelve).  Requests are processed on the
    reactor's thread only.

    @param now: the wall clock, in seconds (C{time.time}; a test's own).
    """

    __slots__ = ("_now", "_kept")

    def __init__(self, now: Any = time.time) -> None:
        self._now = now
        self._kept: tuple[int, bytes] = (-1, b"")

    def __call__(self) -> bytes:
        second = int(self._now())
        kept = self._kept
        if kept[0] != second:
            kept = self._kept = (second, datetimeToString(second))
        return kept[1]


#: The process's C{Date} header text (L{SmeldrRequest.process}).
http_date = HTTPDate()


@functools.lru_cache(maxsize=256)
def routable_host(host: bytes) -> bool:
    """
    Can routing use this C{Host} (without its port)?  Visible ASCII, and
    a name Werkzeug can IDNA-encode: no empty label (C{a..b}), none over 63
    characters.  Werkzeug raises for the others, outside Klein's error
    handling, which made a 500 with a traceback.  (Hosts repeat, so the
    answers are remembered.)
    """
    if _HOST.fullmatch(host) is None:
        return False
    try:
        host.decode("ascii").lower().partition(":")[0].encode("idna")
    except UnicodeError:
        return False
    return True


#: How twisted.web reads C{Host} (L{Request.getRequestHostname}): the host
#: without brackets or port.
_HOST_HEADER = re.compile(rb"^\[?(?P<host>.*?)\]?(:\d+)?$")


@functools.lru_cache(maxsize=256)
def routable_host_header(value: bytes) -> Optional[bool]:
    """
    L{routable_host} of the host a single C{Host} header C{value} names,
    read as L{Request.getRequestHostname} reads it; C{None} when that
    would fall back to the socket's address (no match).  Keyed by the raw
    header: the request's C{getRequestHostname} (a header look-up and a
    regular expression, 1.4% of a C{tools/call}) is not needed for the
    usual request.
    """
    match = _HOST_HEADER.match(value)
    if match is None:
        return None
    return routable_host(match.group("host"))


_NOT_ONE_HOST = "the Host header is not a single valid host name"


class SmeldrRequest(Request):
    """
    A request that stops storing its body past C{site.max_body} bytes and
    refuses, before routing, what routing cannot handle.
    """

    max_body = DEFAULT_MAX_BODY
    body_too_large = False
    _received = 0
    _started = 0.0
    _client_found: Any = None

    def gotLength(self, length: Optional[int]) -> None:
        site = getattr(self.channel, "site", None)
        self.max_body = getattr(site, "max_body", DEFAULT_MAX_BODY)
        if length is not None and length > self.max_body:
            self.body_too_large = True
        super().gotLength(0 if self.body_too_large else length)

    def handleContentChunk(self, data: bytes) -> None:
        self._received += len(data)
        if self.body_too_large or self._received > self.max_body:
            self.body_too_large = True
            return
        super().handleContentChunk(data)

    def getClientAddress(self):  # type: ignore[no-untyped-def]
        """
        The client's address: the peer, unless the peer is a proxy the
        operator said to trust (C{--trust-forwarded-from}); then the
        nearest address in C{X-Forwarded-For} that is not itself a trusted
        proxy.  Without that option forwarded headers are ignored, so a
        client cannot pick its own rate-limit key.

        Worked out once a request once it is processed (its headers are
        all in, and its peer, the site's proxies and its headers no longer
        change): the token endpoint's rate limits and the access log both
        ask.
        """
        found = self._client_found
        if found is None:
            found = self._client_address()
            if self._started:
                self._client_found = found
        return found

    def _client_address(self):  # type: ignore[no-untyped-def]
        peer = super().getClientAddress()
        site = getattr(getattr(self, "channel", None), "site", None)
        proxies: Optional[TrustedProxies] = getattr(site, "trusted_proxies", None)
        if proxies is None or not proxies:
            return peer
        forwarded = proxies.client_of(
            getattr(peer, "host", ""), self.requestHeaders.getRawHeaders(b"x-forwarded-for", [])
        )
        if forwarded is None:
            return peer
        kind = IPv6Address if ":" in forwarded else IPv4Address
        return kind("TCP", forwarded, 0)

    def process(self) -> None:
        self._started = time.perf_counter()
        # Answers sent when the reactor's turn ends, in one send a
        # connection (smeldr_oauth.web.transport); a no-op after the
        # connection's first request, and for TLS and UNIX sockets.
        adopt(self.channel.transport)
        if self.body_too_large:
            self._refuse(errors.body_too_large(), close=True)
            return
        problem = self._unroutable()
        if problem is not None:
            self._refuse(errors.bad_request(problem))
            return
        self._route()

    def _route(self) -> None:
        """
        twisted.web's C{Request.process} (26.10), with the C{Date} header
        from L{http_date}: the same headers in the same order, the same
        resource look-up, rendering and failure path.
        """
        self.site = self.channel.site  # type: ignore[attr-defined]
        self.setHeader(b"Server", version)
        self.setHeader(b"Date", http_date())
        self.prepath = []
        self.postpath = list(map(unquote, self.path[1:].split(b"/")))
        if self.path == b"*":
            self._handleStar()
            return
        try:
            found = self.site.getResourceFor(self)
            if _resource._IEncodingResource.providedBy(found):
                encoder = found.getEncoder(self)
                if encoder is not None:
                    self._encoder = encoder
            self.render(found)
        except BaseException:
            self.processingFailed(Failure())

    def _unroutable(self) -> Optional[str]:
        """
        Why routing could not read this request, or C{None}.  Cheap for the
        usual request: plain ASCII paths skip the decoding.
        """
        if self.method not in _TOKEN_METHODS and _METHOD.fullmatch(self.method) is None:
            return "the method is not an HTTP token"
        host = self.requestHeaders.getRawHeaders(b"host")
        if self.path[:1] != b"/" and self.path != b"*":
            # Two Host lines are a 400 whatever the target (RFC 9112
            # section 3.2), before an absolute form's authority replaces them.
            if host is not None and len(host) > 1:
                return _NOT_ONE_HOST
            if not self._origin_form():
                return "the request target is neither a path nor an http(s) URL"
            host = self.requestHeaders.getRawHeaders(b"host")
        if host is not None and (len(host) > 1 or not self._routable(host[0])):
            return _NOT_ONE_HOST
        path = self.path
        if not path.isascii() or b"%" in path:
            from urllib.parse import unquote_to_bytes

            try:
                unquote_to_bytes(path).decode("utf-8")
            except UnicodeDecodeError:
                return "the path is not UTF-8"
        return None

    def _origin_form(self) -> bool:
        """
        An absolute-form request target (C{GET http://host/path}, what a
        client sends a proxy, and which a server must accept: RFC 9112
        section 3.2.2) read as the origin form: its path routes, and its
        authority stands for the C{Host} header, which the RFC says it
        overrides (and which is then checked as any C{Host} is).  Klein
        routed the whole URL as a path: a 404.  C{False} for any other
        target that is not a path (another scheme, no authority, a user
        name in it: RFC 9110 section 4.2.4).
        """
        scheme, sep, rest = self.path.partition(b"://")
        if not sep or scheme.lower() not in (b"http", b"https"):
            return False
        authority, slash, path = rest.partition(b"/")
        if not authority or b"@" in authority:
            return False
        self.path = slash + path or b"/"
        _, query, arguments = self.uri.partition(b"?")
        self.uri = self.path + query + arguments
        self.requestHeaders.setRawHeaders(b"host", [authority])
        return True

    def _routable(self, value: bytes) -> bool:
        known = routable_host_header(value)
        if known is None:
            return routable_host(self.getRequestHostname())
        return known

    def _refuse(self, error: errors.HTTPError, close: bool = False) -> None:
        """
        Answer before routing, in the format the path calls for, with no
        traceback and no log line beyond the access log's.
        """
        self.site = self.channel.site  # type: ignore[attr-defined]
        if close:
            self.setHeader(b"Connection", b"close")
        body = errors.dialect_for_path(self.path).render(self, error)
        self.write(body)
        self.finish()

    def connectionLost(self, reason: Any) -> None:
        """
        The client went away: a request it sent and that was handled
        (L{process} ran: a token may have been issued) but whose answer
        had not finished still gets its access-log line, which only
        L{finish} writes: with C{499} (nginx's "client closed request")
        when nothing had been sent, else the status and bytes sent (an
        event stream the client closed).
        """
        site = getattr(self.channel, "site", None)
        if not self.finished and self._started and site is not None:
            if not self.startedWriting:
                self.code = 499
            # Before the channel is let go of: the client's address may
            # come from X-Forwarded-For, read with the site's proxies.
            site.log(self)
        super().connectionLost(reason)

    def finish(self) -> None:
        metrics = getattr(getattr(getattr(self, "channel", None), "site", None), "metrics", None)
        super().finish()
        request_finished(self)
        if metrics is None or not self._started:
            return
        content_type = self.responseHeaders.getRawHeaders(b"content-type", [b""])[0]
        if content_type.startswith(b"text/event-stream"):
            return
        metrics.observe_request(self.path, self.method, self.code, time.perf_counter() - self._started)


class TrustedProxies:
    """
    The proxies whose C{X-Forwarded-For} header is believed.
    """

    def __init__(self, networks: Iterable[str] = ()) -> None:
        self.networks = tuple(ipaddress.ip_network(n, strict=False) for n in networks)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def trusts(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in network for network in self.networks)

    def client_of(self, peer: str, headers: list[bytes]) -> Optional[str]:
        """
        Walk C{X-Forwarded-For} from the right (the hop nearest to us) past
        trusted proxies; the first other address is the client.  C{None}
        when the peer is not trusted or the header says nothing usable.
        """
        if not self.trusts(peer):
            return None
        hops: list[str] = []
        for header in headers:
            hops.extend(part.strip() for part in header.decode("latin-1").split(","))
        for hop in reversed(hops):
            try:
                address = ipaddress.ip_address(hop)
            except ValueError:
                return None
            if not self.trusts(str(address)):
                return str(address)
        return None


class _ConnectionAddress:
    """
    A connection's C{getHost} or C{getPeer}, asked once: twisted.web's
    C{Request} asks its channel for both addresses in its constructor, on
    every request, and the TCP transport answers the local one with a
    C{getsockname} system call and each with a new address object (the
    local one 1.5% of a refresh, as much of the floor: round six; the
    peer's object about 0.5%: round twelve, C{docs/performance.md}).  A
    connected socket's addresses never change, so the first answer stands
    for the connection's life.  (The channel is held weakly: the channel
    holds this, and a cycle would leave each closed connection to the
    garbage collector.)

    @param which: C{"getHost"} or C{"getPeer"}, the transport's method.
    """

    __slots__ = ("_channel", "_which", "_address")

    def __init__(self, channel: Any, which: str) -> None:
        self._channel = weakref.ref(channel)
        self._which = which
        self._address: Any = None

    def __call__(self) -> Any:
        found = self._address
        if found is None:
            channel = self._channel()
            # Only the channel itself asks, so it is alive.
            assert channel is not None
            found = self._address = getattr(channel.transport, self._which)()
        return found


class SmeldrSite(Site):
    """
    The site for every smeldr-oauth HTTP listener.

    @param max_body: the largest request body accepted, in bytes.
    @param metrics: a L{smeldr_oauth.service.metrics.Metrics} to time
        requests with, or C{None}.
    @param trusted_proxies: whose C{X-Forwarded-For} to believe.
    @param access_log: a faster writer for the access log (see
        L{smeldr_oauth.web.accesslog}), or C{None} for twisted.web's own.
    @param static: exact path -> the resource answering C{GET} there, ahead
        of the site's resource tree (see
        L{smeldr_oauth.web.routes.static_answers}: the same bytes and
        headers the routes would answer).  Other methods, and C{HEAD}, go
        to the tree as usual.
    @param direct: exact path -> the resource answering there
        (L{smeldr_oauth.web.routes.direct_answers}), ahead of the tree,
        for every method but those in its C{skip}.
    """

    requestFactory = SmeldrRequest

    def __init__(
        self,
        resource: IResource,
        max_body: int = DEFAULT_MAX_BODY,
        metrics: Any = None,
        trusted_proxies: Optional[TrustedProxies] = None,
        access_log: Optional[BufferedAccessLog] = None,
        static: Optional[Mapping[bytes, IResource]] = None,
        direct: Optional[Mapping[bytes, IResource]] = None,
        **kw: Any,
    ) -> None:
        # Every endpoint parses its own body (the token endpoint must not
        # mix query and form parameters), so twisted.web's form parsing into
        # request.args is both unused and, through email.headerregistry, a
        # fifth of the CPU of an MCP POST.
        kw.setdefault("parsePOSTFormSubmission", False)
        # The same lines as twisted.web's formatter, cheaper to make.
        kw.setdefault("logFormatter", combined)
        super().__init__(resource, **kw)
        self.max_body = max_body
        self.metrics = metrics
        self.trusted_proxies = trusted_proxies
        self.access_log = access_log
        self.static: dict[bytes, IResource] = dict(static or {})
        self.direct: dict[bytes, IResource] = dict(direct or {})

    def getResourceFor(self, request: Any) -> IResource:
        found = self.static.get(request.path) if request.method == b"GET" else None
        if found is None:
            found = self.direct.get(request.path)
            if found is not None and request.method in getattr(found, "skip", ()):
                found = None
        if found is not None:
            request.site = self
            request.sitepath = []
            return found
        return super().getResourceFor(request)  # type: ignore[no-any-return]

    def log(self, request: Any) -> None:
        if self.access_log is None:
            super().log(request)
        elif self._logDateTime is not None:
            self.access_log.line(self._logFormatter(self._logDateTime, request))

    def buildProtocol(self, addr: Any) -> Any:
        protocol = super().buildProtocol(addr)
        # twisted.web wraps its HTTP/1.1 channel in a protocol that may
        # switch to HTTP/2; requests are made by the channel inside.
        channel = getattr(protocol, "_channel", protocol)
        channel.getHost = _ConnectionAddress(channel, "getHost")
        channel.getPeer = _ConnectionAddress(channel, "getPeer")
        return protocol

    def stopFactory(self) -> None:
        super().stopFactory()
        if self.access_log is not None:
            self.access_log.flush()
