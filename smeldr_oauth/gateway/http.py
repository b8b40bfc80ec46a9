# -*- test-case-name: tests.test_gateway_http -*-
"""
The HTTP channel: an upstream MCP server reached over Streamable HTTP, or
over the legacy HTTP+SSE transport (2024-11-05) when that is all it speaks.

Streamable HTTP: every message is a POST; a request's answer comes back as
a JSON body or as an event stream that may carry the upstream's own
messages for that request first (they are attributed to it).  The session
id from the C{initialize} answer goes back on every request, with the
negotiated C{MCP-Protocol-Version}.  After the handshake a GET stream
carries what the upstream sends unasked; it reconnects with
C{Last-Event-ID} (and the server's C{retry}) when it drops, and a server
that does not offer one (405) is fine.  A 404 for the session means the
upstream forgot it: the channel ends, the link starts a new session.  A
POST stream that ends before its answer but after an event id is resumed
with a GET and C{Last-Event-ID} (the 2025-11-25 polling pattern).

Fallback (C{transport = "auto"}): if the C{initialize} POST is answered
400, 404 or 405, the channel opens a GET event stream at the same URL,
waits for its C{endpoint} event and posts every message there; answers
come on the stream.  The endpoint must be on the same origin as the
configured URL, so an upstream cannot send the gateway's credential
elsewhere.

Security: requests carry the gateway's own credential header (from the
configuration) and optional identity headers, never the caller's token;
redirects are not followed; every body and event is size-capped; each
channel has its own cookie jar, so cookies never cross isolation keys.

Why one module over 500 lines: the channel is one state machine (its
session id, negotiated version, cookie jar, endpoint and resumption state)
that both transports drive, and the fallback is decided half-way through
the Streamable handshake; its helpers (capped body reader, cookie jar,
endpoint bound) are private to it.  Cut apart, each half would need the
other's state.
"""

from __future__ import annotations

import json
from http.cookiejar import CookieJar
from typing import Any, Callable, Optional
from urllib.parse import quote
from urllib.request import Request as _CookieRequest

import hyperlink
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer
from zope.interface import implementer

from smeldr_oauth.gateway import errors
from smeldr_oauth.gateway.agent import KeptHeaders
from smeldr_oauth.gateway.config import UpstreamConfig
from smeldr_oauth.gateway.interfaces import IChannelReceiver, IUpstreamChannel
from smeldr_oauth.gateway.sse import Event, SSEDecoder, SSETooLarge
from smeldr_oauth.mcp import jsonrpc
from smeldr_oauth.mcp.jsonrpc import JSONRPCError, Response

log = Logger()

USER_AGENT = b"smeldr-oauth-gateway"
#: What a POST accepts (Streamable HTTP: a JSON answer or an event stream).
_POST_ACCEPT = b"application/json, text/event-stream"
#: A session id is visible ASCII (the Streamable HTTP rule), and short.
_MAX_SESSION_ID = 1024
#: Bytes of an error body kept (for a JSON-RPC error inside it).
_ERROR_BODY_MAX = 64 * 1024
#: Resumptions of one POST stream (SSE polling) before giving up.
_MAX_RESUMES = 20
#: The GET stream's reconnection delay bounds (seconds).
_RECONNECT_MIN, _RECONNECT_MAX = 1.0, 30.0
#: Characters kept as they are in identity header values; the rest
#: (non-ASCII, controls, "%") is percent-encoded.
_HEADER_SAFE = "!#$&'()*+,-./:;<=>?@[]^_`{|}~ "


