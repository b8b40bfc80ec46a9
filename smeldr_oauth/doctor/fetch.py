# -*- test-case-name: tests.test_doctor_fetch -*-
"""
The doctor's network side, and the only one: HTTP exchanges with treq
(each turned into a plain L{Fetched}), one TLS handshake to read the
server's certificate, and the watching of an event stream.

Every exchange has a deadline and a body cap; nothing here decides
whether what came back is right (that is L{smeldr_oauth.doctor.checks}).
The reactor and the treq client are given, so tests can use StubTreq or a
client that trusts a test CA.  Every connection (the client's, each
redirect hop's, the handshake's) is made through the run's
L{smeldr_oauth.doctor.guard.Guard}: where the doctor may connect is decided
there, once.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Optional
from urllib.parse import urlencode

from hyperlink import URL
from OpenSSL import SSL
from treq.client import HTTPClient
from twisted.internet import defer, error
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IHandshakeListener, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate as TLSCertificate
from twisted.internet.ssl import CertificateOptions, optionsForClientTLS, platformTrust
from twisted.python.failure import Failure
from twisted.web import client as web_client
from twisted.web.client import URI, Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from smeldr_oauth.doctor.checks import Certificate
from smeldr_oauth.doctor.guard import Guard, describe_refusal
from smeldr_oauth.doctor.model import Fetched
from smeldr_oauth.doctor.sse import CLOSED, FAILED, WATCHED, EventTimeline, StreamObservation

USER_AGENT = "smeldr-oauth-doctor"

#: What discovery requests carry, as the SDKs send it: servers and proxies
#: must not refuse a protocol version header on the well-known routes.
PROTOCOL_VERSION = "2025-11-25"

#: The most of one body the doctor reads (metadata documents are small).
MAX_BODY = 256 * 1024


def load_trust_root(ca_file: Optional[str]) -> Any:
    """
    The certificates to trust: the platform's, or only the PEM CA in
    C{ca_file} (a private CA, or a test's).
    """
    if ca_file is None:
        return platformTrust()
    with open(ca_file, "rb") as f:
        return TLSCertificate.loadPEM(f.read())


def http_client(reactor: Any, trust_root: Any, timeout: float, guard: Optional[Guard] = None) -> HTTPClient:
    """
    A treq client that verifies certificates against C{trust_root},
    connects only where C{guard} allows (by default public addresses only;
    each redirect hop is a new request through it), and keeps no
    connection open after an exchange (each check sees a fresh connection,
    as a new client would, and nothing is left behind).
    """
    pool = HTTPConnectionPool(reactor, persistent=False)
    tls = BrowserLikePolicyForHTTPS(trustRoot=trust_root)
    endpoints = (guard if guard is not None else Guard()).endpoints(reactor, tls, timeout)
    agent = Agent.usingEndpointFactory(reactor, endpoints, pool=pool)
    return HTTPClient(agent)


def guarded_fetcher(reactor: Any, trust_root: Any, timeout: float, guard: Guard) -> "Fetcher":
    """
    The doctor's L{Fetcher}: its requests and its certificate handshake
    under the one C{guard}, verified against the one C{trust_root}.
    """
    return Fetcher(reactor, http_client(reactor, trust_root, timeout, guard), timeout, trust_root, guard)


def describe_failure(reason: Failure, timeout: float) -> str:
    """
    One line for why an exchange got no answer, without a traceback.
    """
    value = reason.value
    refused = describe_refusal(value)
    if refused is not None:
        return refused
    if isinstance(value, (CancelledError, defer.TimeoutError, error.TimeoutError)):
        return f"no answer within {timeout:g} s (timed out)"
    if isinstance(value, error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(value, error.DNSLookupError):
        return "host name not found"
    nested = getattr(value, "reasons", None)
    if nested:
        for inner in nested:
            if isinstance(inner, Failure):
                text = _tls_text(inner.value)
                if text:
                    return text
        inner_value = nested[0].value if isinstance(nested[0], Failure) else nested[0]
        if isinstance(inner_value, CancelledError):
            return f"no answer within {timeout:g} s (timed out)"
        return f"connection failed: {type(inner_value).__name__}"
    text = _tls_text(value)
    if text:
        return text
    return f"{type(value).__name__}: {str(value)[:200]}"


def _tls_text(value: BaseException) -> Optional[str]:
    if isinstance(value, SSL.Error):
        reasons = []
        for entry in value.args[0] if value.args and isinstance(value.args[0], list) else ():
            if isinstance(entry, tuple) and entry:
                reasons.append(str(entry[-1]))
        return "TLS: " + ("; ".join(reasons) or str(value)[:200])
    if type(value).__name__ in ("VerificationError", "CertificateError"):
        return f"TLS: the certificate does not name this host ({str(value)[:160]})"
    return None


class _CappedBody(Protocol):
    """
    Collect a body up to C{limit} bytes; past it, stop reading.
    """

    def __init__(self, limit: int, done: "Deferred[bytes]") -> None:
        self.limit = limit
        self.done = done
        self.chunks: list[bytes] = []
        self.size = 0

    def dataReceived(self, data: bytes) -> None:
        if self.size >= self.limit:
            return
        self.chunks.append(data[: self.limit - self.size])
        self.size += len(data)
        if self.size >= self.limit and self.transport is not None:
            # A response body's transport is its producer: stop it.
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def stop(self) -> None:
        """
        The deadline passed before the body ended (a server that sends its
        headers and then nothing, or trickles): keep what came, drop the
        connection.
        """
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]
        self.connectionLost()

    def connectionLost(self, reason: Failure = web_client.ResponseDone()) -> None:  # type: ignore[assignment]
        if not self.done.called:
            self.done.callback(b"".join(self.chunks))


def _headers(response: Any) -> dict[str, tuple[str, ...]]:
    found: dict[str, tuple[str, ...]] = {}
    for name, values in response.headers.getAllRawHeaders():
        key = name.decode("latin-1").lower()
        found[key] = found.get(key, ()) + tuple(v.decode("latin-1") for v in values)
    return found


@implementer(IHandshakeListener)
class _Handshake(Protocol):
    """
    Connect, finish the TLS handshake, keep the peer's certificate, leave.

    @ivar done: fires with the certificate, or fails with why there is
        none, once the connection is closed (so nothing is left open).
    """

    def __init__(self, done: "Deferred[Any]") -> None:
        self.done = done
        self.certificate: Any = None
        self.stalled = False

    def stall(self) -> None:
        """
        The handshake took too long: drop the connection.
        """
        self.stalled = True
        self.transport.abortConnection()  # type: ignore[union-attr]

    def handshakeCompleted(self) -> None:
        assert self.transport is not None
        self.certificate = self.transport.getPeerCertificate()  # type: ignore[attr-defined]
        self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = error.ConnectionDone()) -> None:  # type: ignore[assignment]
        if self.done.called:
            return
        if self.certificate is not None:
            self.done.callback(self.certificate)
        elif self.stalled:
            self.done.errback(defer.TimeoutError("no TLS handshake"))
        else:
            self.done.errback(reason)


class Fetcher:
    """
    Make the doctor's requests.

    @param reactor: for deadlines, the TLS handshake, and the time each
        answer arrived (its C{seconds()} is the wall clock the clock check
        compares the server's C{Date} with).
    @param http: the treq client (see L{http_client}).
    @param timeout: seconds each exchange may take.
    @param trust_root: what the certificate check trusts (the same as
        C{http}'s).
    @param guard: where the certificate's handshake may connect (the same
        as C{http}'s); by default public addresses only.
    """

    def __init__(
        self,
        reactor: Any,
        http: HTTPClient,
        timeout: float = 10.0,
        trust_root: Any = None,
        guard: Optional[Guard] = None,
    ) -> None:
        self.reactor = reactor
        self.http = http
        self.timeout = timeout
        self.trust_root = trust_root
        self.guard = guard if guard is not None else Guard()
        #: Every answer, in order, for the clock check.
        self.answers: list[Fetched] = []

    def _seconds(self) -> float:
        return float(IReactorTime(self.reactor).seconds())

    async def request(
        self,
        method: str,
        url: str,
        headers: Optional[Mapping[str, str]] = None,
        body: Optional[bytes] = None,
        follow: bool = False,
        limit: int = MAX_BODY,
    ) -> Fetched:
        """
        One exchange; never raises for network trouble (the record says
        what happened).
        """
        sent = {"User-Agent": USER_AGENT}
        sent.update(headers or {})
        raw = Headers({k.encode("latin-1"): [v.encode("latin-1")] for k, v in sent.items()})

        async def exchange() -> Fetched:
            response = await self.http.request(
                method, url, headers=raw, data=body, allow_redirects=follow, unbuffered=True
            )
            done: Deferred[bytes] = Deferred()
            if method == "HEAD" or response.code in (204, 304):
                data = b""
            else:
                response.deliverBody(_CappedBody(limit, done))
                data = await done
            final = getattr(getattr(response, "request", None), "absoluteURI", None)
            return Fetched(
                url=url,
                status=response.code,
                headers=_headers(response),
                body=data,
                final_url=final.decode("ascii", "replace") if isinstance(final, bytes) else url,
                received_at=self._seconds(),
            )

        attempt = Deferred.fromCoroutine(exchange())
        attempt.addTimeout(self.timeout, self.reactor)
        try:
            fetched = await attempt
        except Exception:
            return Fetched(url=url, error=describe_failure(Failure(), self.timeout))
        self.answers.append(fetched)
        return fetched

    async def get(self, url: str, headers: Optional[Mapping[str, str]] = None, follow: bool = True) -> Fetched:
        """
        A discovery GET, as the SDKs send it (following redirects).
        """
        sent = {"Accept": "application/json", "MCP-Protocol-Version": PROTOCOL_VERSION}
        sent.update(headers or {})
        return await self.request("GET", url, sent, follow=follow)

    async def post_form(self, url: str, fields: list[tuple[str, str]], headers: Optional[Mapping[str, str]] = None) -> Fetched:
        sent = {"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"}
        sent.update(headers or {})
        return await self.request("POST", url, sent, urlencode(fields).encode("ascii"))

    async def post_json(self, url: str, value: Any, headers: Optional[Mapping[str, str]] = None) -> Fetched:
        sent = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        sent.update(headers or {})
        return await self.request("POST", url, sent, json.dumps(value).encode("utf-8"))

    async def certificate(self, url: str) -> Certificate:
        """
        The certificate the server at C{url} presents, verified against the
        trust root and the host name; when verification fails, read again
        without it so the message can say whether it merely expired.
        """
        parsed = URL.from_text(url)
        try:
            peer = await self._handshake(parsed, optionsForClientTLS(parsed.host, self.trust_root))
        except Exception:
            failure = Failure()
            refused = describe_refusal(failure.value)
            if refused is not None:
                # The guard refused the address: no second try without verification.
                return Certificate(error=refused)
            problem = describe_failure(failure, self.timeout)
            try:
                peer = await self._handshake(parsed, CertificateOptions(verify=False))
            except Exception:
                return Certificate(error=problem)
            return _certificate(peer, problem)
        return _certificate(peer, None)

    async def _handshake(self, url: URL, options: Any) -> Any:
        done: Deferred[Any] = Deferred()
        # The guard's endpoint, as every request's: the host resolved once,
        # the address vetted, TLS with C{options} against the URL's name.
        uri = URI.fromBytes(url.to_uri().to_text().encode("ascii"))
        endpoint = self.guard.endpoints(self.reactor, _FixedTLS(options), self.timeout).endpointForURI(uri)
        attempt = endpoint.connect(Factory.forProtocol(lambda: _Handshake(done)))

        def refused(reason: Failure) -> None:
            if not done.called:
                done.errback(reason)

        def connected(protocol: _Handshake) -> None:
            # A server that never finishes the handshake: drop it, which
            # fails `done` through connectionLost.
            stalled = self.reactor.callLater(self.timeout, protocol.stall)

            def settled(result: Any) -> Any:
                if stalled.active():
                    stalled.cancel()
                return result

            done.addBoth(settled)

        attempt.addCallbacks(connected, refused)
        return await done

    async def stream(
        self,
        url: str,
        headers: Mapping[str, str],
        seconds: float,
        transport: str = "streamable-http",
    ) -> StreamObservation:
        """
        Open an event stream and watch it for C{seconds}: when its headers
        and each event arrived, and whether it was still open at the end.
        """
        start = self._seconds()
        sent = {"User-Agent": USER_AGENT, "Accept": "text/event-stream"}
        sent.update(headers)
        raw = Headers({k.encode("latin-1"): [v.encode("latin-1")] for k, v in sent.items()})
        attempt = self.http.request("GET", url, headers=raw, allow_redirects=False, unbuffered=True)
        attempt.addTimeout(seconds, self.reactor)
        try:
            response = await attempt
        except Exception:
            failure = Failure()
            return StreamObservation(
                url=url,
                ended=FAILED,
                ended_at=self._seconds() - start,
                error=describe_failure(failure, seconds),
                transport=transport,
            )
        headers_at = self._seconds() - start
        content_type = (response.headers.getRawHeaders(b"content-type") or [b""])[0]
        media = content_type.decode("latin-1").split(";", 1)[0].strip().lower()
        if response.code != 200 or media != "text/event-stream":
            done: Deferred[bytes] = Deferred()
            body = _CappedBody(4096, done)
            response.deliverBody(body)
            # The body is read within the watch's time too: a server that
            # never ends it must not hold the doctor for ever.
            deadline = self.reactor.callLater(max(0.0, seconds - headers_at), body.stop)
            await done
            if deadline.active():
                deadline.cancel()
            return StreamObservation(
                url=url,
                status=response.code,
                content_type=media,
                headers_at=headers_at,
                ended=CLOSED,
                ended_at=self._seconds() - start,
                transport=transport,
            )
        ended: Deferred[str] = Deferred()
        reader = _StreamReader(self.reactor, start, ended)
        response.deliverBody(reader)
        timer = self.reactor.callLater(max(0.0, seconds - headers_at), reader.stop)
        how = await ended
        if timer.active():
            timer.cancel()
        return StreamObservation(
            url=url,
            status=response.code,
            content_type=media,
            headers_at=headers_at,
            events=tuple(reader.timeline.events),
            ended=how,
            ended_at=reader.ended_at,
            transport=transport,
        )


class _StreamReader(Protocol):
    """
    Feed an event stream to an L{EventTimeline}, with times; L{stop} ends
    the watch (the connection is dropped).
    """

    def __init__(self, clock: Any, start: float, ended: "Deferred[str]") -> None:
        self.clock = clock
        self.start = start
        self.ended = ended
        self.timeline = EventTimeline()
        self.stopped = False
        self.ended_at = 0.0

    def dataReceived(self, data: bytes) -> None:
        self.timeline.feed(self.clock.seconds() - self.start, data)

    def stop(self) -> None:
        self.stopped = True
        self.ended_at = self.clock.seconds() - self.start
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]
        if not self.ended.called:
            self.ended.callback(WATCHED)

    def connectionLost(self, reason: Failure = web_client.ResponseDone()) -> None:  # type: ignore[assignment]
        if not self.ended.called:
            self.ended_at = self.clock.seconds() - self.start
            self.ended.callback(CLOSED)


@implementer(IPolicyForHTTPS)
class _FixedTLS:
    """
    The same TLS options for any host (the handshake's, made for its URL).
    """

    def __init__(self, options: Any) -> None:
        self.options = options

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        return self.options


def _certificate(peer: Any, problem: Optional[str]) -> Certificate:
    certificate = peer.to_cryptography()
    return Certificate(
        error=problem,
        not_before=certificate.not_valid_before_utc.timestamp(),
        not_after=certificate.not_valid_after_utc.timestamp(),
        subject=certificate.subject.rfc4514_string(),
        issuer=certificate.issuer.rfc4514_string(),
    )
