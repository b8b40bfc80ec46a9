# -*- test-case-name: tests.test_mcp_session -*-
"""
The MCP protocol state machine, independent of any transport.

A L{ServerSession} takes parsed JSON-RPC messages plus the caller's
L{Principal} and an I{outlet} (where messages related to that request go:
progress, logs, server-to-client requests) and answers with response
dictionaries.  Transports (Streamable HTTP, legacy HTTP+SSE, stdio) only
move bytes and decide where an outlet writes.

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
"""

from __future__ import annotations

import base64
import binascii
from typing import Any, Callable, Optional

import attr
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from smeldr_oauth.mcp import jsonrpc
from smeldr_oauth.mcp.app import (
    LOG_LEVELS,
    Context,
    MCPApp,
    ToolError,
    error_result,
    invoke,
    prompt_result,
    resource_contents,
    tool_result,
    validate,
)
from smeldr_oauth.mcp.jsonrpc import (
    InsufficientScope,
    JSONRPCError,
    Message,
    Notification,
    Request,
    Response,
)

log = Logger()

SESSION_VERSIONS = ("2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05")
MODERN_VERSIONS = ("2026-07-28",)
#: Every version this server speaks, newest first.
SUPPORTED_VERSIONS = MODERN_VERSIONS + SESSION_VERSIONS
LATEST_SESSION_VERSION = SESSION_VERSIONS[0]
BATCH_VERSIONS = ("2025-03-26",)

PROTOCOL_VERSION_KEY = "io.modelcontextprotocol/protocolVersion"
CLIENT_CAPABILITIES_KEY = "io.modelcontextprotocol/clientCapabilities"
CLIENT_INFO_KEY = "io.modelcontextprotocol/clientInfo"
LOG_LEVEL_KEY = "io.modelcontextprotocol/logLevel"
SERVER_INFO_KEY = "io.modelcontextprotocol/serverInfo"

#: Methods the 2026-07-28 revision removed; they answer "method not found".
REMOVED_IN_MODERN = frozenset(
    {"initialize", "ping", "logging/setLevel", "resources/subscribe", "resources/unsubscribe"}
)
#: 2026-07-28 results of these carry cache hints (C{ttlMs}, C{cacheScope}).
CACHEABLE = frozenset(
    {"prompts/list", "resources/list", "resources/read", "resources/templates/list", "server/discover", "tools/list"}
)
#: 2026-07-28: the body field mirrored by the C{Mcp-Name} header.
NAME_BEARING = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}


@attr.s(frozen=True, auto_attribs=True)
class Principal:
    """
    Who sent one message: taken from that message's access token (or
    C{"local"} on stdio), so a refreshed token's scopes apply at once.
    """

    subject: str
    client_id: Optional[str]
    scopes: frozenset[str]
    grant_id: Optional[str] = None


class Outlet:
    """
    Where the messages related to one request go.  Transports subclass
    it; the base class drops everything (a transport with no way to
    reach the client, e.g. a plain JSON answer).
    """

    #: whether server-to-client requests can travel through this outlet.
    can_request = False

    def send(self, message: dict[str, Any]) -> None:
        pass


class CallbackOutlet(Outlet):
    """An outlet that hands every message to a callable."""

    can_request = True

    def __init__(self, write: Callable[[dict[str, Any]], None]) -> None:
        self._write = write

    def send(self, message: dict[str, Any]) -> None:
        self._write(message)


def is_modern_request(message: Message) -> bool:
    """
    Whether a request uses the 2026-07-28 per-request envelope (its
    C{_meta} names a protocol version), whatever that version is.
    """
    if not isinstance(message, (Request, Notification)):
        return False
    meta = message.params.get("_meta")
    return isinstance(meta, dict) and PROTOCOL_VERSION_KEY in meta


def _decode_header_value(value: Optional[str]) -> Optional[str]:
    # Mcp-Name may carry non-ASCII values as =?base64?...?=.
    if value is None or not (value.startswith("=?base64?") and value.endswith("?=")):
        return value
    payload = value[len("=?base64?") : -2]
    try:
        decoded = base64.b64decode(payload, validate=True)
        if base64.b64encode(decoded).decode("ascii") != payload:
            return None
        return decoded.decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None


