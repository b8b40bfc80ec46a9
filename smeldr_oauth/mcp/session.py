# -*- test-case-name: tests.test_mcp_session -*-
"""
The MCP protocol state machine, independent of any transport.

A L{ServerSession} takes parsed JSON-RPC messages plus the caller's
L{Principal} and an I{outlet} (where messages related to that request go:
progress, logs, server-to-client requests) and answers with response
dictionaries.  Transports (Streamable HTTP, legacy HTTP+SSE, stdio) only
move bytes and decide where an outlet writes.  The methods themselves are
in L{smeldr_oauth.mcp.methods}.

Two eras are served:

  - session era (2024-11-05, 2025-03-26, 2025-06-18, 2025-11-25): an
    C{initialize} handshake negotiates the version, and state (log level,
    subscriptions, in-flight requests) lives on the session;
  - the 2026-07-28 stateless era: no handshake; every request carries its
    protocol version and client capabilities in C{params._meta}
    (C{io.modelcontextprotocol/protocolVersion}, C{.../clientCapabilities},
    optionally C{.../clientInfo} and C{.../logLevel}), C{server/discover}
    replaces C{initialize}, and C{ping}, C{logging/setLevel} and resource
    subscriptions are gone.

A session's state (version, capabilities, log level, subscriptions) can be
read back (C{on_change} hears every change) and restored (C{resume}):
both are L{smeldr_oauth.mcp.conversation.ConversationState}'s, so that a session record kept elsewhere can
rebuild the session in another process.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from twisted.internet.defer import CancelledError, Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from smeldr_oauth.mcp import jsonrpc
from smeldr_oauth.mcp.app import MCPApp
from smeldr_oauth.mcp.calls import Call, CallbackOutlet, Outlet, Principal, outcome_now
from smeldr_oauth.mcp.conversation import ConversationState, SessionOptions
from smeldr_oauth.mcp.jsonrpc import JSONRPCError, Message, Notification, Request, Response
from smeldr_oauth.mcp.methods import METHODS, needed_scopes
from smeldr_oauth.mcp.results import modern_envelope
from smeldr_oauth.mcp.versions import BATCH_VERSIONS, LATEST_SESSION_VERSION, check_envelope, is_modern_request

if TYPE_CHECKING:
    # typing has Unpack from Python 3.11; only the type checker needs it.
    from typing_extensions import Unpack

log = Logger()

__all__ = ["ServerSession", "Call", "CallbackOutlet", "Outlet", "Principal", "outcome_now"]


class ServerSession(ConversationState):
    """
    One MCP conversation.  For the session era, one instance lives as
    long as the C{Mcp-Session-Id}, SSE stream or stdio process; for the
    stateless era a throwaway instance serves each request.  Its state
    (and C{on_change}, C{resume}) is L{ConversationState}'s; the log level
    is C{info} until the client says otherwise.

    @ivar default_outlet: where messages unrelated to any request go
        (list-changed and resource-updated notifications).
    """

    # The state's slots are ConversationState's: a legacy SSE session
    # idles behind its stream by the thousand.
    __slots__ = ("app", "__weakref__")

    _in_flight: dict[Any, tuple[Deferred, Call]]
    _pending: dict[str, tuple[Deferred, IDelayedCall]]

    initial_log_level = "info"

    def __init__(self, app: MCPApp, clock: IReactorTime, **options: Unpack[SessionOptions]) -> None:
        super().__init__(clock, **options)
        self.app = app

    # -- transport-facing API ------------------------------------------------

    @property
    def allows_batch(self) -> bool:
        """JSON-RPC batches were part of MCP only in 2025-03-26."""
        return self.protocol_version in BATCH_VERSIONS

    def missing_scopes(self, message: Message, principal: Principal) -> Optional[tuple[str, ...]]:
        """
        The scopes C{message} needs when C{principal} lacks some of them
        (so a transport can answer HTTP 403 before dispatching), else
        C{None}.
        """
        needed = needed_scopes(self.app, message)
        if needed and not set(needed) <= principal.scopes:
            return needed
        return None

    def handle(self, message: Message, principal: Principal, outlet: Optional[Outlet] = None) -> Deferred:
        """
        Process one message.

        @return: a L{Deferred} firing with the response dictionary to send,
            or C{None} when there is none (notifications, responses to our
            own requests, cancelled requests).  It never fails.
        """
        if isinstance(message, jsonrpc.Invalid):
            return succeed(jsonrpc.error_response(message.id, message.error))
        if isinstance(message, Response):
            self._handle_response(message)
            return succeed(None)
        if isinstance(message, Notification):
            self._handle_notification(message)
            return succeed(None)
        assert isinstance(message, Request)
        if self.state == "closed":
            return succeed(jsonrpc.error_response(message.id, JSONRPCError(jsonrpc.INVALID_REQUEST, "Session ended")))
        try:
            call = self.prepare(message, principal, outlet)
        except JSONRPCError as error:
            return succeed(jsonrpc.error_response(message.id, error))
        if message.id in self._in_flight:
            return succeed(jsonrpc.error_response(message.id, jsonrpc.invalid_request("Request id already in use")))
        try:
            inner = self._dispatch(message, call)
        except BaseException:
            return succeed(self._response(message, call, Failure()))
        if not isinstance(inner, Deferred):
            # A method that answered with its value (most calls, SQLite on
            # the reactor thread): no Deferred made and unwrapped again.
            return succeed(self._response(message, call, inner))
        settled = outcome_now(inner)
        if settled:
            # Answered at once: no second Deferred, nothing in flight to
            # track.
            return succeed(self._response(message, call, settled[0]))
        self._in_flight[message.id] = (inner, call)
        outer: Deferred = Deferred()

        def finished(result: object) -> None:
            self._in_flight.pop(message.id, None)
            outer.callback(self._response(message, call, result))

        inner.addBoth(finished)
        return outer

    def _response(self, message: Request, call: Call, result: object) -> Optional[dict[str, Any]]:
        """The response to C{message}, whose method ended with C{result}."""
        if isinstance(result, Failure):
            if call.cancelled and result.check(CancelledError):
                return None
            if result.check(JSONRPCError):
                return jsonrpc.error_response(message.id, result.value)  # type: ignore[arg-type]
            log.failure("MCP method {method} failed", result, method=message.method)
            return jsonrpc.error_response(message.id, jsonrpc.internal_error())
        if call.modern:
            server_info = {"name": self.app.name, "version": self.app.version}
            result = modern_envelope(message.method, result, server_info)  # type: ignore[arg-type]
        return jsonrpc.result_response(message.id, result)

    def close(self) -> None:
        """
        End the session: cancel what is running, fail what waits for the
        client, stop hearing application notifications.
        """
        if self.state == "closed":
            return
        self.state = "closed"
        self.app.detach(self)
        for inner, call in list(self._in_flight.values()):
            call.cancelled = True
            if call.context is not None:
                call.context.cancelled = True
            inner.cancel()
        self._in_flight.clear()
        pending, self._pending = self._pending, {}
        for request_id, (d, timeout) in pending.items():
            self._stop_waiting(request_id, timeout)
            d.errback(JSONRPCError(jsonrpc.REQUEST_CANCELLED, "Session ended"))

    def _joined(self) -> None:
        self.app.attach(self)

    # -- used by Context and MCPApp ------------------------------------------

    def notify(self, outlet: Optional[Outlet], method: str, params: dict[str, Any]) -> None:
        target = outlet if outlet is not None else self.default_outlet
        if target is not None and self.state != "closed":
            target.send(jsonrpc.notification(method, params))

    def client_request(
        self, outlet: Optional[Outlet], method: str, params: dict[str, Any], capability: str
    ) -> Deferred:
        """
        Send a request to the client and wait for its answer, which comes
        back through L{handle} as a L{Response} (on this process or, through
        the delivery, on another).

        @param capability: the client capability the request needs
            (C{sampling}, C{elicitation}, C{roots}).
        """
        if self.state == "closed":
            return fail(JSONRPCError(jsonrpc.REQUEST_CANCELLED, "Session ended"))
        if self.state == "new" or self.modern_only:
            return fail(
                JSONRPCError(
                    jsonrpc.MISSING_CLIENT_CAPABILITY,
                    f"{method} needs a session (not available in the stateless exchange)",
                )
            )
        if capability not in self.client_capabilities:
            return fail(
                JSONRPCError(
                    jsonrpc.MISSING_CLIENT_CAPABILITY,
                    f"The client did not declare the {capability!r} capability",
                    {"requiredCapabilities": [capability]},
                )
            )
        target = outlet if outlet is not None and outlet.can_request else self.default_outlet
        if target is None or not target.can_request:
            return fail(JSONRPCError(jsonrpc.INVALID_REQUEST, "No channel to the client for requests"))
        self._next_id += 1
        request_id = f"srv-{self._next_id}"

        def cancel(_: Deferred) -> None:
            entry = self._pending.pop(request_id, None)
            if entry is not None:
                self._stop_waiting(request_id, entry[1])
            self.notify(target, "notifications/cancelled", {"requestId": request_id})

        d: Deferred = Deferred(cancel)
        timeout = self.clock.callLater(self.request_timeout, self._time_out, request_id)
        self._pending[request_id] = (d, timeout)
        if self._delivery is not None:
            self._delivery.expect_reply(self.session_id, request_id, self._resolve)  # type: ignore[arg-type]
        target.send(jsonrpc.request(request_id, method, params))
        return d

    def resource_updated(self, uri: str) -> None:
        if uri in self.subscriptions:
            self.notify(None, "notifications/resources/updated", {"uri": uri})

    def list_changed(self, kind: str) -> None:
        if self.initialized:
            self.notify(None, f"notifications/{kind}/list_changed", {})

    # -- internals -------------------------------------------------------------

    def _stop_waiting(self, request_id: str, timeout: IDelayedCall) -> None:
        if timeout.active():
            timeout.cancel()
        if self._delivery is not None:
            self._delivery.forget_reply(self.session_id, request_id)  # type: ignore[arg-type]

    def _time_out(self, request_id: str) -> None:
        entry = self._pending.pop(request_id, None)
        if entry is not None:
            self._stop_waiting(request_id, entry[1])
            entry[0].errback(JSONRPCError(jsonrpc.REQUEST_TIMEOUT, "The client did not answer in time"))

    def _handle_response(self, message: Response) -> None:
        if self._delivery is not None:
            # The request may have been sent by this session's live parts
            # in another process.
            found = self._delivery.route_reply(self.session_id, message)  # type: ignore[arg-type]
        else:
            found = self._resolve(message)
        if not found:
            log.debug("Response to unknown request {id!r} ignored", id=str(message.id)[:64])

    def _resolve(self, message: Response) -> bool:
        entry = self._pending.pop(str(message.id), None) if isinstance(message.id, str) else None
        if entry is None:
            return False
        d, timeout = entry
        self._stop_waiting(str(message.id), timeout)
        if message.error is not None:
            error = message.error
            raw_code, raw_text = error.get("code"), error.get("message")
            code = raw_code if isinstance(raw_code, int) else jsonrpc.INTERNAL_ERROR
            text = raw_text if isinstance(raw_text, str) else "Client error"
            d.errback(JSONRPCError(code, text[:500], error.get("data")))
        else:
            d.callback(message.result)
        return True

    def _handle_notification(self, message: Notification) -> None:
        if message.method == "notifications/initialized":
            self.client_initialized()
        elif message.method == "notifications/cancelled":
            request_id = message.params.get("requestId")
            if isinstance(request_id, (str, int)) and not isinstance(request_id, bool):
                entry = self._in_flight.get(request_id)
                if entry is not None:
                    inner, call = entry
                    call.cancelled = True
                    if call.context is not None:
                        call.context.cancelled = True
                    inner.cancel()
        # notifications/roots/list_changed, progress from the client and
        # unknown notifications need no action; JSON-RPC says never answer.

    def prepare(self, message: Request, principal: Principal, outlet: Optional[Outlet]) -> Call:
        """
        Check C{message} against the session's era and state and say how
        it will be served.

        @raise JSONRPCError: it cannot be served (not initialized, a bad
            2026-07-28 envelope, a method that revision removed).
        """
        meta = message.params.get("_meta")
        progress = meta.get("progressToken") if isinstance(meta, dict) else None
        if isinstance(progress, bool) or not isinstance(progress, (str, int)):
            progress = None
        if self.modern_only or (self.state == "new" and message.method != "initialize" and is_modern_request(message)):
            return self._prepare_modern(message, principal, outlet, meta, progress)
        if self.state == "new" and message.method not in ("initialize", "ping"):
            raise jsonrpc.invalid_request("Session not initialized: send initialize first")
        return Call(
            request_id=message.id,
            principal=principal,
            outlet=outlet,
            version=self.protocol_version or LATEST_SESSION_VERSION,
            modern=False,
            client_capabilities=self.client_capabilities,
            log_level="session",
            progress_token=progress,
        )

    def _prepare_modern(
        self, message: Request, principal: Principal, outlet: Optional[Outlet], meta: Any, progress: Any
    ) -> Call:
        envelope = check_envelope(message)
        return Call(
            request_id=message.id,
            principal=principal,
            outlet=outlet,
            version=envelope.version,
            modern=True,
            client_capabilities=envelope.capabilities,
            # No level in _meta: the client wants no log notifications.
            log_level=envelope.log_level,
            progress_token=progress,
        )

    def _dispatch(self, message: Request, call: Call) -> Any:
        """
        The method's answer: its value, or a L{Deferred} of it.

        @raise JSONRPCError: (or anything the method raised.)
        """
        handler = METHODS.get(message.method)
        if handler is None or (not call.modern and message.method == "server/discover"):
            raise jsonrpc.method_not_found(message.method)
        result = handler(self, message.params, call)
        if isinstance(result, (Deferred, dict)) or result is None:
            return result
        # What maybeDeferred made of anything else (a coroutine, a Failure).
        return maybeDeferred(lambda: result)
