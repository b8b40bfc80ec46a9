# -*- test-case-name: tests.test_gateway_proxy -*-
"""
The proxy core: downstream MCP requests in, upstream MCP requests out, no
HTTP anywhere.

The MCP front drives a L{GatewaySession} exactly as it drives the native
L{smeldr_oauth.mcp.session.ServerSession} (both provide
L{smeldr_oauth.gateway.interfaces.IMCPSession})::

    gateway = Gateway(upstream_config, clock=reactor, reactor=reactor, http_agent=agent)
    session = gateway.session(session_id=sid, default_outlet=outlet, request_timeout=300)
    session.missing_scopes(message, principal)    # -> the scopes for a 403 step-up, or None
    session.handle(message, principal, outlet)    # -> Deferred[response dict or None], never fails
    session.close()

The downstream handshake is answered here, at the version the client asked
for, with the upstream's capabilities and server info; the upstream's own
handshake happened (or happens now) at the version the I{upstream} agreed
to.  C{ping} is answered here.  Tools, resources, prompts and completion
requests are forwarded (after the scope check of
L{smeldr_oauth.gateway.scopes}); C{logging/setLevel} and resource
subscriptions are kept per session and merged per upstream instance
(L{smeldr_oauth.gateway.link}).  Anything else answers "method not
found": an upstream method the gateway does not know is a method whose
scopes it cannot check.

The caller's access token never reaches this layer, let alone the
upstream: an HTTP upstream sees the gateway's own credential and, if
configured, identity headers.

What every session does alike (sorting messages, tracking, cancelling
and closing requests, asking the client and waiting for its answer) is
L{smeldr_oauth.mcp.conversation.ConversationState}'s; L{GatewaySession}
is one downstream conversation's method table (handshake, forwarding with
the scope check, level and subscriptions), and L{Gateway} its factory and
isolation policy.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any, Callable, Optional

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from zope.interface import implementer

from smeldr_oauth.gateway import errors, shape
from smeldr_oauth.gateway.config import UpstreamConfig
from smeldr_oauth.gateway.interfaces import IDownstream, IMCPSession, IUpstreamChannel
from smeldr_oauth.gateway.link import CallContext, Link
from smeldr_oauth.gateway.metrics import UpstreamMetrics
from smeldr_oauth.gateway.pool import Pool
from smeldr_oauth.mcp import jsonrpc
from smeldr_oauth.mcp.context import LOG_LEVELS
from smeldr_oauth.mcp.jsonrpc import InsufficientScope, JSONRPCError, Message, Notification, Request
from smeldr_oauth.mcp.calls import Outlet, Principal, log_scope_refusal
from smeldr_oauth.mcp.conversation import ConversationState, SessionOptions
from smeldr_oauth.oauth.routine import routine
from smeldr_oauth.mcp.versions import (
    LATEST_SESSION_VERSION,
    MODERN_VERSIONS,
    SESSION_VERSIONS,
    check_envelope,
    is_modern_request,
)

if TYPE_CHECKING:
    # typing has Unpack from Python 3.11; only the type checker needs it.
    from typing_extensions import Unpack

log = Logger()

#: Methods forwarded to the upstream as they are.
FORWARDED = frozenset(
    {
        "tools/list",
        "tools/call",
        "resources/list",
        "resources/templates/list",
        "resources/read",
        "prompts/list",
        "prompts/get",
        "completion/complete",
    }
)

#: Resource subscriptions one downstream session may hold.
MAX_SUBSCRIPTIONS = 1000


class Gateway:
    """
    One configured upstream: its instances, scope map and counters, and the
    factory of downstream sessions for it.

    @ivar metrics: the upstream's L{UpstreamMetrics}.
    """

    def __init__(
        self,
        config: UpstreamConfig,
        *,
        clock: IReactorTime,
        reactor: Any = None,
        http_agent: Any = None,
        connector: Optional[Callable[[Any], IUpstreamChannel]] = None,
        environ: Optional[dict[str, str]] = None,
    ) -> None:
        """
        @param clock: all timing (timeouts, idle stop, backoff, rate limits).
        @param reactor: an C{IReactorProcess} to spawn stdio upstreams.
        @param http_agent: an C{IAgent} for HTTP upstreams (each upstream session
            sends its requests through it, with its own cookie jar;
            L{smeldr_oauth.gateway.http.upstream_agent} makes the usual one).
        @param connector: makes channels (tests); replaces the two above.
        @param environ: the environment stdio upstreams inherit from
            (default C{os.environ}).
        """
        self.config = config
        self.clock = clock
        self.metrics = UpstreamMetrics(config.name)
        if connector is None:
            connector = _connector(config, clock, reactor, http_agent, environ)
        self.pool = Pool(config, clock, connector, self.metrics)
        self._session_numbers = itertools.count(1)

    def session(self, **options: Unpack[SessionOptions]) -> "GatewaySession":
        """
        A downstream session, numbered in this gateway's order: the
        options are every session's (L{SessionOptions}), so that this
        method is the MCP front's session factory (see
        L{smeldr_oauth.mcp.http.registry.SessionFactory}).
        """
        return GatewaySession(self, next(self._session_numbers), **options)

    def link_for(self, session: "GatewaySession", principal: Principal) -> Link:
        """The link (instance) a session's traffic goes to, by isolation."""
        isolation = self.config.isolation
        if isolation == "shared":
            return self.pool.link(("shared",), None)
        owner = Principal(principal.subject, None, frozenset(), None)
        if isolation == "session" and not session.modern_only:
            return self.pool.link(("session", session.number), owner)
        # A stateless (2026-07-28) request has no session to isolate by:
        # it runs on its subject's instance.
        return self.pool.link(("user", principal.subject), owner)

    def missing_scopes(self, message: Message, principal: Principal) -> Optional[tuple[str, ...]]:
        if not isinstance(message, Request):
            return None
        return self.config.scopes.missing(message.method, message.params, principal.scopes)

    def all_scopes(self) -> frozenset[str]:
        """Every scope the upstream's mapping names (for metadata and consent)."""
        return self.config.scopes.all_scopes()

    def describe(self) -> dict[str, Any]:
        """State and counters for C{/healthz}: no subjects, no secrets."""
        state = self.pool.describe()
        state["target"] = self.config.describe()
        state["metrics"] = self.metrics.snapshot()
        return state

    def stop(self) -> Deferred:
        """Stop every instance (service shutdown)."""
        return self.pool.stop()


