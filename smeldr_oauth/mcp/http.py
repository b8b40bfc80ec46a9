# -*- test-case-name: tests.test_mcp_http -*-
"""
The MCP endpoints over HTTP, as Klein routes, protected by OAuth bearer
tokens:

  - Streamable HTTP (2025-03-26 and later): C{POST /mcp} answers JSON, or an
    SSE stream when the call emits progress, logs or server-to-client
    requests; C{GET /mcp} with C{Mcp-Session-Id} opens the server's stream
    (event ids, C{Last-Event-ID} resumption); C{DELETE /mcp} ends a
    session.  A POST without a session whose body uses the 2026-07-28
    per-request envelope is served statelessly.
  - legacy HTTP+SSE (2024-11-05): C{GET /mcp} I{without} C{Mcp-Session-Id}
    (whatever the C{Accept} header says) opens a stream whose first event is
    C{endpoint}; C{POST /mcp/message?session_id=...} answers 202 and the
    JSON-RPC response travels on that stream as C{event: message}.

Sessions are bound to the token's subject I{and} client: a request with
another caller's token on a session gets the same 404 as an unknown
session, so a session id reveals nothing to someone who is not its owner.

Sessions are capped per grant and per subject (the caller's oldest idle
session makes room, else 429), so one token cannot fill the server-wide
cap and lock everyone else out; a session nobody used after C{initialize}
lives only C{new_session_timeout} seconds.

Every open stream remembers the access token it was opened with (in
memory, in plain text: the verifier needs the token itself) and verifies
it again every C{stream_recheck_interval} seconds and at its expiry, so a
revoked access token, one revoked by another process, or an expired one
does not keep a stream open.

The protocol itself lives in L{smeldr_oauth.mcp.session}; this module only
translates HTTP to those calls and back.
"""

from __future__ import annotations

import json
import math
import secrets
from collections import deque
from typing import Any, Callable, Optional

import attr
import hyperlink
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.web import server

from smeldr_oauth.mcp import jsonrpc
from smeldr_oauth.mcp.app import MCPApp
from smeldr_oauth.mcp.auth import AuthFailure, Challenger, bearer_token, verify
from smeldr_oauth.mcp.jsonrpc import JSONRPCError, Message, Request
from smeldr_oauth.mcp.session import Outlet, Principal, ServerSession
from smeldr_oauth.mcp.versions import MODERN_VERSIONS, SUPPORTED_VERSIONS, check_modern_headers, is_modern_request
from smeldr_oauth.mcp.streams import Deadlines, KeepaliveTimer, SSEStream
from smeldr_oauth.oauth.model import AccessInfo

log = Logger()

MCP_METHODS = (b"DELETE", b"GET", b"OPTIONS", b"POST")
MESSAGE_METHODS = (b"OPTIONS", b"POST")

#: 2026-07-28 error codes and the HTTP status they travel with.
_MODERN_STATUS = {
    jsonrpc.PARSE_ERROR: 400,
    jsonrpc.INVALID_REQUEST: 400,
    jsonrpc.INVALID_PARAMS: 400,
    jsonrpc.HEADER_MISMATCH: 400,
    jsonrpc.MISSING_CLIENT_CAPABILITY: 400,
    jsonrpc.UNSUPPORTED_PROTOCOL_VERSION: 400,
    jsonrpc.METHOD_NOT_FOUND: 404,
}


class CappedRequest(server.Request):
    """
    A request that stops storing its body past C{max_body} bytes (twisted.web
    has no limit of its own), so a huge or endless upload costs no memory;
    the MCP routes then answer 413.  Use with
    C{site.requestFactory = capped_request_factory(limit)}.
    """

    max_body = 1 << 20
    body_too_large = False
    _received = 0

    def gotLength(self, length: Optional[int]) -> None:
        if length is not None and length > self.max_body:
            self.body_too_large = True
        super().gotLength(length if not self.body_too_large else 0)

    def handleContentChunk(self, data: bytes) -> None:
        self._received += len(data)
        if self.body_too_large or self._received > self.max_body:
            self.body_too_large = True
            return
        super().handleContentChunk(data)


def capped_request_factory(max_body: int) -> type:
    return type("CappedRequest", (CappedRequest,), {"max_body": max_body})


class _HTTPError(Exception):
    """An HTTP-level refusal: status, JSON body, extra headers."""

    def __init__(self, status: int, body: dict[str, Any], headers: Optional[dict[str, str]] = None) -> None:
        super().__init__(status)
        self.status = status
        self.body = body
        self.headers = headers or {}


def _rpc_error(status: int, code: int, message: str, data: Any = None, msg_id: Any = None) -> _HTTPError:
    return _HTTPError(status, jsonrpc.error_response(msg_id, JSONRPCError(code, message, data)))


def _auth_error(failure: AuthFailure) -> _HTTPError:
    if failure.status == 503:
        return _rpc_error(503, jsonrpc.INTERNAL_ERROR, "Authorization temporarily unavailable")
    body = {"error": failure.error or "unauthorized", "error_description": "Authorization required"}
    if failure.status == 403:
        body["error_description"] = "The access token lacks a required scope"
    elif failure.error == "invalid_token":
        body["error_description"] = "The access token is invalid or expired"
    elif failure.error == "invalid_request":
        body["error_description"] = "Malformed Authorization header"
    headers = {"WWW-Authenticate": failure.challenge} if failure.challenge else {}
    return _HTTPError(failure.status, body, headers)