def check_modern_headers(request: Request, headers: dict[str, Optional[str]]) -> None:
    """
    The 2026-07-28 HTTP rule that routing headers agree with the body
    (C{MCP-Protocol-Version}, C{Mcp-Method}, C{Mcp-Name}), so that a gateway
    which routed on the headers routed what is actually executed.

    @param headers: lower-case header names to values (C{None}: absent).
    @raise JSONRPCError: C{HEADER_MISMATCH}.
    """
    meta = request.params.get("_meta")
    version = meta.get(PROTOCOL_VERSION_KEY) if isinstance(meta, dict) else None
    if headers.get("mcp-protocol-version") is None or headers.get("mcp-protocol-version") != version:
        raise JSONRPCError(jsonrpc.HEADER_MISMATCH, "MCP-Protocol-Version header does not match _meta")
    if headers.get("mcp-method") != request.method:
        raise JSONRPCError(jsonrpc.HEADER_MISMATCH, "Mcp-Method header does not match the method")
    key = NAME_BEARING.get(request.method)
    if key is not None:
        body_value = request.params.get(key)
        if body_value is not None and _decode_header_value(headers.get("mcp-name")) != body_value:
            raise JSONRPCError(jsonrpc.HEADER_MISMATCH, f"Mcp-Name header does not match {key}")


def _encode_cursor(offset: int) -> str:
    return base64.urlsafe_b64encode(f"o:{offset}".encode()).decode("ascii")


def _decode_cursor(cursor: object) -> int:
    if cursor is None:
        return 0
    try:
        text = base64.urlsafe_b64decode(str(cursor).encode("ascii")).decode("ascii")
        if not text.startswith("o:"):
            raise ValueError(text)
        offset = int(text[2:])
        if offset < 0:
            raise ValueError(offset)
        return offset
    except (ValueError, UnicodeError, binascii.Error):
        raise jsonrpc.invalid_params("Invalid cursor")


@attr.s(auto_attribs=True)
class _Call:
    """Everything one request's handler needs to know."""

    request_id: Any
    principal: Principal
    outlet: Optional[Outlet]
    version: str
    modern: bool
    client_capabilities: dict[str, Any]
    log_level: Optional[str]
    progress_token: Any
    context: Optional[Context] = None
    cancelled: bool = False


