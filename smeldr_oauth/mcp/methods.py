# -*- test-case-name: tests.test_mcp_session -*-
"""
The MCP methods a server answers, one function each, and the table that
names them.

A handler takes the L{ServerSession}, the request's C{params} and its
L{Call} (caller, version, outlet), and returns a result dictionary or a
L{Deferred} of one, or raises a L{JSONRPCError}.  Handlers change session
state only through the session's own methods (C{initialized_as},
C{set_log_level}, C{subscribe}, C{unsubscribe}), so that every change is
one the session can write back to its record.
"""

from __future__ import annotations

import base64
import binascii
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from smeldr_oauth.db.errors import StoreUnavailable, log_failure
from smeldr_oauth.mcp import jsonrpc
from smeldr_oauth.mcp.app import MCPApp, invoke
from smeldr_oauth.mcp.calls import UNAVAILABLE, outcome_now
from smeldr_oauth.mcp.context import LOG_LEVELS, Context, ToolError
from smeldr_oauth.mcp.jsonrpc import InsufficientScope, JSONRPCError, Message, Request
from smeldr_oauth.mcp.results import error_result, prompt_result, resource_contents, tool_result
from smeldr_oauth.mcp.versions import LATEST_SESSION_VERSION, MODERN_VERSIONS, SESSION_VERSIONS
from smeldr_oauth.oauth.routine import routine

if TYPE_CHECKING:
    from smeldr_oauth.mcp.calls import Call
    from smeldr_oauth.mcp.session import ServerSession

log = Logger()

_T = TypeVar("_T")


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


def needed_scopes(app: MCPApp, message: Message) -> tuple[str, ...]:
    """
    The scopes C{message} needs, as the handlers below will check them, so
    that a transport can refuse it with HTTP 403 before dispatching.
    """
    if not isinstance(message, Request):
        return ()
    params = message.params
    if message.method == "tools/call":
        name = params.get("name")
        tool = app.tools.get(name) if isinstance(name, str) else None
        return tool.scopes if tool else ()
    if message.method == "prompts/get":
        name = params.get("name")
        prompt = app.prompts.get(name) if isinstance(name, str) else None
        return prompt.scopes if prompt else ()
    if message.method in ("resources/read", "resources/subscribe"):
        uri = params.get("uri")
        found = app.find_resource(uri) if isinstance(uri, str) else None
        return found[0].scopes if found else ()
    if message.method == "resources/list":
        needed: list[str] = []
        for lister in app.resource_listers:
            needed.extend(s for s in lister.scopes if s not in needed)
        return tuple(needed)
    return ()


def check_scopes(needed: tuple[str, ...], call: "Call") -> None:
    """
    @raise InsufficientScope: the caller's token lacks one of C{needed}.
    """
    if needed and not set(needed) <= call.principal.scopes:
        log.info(
            "MCP call refused: {subject} via {client_id} lacks scopes {scopes}",
            subject=call.principal.subject,
            client_id=call.principal.client_id,
            scopes=" ".join(needed),
        )
        raise InsufficientScope(needed)


