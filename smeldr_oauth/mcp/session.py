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

from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from smeldr_oauth.mcp import jsonrpc
from smeldr_oauth.mcp.app import MCPApp
from smeldr_oauth.mcp.calls import Call, CallbackOutlet, Outlet, Principal, is_deferred, outcome_now
from smeldr_oauth.mcp.conversation import ConversationState, SessionOptions
from smeldr_oauth.mcp.jsonrpc import JSONRPCError, Message, Request
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

    initial_log_level = "info"
    request_prefix = "srv"

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

    def _admit(self, message: Request, principal: Principal, outlet: Optional[Outlet]) -> Call:
        return self.prepare(message, principal, outlet)

    def _run(self, message: Request, call: Call) -> Deferred:
        try:
            inner = self._dispatch(message, call)
        except BaseException:
            return succeed(self._response(message, call, Failure()))
        if not is_deferred(inner):
            # A method that answered with its value (most calls, SQLite on
            # the reactor thread): no Deferred made and unwrapped again.
            return succeed(self._response(message, call, inner))
        now = outcome_now(inner)
        if now:
            # Answered at once: no second Deferred, nothing in flight to
            # track.
            return succeed(self._response(message, call, now[0]))
        return self._serve(message, inner, call, lambda result: self._response(message, call, result))

    def _response(self, message: Request, call: Call, result: object) -> Optional[dict[str, Any]]:
        """The response to C{message}, whose method ended with C{result}."""
        if isinstance(result, Failure):
            return self._failed(message, call, result)
        if call.modern:
            server_info = {"name": self.app.name, "version": self.app.version}
            result = modern_envelope(message.method, result, server_info)  # type: ignore[arg-type]
        return jsonrpc.result_response(message.id, result)

    def close(self) -> None:
        """
        End the session: cancel what is running, fail what waits for the
        client, stop hearing application notifications.
        """
        if self._end():
            self.app.detach(self)

    def _joined(self) -> None:
        self.app.attach(self)

    def _cancel(self, inner: Deferred, call: Call) -> None:
        # The method's context says so too: a tool may poll it.
        if call.context is not None:
            call.context.cancelled = True
        super()._cancel(inner, call)

    # -- used by Context and MCPApp ------------------------------------------

    def notify(self, outlet: Optional[Outlet], method: str, params: dict[str, Any]) -> None:
        target = outlet if outlet is not None else self.default_outlet
        if target is not None and self.state != "closed":
            target.send(jsonrpc.notification(method, params))

    def client_request(
        self, outlet: Optional[Outlet], method: str, params: dict[str, Any], capability: str
    ) -> Deferred:
        """
        Send a request to the client and wait for its answer (see
        L{ConversationState._ask_client}), once the session can make it.

        @param capability: the client capability the request needs
            (C{sampling}, C{elicitation}, C{roots}).
        """
        # A closed session says so first (the base's answer).
        refusal = None if self.state == "closed" else self._refusal(method, capability)
        if refusal is not None:
            return fail(refusal)
        return self._ask_client(outlet, method, params)

    def _refusal(self, method: str, capability: str) -> Optional[JSONRPCError]:
        """Why the client cannot be asked C{method} on this session, if it cannot."""
        if self.state == "new" or self.modern_only:
            return JSONRPCError(
                jsonrpc.MISSING_CLIENT_CAPABILITY,
                f"{method} needs a session (not available in the stateless exchange)",
            )
        if capability not in self.client_capabilities:
            return JSONRPCError(
                jsonrpc.MISSING_CLIENT_CAPABILITY,
                f"The client did not declare the {capability!r} capability",
                {"requiredCapabilities": [capability]},
            )
        return None

    def resource_updated(self, uri: str) -> None:
        if uri in self.subscriptions:
            self.notify(None, "notifications/resources/updated", {"uri": uri})

    def list_changed(self, kind: str) -> None:
        if self.initialized:
            self.notify(None, f"notifications/{kind}/list_changed", {})

    # -- internals -------------------------------------------------------------

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
        if result is None or isinstance(result, dict) or is_deferred(result):
            return result
        # What maybeDeferred made of anything else (a coroutine, a Failure).
        return maybeDeferred(lambda: result)
