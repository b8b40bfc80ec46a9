# -*- test-case-name: tests.test_mcp_http -*-
"""
One Streamable HTTP POST carrying requests, answered as JSON or as an SSE
stream.

It answers JSON when every response is ready before anything else needs
sending, and switches to an SSE stream as soon as a related message
(progress, a log, a server-to-client request) must go out, or the call
runs past the keepalive interval.  An exchange knows only its request,
its session (if any), the stream guard that opens streams, and the
challenger for the C{insufficient_scope} step-up.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from smeldr_oauth.mcp import jsonrpc
from smeldr_oauth.mcp.auth import Challenger, Credential
from smeldr_oauth.mcp.http.errors import answer_status
from smeldr_oauth.mcp.http.registry import LiveSession
from smeldr_oauth.mcp.http.streamauth import StreamGuard
from smeldr_oauth.mcp.jsonrpc import JSONRPCError, Message
from smeldr_oauth.mcp.calls import Outlet, Principal, outcome_now
from smeldr_oauth.mcp.session import ServerSession
from smeldr_oauth.mcp.streams import SSEStream


log = Logger()


class Exchange(Outlet):
    """
    The exchange is also the outlet of its requests (L{Outlet}): the
    messages related to them go on its own stream (L{related}).  It was a
    separate C{_PostOutlet} holding the exchange, which held it back: a
    reference cycle on every POST, so the request, its headers, the
    credential and the answer (36 objects a C{tools/call}) waited for a
    garbage collection instead of going when the request finished
    (C{docs/performance.md}, "Round ten: a request's garbage").

    @ivar can_request: the outlet's: server-to-client requests can go
        out only when the client accepts an SSE answer.
    @ivar result: what the route returns: fires with the JSON body, or
        (SSE) when the stream ends.
    @ivar headers: sent with the answer, JSON or SSE (C{Mcp-Session-Id}
        of a new session).
    """

    def __init__(
        self,
        guard: StreamGuard,
        challenger: Challenger,
        request: Any,
        session: Optional[LiveSession],
        protocol: ServerSession,
        *,
        is_batch: bool,
        sse_ok: bool,
        modern: bool,
        credential: Credential,
        headers: Optional[dict[str, str]] = None,
    ) -> None:
        self._guard = guard
        self._challenger = challenger
        self.request = request
        self.session = session
        self.protocol = protocol
        self.is_batch = is_batch
        self.sse_ok = sse_ok
        self.modern = modern
        self.credential = credential
        self.headers = headers or {}
        self.mode = "pending"
        self.pending: list[dict[str, Any]] = []
        self.responses: list[dict[str, Any]] = []
        self.remaining = 0
        self.stream: Optional[SSEStream] = None
        self.result: Deferred = Deferred(self._cancelled)
        self.can_request = sse_ok
        self._timer: Optional[IDelayedCall] = None
        #: the JSON body, once answered without a stream.
        self.body: Optional[bytes] = None

    def run(self, requests: Sequence[Message], principal: Principal) -> "bytes | Deferred[Any]":
        """
        Dispatch C{requests}; return the JSON body when every answer is
        already there (most calls: the route then writes it with a
        C{Content-Length}, no L{Deferred} chained to it on the way),
        else L{result}.
        """
        self.remaining = len(requests)
        if self.session is not None:
            self.session.add_exchange(self)
        for message in requests:
            handled = self.protocol.handle(message, principal, self)
            # Most calls are answered by the time handle() returns (it
            # never fails): take the answer now rather than through a
            # callback on a Deferred that has already fired.
            known = outcome_now(handled)
            if not known:
                handled.addCallback(self._answered).addErrback(self._broken)
                continue
            try:
                self._answered(known[0])
            except Exception:
                self._broken(Failure())
        options = self._guard.options
        if self.mode == "pending" and self.sse_ok and options.keepalive_interval:
            # Still running: past the keepalive interval the answer becomes
            # a stream.  (A call answered at once, as most are, needs no
            # timer made and cancelled.)
            self._timer = options.clock.callLater(options.keepalive_interval, self.commit_to_stream)
        if self.body is not None:
            return self.body
        return self.result

    def send(self, message: dict[str, Any]) -> None:
        """L{Outlet.send}: a message related to this POST's requests."""
        self.related(message)

    def related(self, message: dict[str, Any]) -> None:
        if self.mode == "done":
            return
        if self.mode == "pending":
            if not self.sse_ok:
                return
            self.pending.append(message)
            self.commit_to_stream()
            return
        assert self.stream is not None
        self.stream.send(jsonrpc.encode(message).decode("utf-8"), event="message")

    def commit_to_stream(self) -> None:
        """Answer with an SSE stream (if not decided yet)."""
        if self.mode != "pending":
            return
        self.mode = "sse"
        self._stop_timer()
        headers = {name.encode(): value.encode() for name, value in self.headers.items()}
        self.stream = self._guard.open(self.request, self.credential, on_close=self._stream_closed, done=self.result)
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
        if self.session is not None:
            self.session.discard_exchange(self)
        if self.mode == "sse":
            self.mode = "done"
            assert self.stream is not None
            self.stream.close()
            return
        if self.mode != "pending":
            return
        self.mode = "done"
        request = self.request
        if self.session is None or self.protocol.initialized:
            # A refused initialize ended its session: its answer names
            # none (the client would be sent on to a 404).  On a stream
            # the headers went before the answer was known.
            for name, value in self.headers.items():
                request.setHeader(name.encode(), value.encode())
        if not self.responses:
            # Every request was cancelled: nothing to say.
            request.setResponseCode(202)
            self._answer(b"")
            return
        status = 200
        if not self.is_batch:
            status, extra = answer_status(self.responses[0], self.modern, self._challenger)
            for name, value in extra.items():
                request.setHeader(name.encode(), value.encode())
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", b"application/json")
        self._answer(jsonrpc.encode(self.responses if self.is_batch else self.responses[0]))

    def _broken(self, failure: Failure) -> None:
        """
        Answering failed (a bug, an answer that cannot be sent): end the
        exchange as an error rather than leave the request open for good,
        its failure logged once (by the route's 500 when there is one).
        """
        self.mode = "done"
        self._stop_timer()
        if self.session is not None:
            self.session.discard_exchange(self)
        if self.stream is None and not self.result.called:
            self.result.errback(failure)
            return
        log.failure("MCP exchange could not be answered", failure)
        if self.stream is not None:
            self.stream.close()

    def _answer(self, body: bytes) -> None:
        self.body = body
        self.result.callback(body)

    def _stop_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _stream_closed(self, stream: SSEStream) -> None:
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
        if self.session is not None:
            self.session.discard_exchange(self)
        if self.modern:
            self.protocol.close()

    def _cancelled(self, _: Deferred) -> None:
        if self.stream is not None:
            self.stream.client_gone()
        elif self.mode != "done":
            self.abandon()

    def end(self) -> None:
        """End this exchange from the server side (its session ended)."""
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
