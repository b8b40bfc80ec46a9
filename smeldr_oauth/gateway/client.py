# -*- test-case-name: tests.test_gateway_client -*-
"""
The MCP I{client} side of one upstream connection, independent of how the
bytes travel.

An L{UpstreamClient} runs the handshake with the upstream's own version
negotiation (nothing to do with the version any downstream client
speaks), sends requests under ids of its own (so requests of many
downstream sessions never collide on one upstream), correlates the
answers, and keeps every request bounded in time: no answer and no
progress for C{request_timeout} (or more than C{max_request_time} in all)
and the request is cancelled upstream with C{notifications/cancelled} and
fails with a timeout error.  When the channel ends, every request in
flight fails at once with a clear error: never a hang.

Progress tokens are remapped like ids: the caller's token is replaced by
one unique on this connection and put back in each
C{notifications/progress}, so the notification reaches the request that
asked for it.

What the upstream says on its own initiative goes to an
L{IUpstreamHandler} with the I{context} of the request it belongs to, when
that is known (the HTTP response stream of that request, or its progress
token).
"""

from __future__ import annotations

from typing import Any, Optional

import attr
from twisted.internet.defer import CancelledError, Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from smeldr_oauth.gateway import errors
from smeldr_oauth.gateway.config import Limits
from smeldr_oauth.gateway.interfaces import IChannelReceiver, IUpstreamChannel, IUpstreamHandler
from smeldr_oauth.mcp import jsonrpc
from smeldr_oauth.mcp.jsonrpc import JSONRPCError, Message, Notification, Request, Response
from smeldr_oauth.mcp.versions import SESSION_VERSIONS

log = Logger()

CLIENT_INFO = {"name": "smeldr-oauth-gateway", "version": "0.1.0"}

#: What the gateway declares to every upstream: all a client can do.  A
#: server-to-client request then goes to a downstream session whose client
#: declared the capability, or fails with a clear error when none did.
CLIENT_CAPABILITIES: dict[str, Any] = {
    "sampling": {},
    "elicitation": {"form": {}, "url": {}},
    "roots": {"listChanged": True},
}


@attr.s(frozen=True, auto_attribs=True)
class ServerInfo:
    """What the upstream said in its C{initialize} answer."""

    protocol_version: str
    capabilities: dict[str, Any]
    server_info: dict[str, Any]
    instructions: Optional[str] = None


@attr.s(auto_attribs=True, eq=False)
class _Call:
    """One request in flight upstream."""

    id: int
    method: str
    deferred: Deferred
    context: Any
    progress_token: Any
    deadline: float
    timer: Optional[IDelayedCall] = None
    exchange: Optional[Deferred] = None


