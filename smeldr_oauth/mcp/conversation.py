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

It has slots and no instance dictionary: a legacy SSE session idles behind
its stream by the thousand, and a subclass with slots of its own stays as
small as a class that declared them all.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Optional, TypedDict

from twisted.internet.interfaces import IReactorTime

from smeldr_oauth.mcp.calls import Outlet
from smeldr_oauth.mcp.state.interfaces import ISessionDelivery

if TYPE_CHECKING:
    # typing has Unpack from Python 3.11; only the type checker needs it.
    from typing_extensions import Unpack

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
        #: Requests being served, by id: their Deferred and call.
        self._in_flight: dict[Any, tuple[Any, Any]] = {}
        #: Requests sent to the client and not yet answered, by id.
        self._pending: dict[str, Any] = {}
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