def context_for(session: "ServerSession", call: "Call") -> Context:
    """The L{Context} a handler of C{call} receives."""
    ctx = Context(
        session=session,
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


def initialize(session: "ServerSession", params: dict[str, Any], call: "Call") -> dict[str, Any]:
    if session.state != "new":
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
    session.initialized_as(version, capabilities, client_info)
    log.info(
        "MCP session {session_id} initialized at {version} for {subject}",
        # A prefix is enough to correlate log lines.
        session_id=(session.session_id or "-")[:8],
        version=version,
        subject=call.principal.subject,
        client_id=call.principal.client_id, grant_id=call.principal.grant_id, smeldr_event="mcp_initialize",
    )
    result: dict[str, Any] = {
        "protocolVersion": version,
        "capabilities": session.app.capabilities(),
        "serverInfo": {"name": session.app.name, "version": session.app.version},
    }
    if session.app.instructions:
        result["instructions"] = session.app.instructions
    return result


def discover(session: "ServerSession", params: dict[str, Any], call: "Call") -> dict[str, Any]:
    result: dict[str, Any] = {
        "supportedVersions": list(MODERN_VERSIONS),
        "capabilities": _modern_capabilities(session.app),
        "serverInfo": {"name": session.app.name, "version": session.app.version},
    }
    if session.app.instructions:
        result["instructions"] = session.app.instructions
    return result


def _modern_capabilities(app: MCPApp) -> dict[str, Any]:
    caps = app.capabilities()
    caps.pop("logging", None)
    if "resources" in caps:
        caps["resources"] = {}
    for key in ("tools", "prompts"):
        if key in caps:
            caps[key] = {}
    return caps


def ping(session: "ServerSession", params: dict[str, Any], call: "Call") -> dict[str, Any]:
    return {}


def set_level(session: "ServerSession", params: dict[str, Any], call: "Call") -> dict[str, Any]:
    level = params.get("level")
    if level not in LOG_LEVELS:
        raise jsonrpc.invalid_params("level must be one of " + ", ".join(LOG_LEVELS))
    session.set_log_level(level)
    return {}


def _page(app: MCPApp, items: list[dict[str, Any]], key: str, params: dict[str, Any]) -> dict[str, Any]:
    offset = _decode_cursor(params.get("cursor"))
    if offset > len(items):
        raise jsonrpc.invalid_params("Invalid cursor")
    end = offset + app.page_size
    result: dict[str, Any] = {key: items[offset:end]}
    if end < len(items):
        result["nextCursor"] = _encode_cursor(end)
    return result


def tools_list(session: "ServerSession", params: dict[str, Any], call: "Call") -> dict[str, Any]:
    # Every tool is listed whatever the caller's scopes, so a client can
    # see what it could do after stepping up.
    items = [tool.descriptor(call.version) for tool in session.app.tools.values()]
    return _page(session.app, items, "tools", params)


def _named(registry: dict[str, _T], kind: str, params: dict[str, Any], call: "Call") -> _T:
    """The tool or prompt C{params["name"]} names, if the caller may use it."""
    name = params.get("name")
    if not isinstance(name, str):
        raise jsonrpc.invalid_params("name must be a string")
    found = registry.get(name)
    if found is None:
        raise jsonrpc.invalid_params(f"Unknown {kind}: {name[:100]}")
    check_scopes(found.scopes, call)  # type: ignore[attr-defined]
    return found


def tools_call(session: "ServerSession", params: dict[str, Any], call: "Call") -> Any:
    tool = _named(session.app.tools, "tool", params, call)
    arguments = params.get("arguments")
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        raise jsonrpc.invalid_params("arguments must be an object")
    problem = tool.validator.problem(arguments)
    if problem is not None:
        if call.version >= "2025-11-25":
            # Since 2025-11-25 input errors are tool errors, so the
            # model can read them and correct its call.
            return succeed(error_result(f"Invalid arguments: {problem}"))
        raise jsonrpc.invalid_params(f"Invalid arguments: {problem}")
    ctx = context_for(session, call)
    d = invoke(tool.func, tool.signature, ctx, arguments)
    settled = outcome_now(d)
    if settled:
        # The tool has answered already (SQLite on the reactor thread):
        # the result itself, with no callbacks chained to a fired Deferred.
        return _tool_called(settled[0], tool, call)
    return d.addBoth(_tool_called, tool, call)


def _tool_called(result: object, tool: Any, call: "Call") -> dict[str, Any]:
    """
    The C{CallToolResult} of a tool that ended with C{result} (a value or
    a L{Failure}), counted; raises what the caller must answer as a
    JSON-RPC error (a cancellation, a step-up).
    """
    try:
        answer = _tool_answer(result, tool, call)
    except BaseException:
        _count_call(tool, call, "error")
        raise
    _count_call(tool, call, "tool_error" if answer.get("isError") else "ok")
    return answer


def _tool_answer(result: object, tool: Any, call: "Call") -> dict[str, Any]:
    if not isinstance(result, Failure):
        return tool_result(tool, result, call.version)
    failure = result
    if failure.check(CancelledError) and call.cancelled:
        failure.raiseException()
    if failure.check(ToolError):
        return error_result(str(failure.value) or "Tool error")
    if failure.check(InsufficientScope):
        failure.raiseException()
    if failure.check(JSONRPCError):
        return error_result(failure.value.message)  # type: ignore[union-attr]
    log_failure(failure, "Tool {tool} failed", tool=tool.name)
    if failure.check(StoreUnavailable):
        return error_result(UNAVAILABLE)
    return error_result("Tool execution failed")


def _count_call(tool: Any, call: "Call", outcome: str) -> None:
    # A call that went well is routine: a debug event, as token issues
    # are (formatting an info line for each was a seventh of a
    # tools/call's CPU), handed to the metrics and the timeline directly
    # and through the log only when someone keeps debug events here
    # (smeldr_oauth.oauth.routine).  Calls that failed stay at info.
    principal = call.principal
    routine.emit(
        log,
        LogLevel.debug if outcome == "ok" else LogLevel.info,
        "tool {tool} called by {subject}: {outcome}",
        tool=tool.name,
        subject=principal.subject if principal is not None else None,
        outcome=outcome,
        smeldr_event="mcp_call",
        client_id=principal.client_id if principal is not None else None,
        grant_id=principal.grant_id if principal is not None else None,
        version=call.version,
    )


def resources_list(session: "ServerSession", params: dict[str, Any], call: "Call") -> Deferred:
    fixed = [r.descriptor(call.version) for r in session.app.resources if not r.is_template]
    listers = session.app.resource_listers
    for lister in listers:
        check_scopes(lister.scopes, call)
    ctx = context_for(session, call)

    async def gather() -> dict[str, Any]:
        items = list(fixed)
        for lister in listers:
            found = await invoke(lister.func, lister.signature, ctx, {})
            for entry in found or ():
                if isinstance(entry, dict) and isinstance(entry.get("uri"), str):
                    items.append(dict(entry))
        return _page(session.app, items, "resources", params)

    return Deferred.fromCoroutine(gather())


def templates_list(session: "ServerSession", params: dict[str, Any], call: "Call") -> dict[str, Any]:
    items = [r.descriptor(call.version) for r in session.app.resources if r.is_template]
    return _page(session.app, items, "resourceTemplates", params)


def _find(app: MCPApp, params: dict[str, Any]) -> tuple[str, Any, dict[str, str]]:
    uri = params.get("uri")
    if not isinstance(uri, str):
        raise jsonrpc.invalid_params("uri must be a string")
    found = app.find_resource(uri)
    if found is None:
        raise JSONRPCError(jsonrpc.RESOURCE_NOT_FOUND, "Resource not found", {"uri": uri[:500]})
    return uri, found[0], found[1]


def resources_read(session: "ServerSession", params: dict[str, Any], call: "Call") -> Deferred:
    uri, resource, arguments = _find(session.app, params)
    check_scopes(resource.scopes, call)
    ctx = context_for(session, call)
    d = invoke(resource.func, resource.signature, ctx, arguments)

    def done(value: object) -> dict[str, Any]:
        if value is None:
            raise JSONRPCError(jsonrpc.RESOURCE_NOT_FOUND, "Resource not found", {"uri": uri[:500]})
        return {"contents": resource_contents(resource, uri, value)}

    return d.addCallback(done)


def subscribe(session: "ServerSession", params: dict[str, Any], call: "Call") -> dict[str, Any]:
    uri, resource, _ = _find(session.app, params)
    check_scopes(resource.scopes, call)
    session.subscribe(uri)
    return {}


def unsubscribe(session: "ServerSession", params: dict[str, Any], call: "Call") -> dict[str, Any]:
    uri = params.get("uri")
    if not isinstance(uri, str):
        raise jsonrpc.invalid_params("uri must be a string")
    session.unsubscribe(uri)
    return {}


def prompts_list(session: "ServerSession", params: dict[str, Any], call: "Call") -> dict[str, Any]:
    items = [p.descriptor(call.version) for p in session.app.prompts.values()]
    return _page(session.app, items, "prompts", params)


def prompts_get(session: "ServerSession", params: dict[str, Any], call: "Call") -> Deferred:
    prompt = _named(session.app.prompts, "prompt", params, call)
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
    ctx = context_for(session, call)
    d = invoke(prompt.func, prompt.signature, ctx, arguments)

    def done(value: object) -> dict[str, Any]:
        try:
            return prompt_result(prompt, value, call.version)
        except TypeError:
            log.failure("Prompt {prompt} returned an unusable value", prompt=prompt.name)
            raise jsonrpc.internal_error()

    return d.addCallback(done)


def complete(session: "ServerSession", params: dict[str, Any], call: "Call") -> Deferred:
    ref = params.get("ref")
    argument = params.get("argument")
    if not isinstance(ref, dict) or not isinstance(argument, dict):
        raise jsonrpc.invalid_params("ref and argument must be objects")
    kind = ref.get("type")
    if kind == "ref/prompt":
        key = ref.get("name")
        prompt = session.app.prompts.get(key) if isinstance(key, str) else None
        if prompt is None:
            raise jsonrpc.invalid_params("Unknown prompt")
        check_scopes(prompt.scopes, call)
    elif kind == "ref/resource":
        key = ref.get("uri")
        if not isinstance(key, str):
            raise jsonrpc.invalid_params("uri must be a string")
    else:
        raise jsonrpc.invalid_params("ref.type must be ref/prompt or ref/resource")
    name, value = argument.get("name"), argument.get("value", "")
    if not isinstance(name, str) or not isinstance(value, str):
        raise jsonrpc.invalid_params("argument name and value must be strings")
    provider = session.app.completions.get((key, name))  # type: ignore[arg-type]
    if provider is None:
        return succeed({"completion": {"values": [], "total": 0, "hasMore": False}})
    ctx = context_for(session, call)
    d = invoke(provider.func, provider.signature, ctx, {"value": value})

    def done(values: object) -> dict[str, Any]:
        found = [str(v) for v in (values or [])]  # type: ignore[attr-defined]
        return {"completion": {"values": found[:100], "total": len(found), "hasMore": len(found) > 100}}

    return d.addCallback(done)


METHODS: dict[str, Callable[["ServerSession", dict[str, Any], "Call"], Any]] = {
    "initialize": initialize,
    "server/discover": discover,
    "ping": ping,
    "logging/setLevel": set_level,
    "tools/list": tools_list,
    "tools/call": tools_call,
    "resources/list": resources_list,
    "resources/templates/list": templates_list,
    "resources/read": resources_read,
    "resources/subscribe": subscribe,
    "resources/unsubscribe": unsubscribe,
    "prompts/list": prompts_list,
    "prompts/get": prompts_get,
    "completion/complete": complete,
}