@implementer(IChannelReceiver)
class UpstreamClient:
    """
    One MCP client session with an upstream server.

    @ivar state: C{new}, C{starting}, C{ready} or C{closed}.
    @ivar server: the upstream's L{ServerInfo} once ready.
    @ivar identity: the principal this connection belongs to (its owner's
        subject under per-user isolation), sent with the requests the
        gateway makes on its own (handshake, answers to server requests).
    """

    def __init__(
        self,
        channel: IUpstreamChannel,
        clock: IReactorTime,
        handler: IUpstreamHandler,
        *,
        upstream: str,
        limits: Limits,
        identity: Any = None,
    ) -> None:
        self.channel = channel
        self.clock = clock
        self.handler = handler
        self.upstream = upstream
        self.limits = limits
        self.identity = identity
        self.state = "new"
        self.server: Optional[ServerInfo] = None
        self.lost_reason: Optional[tuple[str, str]] = None
        self._next_id = 0
        self._calls: dict[int, _Call] = {}
        self._serving: dict[Any, Deferred] = {}

    @property
    def in_flight(self) -> int:
        """Requests sent and not yet answered."""
        return len(self._calls)

    @property
    def serving(self) -> int:
        """Server-to-client requests waiting for an answer."""
        return len(self._serving)

    # -- lifecycle -------------------------------------------------------------

    def start(self, protocol_version: str) -> Deferred:
        """
        Open the channel and run the handshake, all within
        C{startup_timeout}.

        @return: a L{Deferred} firing with the L{ServerInfo}, or failing with
            an C{UPSTREAM_UNAVAILABLE} error (C{start_failed}) after which
            the client is closed.
        """
        assert self.state == "new"
        self.state = "starting"
        done: Deferred = Deferred()
        limit = self.limits.startup_timeout

        def too_slow() -> None:
            if not done.called:
                done.errback(errors.unavailable(self.upstream, "start_failed", f"it did not start within {limit:g}s"))

        timer = self.clock.callLater(limit, too_slow)

        def opened(_: object) -> Deferred:
            params = {
                "protocolVersion": protocol_version,
                "capabilities": CLIENT_CAPABILITIES,
                "clientInfo": CLIENT_INFO,
            }
            return self.request("initialize", params, identity=self.identity, timeout=limit)

        def initialized(result: Any) -> ServerInfo:
            info = _server_info(result)
            if info is None:
                raise errors.unavailable(self.upstream, "start_failed", "its initialize answer is not valid")
            if info.protocol_version not in SESSION_VERSIONS:
                raise errors.unavailable(
                    self.upstream,
                    "start_failed",
                    f"it answered protocol version {info.protocol_version[:32]!r}, which the gateway does not speak",
                )
            self.server = info
            self.channel.negotiated(info.protocol_version)
            self.state = "ready"
            self.notify("notifications/initialized", {})
            return info

        def settle(result: Any) -> None:
            if timer.active():
                timer.cancel()
            if done.called:
                return
            if isinstance(result, Failure):
                error = result.value
                if not isinstance(error, JSONRPCError) or error.code != errors.UPSTREAM_UNAVAILABLE:
                    detail = error.message if isinstance(error, JSONRPCError) else "it failed to start"
                    error = errors.unavailable(self.upstream, "start_failed", detail[:200])
                done.errback(error)
            else:
                done.callback(result)

        def cleanup(result: Any) -> Any:
            if isinstance(result, Failure):
                self.close()
            return result

        started = maybeDeferred(self.channel.start, self)
        started.addCallback(opened).addCallback(initialized).addBoth(settle)
        return done.addBoth(cleanup)

    def close(self) -> Deferred:
        """
        End the connection: fail what is in flight (C{stopped}), close the
        channel.
        """
        if self.state != "closed":
            self._lost("stopped", "it was stopped")
        return maybeDeferred(self.channel.close)

    # -- outgoing ----------------------------------------------------------------

    def request(
        self,
        method: str,
        params: dict[str, Any],
        *,
        context: Any = None,
        identity: Any = None,
        timeout: Optional[float] = None,
    ) -> Deferred:
        """
        Send a request upstream.

        @param context: handed back with notifications and server requests
            that belong to this request.
        @param identity: the caller's principal (for HTTP identity headers).
        @param timeout: seconds without an answer or progress (default
            C{request_timeout}).
        @return: a L{Deferred} with the result; it fails with a
            C{JSONRPCError} (the upstream's own, a timeout, or
            C{UPSTREAM_UNAVAILABLE}).  Cancelling it cancels the request
            upstream.
        """
        if self.state == "closed":
            kind, detail = self.lost_reason or ("stopped", "it was stopped")
            return fail(errors.unavailable(self.upstream, kind, detail))
        if len(self._calls) >= self.limits.max_in_flight:
            return fail(errors.unavailable(self.upstream, "busy", "too many requests in flight"))
        self._next_id += 1
        call_id = self._next_id
        token = None
        meta = params.get("_meta")
        if isinstance(meta, dict) and "progressToken" in meta:
            token = meta["progressToken"]
            params = {**params, "_meta": {**meta, "progressToken": call_id}}
        limit = self.limits.request_timeout if timeout is None else timeout
        d: Deferred = Deferred(lambda _: self._abandon(call_id, "Cancelled by the client"))
        call = _Call(call_id, method, d, context, token, self.clock.seconds() + self.limits.max_request_time)
        self._calls[call_id] = call
        exchange = self._send(jsonrpc.request(call_id, method, params), identity)
        call.exchange = exchange
        if call_id in self._calls:
            # Timed from here, once the request is on its way: the timer
            # is not work the upstream waits for (an in-process channel
            # may have answered already: then there is nothing to time).
            call.timer = self.clock.callLater(min(limit, self.limits.max_request_time), self._expire, call_id, limit)

        def exchange_failed(failure: Failure) -> None:
            if call_id not in self._calls or failure.check(CancelledError):
                return
            error = failure.value if failure.check(JSONRPCError) else errors.unavailable(
                self.upstream, "http", "the request could not be delivered"
            )
            self._finish(call_id).errback(error)

        exchange.addErrback(exchange_failed)
        return d

    def notify(self, method: str, params: dict[str, Any], identity: Any = None) -> None:
        """Send a notification upstream (dropped when the connection is closed)."""
        if self.state == "closed":
            return
        self._send(jsonrpc.notification(method, params), identity or self.identity).addErrback(
            lambda f: log.debug("Notification {method} to upstream {upstream} failed", method=method, upstream=self.upstream)
        )

    def _send(self, message: dict[str, Any], identity: Any) -> Deferred:
        # What maybeDeferred does, for a channel's send, which returns a
        # Deferred (its type checks and wrapping were glue on every call).
        try:
            sent = self.channel.send(message, identity)
        except Exception:
            return fail()
        return sent if isinstance(sent, Deferred) else succeed(sent)

    def _finish(self, call_id: int) -> Deferred:
        call = self._calls.pop(call_id)
        if call.timer is not None and call.timer.active():
            call.timer.cancel()
        return call.deferred

    def _abandon(self, call_id: int, reason: str) -> None:
        # The caller cancelled: tell the upstream, stop waiting for the answer.
        call = self._calls.pop(call_id, None)
        if call is None:
            return
        if call.timer is not None and call.timer.active():
            call.timer.cancel()
        self.notify("notifications/cancelled", {"requestId": call_id, "reason": reason})
        if call.exchange is not None and not call.exchange.called:
            call.exchange.cancel()

    def _expire(self, call_id: int, limit: float) -> None:
        call = self._calls.get(call_id)
        if call is None:
            return
        log.info(
            "Upstream {upstream} did not answer {method} in time; cancelled",
            upstream=self.upstream,
            method=call.method,
            smeldr_event="gateway_timeout",
        )
        self._calls.pop(call_id)
        self.notify("notifications/cancelled", {"requestId": call_id, "reason": "Request timed out"})
        if call.exchange is not None and not call.exchange.called:
            call.exchange.cancel()
        call.deferred.errback(errors.timed_out(self.upstream, limit))

    # -- incoming (IChannelReceiver) ---------------------------------------------

    def messageReceived(self, message: Message, related: Any = None) -> None:
        if self.state == "closed":
            return
        if isinstance(message, Response):
            self._response(message)
        elif isinstance(message, Request):
            self._server_request(message, related)
        elif isinstance(message, Notification):
            self._notification(message, related)
        else:
            log.debug("Upstream {upstream} sent an invalid message; ignored", upstream=self.upstream)

    def channelLost(self, reason: str, detail: str) -> None:
        if self.state != "closed":
            self._lost(reason, detail)

    def _lost(self, reason: str, detail: str) -> None:
        self.state = "closed"
        self.lost_reason = (reason, detail)
        calls, self._calls = self._calls, {}
        for call in calls.values():
            if call.timer is not None and call.timer.active():
                call.timer.cancel()
            call.deferred.errback(errors.unavailable(self.upstream, reason, detail))
        serving, self._serving = self._serving, {}
        for d in serving.values():
            d.cancel()
        self.handler.upstreamLost(reason, detail)

    def _response(self, message: Response) -> None:
        if not isinstance(message.id, int) or message.id not in self._calls:
            log.debug("Upstream {upstream} answered an unknown request; ignored", upstream=self.upstream)
            return
        d = self._finish(message.id)
        if message.error is not None:
            d.errback(errors.from_upstream(message.error))
        else:
            d.callback(message.result)

    def _context(self, related: Any) -> Any:
        call = self._calls.get(related) if isinstance(related, int) else None
        return call.context if call is not None else None

    def _server_request(self, message: Request, related: Any) -> None:
        if message.method == "ping":
            self._reply(jsonrpc.result_response(message.id, {}))
            return
        if message.id in self._serving:
            self._reply(jsonrpc.error_response(message.id, jsonrpc.invalid_request("Request id already in use")))
            return
        if len(self._serving) >= self.limits.max_server_requests:
            self._reply(
                jsonrpc.error_response(
                    message.id, JSONRPCError(jsonrpc.INTERNAL_ERROR, "Too many requests waiting for a client")
                )
            )
            return
        d = maybeDeferred(self.handler.upstreamRequest, message, self._context(related))
        self._serving[message.id] = d

        def answered(result: Any) -> None:
            if self._serving.pop(message.id, None) is None:
                return  # cancelled by the upstream, or the connection ended
            if isinstance(result, Failure):
                if result.check(JSONRPCError):
                    error = result.value
                elif result.check(CancelledError):
                    error = JSONRPCError(jsonrpc.REQUEST_CANCELLED, "Request cancelled")
                else:
                    log.failure("Answering upstream {upstream}'s {method} failed", result, upstream=self.upstream, method=message.method)
                    error = jsonrpc.internal_error()
                self._reply(jsonrpc.error_response(message.id, error))
            else:
                self._reply(jsonrpc.result_response(message.id, result))

        d.addBoth(answered)

    def _reply(self, response: dict[str, Any]) -> None:
        if self.state != "closed":
            self._send(response, self.identity).addErrback(
                lambda f: log.debug("Answer to upstream {upstream} failed", upstream=self.upstream)
            )

    def _notification(self, message: Notification, related: Any) -> None:
        if message.method == "notifications/cancelled":
            request_id = message.params.get("requestId")
            if isinstance(request_id, (str, int)) and not isinstance(request_id, bool):
                d = self._serving.pop(request_id, None)
                if d is not None:
                    d.cancel()
            return
        if message.method == "notifications/progress":
            token = message.params.get("progressToken")
            call = self._calls.get(token) if isinstance(token, int) and not isinstance(token, bool) else None
            if call is None or call.progress_token is None:
                return  # late, or for a token the gateway never gave out
            self._progressed(call)
            params = {**message.params, "progressToken": call.progress_token}
            self.handler.upstreamNotification(Notification(message.method, params), call.context)
            return
        self.handler.upstreamNotification(message, self._context(related))

    def _progressed(self, call: _Call) -> None:
        # Progress proves the upstream works on it: the idle timeout starts
        # again, within the overall cap.
        if call.timer is None or not call.timer.active():
            return
        remaining = call.deadline - self.clock.seconds()
        call.timer.reset(max(0.0, min(self.limits.request_timeout, remaining)))


def _server_info(result: Any) -> Optional[ServerInfo]:
    if not isinstance(result, dict):
        return None
    version = result.get("protocolVersion")
    capabilities = result.get("capabilities", {})
    server_info = result.get("serverInfo", {})
    instructions = result.get("instructions")
    if not isinstance(version, str) or not isinstance(capabilities, dict) or not isinstance(server_info, dict):
        return None
    return ServerInfo(version, capabilities, server_info, instructions if isinstance(instructions, str) else None)