@attr.s(frozen=True, auto_attribs=True, slots=True)
class _Credential:
    """A verified bearer token and what the verifier said about it."""

    info: AccessInfo
    token: str = attr.ib(repr=False)


@attr.s(auto_attribs=True, eq=False, slots=True)
class _StreamAuth:
    """
    The access token that keeps one stream open.

    The token is kept in plain text (the verifier takes nothing else) for
    as long as the stream is open, and never logged (C{repr=False}).  A
    session's own stream (legacy or Streamable HTTP GET) follows the last
    valid token its owner presented on the session.
    """

    stream: SSEStream
    subject: str
    client_id: Optional[str]
    grant_id: Optional[str]
    expires_at: float
    token: str = attr.ib(repr=False)


def _expiry(info: AccessInfo) -> float:
    # verify() treats a zero expires_at as "does not expire".
    return info.expires_at or math.inf


def _principal(info: AccessInfo) -> Principal:
    return Principal(
        subject=info.subject, client_id=info.client_id, scopes=frozenset(info.scopes), grant_id=info.grant_id
    )


@attr.s(auto_attribs=True, eq=False, slots=True)
class _HTTPSession:
    """
    One MCP session as the HTTP layer keeps it.

    Slotted, and the resumption buffer (Streamable HTTP only) and the set
    of exchanges in flight are made on first use: a legacy session idling
    behind its stream is held by the thousand.
    """

    session_id: str
    kind: str  # "streamable" or "legacy"
    subject: str
    client_id: Optional[str]
    grant_id: Optional[str]
    protocol: ServerSession = attr.ib(default=None)
    stream: Optional[SSEStream] = None
    buffer: Optional[deque] = None
    next_event_id: int = 0
    last_delivered: int = 0
    idle: Optional[IDelayedCall] = None
    exchanges: Optional[set] = None
    # Whether the client did anything after initialize (a request, or
    # opening the GET stream); until then the short idle timeout applies.
    used: bool = False
    last_active: float = 0.0
    grant_key: Any = None

    def add_exchange(self, exchange: "_Exchange") -> None:
        if self.exchanges is None:
            self.exchanges = set()
        self.exchanges.add(exchange)

    def discard_exchange(self, exchange: "_Exchange") -> None:
        if self.exchanges is not None:
            self.exchanges.discard(exchange)

    def owned_by(self, info: AccessInfo) -> bool:
        return info.subject == self.subject and info.client_id == self.client_id

    @property
    def is_idle(self) -> bool:
        """
        No open stream and nothing in flight: ending it interrupts nothing
        (the client gets a 404 on its next request and starts over).
        """
        return (self.stream is None or self.stream.closed) and not self.exchanges and not self.protocol.busy


class _SessionOutlet(Outlet):
    """
    The session's own channel to the client: the GET stream (Streamable
    HTTP; buffered with event ids for resumption) or the legacy stream.
    """

    can_request = True

    def __init__(self, owner: "MCPHTTP", http_session: _HTTPSession) -> None:
        self._owner = owner
        self._session = http_session

    def send(self, message: dict[str, Any]) -> None:
        s = self._session
        data = jsonrpc.encode(message).decode("utf-8")
        if s.kind == "legacy":
            if s.stream is not None:
                s.stream.send(data, event="message")
            return
        s.next_event_id += 1
        if s.buffer is None:
            s.buffer = deque()
        s.buffer.append((s.next_event_id, data))
        while len(s.buffer) > self._owner.resume_buffer:
            s.buffer.popleft()
        if s.stream is not None and not s.stream.closed:
            s.stream.send(data, event="message", event_id=str(s.next_event_id))
            s.last_delivered = s.next_event_id


class _PostOutlet(Outlet):
    """Messages related to the requests of one POST go on its own stream."""

    def __init__(self, exchange: "_Exchange") -> None:
        self._exchange = exchange
        self.can_request = exchange.sse_ok

    def send(self, message: dict[str, Any]) -> None:
        self._exchange.related(message)


