# -*- test-case-name: tests.test_mcp_conversation,tests.test_mcp_session,tests.test_gateway_proxy -*-
"""
The client-facing state of one MCP conversation, and its rules, written
once for every session the MCP front drives.

The native L{smeldr_oauth.mcp.session.ServerSession} and the gateway's
L{smeldr_oauth.gateway.proxy.GatewaySession} answer a client in the same
way up to where a request is served (locally, or by an upstream): the same
handshake state, negotiated version, client capabilities and info, log
level and resource subscriptions, kept in a session record through
C{on_change} and restored by C{resume}; the same tables of requests in
flight and of requests sent to the client, and the same numbering of the
latter when a session is live in several processes.  L{ConversationState}
holds that state; both sessions inherit it.

It also holds what both sessions do with that state the same way: sorting
the messages that are not requests (an invalid one, a client's reply, a
notification), tracking a request being served until it answers,
cancelling it, asking the client something and waiting for its answer,
and, on close, cancelling what runs and failing what waits.  Only how a
request is served stays with each session.

It has slots and no instance dictionary: a legacy SSE session idles behind
its stream by the thousand, and a subclass with slots of its own stays as
small as a class that declared them all.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Optional, TypedDict

from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from smeldr_oauth.db.errors import StoreUnavailable, log_failure
from smeldr_oauth.mcp import jsonrpc
from smeldr_oauth.mcp.calls import UNAVAILABLE, Outlet, Principal
from smeldr_oauth.mcp.jsonrpc import JSONRPCError, Message, Notification, Request, Response
from smeldr_oauth.mcp.state.interfaces import ISessionDelivery

if TYPE_CHECKING:
    # typing has Unpack from Python 3.11; only the type checker needs it.
    from typing_extensions import Unpack

log = Logger()

#: The handshake states in which the client may be sent notifications.
_INITIALIZED = ("initialized", "ready")


class SessionOptions(TypedDict, total=False):
    """
    How a transport sets up a session (the keywords of every session's
    constructor, and of the factories that make them).

    @ivar session_id: the C{Mcp-Session-Id} (or legacy SSE session id);
        C{None} for stdio and the stateless exchange.
    @ivar default_outlet: where messages unrelated to any request go.
    @ivar request_timeout: how long a server-to-client request waits for
        its answer (default 300 seconds).
    @ivar modern_only: a throwaway session for one stateless (2026-07-28)
        request.
    @ivar delivery: routes the client's replies to server-to-client
        requests (they may reach another process holding the same
        session); kept only for a session with an id: without one
        replies come back to this object.
    @ivar on_change: see L{ConversationState}.
    """

    session_id: Optional[str]
    default_outlet: Optional[Outlet]
    request_timeout: float
    modern_only: bool
    delivery: Optional[ISessionDelivery]
    on_change: Optional[Callable[[Any], None]]


class ConversationState:
    """
    What a session record keeps of one conversation, and what a transport
    asks of it.

    @ivar state: C{"new"}, C{"initialized"} (the server answered
        C{initialize}), C{"ready"} (the client said
        C{notifications/initialized}, or the session was resumed) or
        C{"closed"}.
    @ivar log_level: the lowest level sent as C{notifications/message}
        (each session kind says what it is before the client chooses).
    @ivar subscriptions: the resource URIs subscribed to.  Replaced, never
        mutated: the empty frozenset is shared by every session, and most
        sessions never subscribe.
    @ivar default_outlet: where messages unrelated to any request go.
    @ivar on_change: called with the session after each change of the
        state a session record keeps (the handshake, the log level,
        subscriptions).
    """

    __slots__ = (
        "clock",
        "session_id",
        "default_outlet",
        "request_timeout",
        "modern_only",
        "state",
        "protocol_version",
        "client_capabilities",
        "client_info",
        "log_level",
        "subscriptions",
        "on_change",
        "_delivery",
        "_in_flight",
        "_pending",
        "_next_id",
    )

    #: The log level before the client chooses one.
    initial_log_level: ClassVar[Optional[str]] = None
    #: How the ids of requests sent to the client start (C{srv-1}, C{gw-1}).
    request_prefix: ClassVar[str] = "req"
    #: Whether a request the client did not answer in time is also
    #: cancelled at the client (C{notifications/cancelled}) as it fails.
    cancel_on_timeout: ClassVar[bool] = False
    #: How a request whose method failed unexpectedly is logged.
    failure_format: ClassVar[str] = "MCP method {method} failed"

    #: Requests being served, by id: their Deferred and call (anything
    #: with a C{cancelled} flag).
    _in_flight: dict[Any, tuple[Deferred, Any]]
    #: Requests sent to the client and not yet answered, by id: the
    #: Deferred their asker waits on, and their timeout.
    _pending: dict[str, tuple[Deferred, IDelayedCall]]

    def __init__(self, clock: IReactorTime, **options: Unpack[SessionOptions]) -> None:
        """
        @param clock: times the client's answers to server-to-client
            requests.
        @param options: see L{SessionOptions}.
        """
        delivery = options.get("delivery")
        session_id = options.get("session_id")
        self.clock = clock
        self.session_id = session_id
        self.default_outlet = options.get("default_outlet")
        self.request_timeout = options.get("request_timeout", 300.0)
        self.modern_only = options.get("modern_only", False)
        self.state = "new"
        self.protocol_version: Optional[str] = None
        self.client_capabilities: dict[str, Any] = {}
        self.client_info: dict[str, Any] = {}
        self.log_level = self.initial_log_level
        self.subscriptions: frozenset[str] = frozenset()
        self.on_change = options.get("on_change")
        self._delivery = delivery if session_id is not None else None
        self._in_flight = {}
        self._pending = {}
        # Copies of one session in several processes each ask the client
        # things: their request ids start at random points so that a reply
        # names one request only.
        self._next_id = secrets.randbelow(1 << 40) if delivery is not None else 0

    @property
    def initialized(self) -> bool:
        return self.state in _INITIALIZED

    @property
    def busy(self) -> bool:
        """
        Whether a request is still running (a transport must not end the
        session to make room for another one while it does).
        """
        return bool(self._in_flight)

    def resume(
        self,
        *,
        protocol_version: Optional[str],
        client_capabilities: dict[str, Any],
        client_info: dict[str, Any],
        log_level: Optional[str],
        subscriptions: frozenset[str],
    ) -> None:
        """
        Take up a session that was initialized elsewhere (another process,
        or before this object existed) from its recorded state.  A session
        recorded before its C{initialize} finished stays new.
        """
        self.log_level = log_level
        self.subscriptions = frozenset(subscriptions)
        if protocol_version is not None:
            self.protocol_version = protocol_version
            self.client_capabilities = dict(client_capabilities)
            self.client_info = dict(client_info)
            self.state = "ready"
            self._joined()

    # -- state changes, each told to on_change ------------------------------------

    def initialized_as(self, version: str, capabilities: dict[str, Any], client_info: dict[str, Any]) -> None:
        """The server answered C{initialize} at C{version}."""
        self.protocol_version = version
        self.client_capabilities = capabilities
        self.client_info = client_info
        self.state = "initialized"
        self._joined()
        self._changed()

    def client_initialized(self) -> None:
        """The client said C{notifications/initialized}."""
        if self.state == "initialized":
            self.state = "ready"

    def set_log_level(self, level: str) -> None:
        self.log_level = level
        self._changed()

    def subscribe(self, uri: str) -> None:
        self.subscriptions = self.subscriptions | {uri}
        self._changed()

    def unsubscribe(self, uri: str) -> None:
        self.subscriptions = self.subscriptions - {uri}
        self._changed()

    def _joined(self) -> None:
        """
        Hook: the conversation has just been initialized or resumed (the
        native session starts hearing its application's notifications).
        """

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self)


    # -- what a transport hands in -----------------------------------------------

    def handle(self, message: Message, principal: Principal, outlet: Optional[Outlet] = None) -> Deferred:
        """
        Process one message: every session sorts it, admits a request and
        refuses a second one under an id in use the same way; only how a
        request is admitted (L{_admit}) and served (L{_run}) is each
        session's.

        @return: a L{Deferred} firing with the response dictionary to send,
            or C{None} when there is none (notifications, responses to our
            own requests, cancelled requests).  It never fails.
        """
        settled = self._settle(message, principal)
        if settled is not None:
            return settled
        assert isinstance(message, Request)
        if self.state == "closed":
            return succeed(jsonrpc.error_response(message.id, jsonrpc.invalid_request("Session ended")))
        try:
            call = self._admit(message, principal, outlet)
        except JSONRPCError as error:
            return succeed(jsonrpc.error_response(message.id, error))
        if message.id in self._in_flight:
            return succeed(jsonrpc.error_response(message.id, jsonrpc.invalid_request("Request id already in use")))
        return self._run(message, call)

    def _admit(self, message: Request, principal: Principal, outlet: Optional[Outlet]) -> Any:
        """
        Check C{message} against the session's era, state and the caller's
        rights, and say how it will be served (its call).

        @raise JSONRPCError: it cannot be served.
        """
        raise NotImplementedError()

    def _run(self, message: Request, call: Any) -> Deferred:
        """Serve an admitted request: a L{Deferred} of its answer that never fails."""
        raise NotImplementedError()

    # -- messages other than requests ---------------------------------------------

    def _settle(self, message: Message, principal: Principal) -> Optional[Deferred]:
        """
        Deal with a message that is not a request, as every session does:
        an invalid one is answered with its error, a reply goes to the
        request sent to the client that it answers, a notification is
        heard (and, as JSON-RPC says, never answered).

        @return: the answer's L{Deferred}; C{None} for a request, which
            the session serves its own way.
        """
        if isinstance(message, jsonrpc.Invalid):
            return succeed(jsonrpc.error_response(message.id, message.error))
        if isinstance(message, Response):
            self._answered(message)
            return succeed(None)
        if isinstance(message, Notification):
            self._notified(message, principal)
            return succeed(None)
        return None

    def _answered(self, message: Response) -> None:
        if self._delivery is not None:
            # The request may have been sent by this session's live parts
            # in another process.
            found = self._delivery.route_reply(self.session_id, message)  # type: ignore[arg-type]
        else:
            found = self._resolve(message)
        if not found:
            log.debug("Response to unknown request {id!r} ignored", id=str(message.id)[:64])

    def _notified(self, message: Notification, principal: Principal) -> None:
        if message.method == "notifications/initialized":
            self.client_initialized()
        elif message.method == "notifications/cancelled":
            request_id = message.params.get("requestId")
            if isinstance(request_id, (str, int)) and not isinstance(request_id, bool):
                entry = self._in_flight.get(request_id)
                if entry is not None:
                    self._cancel(*entry)
        else:
            self._heard(message, principal)

    def _heard(self, message: Notification, principal: Principal) -> None:
        """
        Hook: any other notification from the client (C{roots/list_changed},
        progress, unknown ones); by default none needs an action.
        """

    # -- requests being served ----------------------------------------------------

    def _serve(self, request: Request, inner: Deferred, call: Any, respond: Callable[[object], Any]) -> Deferred:
        """
        Track C{request}, served by C{inner} with C{call}, until it ends
        (a client may cancel it meanwhile, and closing the session does).

        @param respond: makes the answer (a response dictionary or
            C{None}) from what C{inner} ended with.
        @return: a L{Deferred} of that answer.
        """
        self._in_flight[request.id] = (inner, call)
        answer: Deferred = Deferred()

        def finished(result: object) -> None:
            self._in_flight.pop(request.id, None)
            answer.callback(respond(result))

        inner.addBoth(finished)
        return answer

    def _failed(self, request: Request, call: Any, failure: Failure) -> Optional[dict[str, Any]]:
        """
        The answer to C{request} whose method failed: none once it was
        cancelled, its error when it is a JSON-RPC one, otherwise an
        internal error (and the failure logged).
        """
        if call.cancelled and failure.check(CancelledError):
            return None
        if failure.check(JSONRPCError):
            return jsonrpc.error_response(request.id, failure.value)  # type: ignore[arg-type]
        log_failure(failure, self.failure_format, method=request.method)
        if failure.check(StoreUnavailable):
            return jsonrpc.error_response(request.id, JSONRPCError(jsonrpc.INTERNAL_ERROR, UNAVAILABLE))
        return jsonrpc.error_response(request.id, jsonrpc.internal_error())

    def _cancel(self, inner: Deferred, call: Any) -> None:
        """Stop serving a request: it will get no answer."""
        call.cancelled = True
        inner.cancel()

    def _end(self) -> bool:
        """
        Close the session: cancel what is being served, fail what waits for
        the client.

        @return: C{False} if it was closed already (nothing done).
        """
        if self.state == "closed":
            return False
        self.state = "closed"
        for inner, call in list(self._in_flight.values()):
            self._cancel(inner, call)
        self._in_flight.clear()
        pending, self._pending = self._pending, {}
        for request_id, (d, timeout) in pending.items():
            self._stop_waiting(request_id, timeout)
            d.errback(JSONRPCError(jsonrpc.REQUEST_CANCELLED, "Session ended"))
        return True

    # -- requests to the client ---------------------------------------------------

    def _ask_client(self, outlet: Optional[Outlet], method: str, params: dict[str, Any]) -> Deferred:
        """
        Send a request to the client through C{outlet} (or the default
        outlet) and wait for its answer, which comes back as a L{Response}
        (on this process or, through the delivery, on another).

        @return: a L{Deferred} of the answer's result; it fails with the
            client's error, on timeout, when the session ends, and at once
            when there is no channel to the client.  Cancelling it cancels
            the request at the client.
        """
        if self.state == "closed":
            return fail(JSONRPCError(jsonrpc.REQUEST_CANCELLED, "Session ended"))
        target = outlet if outlet is not None and outlet.can_request else self.default_outlet
        if target is None or not target.can_request:
            return fail(JSONRPCError(jsonrpc.INVALID_REQUEST, "No channel to the client for requests"))
        self._next_id += 1
        request_id = f"{self.request_prefix}-{self._next_id}"

        def cancel(_: Deferred) -> None:
            entry = self._pending.pop(request_id, None)
            if entry is not None:
                self._stop_waiting(request_id, entry[1])
                self._tell_cancelled(target, {"requestId": request_id})

        d: Deferred = Deferred(cancel)
        timeout = self.clock.callLater(self.request_timeout, self._time_out, request_id, target)
        self._pending[request_id] = (d, timeout)
        if self._delivery is not None:
            self._delivery.expect_reply(self.session_id, request_id, self._resolve)  # type: ignore[arg-type]
        target.send(jsonrpc.request(request_id, method, params))
        return d

    def _tell_cancelled(self, target: Outlet, params: dict[str, Any]) -> None:
        if self.state != "closed":
            target.send(jsonrpc.notification("notifications/cancelled", params))

    def _time_out(self, request_id: str, target: Outlet) -> None:
        entry = self._pending.pop(request_id, None)
        if entry is not None:
            self._stop_waiting(request_id, entry[1])
            if self.cancel_on_timeout:
                self._tell_cancelled(target, {"requestId": request_id, "reason": "timeout"})
            entry[0].errback(JSONRPCError(jsonrpc.REQUEST_TIMEOUT, "The client did not answer in time"))

    def _stop_waiting(self, request_id: str, timeout: IDelayedCall) -> None:
        if timeout.active():
            timeout.cancel()
        if self._delivery is not None:
            self._delivery.forget_reply(self.session_id, request_id)  # type: ignore[arg-type]

    def _resolve(self, message: Response) -> bool:
        """
        Hand the client's answer to the request it answers.

        @return: whether that request was waiting here.
        """
        entry = self._pending.pop(message.id, None) if isinstance(message.id, str) else None
        if entry is None:
            return False
        d, timeout = entry
        self._stop_waiting(message.id, timeout)  # type: ignore[arg-type]
        if message.error is not None:
            d.errback(jsonrpc.peer_error(message.error, "Client error"))
        else:
            d.callback(message.result)
        return True