class _Body(Protocol):
    """
    Reads a response body chunk by chunk into a callback, with a byte cap;
    C{abort} drops the connection.
    """

    def __init__(self, chunk: Callable[[bytes], None], limit: Optional[int]) -> None:
        self.chunk = chunk
        self.limit = limit
        self.size = 0
        self.done: Deferred = Deferred()
        self.too_large = False

    def dataReceived(self, data: bytes) -> None:
        self.size += len(data)
        if self.limit is not None and self.size > self.limit:
            self.too_large = True
            self.abort()
            return
        try:
            self.chunk(data)
        except Exception:
            if not self.done.called:
                self.done.errback(Failure())
            self.abort()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        # The body is over: let go of its transport, which holds the
        # response, which holds this protocol.  That cycle (with the
        # response's headers, the event decoder and the chunk callback
        # hanging off it, some 25 objects a relayed call) was otherwise
        # left to the garbage collector (docs/performance.md, "Round ten
        # (gateway)"); a late abort has nothing left to stop.
        self.transport = None
        if not self.done.called:
            self.done.callback(None)

    def abort(self) -> None:
        transport = self.transport
        if transport is not None:
            transport.stopProducing()  # type: ignore[attr-defined]


@implementer(IBodyProducer)
class _BytesProducer:
    """
    A request body known in full: written at once (a message is at most
    C{max_message_bytes} and already in memory; Twisted's C{FileBodyProducer}
    would go through the global cooperator, that is the global reactor).
    """

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.length = len(data)

    def startProducing(self, consumer: Any) -> Deferred:
        consumer.write(self.data)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _SetCookies:
    """What C{CookieJar.extract_cookies} reads from a response: its headers."""

    def __init__(self, headers: Headers) -> None:
        self.headers = headers

    def info(self) -> "_SetCookies":
        return self

    def get_all(self, name: str, default: Any = None) -> Any:
        values = self.headers.getRawHeaders(name.encode("latin-1"))
        return [v.decode("latin-1") for v in values] if values else default


class _Cookies:
    """
    One channel's cookie jar (the standard library's rules for domain,
    path, C{Secure} and expiry).  Most upstreams set no cookie: then a
    request costs nothing here (no jar lookup, no request wrapper).
    """

    def __init__(self) -> None:
        self.jar = CookieJar()
        self._any = False

    @property
    def in_use(self) -> bool:
        """Whether the upstream set a cookie: then requests carry one."""
        return self._any

    def add_to(self, url: str, headers: Headers) -> None:
        if not self._any:
            return
        request = _CookieRequest(url)  # noqa: S310 (a key for the jar's rules; nothing is opened)
        self.jar.add_cookie_header(request)
        value = request.get_header("Cookie")
        if value:
            headers.setRawHeaders(b"Cookie", [value.encode("latin-1")])

    def take_from(self, url: str, response: Any) -> None:
        headers = response.headers
        if headers.hasHeader(b"set-cookie") or headers.hasHeader(b"set-cookie2"):
            request = _CookieRequest(url)  # noqa: S310 (as above)
            self.jar.extract_cookies(_SetCookies(headers), request)  # type: ignore[arg-type]
            self._any = len(self.jar) > 0


def _wire_url(url: str) -> bytes:
    """A URL as it goes on the request line: IDNA host, percent-encoded."""
    return hyperlink.EncodedURL.from_text(url).to_uri().to_text().encode("ascii")


def _read(response: Any, chunk: Callable[[bytes], None], limit: Optional[int]) -> tuple[_Body, Deferred]:
    body = _Body(chunk, limit)
    response.deliverBody(body)
    return body, body.done


def _drain(response: Any) -> Deferred:
    """
    Read and drop a body the channel does not use (an error page, a 202's
    nothing), so the connection can go back to the pool; capped, so an
    upstream cannot make the gateway read without end.
    """
    return _read(response, lambda _: None, _ERROR_BODY_MAX)[1]


def _cancelling(result: Any, call: IDelayedCall) -> Any:
    """Cancel C{call} if it has not run; pass C{result} on."""
    if call.active():
        call.cancel()
    return result


def _media_type(response: Any) -> str:
    values = response.headers.getRawHeaders(b"content-type") or [b""]
    return values[0].split(b";")[0].strip().lower().decode("latin-1")


def _header_value(value: str) -> bytes:
    return quote(value, safe=_HEADER_SAFE).encode("ascii")