class _Exchange:
    """
    One Streamable HTTP POST carrying requests.  It answers JSON when every
    response is ready before anything else needs sending, and switches to
    an SSE stream as soon as a related message (progress, log, server
    request) must go out, or the call runs past the keepalive interval.
    """

    def __init__(
        self,
        owner: "MCPHTTP",
        request: Any,
        http_session: Optional[_HTTPSession],
        protocol: ServerSession,
        is_batch: bool,
        sse_ok: bool,
        modern: bool,
        credential: _Credential,
    ) -> None:
        self.owner = owner
        self.request = request
        self.http_session = http_session
        self.protocol = protocol
        self.is_batch = is_batch
        self.sse_ok = sse_ok
        self.modern = modern
        self.credential = credential
        self.mode = "pending"
        self.pending: list[dict[str, Any]] = []
        self.responses: list[dict[str, Any]] = []
        self.remaining = 0
        self.stream: Optional[SSEStream] = None
        self.result: Deferred = Deferred(self._cancelled)
        self.outlet = _PostOutlet(self)
        self.headers: dict[str, str] = {}
        self._timer: Optional[IDelayedCall] = None

    def run(self, requests: list[tuple[Message, Principal]]) -> Deferred:
        self.remaining = len(requests)
        if self.http_session is not None:
            self.http_session.add_exchange(self)
        if self.sse_ok and self.owner.keepalive_interval:
            self._timer = self.owner.clock.callLater(self.owner.keepalive_interval, self._go_sse)
        for message, principal in requests:
            self.protocol.handle(message, principal, self.outlet).addCallback(self._answered)
        return self.result

    def related(self, message: dict[str, Any]) -> None:
        if self.mode == "done":
            return
        if self.mode == "pending":
            if not self.sse_ok:
                return
            self.pending.append(message)
            self._go_sse()
            return
        assert self.stream is not None
        self.stream.send(jsonrpc.encode(message).decode("utf-8"), event="message")

    def _go_sse(self) -> None:
        if self.mode != "pending":
            return
        self.mode = "sse"
        self._stop_timer()
        headers = {name.encode(): value.encode() for name, value in self.headers.items()}
        self.stream = SSEStream(
            self.request,
            self.owner.clock,
            keepalive_interval=self.owner.keepalive_interval,
            keepalive_timer=self.owner.keepalive_timer,
            max_queue=self.owner.max_queue,
            on_close=self._stream_closed,
            done=self.result,
        )
        self.owner._track(self.stream, self.credential)
        self.stream.start(headers=headers)
        pending, self.pending = self.pending, []
        for message in pending:
            self.stream.send(jsonrpc.encode(message).decode("utf-8"), event="message")

    def _answered(self, response: Optional[dict[str, Any]]) -> None:
        self.remaining -= 1
        if response is not None:
            if self.mode == "sse":
                assert self.stream is not None
                self.stream.send(jsonrpc.encode(response).decode("utf-8"), event="message")
            else:
                self.responses.append(response)
        if self.remaining == 0:
            self._finish()

    def _finish(self) -> None:
        self._stop_timer()
        if self.http_session is not None:
            self.http_session.discard_exchange(self)
        if self.mode == "sse":
            self.mode = "done"
            assert self.stream is not None
            self.stream.close()
            return
        if self.mode != "pending":
            return
        self.mode = "done"
        request = self.request
        for name, value in self.headers.items():
            request.setHeader(name.encode(), value.encode())
        if not self.responses:
            # Every request was cancelled: nothing to say.
            request.setResponseCode(202)
            self.result.callback(b"")
            return
        body: Any = self.responses if self.is_batch else self.responses[0]
        status = 200
        if not self.is_batch:
            error = self.responses[0].get("error") or {}
            if error.get("code") == jsonrpc.INSUFFICIENT_SCOPE:
                scope = (error.get("data") or {}).get("scope", "")
                failure = self.owner.challenger.insufficient_scope(tuple(scope.split()))
                request.setHeader(b"WWW-Authenticate", failure.challenge.encode())
                status = 403
            elif self.modern and error:
                code = error.get("code")
                status = _MODERN_STATUS.get(code, 200) if isinstance(code, int) else 200
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", b"application/json")
        self.result.callback(jsonrpc.encode(body))

    def _stop_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _stream_closed(self, stream: SSEStream) -> None:
        self.owner._untrack(stream)
        if self.mode != "done":
            self.abandon()

    def abandon(self) -> None:
        """
        The client went away (or the session ended).  Session-era requests
        go on running (a disconnect is not a cancellation there); stateless
        ones are cancelled, since closing the stream is how 2026-07-28
        cancels.
        """
        self.mode = "done"
        self._stop_timer()
        if self.http_session is not None:
            self.http_session.discard_exchange(self)
        if self.modern:
            self.protocol.close()

    def _cancelled(self, _: Deferred) -> None:
        if self.stream is not None:
            self.stream.client_gone()
        elif self.mode != "done":
            self.abandon()

    def end(self) -> None:
        """End this exchange from the server side."""
        if self.stream is not None:
            self.stream.close()
        elif self.mode == "pending":
            self.mode = "done"
            self._stop_timer()
            self.request.setResponseCode(404)
            self.request.setHeader(b"Content-Type", b"application/json")
            self.result.callback(
                jsonrpc.encode(jsonrpc.error_response(None, JSONRPCError(jsonrpc.INVALID_REQUEST, "Session ended")))
            )