class ServerSession:
    """
    One MCP conversation.  For the session era, one instance lives as
    long as the C{Mcp-Session-Id}, SSE stream or stdio process; for the
    stateless era a throwaway instance serves each request.

    @ivar log_level: the lowest level sent as C{notifications/message};
        C{info} until the client says otherwise.
    @ivar default_outlet: where messages unrelated to any request go
        (list-changed and resource-updated notifications).
    """

    # A legacy SSE session idles behind its stream by the thousand: slots
    # keep each one a few hundred bytes smaller.
    __slots__ = (
        "app",
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
        "_in_flight",
        "_pending",
        "_next_id",
        "__weakref__",
    )

    def __init__(
        self,
        app: MCPApp,
        clock: IReactorTime,
        *,
        session_id: Optional[str] = None,
        default_outlet: Optional[Outlet] = None,
        request_timeout: float = 300.0,
        modern_only: bool = False,
    ) -> None:
        self.app = app
        self.clock = clock
        self.session_id = session_id
        self.default_outlet = default_outlet
        self.request_timeout = request_timeout
        self.modern_only = modern_only
        self.state = "new"
        self.protocol_version: Optional[str] = None
        self.client_capabilities: dict[str, Any] = {}
        self.client_info: dict[str, Any] = {}
        self.log_level: Optional[str] = "info"
        # Replaced, never mutated: the empty frozenset is shared by every
        # session, and most sessions never subscribe.
        self.subscriptions: frozenset[str] = frozenset()
        self._in_flight: dict[Any, tuple[Deferred, _Call]] = {}
        self._pending: dict[Any, Deferred] = {}
        self._next_id = 0

    # -- transport-facing API ------------------------------------------------

    @property
    def allows_batch(self) -> bool:
        """JSON-RPC batches were part of MCP only in 2025-03-26."""
        return self.protocol_version in BATCH_VERSIONS

    @property
    def initialized(self) -> bool:
        return self.state in ("initialized", "ready")

    @property
    def busy(self) -> bool:
        """
        Whether a request is still running (a transport must not end the
        session to make room for another one while it does).
        """
        return bool(self._in_flight)

    def missing_scopes(self, message: Message, principal: Principal) -> Optional[tuple[str, ...]]:
        """
        The scopes C{message} needs when C{principal} lacks some of them
        (so a transport can answer HTTP 403 before dispatching), else
        C{None}.
        """
        needed = self._needed_scopes(message)
        if needed and not set(needed) <= principal.scopes:
            return needed
        return None

    def _needed_scopes(self, message: Message) -> tuple[str, ...]:
        if not isinstance(message, Request):
            return ()
        params = message.params
        if message.method == "tools/call":
            name = params.get("name")
            tool = self.app.tools.get(name) if isinstance(name, str) else None
            return tool.scopes if tool else ()
        if message.method == "prompts/get":
            name = params.get("name")
            prompt = self.app.prompts.get(name) if isinstance(name, str) else None
            return prompt.scopes if prompt else ()
        if message.method in ("resources/read", "resources/subscribe"):
            uri = params.get("uri")
            found = self.app.find_resource(uri) if isinstance(uri, str) else None
            return found[0].scopes if found else ()
        if message.method == "resources/list":
            needed: list[str] = []
            for lister in self.app.resource_listers:
                needed.extend(s for s in lister.scopes if s not in needed)
            return tuple(needed)
        return ()

    def handle(
        self, message: Message, principal: Principal, outlet: Optional[Outlet] = None
    ) -> Deferred:
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
            call = self._prepare(message, principal, outlet)
        except JSONRPCError as error:
            return succeed(jsonrpc.error_response(message.id, error))
        if message.id in self._in_flight:
            return succeed(
                jsonrpc.error_response(message.id, jsonrpc.invalid_request("Request id already in use"))
            )
        inner = self._dispatch(message, call)
        self._in_flight[message.id] = (inner, call)
        outer: Deferred = Deferred()

        def finished(result: object) -> None:
            self._in_flight.pop(message.id, None)
            if isinstance(result, Failure):
                if call.cancelled and result.check(CancelledError):
                    outer.callback(None)
                    return
                if result.check(JSONRPCError):
                    outer.callback(jsonrpc.error_response(message.id, result.value))
                    return
                log.failure("MCP method {method} failed", result, method=message.method)
                outer.callback(jsonrpc.error_response(message.id, jsonrpc.internal_error()))
                return
            outer.callback(jsonrpc.result_response(message.id, self._shape(message.method, call, result)))  # type: ignore[arg-type]

        inner.addBoth(finished)
        return outer

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
        for d in pending.values():
            d.errback(JSONRPCError(jsonrpc.REQUEST_CANCELLED, "Session ended"))

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
        back through L{handle} as a L{Response}.
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
            self._pending.pop(request_id, None)
            self.notify(target, "notifications/cancelled", {"requestId": request_id})

        d: Deferred = Deferred(cancel)
        self._pending[request_id] = d
        timeout = self.clock.callLater(self.request_timeout, self._time_out, request_id)
        target.send(jsonrpc.request(request_id, method, params))

        def clear(result: object) -> object:
            if timeout.active():
                timeout.cancel()
            return result

        return d.addBoth(clear)

    def resource_updated(self, uri: str) -> None:
        if uri in self.subscriptions:
            self.notify(None, "notifications/resources/updated", {"uri": uri})

    def list_changed(self, kind: str) -> None:
        if self.initialized:
            self.notify(None, f"notifications/{kind}/list_changed", {})

    # -- internals -------------------------------------------------------------

    def _time_out(self, request_id: str) -> None:
        d = self._pending.pop(request_id, None)
        if d is not None:
            d.errback(JSONRPCError(jsonrpc.REQUEST_TIMEOUT, "The client did not answer in time"))

    def _handle_response(self, message: Response) -> None:
        d = self._pending.pop(message.id, None)
        if d is None:
            log.debug("Response to unknown request {id!r} ignored", id=str(message.id)[:64])
            return
        if message.error is not None:
            error = message.error
            raw_code, raw_text = error.get("code"), error.get("message")
            code = raw_code if isinstance(raw_code, int) else jsonrpc.INTERNAL_ERROR
            text = raw_text if isinstance(raw_text, str) else "Client error"
            d.errback(JSONRPCError(code, text[:500], error.get("data")))
        else:
            d.callback(message.result)

    def _handle_notification(self, message: Notification) -> None:
        if message.method == "notifications/initialized":
            if self.state == "initialized":
                self.state = "ready"
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

    def _prepare(self, message: Request, principal: Principal, outlet: Optional[Outlet]) -> _Call:
        meta = message.params.get("_meta")
        progress = meta.get("progressToken") if isinstance(meta, dict) else None
        if isinstance(progress, bool) or not isinstance(progress, (str, int)):
            progress = None
        if self.modern_only or (self.state == "new" and message.method != "initialize" and is_modern_request(message)):
            return self._prepare_modern(message, principal, outlet, meta, progress)
        if self.state == "new" and message.method not in ("initialize", "ping"):
            raise jsonrpc.invalid_request("Session not initialized: send initialize first")
        return _Call(
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
    ) -> _Call:
        # The validation ladder of the 2026-07-28 revision, first failure wins.
        if not isinstance(meta, dict):
            raise jsonrpc.invalid_params("params._meta must carry the protocol version and client capabilities")
        missing = [k for k in (PROTOCOL_VERSION_KEY, CLIENT_CAPABILITIES_KEY) if k not in meta]
        if missing:
            raise jsonrpc.invalid_params("params._meta is missing " + ", ".join(missing))
        version = meta[PROTOCOL_VERSION_KEY]
        if not isinstance(version, str):
            raise jsonrpc.invalid_params("protocol version must be a string")
        if version not in MODERN_VERSIONS:
            raise jsonrpc.unsupported_version(version, MODERN_VERSIONS)
        capabilities = meta[CLIENT_CAPABILITIES_KEY]
        if not isinstance(capabilities, dict):
            raise jsonrpc.invalid_params("client capabilities must be an object")
        level = meta.get(LOG_LEVEL_KEY)
        if level is not None and level not in LOG_LEVELS:
            raise jsonrpc.invalid_params("unknown log level")
        if message.method in REMOVED_IN_MODERN:
            raise jsonrpc.method_not_found(message.method)
        return _Call(
            request_id=message.id,
            principal=principal,
            outlet=outlet,
            version=version,
            modern=True,
            client_capabilities=capabilities,
            # No level in _meta: the client wants no log notifications.
            log_level=level,
            progress_token=progress,
        )

    def _shape(self, method: str, call: _Call, result: dict[str, Any]) -> dict[str, Any]:
        if not call.modern:
            return result
        shaped = dict(result)
        shaped.setdefault("resultType", "complete")
        if method in CACHEABLE:
            # Results depend on who asks (scopes), so only private caches.
            shaped.setdefault("ttlMs", 0)
            shaped.setdefault("cacheScope", "private")
        meta = dict(shaped.get("_meta") or {})
        meta.setdefault(SERVER_INFO_KEY, {"name": self.app.name, "version": self.app.version})
        shaped["_meta"] = meta
        return shaped

    def _context(self, call: _Call) -> Context:
        ctx = Context(
            session=self,
            subject=call.principal.subject,
            client_id=call.principal.client_id,
            scopes=call.principal.scopes,
            request_id=call.request_id,
            protocol_version=call.version,
            outlet=call.outlet,
            progress_token=call.progress_token,
            log_level=call.log_level,
        )
        if call.modern:
            ctx.session_id = None
        call.context = ctx
        return ctx

    def _check_scopes(self, needed: tuple[str, ...], call: _Call) -> None:
        if needed and not set(needed) <= call.principal.scopes:
            log.info(
                "MCP call refused: {subject} via {client_id} lacks scopes {scopes}",
                subject=call.principal.subject,
                client_id=call.principal.client_id,
                scopes=" ".join(needed),
            )
            raise InsufficientScope(needed)

    def _dispatch(self, message: Request, call: _Call) -> Deferred:
        handler = _METHODS.get(message.method)
        if handler is None or (not call.modern and message.method == "server/discover"):
            return fail(jsonrpc.method_not_found(message.method))
        try:
            result = handler(self, message.params, call)
        except BaseException:
            return fail()
        if isinstance(result, Deferred):
            return result
        return succeed(result)

    # -- methods ---------------------------------------------------------------

    def _initialize(self, params: dict[str, Any], call: _Call) -> dict[str, Any]:
        if self.state != "new":
            raise jsonrpc.invalid_request("Already initialized")
        requested = params.get("protocolVersion")
        if not isinstance(requested, str):
            raise jsonrpc.invalid_params("protocolVersion must be a string")
        capabilities = params.get("capabilities", {})
        client_info = params.get("clientInfo", {})
        if not isinstance(capabilities, dict) or not isinstance(client_info, dict):
            raise jsonrpc.invalid_params("capabilities and clientInfo must be objects")
        # A session-era version is echoed; anything else (including the
        # stateless 2026-07-28, which has no handshake) gets our latest
        # session-era version as the counter-offer.
        version = requested if requested in SESSION_VERSIONS else LATEST_SESSION_VERSION
        self.protocol_version = version
        self.client_capabilities = capabilities
        self.client_info = client_info
        self.state = "initialized"
        self.app.attach(self)
        log.info(
            "MCP session {session_id} initialized at {version} for {subject}",
            # A prefix is enough to correlate log lines.
            session_id=(self.session_id or "-")[:8],
            version=version,
            subject=call.principal.subject,
        )
        result: dict[str, Any] = {
            "protocolVersion": version,
            "capabilities": self.app.capabilities(),
            "serverInfo": {"name": self.app.name, "version": self.app.version},
        }
        if self.app.instructions:
            result["instructions"] = self.app.instructions
        return result

    def _discover(self, params: dict[str, Any], call: _Call) -> dict[str, Any]:
        result: dict[str, Any] = {
            "supportedVersions": list(MODERN_VERSIONS),
            "capabilities": self._modern_capabilities(),
            "serverInfo": {"name": self.app.name, "version": self.app.version},
        }
        if self.app.instructions:
            result["instructions"] = self.app.instructions
        return result

    def _modern_capabilities(self) -> dict[str, Any]:
        caps = self.app.capabilities()
        caps.pop("logging", None)
        if "resources" in caps:
            caps["resources"] = {}
        for key in ("tools", "prompts"):
            if key in caps:
                caps[key] = {}
        return caps

    def _ping(self, params: dict[str, Any], call: _Call) -> dict[str, Any]:
        return {}

    def _set_level(self, params: dict[str, Any], call: _Call) -> dict[str, Any]:
        level = params.get("level")
        if level not in LOG_LEVELS:
            raise jsonrpc.invalid_params("level must be one of " + ", ".join(LOG_LEVELS))
        self.log_level = level
        return {}

    def _page(self, items: list[dict[str, Any]], key: str, params: dict[str, Any]) -> dict[str, Any]:
        offset = _decode_cursor(params.get("cursor"))
        if offset > len(items):
            raise jsonrpc.invalid_params("Invalid cursor")
        end = offset + self.app.page_size
        result: dict[str, Any] = {key: items[offset:end]}
        if end < len(items):
            result["nextCursor"] = _encode_cursor(end)
        return result

    def _tools_list(self, params: dict[str, Any], call: _Call) -> dict[str, Any]:
        # Every tool is listed whatever the caller's scopes, so a client can
        # see what it could do after stepping up.
        items = [tool.descriptor(call.version) for tool in self.app.tools.values()]
        return self._page(items, "tools", params)

    def _tools_call(self, params: dict[str, Any], call: _Call) -> Deferred:
        name = params.get("name")
        if not isinstance(name, str):
            raise jsonrpc.invalid_params("name must be a string")
        tool = self.app.tools.get(name)
        if tool is None:
            raise jsonrpc.invalid_params(f"Unknown tool: {name[:100]}")
        self._check_scopes(tool.scopes, call)
        arguments = params.get("arguments")
        if arguments is None:
            arguments = {}
        if not isinstance(arguments, dict):
            raise jsonrpc.invalid_params("arguments must be an object")
        problem = validate(arguments, tool.input_schema)
        if problem is not None:
            if call.version >= "2025-11-25":
                # Since 2025-11-25 input errors are tool errors, so the
                # model can read them and correct its call.
                return succeed(error_result(f"Invalid arguments: {problem}"))
            raise jsonrpc.invalid_params(f"Invalid arguments: {problem}")
        ctx = self._context(call)
        d = invoke(tool.func, tool.signature, ctx, arguments)

        def done(value: object) -> dict[str, Any]:
            return tool_result(tool, value, call.version)

        def failed(failure: Failure) -> dict[str, Any]:
            if failure.check(CancelledError) and call.cancelled:
                failure.raiseException()
            if failure.check(ToolError):
                return error_result(str(failure.value) or "Tool error")
            if failure.check(InsufficientScope):
                failure.raiseException()
            if failure.check(JSONRPCError):
                return error_result(failure.value.message)
            log.failure("Tool {tool} failed", failure, tool=tool.name)
            return error_result("Tool execution failed")

        def counted(result: Any) -> Any:
            outcome = "error" if isinstance(result, Failure) else ("tool_error" if result.get("isError") else "ok")
            log.info(
                "tool {tool} called by {subject}: {outcome}",
                tool=tool.name,
                subject=call.principal.subject if call.principal is not None else None,
                outcome=outcome,
                smeldr_event="mcp_call",
            )
            return result

        return d.addCallbacks(done, failed).addBoth(counted)

    def _resources_list(self, params: dict[str, Any], call: _Call) -> Deferred:
        fixed = [r.descriptor(call.version) for r in self.app.resources if not r.is_template]
        listers = self.app.resource_listers
        for lister in listers:
            self._check_scopes(lister.scopes, call)
        ctx = self._context(call)

        async def gather() -> dict[str, Any]:
            items = list(fixed)
            for lister in listers:
                found = await invoke(lister.func, lister.signature, ctx, {})
                for entry in found or ():
                    if isinstance(entry, dict) and isinstance(entry.get("uri"), str):
                        items.append(dict(entry))
            return self._page(items, "resources", params)

        return Deferred.fromCoroutine(gather())

    def _templates_list(self, params: dict[str, Any], call: _Call) -> dict[str, Any]:
        items = [r.descriptor(call.version) for r in self.app.resources if r.is_template]
        return self._page(items, "resourceTemplates", params)

    def _find(self, params: dict[str, Any]) -> tuple[str, Any, dict[str, str]]:
        uri = params.get("uri")
        if not isinstance(uri, str):
            raise jsonrpc.invalid_params("uri must be a string")
        found = self.app.find_resource(uri)
        if found is None:
            raise JSONRPCError(jsonrpc.RESOURCE_NOT_FOUND, "Resource not found", {"uri": uri[:500]})
        return uri, found[0], found[1]

    def _resources_read(self, params: dict[str, Any], call: _Call) -> Deferred:
        uri, resource, arguments = self._find(params)
        self._check_scopes(resource.scopes, call)
        ctx = self._context(call)
        d = invoke(resource.func, resource.signature, ctx, arguments)

        def done(value: object) -> dict[str, Any]:
            if value is None:
                raise JSONRPCError(jsonrpc.RESOURCE_NOT_FOUND, "Resource not found", {"uri": uri[:500]})
            return {"contents": resource_contents(resource, uri, value)}

        return d.addCallback(done)

    def _subscribe(self, params: dict[str, Any], call: _Call) -> dict[str, Any]:
        uri, resource, _ = self._find(params)
        self._check_scopes(resource.scopes, call)
        self.subscriptions = self.subscriptions | {uri}
        return {}

    def _unsubscribe(self, params: dict[str, Any], call: _Call) -> dict[str, Any]:
        uri = params.get("uri")
        if not isinstance(uri, str):
            raise jsonrpc.invalid_params("uri must be a string")
        self.subscriptions = self.subscriptions - {uri}
        return {}

    def _prompts_list(self, params: dict[str, Any], call: _Call) -> dict[str, Any]:
        items = [p.descriptor(call.version) for p in self.app.prompts.values()]
        return self._page(items, "prompts", params)

    def _prompts_get(self, params: dict[str, Any], call: _Call) -> Deferred:
        name = params.get("name")
        if not isinstance(name, str):
            raise jsonrpc.invalid_params("name must be a string")
        prompt = self.app.prompts.get(name)
        if prompt is None:
            raise jsonrpc.invalid_params(f"Unknown prompt: {name[:100]}")
        self._check_scopes(prompt.scopes, call)
        arguments = params.get("arguments") or {}
        if not isinstance(arguments, dict) or not all(isinstance(v, str) for v in arguments.values()):
            raise jsonrpc.invalid_params("prompt arguments must be an object of strings")
        declared = prompt.signature.schema["properties"]
        for key in arguments:
            if key not in declared and not prompt.signature.accepts_kwargs:
                raise jsonrpc.invalid_params(f"Unknown argument: {key[:100]}")
        for key in prompt.signature.schema.get("required", ()):
            if key not in arguments:
                raise jsonrpc.invalid_params(f"Missing required argument: {key}")
        ctx = self._context(call)
        d = invoke(prompt.func, prompt.signature, ctx, arguments)

        def done(value: object) -> dict[str, Any]:
            try:
                return prompt_result(prompt, value, call.version)
            except TypeError:
                log.failure("Prompt {prompt} returned an unusable value", prompt=prompt.name)
                raise jsonrpc.internal_error()

        return d.addCallback(done)

    def _complete(self, params: dict[str, Any], call: _Call) -> Deferred:
        ref = params.get("ref")
        argument = params.get("argument")
        if not isinstance(ref, dict) or not isinstance(argument, dict):
            raise jsonrpc.invalid_params("ref and argument must be objects")
        kind = ref.get("type")
        if kind == "ref/prompt":
            key = ref.get("name")
            prompt = self.app.prompts.get(key) if isinstance(key, str) else None
            if prompt is None:
                raise jsonrpc.invalid_params("Unknown prompt")
            self._check_scopes(prompt.scopes, call)
        elif kind == "ref/resource":
            key = ref.get("uri")
            if not isinstance(key, str):
                raise jsonrpc.invalid_params("uri must be a string")
        else:
            raise jsonrpc.invalid_params("ref.type must be ref/prompt or ref/resource")
        name, value = argument.get("name"), argument.get("value", "")
        if not isinstance(name, str) or not isinstance(value, str):
            raise jsonrpc.invalid_params("argument name and value must be strings")
        provider = self.app.completions.get((key, name))  # type: ignore[arg-type]
        if provider is None:
            return succeed({"completion": {"values": [], "total": 0, "hasMore": False}})
        ctx = self._context(call)
        d = invoke(provider.func, provider.signature, ctx, {"value": value})

        def done(values: object) -> dict[str, Any]:
            found = [str(v) for v in (values or [])]  # type: ignore[attr-defined]
            return {"completion": {"values": found[:100], "total": len(found), "hasMore": len(found) > 100}}

        return d.addCallback(done)


_METHODS: dict[str, Callable[[ServerSession, dict[str, Any], _Call], Any]] = {
    "initialize": ServerSession._initialize,
    "server/discover": ServerSession._discover,
    "ping": ServerSession._ping,
    "logging/setLevel": ServerSession._set_level,
    "tools/list": ServerSession._tools_list,
    "tools/call": ServerSession._tools_call,
    "resources/list": ServerSession._resources_list,
    "resources/templates/list": ServerSession._templates_list,
    "resources/read": ServerSession._resources_read,
    "resources/subscribe": ServerSession._subscribe,
    "resources/unsubscribe": ServerSession._unsubscribe,
    "prompts/list": ServerSession._prompts_list,
    "prompts/get": ServerSession._prompts_get,
    "completion/complete": ServerSession._complete,
}