@implementer(IUpstreamChannel)
class HTTPChannel:
    """
    One MCP session with an HTTP upstream.

    @ivar mode: C{streamable} or C{legacy} (after the fallback, or when
        configured with C{transport = "sse"}).
    """

    pid = None

    def __init__(self, agent: IAgent, clock: IReactorTime, config: UpstreamConfig, owner: Any = None) -> None:
        """
        @param owner: the principal (subject only) the session belongs to
            under per-user or per-session isolation: its identity goes on
            the requests that carry no caller (the GET stream, DELETE).
        """
        self.clock = clock
        self.config = config
        self.owner = owner
        # An agent without treq's layers (URL parsing, a cookie agent and a
        # content decoder per request): usually the gateway's own
        # (L{smeldr_oauth.gateway.agent}).  Redirects are never followed
        # (no redirect agent), bodies are streamed into capped readers.
        self.agent = agent
        # Each channel has its own jar: cookies an upstream sets for one
        # user's session are never sent with another user's requests.
        self.cookies = _Cookies()
        self._wire: dict[str, bytes] = {}
        self.url = config.url or ""
        self.mode = "legacy" if config.transport == "sse" else "streamable"
        self.receiver: Optional[IChannelReceiver] = None
        self.session_id: Optional[str] = None
        self.version: Optional[str] = None
        self.endpoint: Optional[str] = None
        self.closed = False
        self._limit = config.limits.max_message_bytes
        self._stream: Optional[_Body] = None
        self._stream_request: Optional[Deferred] = None
        self._last_event_id: Optional[str] = None
        self._reconnect_delay = _RECONNECT_MIN
        self._reconnect: Optional[IDelayedCall] = None
        self._endpoint_ready: Optional[Deferred] = None
        self._exchanges: set[Deferred] = set()
        #: The POST headers of the last request, and what they were made of.
        self._kept: Optional[tuple[Any, KeptHeaders]] = None

    @property
    def streaming(self) -> bool:
        """
        Whether the GET stream (or the legacy event stream) is open: what
        the upstream sends unasked before it opens is lost, as it would be
        for any Streamable HTTP client.
        """
        return self._stream is not None

    # -- IUpstreamChannel ------------------------------------------------------

    def start(self, receiver: IChannelReceiver) -> Deferred:
        self.receiver = receiver
        if self.mode == "legacy":
            return self._open_legacy()
        # Streamable HTTP: the initialize POST is the first exchange.
        return succeed(None)

    def send(self, message: dict[str, Any], identity: Any = None) -> Deferred:
        if self.closed:
            return fail(errors.unavailable(self.config.name, "exited", "its HTTP session has ended"))
        d = self._post_legacy(message, identity) if self.mode == "legacy" else self._post(message, identity)
        self._exchanges.add(d)
        timer: Optional[IDelayedCall] = None
        if "method" not in message or "id" not in message:
            # Nobody waits for a notification or an answer: bound the exchange here
            # (a request's exchange is bounded by the client's timeout).
            timer = self.clock.callLater(self.config.limits.request_timeout, d.cancel)

        def forget(result: Any) -> Any:
            self._exchanges.discard(d)
            if timer is not None and timer.active():
                timer.cancel()
            return result

        return d.addBoth(forget)

    def negotiated(self, version: str) -> None:
        self.version = version

    def close(self) -> Deferred:
        if self.closed:
            return succeed(None)
        self.closed = True
        self._stop_stream()
        for d in list(self._exchanges):
            d.cancel()
        if self.mode == "streamable" and self.session_id is not None:
            # Tell the upstream the session is over; 405 (not supported) is
            # fine.  Waited for C{stop_grace} at most, as a stdio process's
            # exit is: the server's shutdown waits for this, and a hung
            # upstream must not hold it for ever.
            d = self._request("DELETE", self.url, self._headers(None))
            reading: list[_Body] = []

            def read(response: Any) -> Deferred:
                body, done = _read(response, lambda _: None, _ERROR_BODY_MAX)
                reading.append(body)
                return done

            def give_up() -> None:
                for body in reading:
                    body.abort()
                d.cancel()

            timer = self.clock.callLater(self.config.limits.stop_grace, give_up)
            return d.addCallback(read).addErrback(lambda _: None).addBoth(_cancelling, timer)
        return succeed(None)

    # -- helpers -----------------------------------------------------------------

    def _headers(
        self, identity: Any, accept: Optional[bytes] = None, json_body: bool = False, kind: Any = Headers
    ) -> Headers:
        headers: Headers = kind({b"User-Agent": [USER_AGENT]})
        if accept is not None:
            headers.setRawHeaders(b"Accept", [accept])
        if json_body:
            headers.setRawHeaders(b"Content-Type", [b"application/json"])
        if self.mode == "streamable":
            if self.session_id is not None:
                headers.setRawHeaders(b"Mcp-Session-Id", [self.session_id.encode("ascii")])
            if self.version is not None and self.version >= "2025-06-18":
                headers.setRawHeaders(b"MCP-Protocol-Version", [self.version.encode("ascii")])
        credential = self.config.credential
        if credential is not None:
            headers.setRawHeaders(credential.header.encode("ascii"), [credential.value.encode("latin-1")])
        names = self.config.identity_headers
        identity = identity if identity is not None else self.owner
        if identity is not None:
            for name, value in (
                (names.subject, getattr(identity, "subject", None)),
                (names.client, getattr(identity, "client_id", None)),
                (names.scopes, " ".join(sorted(getattr(identity, "scopes", ()) or ()))),
            ):
                if name is not None and value:
                    headers.setRawHeaders(name.encode("ascii"), [_header_value(value)])
        return headers

    def _request(self, method: str, url: str, headers: Headers, message: Optional[dict[str, Any]] = None) -> Deferred:
        """Every request the channel makes: no redirects, streamed bodies."""
        body = _BytesProducer(jsonrpc.encode(message)) if message is not None else None
        wire = self._wire.get(url)
        if wire is None:
            # The configured URL and the legacy endpoint: two at most.
            wire = self._wire[url] = _wire_url(url)
        self.cookies.add_to(url, headers)
        d = self.agent.request(method.encode("ascii"), wire, headers, body)

        def received(response: Any) -> Any:
            self.cookies.take_from(url, response)
            return response

        return d.addCallback(received)

    def _post_message(self, url: str, message: dict[str, Any], identity: Any) -> Deferred:
        return self._request("POST", url, self._post_headers(identity), message)

    def _post_headers(self, identity: Any) -> Headers:
        """
        A POST's headers: the last request's again when nothing they are
        made of changed (the transport, the session id, the negotiated
        version, the caller's identity when identity headers are
        configured), so that the agent sends their checked lines as they
        are (L{KeptHeaders}); new ones otherwise.  With cookies in use,
        always new ones: the jar adds its own header to them.
        """
        if self.cookies.in_use:
            return self._headers(identity, _POST_ACCEPT, json_body=True)
        who = identity if identity is not None else self.owner
        names = self.config.identity_headers
        person = None
        if who is not None and (names.subject is not None or names.client is not None or names.scopes is not None):
            scopes = getattr(who, "scopes", None) or ()
            person = (getattr(who, "subject", None), getattr(who, "client_id", None), frozenset(scopes))
        key = (self.mode, self.session_id, self.version, person)
        kept = self._kept
        if kept is not None and kept[0] == key:
            return kept[1]
        headers = self._headers(identity, _POST_ACCEPT, json_body=True, kind=KeptHeaders)
        self._kept = (key, headers)  # type: ignore[assignment]
        return headers

    def _deliver(self, data: bytes, related: Any) -> list[Any]:
        """Parse one JSON frame and hand its messages on; return them."""
        try:
            _, messages = jsonrpc.parse_frame(data)
        except JSONRPCError:
            log.info("Upstream {upstream} sent a frame that is not JSON-RPC; ignored", upstream=self.config.name)
            return []
        for message in messages:
            if self.receiver is not None and not self.closed:
                self.receiver.messageReceived(message, related)
        return messages

    def _lost(self, reason: str, detail: str) -> None:
        if self.closed:
            return
        self.closed = True
        self._stop_stream()
        if self.receiver is not None:
            self.receiver.channelLost(reason, detail)

    def _fail(self, detail: str) -> JSONRPCError:
        return errors.unavailable(self.config.name, "http", detail)

    # -- Streamable HTTP ---------------------------------------------------------

    def _post(self, message: dict[str, Any], identity: Any) -> Deferred:
        request_id = message.get("id") if "method" in message else None
        initialize = message.get("method") == "initialize"
        # The request first (it is written to the upstream at once when a
        # connection is idle); what only its answer needs, after it.
        request = self._post_message(self.url, message, identity)
        state: dict[str, Any] = {"body": None}

        def cancel(_: Deferred) -> None:
            if state["body"] is not None:
                state["body"].abort()
            request.cancel()

        result: Deferred = Deferred(cancel)

        def answered(response: Any) -> Any:
            status = response.code
            if initialize:
                if self.config.transport == "auto" and status in (400, 404, 405):
                    log.info(
                        "Upstream {upstream} refused Streamable HTTP ({status}); trying the HTTP+SSE transport",
                        upstream=self.config.name,
                        status=status,
                    )
                    _drain(response)
                    self.mode = "legacy"
                    return self._open_legacy().addCallback(lambda _: self._post_legacy(message, identity))
                self._take_session_id(response)
            if status == 404 and self.session_id is not None and not initialize:
                _drain(response)
                self._lost("exited", "the upstream ended its HTTP session")
                raise errors.unavailable(self.config.name, "exited", "the upstream ended its HTTP session")
            if request_id is None:
                _drain(response)
                if status >= 300:
                    raise self._fail(f"it answered HTTP {status}")
                return None
            if status >= 300:
                # Redirects are not followed: the credential stays with the configured URL.
                return self._error_body(response, status, request_id)
            media = _media_type(response)
            if media == "text/event-stream":
                return self._post_stream(response, request_id, state)
            if media == "application/json":
                return self._json_body(response, request_id, state)
            _drain(response)
            raise self._fail(f"it answered with {media or 'no content type'} instead of JSON or an event stream")

        def opened(outcome: Any) -> None:
            if result.called:
                return
            if isinstance(outcome, Failure):
                if outcome.check(CancelledError):
                    return
                error = outcome.value if outcome.check(JSONRPCError) else self._fail("it could not be reached")
                result.errback(error)
            else:
                result.callback(None)

        request.addCallback(answered).addBoth(opened)
        if message.get("method") == "notifications/initialized":
            result.addCallback(lambda _: self._open_stream())
        return result

    def _take_session_id(self, response: Any) -> None:
        values = response.headers.getRawHeaders(b"mcp-session-id")
        if not values:
            return
        value = values[0]
        if len(value) > _MAX_SESSION_ID or not all(0x21 <= b <= 0x7E for b in value):
            raise self._fail("it gave a session id that is not visible ASCII")
        self.session_id = value.decode("ascii")

    def _json_body(self, response: Any, request_id: Any, state: dict[str, Any]) -> Deferred:
        chunks: list[bytes] = []
        body, done = _read(response, chunks.append, self._limit)
        state["body"] = body

        def parsed(_: Any) -> None:
            if body.too_large:
                raise self._fail(f"its answer is larger than {self._limit} bytes")
            messages = self._deliver(b"".join(chunks), request_id)
            if not any(isinstance(m, Response) and m.id == request_id for m in messages):
                raise self._fail("its answer did not answer the request")

        return done.addCallback(parsed)

    def _error_body(self, response: Any, status: int, request_id: Any) -> Deferred:
        # A JSON-RPC error in an error status is still the upstream's answer.
        chunks: list[bytes] = []
        body, done = _read(response, chunks.append, _ERROR_BODY_MAX)

        def parsed(_: Any) -> None:
            if status >= 400 and _media_type(response) == "application/json" and not body.too_large:
                try:
                    decoded = json.loads(b"".join(chunks))
                except ValueError:
                    decoded = None
                if isinstance(decoded, dict) and decoded.get("id") == request_id and isinstance(decoded.get("error"), dict):
                    self._deliver(b"".join(chunks), request_id)
                    return
            if status in (401, 403):
                raise self._fail(f"it refused the gateway's credential (HTTP {status})")
            raise self._fail(f"it answered HTTP {status}")

        return done.addCallback(parsed)

    def _post_stream(self, response: Any, request_id: Any, state: dict[str, Any], resumes: int = 0) -> Deferred:
        decoder = SSEDecoder(self._limit)
        seen = {"answer": False}

        def chunk(data: bytes) -> None:
            for event in decoder.feed(data):
                if event.event == "message" and event.data.strip():
                    for message in self._deliver(event.data.encode("utf-8"), request_id):
                        if isinstance(message, Response) and message.id == request_id:
                            seen["answer"] = True

        body, done = _read(response, chunk, None)
        state["body"] = body

        def ended(outcome: Any) -> Any:
            if isinstance(outcome, Failure) and outcome.check(SSETooLarge):
                raise self._fail(f"it sent an event larger than {self._limit} bytes")
            if seen["answer"] or self.closed:
                return None
            if decoder.last_event_id is not None and resumes < _MAX_RESUMES:
                delay = (decoder.retry or 0) / 1000.0
                return self._resume(request_id, decoder.last_event_id, delay, state, resumes + 1)
            raise self._fail("it ended the stream without answering")

        return done.addBoth(ended)

    def _resume(self, request_id: Any, last_id: str, delay: float, state: dict[str, Any], resumes: int) -> Deferred:
        waited: Deferred = Deferred()
        timer = self.clock.callLater(min(delay, _RECONNECT_MAX), waited.callback, None)
        state["body"] = None

        def get(_: Any) -> Deferred:
            headers = self._headers(None, b"text/event-stream")
            headers.setRawHeaders(b"Last-Event-ID", [last_id.encode("utf-8")])
            return self._request("GET", self.url, headers)

        def opened(response: Any) -> Any:
            if response.code != 200 or _media_type(response) != "text/event-stream":
                _drain(response)
                raise self._fail(f"resuming its stream failed (HTTP {response.code})")
            return self._post_stream(response, request_id, state, resumes)

        def stop_timer(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            return result

        return waited.addBoth(stop_timer).addCallback(get).addCallback(opened)

    def _open_stream(self) -> None:
        """The GET stream for what the upstream sends unasked."""
        self._reconnect = None
        if self.closed or self.mode != "streamable":
            return
        headers = self._headers(None, b"text/event-stream")
        if self._last_event_id is not None:
            headers.setRawHeaders(b"Last-Event-ID", [self._last_event_id.encode("utf-8")])
        d = self._request("GET", self.url, headers)
        self._stream_request = d

        def opened(response: Any) -> Any:
            self._stream_request = None
            if response.code == 405:
                _drain(response)
                log.debug("Upstream {upstream} offers no GET stream", upstream=self.config.name)
                return None
            if response.code == 404 and self.session_id is not None:
                _drain(response)
                self._lost("exited", "the upstream ended its HTTP session")
                return None
            if response.code != 200 or _media_type(response) != "text/event-stream":
                _drain(response)
                raise self._fail(f"its GET stream answered HTTP {response.code}")
            def received(decoder: SSEDecoder, event: Event) -> None:
                if decoder.last_event_id is not None:
                    self._last_event_id = decoder.last_event_id
                if event.event == "message" and event.data.strip():
                    self._reconnect_delay = _RECONNECT_MIN
                    self._deliver(event.data.encode("utf-8"), None)

            decoder, done = self._listen(response, received)

            def ended(_: Any) -> None:
                self._stream = None
                if decoder.retry is not None:
                    self._reconnect_delay = max(decoder.retry / 1000.0, 0.0)
                self._schedule_stream()

            return done.addBoth(ended)

        def failed(failure: Failure) -> None:
            self._stream_request = None
            if failure.check(CancelledError) or self.closed:
                return
            log.info(
                "Upstream {upstream} GET stream: {error}; reconnecting",
                upstream=self.config.name,
                error=getattr(failure.value, "message", type(failure.value).__name__),
            )
            self._schedule_stream()

        d.addCallback(opened).addErrback(failed)

    def _listen(self, response: Any, on_event: Callable[[SSEDecoder, Event], None]) -> tuple[SSEDecoder, Deferred]:
        """
        Make C{response} the channel's own event stream (the GET stream, or
        the legacy transport's): each event to C{on_event} with the decoder
        (its last event id and retry); C{close} drops it.

        @return: the decoder, and a L{Deferred} that fires when the stream
            ends.
        """
        decoder = SSEDecoder(self._limit)

        def chunk(data: bytes) -> None:
            for event in decoder.feed(data):
                on_event(decoder, event)

        self._stream, done = _read(response, chunk, None)
        return decoder, done

    def _schedule_stream(self) -> None:
        if self.closed:
            return
        delay = self._reconnect_delay
        self._reconnect_delay = min(_RECONNECT_MAX, max(_RECONNECT_MIN, delay * 2))
        self._reconnect = self.clock.callLater(delay, self._open_stream)

    def _stop_stream(self) -> None:
        if self._reconnect is not None and self._reconnect.active():
            self._reconnect.cancel()
        self._reconnect = None
        if self._stream_request is not None:
            self._stream_request.cancel()
        if self._stream is not None:
            self._stream.abort()
        if self._endpoint_ready is not None and not self._endpoint_ready.called:
            self._endpoint_ready.cancel()

    # -- legacy HTTP+SSE ---------------------------------------------------------

    def _open_legacy(self) -> Deferred:
        """GET the event stream; fire when its C{endpoint} event arrived."""
        ready: Deferred = Deferred()
        self._endpoint_ready = ready
        d = self._request("GET", self.url, self._headers(None, b"text/event-stream"))
        self._stream_request = d

        def opened(response: Any) -> Any:
            self._stream_request = None
            if response.code != 200 or _media_type(response) != "text/event-stream":
                _drain(response)
                raise self._fail(f"it speaks neither Streamable HTTP nor HTTP+SSE (GET answered {response.code})")
            def received(decoder: SSEDecoder, event: Event) -> None:
                if event.event == "endpoint" and self.endpoint is None:
                    self._take_endpoint(event.data.strip(), ready)
                elif event.event == "message" and event.data.strip() and self.endpoint is not None:
                    self._deliver(event.data.encode("utf-8"), None)

            _, done = self._listen(response, received)

            def ended(outcome: Any) -> None:
                self._stream = None
                if not ready.called:
                    ready.errback(self._fail("its event stream ended before naming an endpoint"))
                self._lost("exited", "the upstream closed its event stream")

            done.addBoth(ended)

        def failed(failure: Failure) -> None:
            self._stream_request = None
            if not ready.called:
                error = failure.value if failure.check(JSONRPCError) else self._fail("its event stream could not be opened")
                ready.errback(error)

        d.addCallback(opened).addErrback(failed)
        return ready

    def _take_endpoint(self, data: str, ready: Deferred) -> None:
        base = hyperlink.URL.from_text(self.url)
        try:
            endpoint = base.click(data)
        except (hyperlink.URLParseError, ValueError):
            endpoint = None
        if endpoint is None or (endpoint.scheme, endpoint.host, endpoint.port) != (base.scheme, base.host, base.port):
            log.warn(
                "Upstream {upstream} named a message endpoint on another origin; refused",
                upstream=self.config.name,
                smeldr_event="gateway_protocol_error",
            )
            if not ready.called:
                ready.errback(self._fail("it named a message endpoint on another origin"))
            self._stop_stream()
            return
        self.endpoint = endpoint.to_text()
        if not ready.called:
            ready.callback(None)

    def _post_legacy(self, message: dict[str, Any], identity: Any) -> Deferred:
        assert self.endpoint is not None
        request = self._post_message(self.endpoint, message, identity)

        def accepted(response: Any) -> Deferred:
            done = _drain(response)
            error: Optional[JSONRPCError] = None
            if response.code == 404:
                error = errors.unavailable(self.config.name, "exited", "the upstream ended its HTTP+SSE session")
                self._lost("exited", "the upstream ended its HTTP+SSE session")
            elif response.code >= 300:
                error = self._fail(f"it answered HTTP {response.code}")

            def settle(_: Any) -> None:
                if error is not None:
                    raise error

            return done.addCallback(settle)

        def failed(failure: Failure) -> Failure:
            if failure.check(JSONRPCError, CancelledError):
                return failure
            return Failure(self._fail("it could not be reached"))

        return request.addCallback(accepted).addErrback(failed)
