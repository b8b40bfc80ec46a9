# -*- test-case-name: tests.test_mcp_http -*-
"""
The Streamable HTTP transport (2025-03-26 and later, and the 2026-07-28
stateless exchange) on C{/mcp}:

  - C{POST} answers JSON, or an SSE stream when the call emits progress,
    logs or server-to-client requests (L{Exchange}); C{initialize} without
    C{Mcp-Session-Id} creates a session; a request in the 2026-07-28
    per-request envelope without a session is served statelessly;
  - C{GET} with C{Mcp-Session-Id} opens the session's own stream (event
    ids from the L{IEventLog}, C{Last-Event-ID} resumption);
  - C{DELETE} ends a session.

A request for a session this process does not hold is served from the
session's record (L{SessionRegistry.use}).
"""

from __future__ import annotations

from typing import Any, Optional

import attr
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from smeldr_oauth.mcp import jsonrpc
from smeldr_oauth.mcp.app import MCPApp
from smeldr_oauth.mcp.auth import BearerAuth, Credential
from smeldr_oauth.db.errors import log_failure
from smeldr_oauth.mcp.http import wire
from smeldr_oauth.mcp.http.errors import bad_request, invalid_frame, modern_refusal, rpc_error
from smeldr_oauth.mcp.http.exchange import Exchange
from smeldr_oauth.mcp.http.registry import LiveSession, SessionRegistry
from smeldr_oauth.mcp.http.streamauth import StreamGuard
from smeldr_oauth.mcp.jsonrpc import JSONRPCError, Message, Request
from smeldr_oauth.mcp.session import ServerSession
from smeldr_oauth.mcp.state.records import STREAMABLE
from smeldr_oauth.mcp.versions import MODERN_VERSIONS, check_modern_headers, is_modern_request


@attr.s(frozen=True, auto_attribs=True, slots=True)
class _Post:
    """One POST, read: its messages and what its client accepts."""

    request: Any
    credential: Credential
    is_batch: bool
    messages: list[Message]
    json_ok: bool
    sse_ok: bool


log = Logger()


def _not_replayed(failure: Failure) -> list[tuple[int, str]]:
    log_failure(failure, "MCP events could not be replayed")
    return []


def _accepted(request: Any) -> bytes:
    request.setResponseCode(202)
    request.setHeader(b"Content-Type", b"application/json")
    return b""