def _connector(
    config: UpstreamConfig, clock: IReactorTime, reactor: Any, http_agent: Any, environ: Optional[dict[str, str]]
) -> Callable[[Any], IUpstreamChannel]:
    if config.kind == "stdio":
        from smeldr_oauth.gateway.stdio import StdioChannel

        if reactor is None:
            raise ValueError("a stdio upstream needs a reactor to spawn processes")
        return lambda owner: StdioChannel(reactor, clock, config, owner.subject if owner else None, environ)
    from smeldr_oauth.gateway.http import HTTPChannel

    if http_agent is None:
        raise ValueError("an HTTP upstream needs an HTTP agent")
    return lambda owner: HTTPChannel(http_agent, clock, config, owner)


def _resubscribe_failed(failure: Failure, uri: str) -> None:
    log.info("Gateway: a resumed subscription to {uri} failed", uri=uri[:200])


class _Call(CallContext):
    """A downstream request being served: its routing context plus what the session needs."""

    def __init__(self, session: "GatewaySession", outlet: Any, principal: Principal, version: str, modern: bool, log_level: Optional[str]) -> None:
        super().__init__(session, outlet, principal, log_level)
        self.version = version
        self.modern = modern
        self.cancelled = False


@implementer(IMCPSession, IDownstream)
class GatewaySession(ConversationState):
    """
    One downstream MCP conversation relayed to an upstream.  Its
    client-facing state (and C{on_change}, C{resume}) is
    L{ConversationState}'s, as for the native
    L{smeldr_oauth.mcp.session.ServerSession}; the log level is C{None}
    until the client chooses one (it gets what the upstream sends).
    """

    _in_flight: dict[Any, tuple[Deferred, _Call]]

    request_prefix = "gw"
    cancel_on_timeout = True
    failure_format = "Gateway {method} failed"

    def __init__(self, gateway: Gateway, number: int, **options: Unpack[SessionOptions]) -> None:
        """
        @param number: this session's number in its gateway (the key of
            its own instance under per-session isolation).
        """
        super().__init__(gateway.clock, **options)
        self.gateway = gateway
        self.number = number
        self.link: Optional[Link] = None
        #: The subject whose instance this session uses (set on first use).
        self.subject: Optional[str] = None
        self._resubscribe = False

    # -- IMCPSession -------------------------------------------------------------

    @property
    def allows_batch(self) -> bool:
        return self.protocol_version == "2025-03-26"

    def missing_scopes(self, message: Message, principal: Principal) -> Optional[tuple[str, ...]]:
        return self.gateway.missing_scopes(message, principal)

    def _admit(self, message: Request, principal: Principal, outlet: Optional[Outlet]) -> _Call:
        call = self._prepare(message, principal, outlet)
        missing = self.missing_scopes(message, principal)
        if missing:
            log_scope_refusal("Gateway call", principal, missing)
            raise InsufficientScope(missing)
        return call

    def _run(self, message: Request, call: _Call) -> Deferred:
        try:
            inner = self._dispatch(message, call)
        except Exception:
            return succeed(self._failed(message, call, Failure()))

        def respond(result: object) -> Optional[dict[str, Any]]:
            call.done = True
            if isinstance(result, Failure):
                return self._failed(message, call, result)
            return jsonrpc.result_response(message.id, result)

        return self._serve(message, inner, call, respond)

    def close(self) -> None:
        if self._end() and self.link is not None:
            self.link.detach(self)

    def resume(self, **record: Any) -> None:
        """
        See L{ConversationState.resume}.  The subscriptions are made again
        on the upstream instance this process gives the session, at its
        first request.
        """
        super().resume(**record)
        self._resubscribe = bool(self.subscriptions)

    # -- IDownstream (what the link calls) ----------------------------------------

    def deliver(self, notification: Notification, outlet: Optional[Outlet]) -> None:
        if self.state == "closed":
            return
        target = outlet if outlet is not None else self.default_outlet
        if target is not None:
            target.send(jsonrpc.notification(notification.method, notification.params))

    def can_answer(self, capability: str, params: Any) -> bool:
        if self.modern_only or not self.initialized:
            return False
        declared = self.client_capabilities.get(capability)
        if not isinstance(declared, dict):
            return False
        if capability == "elicitation":
            mode = params.get("mode", "form") if isinstance(params, dict) else "form"
            # {} declares form mode only (the 2025-06-18 meaning).
            modes = {k for k in ("form", "url") if k in declared} or {"form"}
            return mode in modes
        return True

    def client_request(self, method: str, params: dict[str, Any], outlet: Optional[Outlet]) -> Deferred:
        return self._ask_client(outlet, method, params)

    # -- internals -----------------------------------------------------------------

    def _heard(self, message: Notification, principal: Principal) -> None:
        if message.method in ("notifications/roots/list_changed", "notifications/progress"):
            # Progress here is the client's, for a request the upstream made.
            if self.link is not None:
                self.link.notify(message.method, message.params, principal)

    def _prepare(self, message: Request, principal: Principal, outlet: Optional[Outlet]) -> _Call:
        if self.state == "closed":
            raise jsonrpc.invalid_request("Session ended")
        if self.subject is not None and principal.subject != self.subject:
            # The front checks the owner too; an instance must never see another subject's traffic.
            log.warn(
                "Gateway session used by another subject: {subject}",
                subject=principal.subject,
                smeldr_event="session_owner_mismatch",
            )
            raise jsonrpc.invalid_request("Session belongs to another subject")
        if self.modern_only or (self.state == "new" and message.method != "initialize" and is_modern_request(message)):
            return self._prepare_modern(message, principal, outlet)
        if self.state == "new" and message.method not in ("initialize", "ping"):
            raise jsonrpc.invalid_request("Session not initialized: send initialize first")
        return _Call(self, outlet, principal, self.protocol_version or LATEST_SESSION_VERSION, False, "session")

    def prepare(self, message: Request, principal: Principal, outlet: Optional[Outlet] = None) -> None:
        """
        Validate a request before dispatch (for a stateless 2026-07-28
        request: the revision's validation ladder), as the front does for
        native sessions.

        @raise JSONRPCError: it cannot be served.
        """
        self._prepare(message, principal, outlet)

    def _prepare_modern(self, message: Request, principal: Principal, outlet: Optional[Outlet]) -> _Call:
        envelope = check_envelope(message)
        return _Call(self, outlet, principal, envelope.version, True, envelope.log_level)

    def _dispatch(self, message: Request, call: _Call) -> Deferred:
        method, params = message.method, message.params
        if method == "initialize":
            return self._initialize(params, call)
        if method == "ping":
            return succeed({})
        if method == "server/discover" and call.modern:
            return self._attach(call).server_info().addCallback(self._discover)
        if method == "logging/setLevel":
            return self._set_level(params, call)
        if method in ("resources/subscribe", "resources/unsubscribe"):
            return self._subscription(method, params, call)
        if method not in FORWARDED:
            raise jsonrpc.method_not_found(method)
        return self._forward(method, params, call)

    def _attach(self, call: _Call) -> Link:
        if self.link is None:
            self.subject = call.principal.subject
            self.link = self.gateway.link_for(self, call.principal)
            if not self.modern_only:
                self.link.attach(self)
            if self._resubscribe:
                self._resubscribe = False
                for uri in sorted(self.subscriptions):
                    self.link.subscribe(self, uri, call.principal).addErrback(_resubscribe_failed, uri)
        return self.link

    def _initialize(self, params: dict[str, Any], call: _Call) -> Deferred:
        if self.state != "new":
            raise jsonrpc.invalid_request("Already initialized")
        requested = params.get("protocolVersion")
        capabilities = params.get("capabilities", {})
        client_info = params.get("clientInfo", {})
        if not isinstance(requested, str):
            raise jsonrpc.invalid_params("protocolVersion must be a string")
        if not isinstance(capabilities, dict) or not isinstance(client_info, dict):
            raise jsonrpc.invalid_params("capabilities and clientInfo must be objects")
        # The client's version is negotiated here, whatever the upstream speaks.
        version = requested if requested in SESSION_VERSIONS else LATEST_SESSION_VERSION
        link = self._attach(call)

        def answer(info: Any) -> dict[str, Any]:
            if self.state == "closed":
                raise JSONRPCError(jsonrpc.REQUEST_CANCELLED, "Session ended")
            self.initialized_as(version, capabilities, client_info)
            result: dict[str, Any] = {
                "protocolVersion": version,
                "capabilities": shape.capabilities(info.capabilities, modern=False),
                "serverInfo": info.server_info or {"name": self.gateway.config.name or "upstream", "version": ""},
            }
            if info.instructions:
                result["instructions"] = info.instructions
            log.info(
                "Gateway session {session_id} initialized at {version} for {subject} (upstream {upstream} at {upstream_version})",
                session_id=(self.session_id or "-")[:8],
                version=version,
                subject=call.principal.subject,
                upstream=self.gateway.config.name,
                upstream_version=info.protocol_version,
            )
            return result

        return link.server_info().addCallback(answer)

    def _discover(self, info: Any) -> dict[str, Any]:
        result: dict[str, Any] = {
            "supportedVersions": list(MODERN_VERSIONS),
            "capabilities": shape.capabilities(info.capabilities, modern=True),
            "serverInfo": info.server_info,
        }
        if info.instructions:
            result["instructions"] = info.instructions
        return shape.modern_result("server/discover", result, info.server_info)

    def _set_level(self, params: dict[str, Any], call: _Call) -> Deferred:
        level = params.get("level")
        if level not in LOG_LEVELS:
            raise jsonrpc.invalid_params("level must be one of " + ", ".join(LOG_LEVELS))
        self.set_log_level(level)
        return self._attach(call).set_level().addCallback(lambda _: {})

    def _subscription(self, method: str, params: dict[str, Any], call: _Call) -> Deferred:
        uri = params.get("uri")
        if not isinstance(uri, str):
            raise jsonrpc.invalid_params("uri must be a string")
        link = self._attach(call)
        if method == "resources/unsubscribe":
            if uri in self.subscriptions:
                self.unsubscribe(uri)
            return link.unsubscribe(self, uri, call.principal).addCallback(lambda _: {})
        if uri not in self.subscriptions and len(self.subscriptions) >= MAX_SUBSCRIPTIONS:
            raise JSONRPCError(jsonrpc.INVALID_REQUEST, "Too many subscriptions on this session")

        def joined(result: Any) -> dict[str, Any]:
            if uri not in self.subscriptions:
                self.subscribe(uri)
            return {}

        return link.subscribe(self, uri, call.principal).addCallback(joined)

    def _forward(self, method: str, params: dict[str, Any], call: _Call) -> Deferred:
        link = self._attach(call)
        upstream_params = shape.strip_modern_meta(params) if call.modern else params
        started = self.clock.seconds()

        def shaped(result: Any) -> Any:
            result = self.gateway.config.scopes.shape_list(method, result, call.principal.scopes)
            if call.modern:
                info = link.client.server.server_info if link.client is not None and link.client.server else {}
                return shape.modern_result(method, result, info)
            return shape.for_version(method, result, call.version)

        def observed(result: Any) -> Any:
            elapsed = self.clock.seconds() - started
            cancelled = isinstance(result, Failure) and result.check(CancelledError) is not None
            if not cancelled:
                self.gateway.metrics.observe(method, elapsed, not isinstance(result, Failure))
            if isinstance(result, Failure):
                error = result.value
                code = error.code if isinstance(error, JSONRPCError) else None
                outcome = "cancelled" if cancelled else {
                    errors.UPSTREAM_UNAVAILABLE: "unavailable",
                    jsonrpc.REQUEST_TIMEOUT: "timeout",
                }.get(code, "error")  # type: ignore[arg-type]
                if outcome == "timeout":
                    self.gateway.metrics.timeouts += 1
            else:
                outcome = "tool_error" if isinstance(result, dict) and result.get("isError") else "ok"
            if method == "tools/call":
                # As for native tools (mcp/methods.py): a call that went well
                # is routine, a debug event handed to the metrics and the
                # timeline directly, and through the log only when someone
                # keeps debug events here (smeldr_oauth.oauth.routine: through
                # Logger.emit it was a walk over every observer and the
                # file's level filter, per call); any other outcome stays at
                # info.
                routine.emit(
                    log,
                    LogLevel.debug if outcome == "ok" else LogLevel.info,
                    "Gateway {upstream}: tool {tool} called by {subject}: {outcome} in {ms:.1f} ms",
                    upstream=self.gateway.config.name,
                    tool=str(params.get("name"))[:200],
                    subject=call.principal.subject,
                    outcome=outcome,
                    ms=elapsed * 1000,
                    smeldr_event="gateway_call",
                )
            return result

        def settled(result: Any) -> Any:
            # One callback for both (a Deferred step fewer per call).
            result = observed(result)
            return result if isinstance(result, Failure) else shaped(result)

        return link.call(method, upstream_params, call).addBoth(settled)