class MCPHTTP:
    """
    The MCP endpoints of one protected resource.

    @param reactor: provides L{IReactorTime}; used only for timing
        (keepalives, idle sessions), so a L{Clock} drives it in tests.
    @param verifier: an L{IAccessVerifier}.
    @param resource_url: the public MCP URL (the token audience).
    @param resource_metadata_url: absolute URL of the RFC 9728 document,
        named in every challenge.
    @param challenge_scope: the scopes a 401 asks for.
    @param allowed_origins: browser origins allowed to call; C{None} allows
        only the origin of C{resource_url}.  Requests without C{Origin}
        (every non-browser client) are always allowed.
    @param session_idle_timeout: a Streamable HTTP session with no request
        and no open stream for this long is ended.
    @param new_session_timeout: the idle timeout of a session that saw
        nothing after C{initialize} (no request, no GET stream): scripted
        C{initialize} floods leave nothing behind for long.
    @param max_queue: events a stream may queue for a client that stopped
        reading before it is disconnected.
    @param max_sessions_per_grant: live sessions (both transports) one
        grant may hold.  A new one ends the grant's least recently active
        idle session (no open stream, nothing in flight); if none is idle
        the answer is 429.
    @param max_sessions_per_subject: the same across all the grants of one
        subject (a user can make many grants by authorizing again).
    @param max_sessions: the server-wide cap, a last resort (503): one user
        reaches it only with C{max_sessions / max_sessions_per_subject}
        accounts.
    @param stream_recheck_interval: how often (seconds) an open stream's
        access token is verified again; it is also checked when it expires.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        mcp_app: MCPApp,
        verifier: Any,
        *,
        resource_url: str,
        resource_metadata_url: str,
        challenge_scope: str,
        allowed_origins: Optional[tuple[str, ...]] = None,
        keepalive_interval: float = 15.0,
        max_body: int = 1 << 20,
        session_idle_timeout: float = 3600.0,
        new_session_timeout: float = 60.0,
        max_queue: int = 256,
        resume_buffer: int = 256,
        max_sessions: int = 10000,
        max_sessions_per_grant: int = 50,
        max_sessions_per_subject: int = 200,
        stream_recheck_interval: float = 30.0,
        request_timeout: float = 300.0,
    ) -> None:
        self.clock = reactor
        self.app = mcp_app
        self.verifier = verifier
        self.resource_url = resource_url
        self.challenger = Challenger(resource_metadata_url, challenge_scope)
        if allowed_origins is None:
            url = hyperlink.URL.from_text(resource_url)
            port = "" if url.port in (None, 80 if url.scheme == "http" else 443) else f":{url.port}"
            allowed_origins = (f"{url.scheme}://{url.host}{port}",)
        self.allowed_origins = frozenset(o.rstrip("/").lower() for o in allowed_origins)
        self.keepalive_interval = keepalive_interval
        # One timer for every stream's keepalives (see KeepaliveTimer).
        self.keepalive_timer = KeepaliveTimer(reactor, keepalive_interval) if keepalive_interval else None
        self.max_body = max_body
        self.session_idle_timeout = session_idle_timeout
        self.new_session_timeout = min(new_session_timeout, session_idle_timeout)
        self.max_queue = max_queue
        self.resume_buffer = resume_buffer
        self.max_sessions = max_sessions
        self.max_sessions_per_grant = max_sessions_per_grant
        self.max_sessions_per_subject = max_sessions_per_subject
        if min(max_sessions, max_sessions_per_grant, max_sessions_per_subject) < 1:
            raise ValueError("session caps must be at least 1")
        self.stream_recheck_interval = stream_recheck_interval
        self.request_timeout = request_timeout
        self.path = "/mcp"
        self._sessions: dict[str, _HTTPSession] = {}
        # The sessions of each grant and of each subject, for the caps.
        self._by_grant: dict[Any, dict[str, _HTTPSession]] = {}
        self._by_subject: dict[str, dict[str, _HTTPSession]] = {}
        self._streams: dict[SSEStream, _StreamAuth] = {}
        # One timer for every stream's token re-verification and expiry.
        self._token_checks = Deadlines(reactor, self._recheck)  # type: ignore[arg-type]

    # -- wiring ---------------------------------------------------------------

    def register(self, klein_app: Any, path: str = "/mcp") -> None:
        """Mount C{path} and C{path + "/message"} on C{klein_app}."""
        self.path = path.rstrip("/") or "/mcp"

        def mcp(request: Any) -> Any:
            return self._guard(request, MCP_METHODS, self._route_mcp)

        def message(request: Any) -> Any:
            return self._guard(request, MESSAGE_METHODS, self._route_message)

        klein_app.route(self.path, endpoint=f"smeldr_mcp:{self.path}")(mcp)
        klein_app.route(self.path + "/message", endpoint=f"smeldr_mcp_message:{self.path}")(message)

    def add_revocation_source(self, grant_events: Any) -> None:
        """Close what a grant opened when C{grant_events} says it was revoked."""
        grant_events.add_revocation_observer(self.close_grant)

    def close_grant(self, grant_id: str) -> None:
        """
        End the sessions created with C{grant_id} and every stream held
        open by one of its tokens.

        Only revocations this process makes reach here at once; the
        others (an access token revoked alone, another process's
        revocations) are found by the streams' periodic re-verification.
        """
        for stream, auth in list(self._streams.items()):
            if auth.grant_id == grant_id:
                stream.close()
        for http_session in list(self._sessions.values()):
            if http_session.grant_id == grant_id:
                self._end_session(http_session)
        log.info("MCP streams of a revoked grant closed")

    def shutdown(self) -> Deferred:
        """End every stream and session cleanly (SIGTERM)."""
        for http_session in list(self._sessions.values()):
            self._end_session(http_session)
        for stream in list(self._streams):
            stream.close()
        return succeed(None)

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    @property
    def stream_count(self) -> int:
        """
        Open SSE streams (legacy, server-initiated and POST responses).
        """
        return len(self._streams)

    # -- plumbing ---------------------------------------------------------------

    def _track(self, stream: SSEStream, credential: _Credential) -> None:
        info = credential.info
        auth = _StreamAuth(stream, info.subject, info.client_id, info.grant_id, _expiry(info), credential.token)
        self._streams[stream] = auth
        self._schedule_check(auth)

    def _untrack(self, stream: SSEStream) -> None:
        auth = self._streams.pop(stream, None)
        if auth is not None:
            self._token_checks.cancel(auth)

    def _schedule_check(self, auth: _StreamAuth) -> None:
        self._token_checks.schedule(
            auth, min(self.clock.seconds() + self.stream_recheck_interval, auth.expires_at)
        )

    def _follow_token(self, http_session: _HTTPSession, credential: _Credential) -> None:
        """
        The session's owner presented a valid token on the session: its own
        stream (legacy, or the Streamable HTTP GET stream) is now held open
        by that token, so a refreshed or re-authorized client's stream
        survives the old token's expiry, and is checked against the token
        actually in use.
        """
        stream = http_session.stream
        auth = self._streams.get(stream) if stream is not None else None
        if auth is None or auth.token == credential.token:
            return
        info = credential.info
        auth.token = credential.token
        auth.grant_id = info.grant_id
        auth.expires_at = _expiry(info)
        self._schedule_check(auth)

    def _recheck(self, auth: _StreamAuth) -> None:
        """
        A stream's token is due for checking: close the stream if the token
        expired, or if the verifier no longer accepts it (revoked here or
        by another process).  If the verifier cannot answer (its store is
        down) the stream stays open until the next check: expiry is still
        enforced, so a stream never outlives its token's lifetime.
        """
        stream = auth.stream
        if stream.closed or self._streams.get(stream) is not auth:
            return
        if auth.expires_at <= self.clock.seconds():
            log.info(
                "MCP stream closed: its access token expired ({subject} via {client_id})",
                subject=auth.subject,
                client_id=auth.client_id,
            )
            stream.close()
            return
        token = auth.token

        def checked(info: AccessInfo) -> None:
            if stream.closed or auth.token is not token:
                return  # ended meanwhile, or now follows a newer token
            if info.subject != auth.subject or info.client_id != auth.client_id:
                refused(None)
                return
            auth.grant_id = info.grant_id
            auth.expires_at = _expiry(info)
            self._schedule_check(auth)

        def refused(failure: Any) -> None:
            if stream.closed or auth.token is not token:
                return
            if failure is not None and failure.check(AuthFailure) and failure.value.status == 503:
                log.warn("MCP stream token could not be verified again; checking later")
                self._schedule_check(auth)
                return
            log.info(
                "MCP stream closed: its access token is no longer valid ({subject} via {client_id})",
                subject=auth.subject,
                client_id=auth.client_id,
            )
            stream.close()

        def broken(failure: Any) -> None:
            log.failure("MCP stream token check failed", failure)

        d = verify(self.verifier, token, self.challenger, self.clock)
        d.addCallbacks(checked, refused).addErrback(broken)

    def _guard(self, request: Any, allowed: tuple[bytes, ...], route: Callable[[Any], Any]) -> Any:
        """
        What every route shares: Origin and method checks, and turning
        L{_HTTPError} and L{AuthFailure} into responses so that no bad input
        can produce a 500.
        """
        # Answers depend on the token and may carry private data: no cache
        # (browser, proxy, CDN) may keep any of them.  SSE streams repeat
        # it (see SSEStream.start).
        request.setHeader(b"Cache-Control", b"no-store")
        try:
            self._check_origin(request)
            if request.method == b"OPTIONS":
                return self._options(request, allowed)
            if request.method not in allowed:
                raise _HTTPError(
                    405,
                    jsonrpc.error_response(None, JSONRPCError(jsonrpc.INVALID_REQUEST, "Method not allowed")),
                    {"Allow": ", ".join(m.decode() for m in sorted(allowed))},
                )
            result = route(request)
        except _HTTPError as error:
            return self._error(request, error)
        except AuthFailure as failure:
            return self._error(request, _auth_error(failure))
        except Exception:
            log.failure("MCP route failed")
            return self._error(request, _rpc_error(500, jsonrpc.INTERNAL_ERROR, "Internal error"))
        if isinstance(result, Deferred):
            # A bound method, not a closure: an idle stream holds this
            # errback for as long as it is open.
            result.addErrback(self._route_failed, request)
        return result

    def _route_failed(self, failure: Any, request: Any) -> Any:
        if failure.check(_HTTPError):
            return self._error(request, failure.value)
        if failure.check(AuthFailure):
            return self._error(request, _auth_error(failure.value))
        from twisted.internet.defer import CancelledError

        if failure.check(CancelledError):
            return None
        log.failure("MCP route failed", failure)
        return self._error(request, _rpc_error(500, jsonrpc.INTERNAL_ERROR, "Internal error"))

    def _error(self, request: Any, error: _HTTPError) -> bytes:
        request.setResponseCode(error.status)
        request.setHeader(b"Content-Type", b"application/json")
        for name, value in error.headers.items():
            request.setHeader(name.encode(), value.encode())
        return json.dumps(error.body).encode()

    def _check_origin(self, request: Any) -> None:
        origins = request.requestHeaders.getRawHeaders(b"origin")
        if not origins:
            return
        origin = origins[-1].decode("latin-1").rstrip("/").lower()
        if len(origins) > 1 or origin not in self.allowed_origins:
            log.info("MCP request from a forbidden Origin refused")
            raise _rpc_error(403, jsonrpc.INVALID_REQUEST, "Origin not allowed")
        request.setHeader(b"Access-Control-Allow-Origin", origins[-1])
        request.setHeader(b"Vary", b"Origin")
        request.setHeader(b"Access-Control-Expose-Headers", b"Mcp-Session-Id, WWW-Authenticate")

    def _options(self, request: Any, allowed: tuple[bytes, ...]) -> bytes:
        methods = b", ".join(sorted(allowed))
        request.setResponseCode(204)
        request.setHeader(b"Allow", methods)
        request.setHeader(b"Access-Control-Allow-Methods", methods)
        request.setHeader(
            b"Access-Control-Allow-Headers",
            b"Authorization, Content-Type, Accept, Last-Event-ID, Mcp-Session-Id, "
            b"MCP-Protocol-Version, Mcp-Method, Mcp-Name",
        )
        request.setHeader(b"Access-Control-Max-Age", b"600")
        return b""

    def _header(self, request: Any, name: bytes) -> Optional[str]:
        values = request.requestHeaders.getRawHeaders(name)
        if not values:
            return None
        if len(values) > 1:
            raise _rpc_error(400, jsonrpc.INVALID_REQUEST, f"Repeated {name.decode()} header")
        try:
            return values[0].decode("ascii").strip()
        except UnicodeDecodeError:
            raise _rpc_error(400, jsonrpc.INVALID_REQUEST, f"Malformed {name.decode()} header")

    def _authenticate(self, request: Any) -> Deferred:
        """
        @return: a L{Deferred} firing with the request's L{_Credential}.
        """
        token = bearer_token(request.requestHeaders.getRawHeaders(b"authorization"), self.challenger)
        return verify(self.verifier, token, self.challenger, self.clock).addCallback(_Credential, token)

    def _check_length(self, request: Any) -> None:
        if getattr(request, "body_too_large", False):
            raise _rpc_error(413, jsonrpc.INVALID_REQUEST, "Request body too large")
        length = self._header(request, b"content-length")
        if length is not None:
            try:
                if int(length) > self.max_body:
                    raise _rpc_error(413, jsonrpc.INVALID_REQUEST, "Request body too large")
            except ValueError:
                raise _rpc_error(400, jsonrpc.INVALID_REQUEST, "Bad Content-Length")

    def _read_body(self, request: Any) -> tuple[bool, list[Message]]:
        content_type = (self._header(request, b"content-type") or "").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise _rpc_error(415, jsonrpc.INVALID_REQUEST, "Content-Type must be application/json")
        request.content.seek(0)
        body = request.content.read(self.max_body + 1)
        if len(body) > self.max_body or getattr(request, "body_too_large", False):
            raise _rpc_error(413, jsonrpc.INVALID_REQUEST, "Request body too large")
        try:
            return jsonrpc.parse_frame(body)
        except JSONRPCError as error:
            raise _HTTPError(400, jsonrpc.error_response(None, error))

    def _accepts(self, request: Any) -> tuple[bool, bool]:
        """(JSON acceptable, SSE acceptable) from the Accept header."""
        accept = (self._header(request, b"accept") or "*/*").lower()
        kinds = {part.split(";")[0].strip() for part in accept.split(",")}
        anything = "*/*" in kinds
        return (
            anything or "application/json" in kinds or "application/*" in kinds,
            anything or "text/event-stream" in kinds or "text/*" in kinds,
        )

    def _lookup(self, session_id: Optional[str], info: AccessInfo, kind: str) -> _HTTPSession:
        http_session = self._sessions.get(session_id or "")
        if http_session is None or http_session.kind != kind or not http_session.owned_by(info):
            if http_session is not None:
                log.warn(
                    "MCP session used by a caller that does not own it: {subject} via {client_id}",
                    subject=info.subject,
                    client_id=info.client_id,
                )
            raise _rpc_error(404, jsonrpc.INVALID_REQUEST, "Session not found")
        return http_session

    def _check_version_header(self, request: Any) -> Optional[str]:
        version = self._header(request, b"mcp-protocol-version")
        if version is not None and version not in SUPPORTED_VERSIONS:
            raise _rpc_error(
                400,
                jsonrpc.INVALID_REQUEST,
                "Unsupported MCP-Protocol-Version",
                {"supported": list(SUPPORTED_VERSIONS), "requested": version[:64]},
            )
        return version

    def _new_session(self, kind: str, info: AccessInfo) -> _HTTPSession:
        grant_key: Any = ("grant", info.grant_id) if info.grant_id else ("caller", info.subject, info.client_id)
        self._make_room(self._by_grant.get(grant_key), self.max_sessions_per_grant, info)
        self._make_room(self._by_subject.get(info.subject), self.max_sessions_per_subject, info)
        if len(self._sessions) >= self.max_sessions:
            log.warn("MCP session limit of the server reached ({count} sessions)", count=len(self._sessions))
            raise _rpc_error(503, jsonrpc.INTERNAL_ERROR, "Too many sessions")
        session_id = secrets.token_urlsafe(32)
        http_session = _HTTPSession(session_id, kind, info.subject, info.client_id, info.grant_id)
        http_session.grant_key = grant_key
        self._by_grant.setdefault(grant_key, {})[session_id] = http_session
        self._by_subject.setdefault(info.subject, {})[session_id] = http_session
        http_session.protocol = ServerSession(
            self.app,
            self.clock,
            session_id=session_id,
            default_outlet=_SessionOutlet(self, http_session),
            request_timeout=self.request_timeout,
        )
        self._sessions[session_id] = http_session
        self._touch(http_session)
        return http_session

    def _make_room(self, bucket: Optional[dict[str, _HTTPSession]], cap: int, info: AccessInfo) -> None:
        """
        Make room for one more session in C{bucket} (one caller's
        sessions) by ending its least recently active idle session.

        @raise _HTTPError: 429 when every session of the bucket is busy.
        """
        while bucket and len(bucket) >= cap:
            idle = [s for s in bucket.values() if s.is_idle]
            if not idle:
                log.info(
                    "MCP session refused: {subject} via {client_id} has {count} busy sessions",
                    subject=info.subject,
                    client_id=info.client_id,
                    count=len(bucket),
                )
                raise _HTTPError(
                    429,
                    jsonrpc.error_response(None, JSONRPCError(jsonrpc.INTERNAL_ERROR, "Too many sessions")),
                    {"Retry-After": str(int(math.ceil(self.new_session_timeout)))},
                )
            victim = min(idle, key=lambda s: s.last_active)
            log.info(
                "MCP session limit reached for {subject} via {client_id}: oldest idle session ended",
                subject=info.subject,
                client_id=info.client_id,
            )
            self._end_session(victim)

    def _touch(self, http_session: _HTTPSession) -> None:
        http_session.last_active = self.clock.seconds()
        if http_session.kind != "streamable":
            return
        if http_session.idle is not None and http_session.idle.active():
            http_session.idle.cancel()
        timeout = self.session_idle_timeout if http_session.used else self.new_session_timeout
        http_session.idle = self.clock.callLater(timeout, self._expire, http_session)

    def _expire(self, http_session: _HTTPSession) -> None:
        if not http_session.is_idle:
            self._touch(http_session)
            return
        log.info("MCP session idle; ended")
        self._end_session(http_session)

    def _end_session(self, http_session: _HTTPSession) -> None:
        if self._sessions.pop(http_session.session_id, None) is None:
            return
        for index, key in ((self._by_grant, http_session.grant_key), (self._by_subject, http_session.subject)):
            bucket = index.get(key)
            if bucket is not None:
                bucket.pop(http_session.session_id, None)
                if not bucket:
                    del index[key]
        if http_session.idle is not None and http_session.idle.active():
            http_session.idle.cancel()
        for exchange in list(http_session.exchanges or ()):
            exchange.end()
        http_session.protocol.close()
        if http_session.stream is not None:
            http_session.stream.close()

    def _scope_check(self, protocol: ServerSession, messages: list[Message], principal: Principal) -> None:
        for message in messages:
            needed = protocol.missing_scopes(message, principal)
            if needed:
                log.info(
                    "MCP request refused for insufficient scope: {subject} via {client_id} needs {scopes}",
                    subject=principal.subject,
                    client_id=principal.client_id,
                    scopes=" ".join(needed),
                )
                raise AuthFailure(
                    403, self.challenger.insufficient_scope(needed).challenge, "insufficient_scope"
                )

    # -- /mcp ---------------------------------------------------------------------

    def _route_mcp(self, request: Any) -> Any:
        if request.method == b"POST":
            self._check_length(request)
            return self._authenticate(request).addCallback(self._post, request)
        if request.method == b"GET":
            return self._authenticate(request).addCallback(self._get, request)
        return self._authenticate(request).addCallback(self._delete, request)

    def _post(self, credential: _Credential, request: Any) -> Any:
        info = credential.info
        principal = _principal(info)
        is_batch, messages = self._read_body(request)
        json_ok, sse_ok = self._accepts(request)
        if not (json_ok or sse_ok):
            raise _rpc_error(406, jsonrpc.INVALID_REQUEST, "Accept must allow application/json or text/event-stream")
        session_id = self._header(request, b"mcp-session-id")
        if session_id is not None:
            http_session = self._lookup(session_id, info, "streamable")
            self._check_version_header(request)
            protocol = http_session.protocol
            if any(isinstance(m, Request) for m in messages):
                http_session.used = True
            self._touch(http_session)
            self._follow_token(http_session, credential)
            if is_batch and not protocol.allows_batch:
                raise _rpc_error(400, jsonrpc.INVALID_REQUEST, "Batches are not allowed at this protocol version")
            return self._exchange(
                request, http_session, protocol, is_batch, messages, principal, credential, sse_ok, json_ok
            )
        if any(is_modern_request(m) for m in messages) or (
            self._header(request, b"mcp-protocol-version") in MODERN_VERSIONS
        ):
            return self._stateless(request, is_batch, messages, principal, credential, sse_ok, json_ok)
        self._check_version_header(request)
        first = messages[0]
        if is_batch or not isinstance(first, Request) or first.method != "initialize":
            raise _rpc_error(400, jsonrpc.INVALID_REQUEST, "Missing Mcp-Session-Id: send initialize first")
        http_session = self._new_session("streamable", info)
        exchange_headers = {"Mcp-Session-Id": http_session.session_id}
        d = self._exchange(
            request,
            http_session,
            http_session.protocol,
            False,
            messages,
            principal,
            credential,
            sse_ok,
            json_ok,
            exchange_headers,
        )

        def check_initialized(result: Any) -> Any:
            # A failed initialize leaves no session behind.
            if not http_session.protocol.initialized:
                self._end_session(http_session)
            return result

        return d.addBoth(check_initialized)

    def _stateless(
        self,
        request: Any,
        is_batch: bool,
        messages: list[Message],
        principal: Principal,
        credential: _Credential,
        sse_ok: bool,
        json_ok: bool,
    ) -> Any:
        if is_batch:
            raise _rpc_error(400, jsonrpc.INVALID_REQUEST, "Batches are not part of the 2026-07-28 exchange")
        message = messages[0]
        if isinstance(message, jsonrpc.Invalid):
            raise _HTTPError(400, jsonrpc.error_response(message.id, message.error))
        if not isinstance(message, Request):
            # The stateless exchange defines no client notifications and
            # there is no session to deliver a response to.
            request.setResponseCode(202)
            request.setHeader(b"Content-Type", b"application/json")
            return b""
        headers = {
            name: self._header(request, name.encode()) for name in ("mcp-protocol-version", "mcp-method", "mcp-name")
        }
        protocol = ServerSession(self.app, self.clock, modern_only=True, request_timeout=self.request_timeout)
        try:
            protocol.prepare(message, principal, None)
            check_modern_headers(message, headers)
        except JSONRPCError as error:
            raise _HTTPError(_MODERN_STATUS.get(error.code, 400), jsonrpc.error_response(message.id, error))
        return self._exchange(
            request, None, protocol, False, messages, principal, credential, sse_ok, json_ok, modern=True
        )

    def _exchange(
        self,
        request: Any,
        http_session: Optional[_HTTPSession],
        protocol: ServerSession,
        is_batch: bool,
        messages: list[Message],
        principal: Principal,
        credential: _Credential,
        sse_ok: bool,
        json_ok: bool,
        headers: Optional[dict[str, str]] = None,
        modern: bool = False,
    ) -> Any:
        self._scope_check(protocol, messages, principal)
        requests = [m for m in messages if isinstance(m, (Request, jsonrpc.Invalid))]
        for message in messages:
            if not isinstance(message, (Request, jsonrpc.Invalid)):
                protocol.handle(message, principal, None)
        if not requests:
            request.setResponseCode(202)
            request.setHeader(b"Content-Type", b"application/json")
            return b""
        exchange = _Exchange(
            self,
            request,
            http_session,
            protocol,
            is_batch,
            sse_ok,
            modern,
            credential,
        )
        exchange.headers = headers or {}
        d = exchange.run([(m, principal) for m in requests])
        if not json_ok:
            # The client takes only SSE: commit to a stream at once.
            exchange._go_sse()
        return d

    def _get(self, credential: _Credential, request: Any) -> Any:
        info = credential.info
        session_id = self._header(request, b"mcp-session-id")
        if session_id is None:
            return self._open_legacy(credential, request)
        http_session = self._lookup(session_id, info, "streamable")
        self._check_version_header(request)
        _, sse_ok = self._accepts(request)
        if not sse_ok:
            raise _rpc_error(406, jsonrpc.INVALID_REQUEST, "Accept must allow text/event-stream")
        last_event = self._header(request, b"last-event-id")
        if http_session.stream is not None:
            # A new GET replaces the old stream (the client reconnected,
            # perhaps while the old connection is still half open).
            old, http_session.stream = http_session.stream, None
            old.close()

        def closed(stream: SSEStream) -> None:
            self._untrack(stream)
            if http_session.stream is stream:
                http_session.stream = None
            self._touch(http_session)

        stream = SSEStream(
            request,
            self.clock,
            keepalive_interval=self.keepalive_interval,
            keepalive_timer=self.keepalive_timer,
            max_queue=self.max_queue,
            on_close=closed,
        )
        http_session.stream = stream
        http_session.used = True
        self._track(stream, credential)
        done = stream.start(headers={b"Mcp-Session-Id": http_session.session_id.encode()})
        replay_after = http_session.last_delivered
        if last_event is not None:
            try:
                replay_after = int(last_event)
            except ValueError:
                pass
        for event_id, data in list(http_session.buffer or ()):
            if event_id > replay_after:
                stream.send(data, event="message", event_id=str(event_id))
                http_session.last_delivered = max(http_session.last_delivered, event_id)
        self._touch(http_session)
        return done

    def _delete(self, credential: _Credential, request: Any) -> Any:
        session_id = self._header(request, b"mcp-session-id")
        if session_id is None:
            raise _rpc_error(400, jsonrpc.INVALID_REQUEST, "Missing Mcp-Session-Id")
        http_session = self._lookup(session_id, credential.info, "streamable")
        self._end_session(http_session)
        request.setResponseCode(204)
        return b""

    # -- legacy HTTP+SSE ---------------------------------------------------------

    def _open_legacy(self, credential: _Credential, request: Any) -> Any:
        info = credential.info
        http_session = self._new_session("legacy", info)

        def closed(stream: SSEStream) -> None:
            self._untrack(stream)
            self._end_session(http_session)

        stream = SSEStream(
            request,
            self.clock,
            keepalive_interval=self.keepalive_interval,
            keepalive_timer=self.keepalive_timer,
            max_queue=self.max_queue,
            on_close=closed,
        )
        http_session.stream = stream
        self._track(stream, credential)
        endpoint = hyperlink.URL.from_text(self.path + "/message").set("session_id", http_session.session_id)
        log.info("Legacy MCP SSE stream opened for {subject}", subject=info.subject)
        return stream.start(first=b"event: endpoint\ndata: " + endpoint.to_text().encode("ascii") + b"\n\n")

    def _route_message(self, request: Any) -> Any:
        self._check_length(request)
        return self._authenticate(request).addCallback(self._message, request)

    def _message(self, credential: _Credential, request: Any) -> Any:
        info = credential.info
        principal = _principal(info)
        # Only the query string names the session (request.args would also
        # hold form fields).
        try:
            ids = hyperlink.URL.from_text(request.uri.decode("ascii")).get("session_id")
        except (UnicodeDecodeError, ValueError):
            ids = []
        if len(ids) != 1 or not ids[0]:
            raise _rpc_error(400, jsonrpc.INVALID_REQUEST, "session_id must be given once in the query")
        http_session = self._lookup(ids[0], info, "legacy")
        self._follow_token(http_session, credential)
        is_batch, messages = self._read_body(request)
        protocol = http_session.protocol
        if is_batch and not protocol.allows_batch:
            raise _rpc_error(400, jsonrpc.INVALID_REQUEST, "Batches are not allowed at this protocol version")
        self._scope_check(protocol, messages, principal)
        outlet = protocol.default_outlet
        for message in messages:
            protocol.handle(message, principal, outlet).addCallback(self._legacy_reply, http_session)
        request.setResponseCode(202)
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        return b"Accepted"

    def _legacy_reply(self, response: Optional[dict[str, Any]], http_session: _HTTPSession) -> None:
        if response is not None and http_session.stream is not None:
            http_session.stream.send(jsonrpc.encode(response).decode("utf-8"), event="message")