class StreamableHTTP:
    """The C{POST}, C{GET} and C{DELETE} handlers of C{/mcp}."""

    def __init__(
        self,
        app: Optional[MCPApp],
        clock: IReactorTime,
        *,
        sessions: SessionRegistry,
        guard: StreamGuard,
        auth: BearerAuth,
        max_body: int,
        request_timeout: float,
    ) -> None:
        self.app = app
        self.clock = clock
        self.sessions = sessions
        self.guard = guard
        self.auth = auth
        self.max_body = max_body
        self.request_timeout = request_timeout

    # -- POST -------------------------------------------------------------------

    def post(self, credential: Credential, request: Any) -> Any:
        is_batch, messages = wire.read_frame(request, self.max_body)
        json_ok, sse_ok = wire.accepts(request)
        if not (json_ok or sse_ok):
            raise rpc_error(406, jsonrpc.INVALID_REQUEST, "Accept must allow application/json or text/event-stream")
        post = _Post(request, credential, is_batch, messages, json_ok, sse_ok)
        session_id = wire.header(request, b"mcp-session-id")
        if session_id is not None:
            return self.sessions.use(session_id, credential.info, STREAMABLE, self._post_in_session, post)
        if any(is_modern_request(m) for m in messages) or (
            wire.header(request, b"mcp-protocol-version") in MODERN_VERSIONS
        ):
            return self._stateless(post)
        wire.check_version(request)
        first = messages[0]
        if is_batch or not isinstance(first, Request) or first.method != "initialize":
            raise bad_request("Missing Mcp-Session-Id: send initialize first")
        return self.sessions.create(STREAMABLE, credential.info, self._initialize, post)

    def _post_in_session(self, session: LiveSession, post: "_Post") -> Any:
        wire.check_version(post.request)
        protocol = session.protocol
        # Only the first request of a session changes what touch() does
        # with "used": later ones skip the scan of the messages.
        self.sessions.touch(session, used=not session.used and any(isinstance(m, Request) for m in post.messages))
        self.guard.follow(session.stream, post.credential)
        if post.is_batch and not protocol.allows_batch:
            raise bad_request("Batches are not allowed at this protocol version")
        return self.sessions.when_saved(session, self._exchange(post, session, protocol))

    def _initialize(self, session: LiveSession, post: "_Post") -> Any:
        def check_initialized(result: Any) -> Any:
            # A failed initialize leaves no session behind.
            if not session.protocol.initialized:
                self.sessions.end(session)
            return result

        try:
            answer = self._exchange(post, session, session.protocol, {"Mcp-Session-Id": session.session_id})
        except BaseException:
            self.sessions.end(session)
            raise
        # initialize is a request: the answer is always an exchange's
        # (its body, or a Deferred of it).  The client's next request may
        # land on another process: the answer waits until the new
        # session's state is in its record.
        if isinstance(answer, Deferred):
            answer.addBoth(check_initialized)
        else:
            check_initialized(answer)
        return self.sessions.when_saved(session, answer)

    def _stateless(self, post: "_Post") -> Any:
        if post.is_batch:
            raise bad_request("Batches are not part of the 2026-07-28 exchange")
        message = post.messages[0]
        if isinstance(message, jsonrpc.Invalid):
            raise invalid_frame(message.error, message.id)
        if not isinstance(message, Request):
            # The stateless exchange defines no client notifications and
            # there is no session to deliver a response to.
            return _accepted(post.request)
        headers = {
            name: wire.header(post.request, name.encode())
            for name in ("mcp-protocol-version", "mcp-method", "mcp-name")
        }
        protocol = self.sessions.stateless()
        try:
            protocol.prepare(message, post.credential.principal, None)
            check_modern_headers(message, headers)
        except JSONRPCError as error:
            raise modern_refusal(message.id, error)
        return self._exchange(post, None, protocol, modern=True)

    def _exchange(
        self,
        post: "_Post",
        session: Optional[LiveSession],
        protocol: ServerSession,
        headers: Optional[dict[str, str]] = None,
        modern: bool = False,
    ) -> Any:
        principal = post.credential.principal
        self.auth.require_scopes(protocol, post.messages, principal)
        requests = [m for m in post.messages if isinstance(m, (Request, jsonrpc.Invalid))]
        for message in post.messages:
            if not isinstance(message, (Request, jsonrpc.Invalid)):
                protocol.handle(message, principal, None)
        if not requests:
            return _accepted(post.request)
        exchange = Exchange(
            self.guard,
            self.auth.challenger,
            post.request,
            session,
            protocol,
            is_batch=post.is_batch,
            sse_ok=post.sse_ok,
            modern=modern,
            credential=post.credential,
            headers=headers,
        )
        if not post.json_ok:
            # The client takes only SSE: commit to a stream before anything
            # runs, so that even an answer ready at once goes on it.
            exchange.commit_to_stream()
        return exchange.run(requests, principal)

    # -- GET -----------------------------------------------------------------------

    def get(self, credential: Credential, request: Any, session_id: str) -> Any:
        """The session's own stream, replaying what the client missed."""
        return self.sessions.use(session_id, credential.info, STREAMABLE, self._open_stream, request, credential)

    def _open_stream(self, session: LiveSession, request: Any, credential: Credential) -> Any:
        wire.check_version(request)
        _, sse_ok = wire.accepts(request)
        if not sse_ok:
            raise rpc_error(406, jsonrpc.INVALID_REQUEST, "Accept must allow text/event-stream")
        last_event = wire.header(request, b"last-event-id")
        if session.stream is not None:
            # A new GET replaces the old stream (the client reconnected,
            # perhaps while the old connection is still half open).
            old, session.stream = session.stream, None
            old.close()

        stream = self.guard.open(request, credential, on_close=session.stream_closed)
        session.stream = stream
        done = stream.start(headers={b"Mcp-Session-Id": session.session_id.encode()})
        after: Optional[int] = None
        if last_event is not None:
            try:
                after = int(last_event)
            except ValueError:
                pass
        # Events arriving while the log is read wait, so that the stream
        # gets them in order, once.
        session.replaying()
        self.sessions.events.replay(session.session_id, after).addErrback(_not_replayed).addCallback(session.replayed)
        self.sessions.touch(session, used=True)
        return done

    # -- DELETE ---------------------------------------------------------------------

    def delete(self, credential: Credential, request: Any) -> Any:
        session_id = wire.header(request, b"mcp-session-id")
        if session_id is None:
            raise bad_request("Missing Mcp-Session-Id")
        return self.sessions.use(session_id, credential.info, STREAMABLE, self._end, request)

    def _end(self, session: LiveSession, request: Any) -> Any:
        request.setResponseCode(204)
        # Answered once no process can take the session up again.
        return self.sessions.end(session).addCallback(lambda _: b"")
