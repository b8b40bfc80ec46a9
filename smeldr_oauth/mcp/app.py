# -*- test-case-name: tests.test_mcp_app -*-
"""
The tool-author API: L{MCPApp} registers tools, resources, prompts and
completions; L{Context} is what a handler sees of its caller and of the
session; the content records are what a tool may return.

Nothing here knows about a transport: L{smeldr_oauth.mcp.session} calls the
registries and turns their results into protocol messages.
"""

from __future__ import annotations

import base64
import inspect
import json
import re
import types
import typing
import weakref
from typing import Any, Callable, Iterable, Literal, Optional, Union

import attr
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger


log = Logger()

JSONValue = Any


class ToolError(Exception):
    """
    Raised by a tool to report a failure the model should see: the call
    answers with C{isError: true} and this message as text content.
    """


# --------------------------------------------------------------------------
# Content records


def _b64(data: Union[bytes, str]) -> str:
    if isinstance(data, bytes):
        return base64.b64encode(data).decode("ascii")
    return data


def _common(body: dict[str, JSONValue], annotations: Optional[dict], meta: Optional[dict]) -> dict:
    if annotations:
        body["annotations"] = annotations
    if meta:
        body["_meta"] = meta
    return body


@attr.s(frozen=True, auto_attribs=True)
class TextContent:
    text: str
    annotations: Optional[dict] = None
    meta: Optional[dict] = None

    def as_json(self) -> dict[str, JSONValue]:
        return _common({"type": "text", "text": self.text}, self.annotations, self.meta)


@attr.s(frozen=True, auto_attribs=True)
class ImageContent:
    """An image; C{data} is raw bytes or already-base64 text."""

    data: Union[bytes, str]
    mime_type: str
    annotations: Optional[dict] = None
    meta: Optional[dict] = None

    def as_json(self) -> dict[str, JSONValue]:
        return _common(
            {"type": "image", "data": _b64(self.data), "mimeType": self.mime_type},
            self.annotations,
            self.meta,
        )


@attr.s(frozen=True, auto_attribs=True)
class AudioContent:
    """Audio; C{data} is raw bytes or already-base64 text."""

    data: Union[bytes, str]
    mime_type: str
    annotations: Optional[dict] = None
    meta: Optional[dict] = None

    def as_json(self) -> dict[str, JSONValue]:
        return _common(
            {"type": "audio", "data": _b64(self.data), "mimeType": self.mime_type},
            self.annotations,
            self.meta,
        )


@attr.s(frozen=True, auto_attribs=True)
class EmbeddedResource:
    """The contents of a resource, inline: C{text} or C{blob} (bytes)."""

    uri: str
    mime_type: Optional[str] = None
    text: Optional[str] = None
    blob: Optional[bytes] = None
    annotations: Optional[dict] = None
    meta: Optional[dict] = None

    def as_json(self) -> dict[str, JSONValue]:
        resource: dict[str, JSONValue] = {"uri": self.uri}
        if self.mime_type:
            resource["mimeType"] = self.mime_type
        if self.blob is not None:
            resource["blob"] = _b64(self.blob)
        else:
            resource["text"] = self.text or ""
        return _common({"type": "resource", "resource": resource}, self.annotations, self.meta)


@attr.s(frozen=True, auto_attribs=True)
class ResourceLink:
    """A pointer to a resource the client may read later."""

    uri: str
    name: str
    title: Optional[str] = None
    description: Optional[str] = None
    mime_type: Optional[str] = None
    size: Optional[int] = None
    annotations: Optional[dict] = None
    meta: Optional[dict] = None

    def as_json(self) -> dict[str, JSONValue]:
        body: dict[str, JSONValue] = {"type": "resource_link", "uri": self.uri, "name": self.name}
        for key, value in (
            ("title", self.title),
            ("description", self.description),
            ("mimeType", self.mime_type),
            ("size", self.size),
        ):
            if value is not None:
                body[key] = value
        return _common(body, self.annotations, self.meta)


CONTENT_TYPES = (TextContent, ImageContent, AudioContent, EmbeddedResource, ResourceLink)


# --------------------------------------------------------------------------
# Context


class Context:
    """
    What a handler knows about its call: who is calling (from the access
    token of I{this} request, so a refreshed token's scopes apply at
    once), which session and request, and ways to talk back to the client.

    The awaitables return L{Deferred}s, so plain functions can add
    callbacks to them and C{async def} handlers can C{await} them.

    @ivar cancelled: set when the client cancels this request.
    """

    def __init__(
        self,
        *,
        session: Any,
        subject: str,
        client_id: Optional[str],
        scopes: frozenset[str],
        request_id: Any,
        protocol_version: Optional[str],
        outlet: Any,
        progress_token: Any = None,
        log_level: Optional[str] = "session",
    ) -> None:
        self._session = session
        self._outlet = outlet
        self._progress_token = progress_token
        self._log_level = log_level
        self.subject = subject
        self.client_id = client_id
        self.scopes = scopes
        self.session_id = getattr(session, "session_id", None)
        self.request_id = request_id
        self.protocol_version = protocol_version
        self.cancelled = False

    def report_progress(
        self, progress: float, total: Optional[float] = None, message: Optional[str] = None
    ) -> Deferred:
        """
        Send C{notifications/progress} for this request, if the client
        asked for progress (sent a C{progressToken}); otherwise do nothing.
        """
        if self._progress_token is not None and not self.cancelled:
            params: dict[str, JSONValue] = {"progressToken": self._progress_token, "progress": progress}
            if total is not None:
                params["total"] = total
            if message is not None:
                params["message"] = message
            self._session.notify(self._outlet, "notifications/progress", params)
        return succeed(None)

    def log(self, level: str, data: JSONValue, logger: Optional[str] = None) -> Deferred:
        """
        Send C{notifications/message} when C{level} reaches the level the
        client chose (C{logging/setLevel}, or the 2026-07-28 per-request
        C{io.modelcontextprotocol/logLevel}).
        """
        if level not in LOG_LEVELS:
            return fail(ValueError(f"unknown log level {level!r}"))
        # "session": the level set by logging/setLevel; None: send nothing.
        threshold = self._session.log_level if self._log_level == "session" else self._log_level
        if threshold is not None and LOG_LEVELS.index(level) >= LOG_LEVELS.index(threshold):
            params: dict[str, JSONValue] = {"level": level, "data": data}
            if logger is not None:
                params["logger"] = logger
            self._session.notify(self._outlet, "notifications/message", params)
        return succeed(None)

    def sample(self, messages: list, max_tokens: int, **kw: Any) -> Deferred:
        """Ask the client's model for a completion (C{sampling/createMessage})."""
        params = {"messages": messages, "maxTokens": max_tokens}
        params.update(kw)
        return self._session.client_request(self._outlet, "sampling/createMessage", params, "sampling")

    def elicit(self, message: str, requested_schema: dict) -> Deferred:
        """Ask the user for structured input (C{elicitation/create})."""
        params = {"message": message, "requestedSchema": requested_schema}
        return self._session.client_request(self._outlet, "elicitation/create", params, "elicitation")

    def list_roots(self) -> Deferred:
        """The client's roots (C{roots/list}), as a list of dicts."""
        d = self._session.client_request(self._outlet, "roots/list", {}, "roots")
        return d.addCallback(lambda result: list((result or {}).get("roots", [])))


LOG_LEVELS = ("debug", "info", "notice", "warning", "error", "critical", "alert", "emergency")


# --------------------------------------------------------------------------
# Schemas from type hints

_NONE = type(None)


def _is_typeddict(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, dict) and hasattr(tp, "__required_keys__")


def schema_for(tp: Any) -> dict[str, JSONValue]:
    """
    A JSON Schema for a Python annotation.  Unknown annotations give the
    empty schema (anything), never an error: a tool author's exotic type
    must not stop the server from starting.
    """
    if tp is inspect.Parameter.empty or tp is Any:
        return {}
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Annotated:
        schema = dict(schema_for(args[0]))
        for extra in args[1:]:
            if isinstance(extra, str):
                schema["description"] = extra
        return schema
    if tp is str:
        return {"type": "string"}
    if tp is bool:
        return {"type": "boolean"}
    if tp is int:
        return {"type": "integer"}
    if tp is float:
        return {"type": "number"}
    if tp is _NONE or tp is None:
        return {"type": "null"}
    if tp is dict or origin is dict:
        schema = {"type": "object"}
        if len(args) == 2 and args[1] is not Any:
            schema["additionalProperties"] = schema_for(args[1])
        return schema
    if tp in (list, tuple, set, frozenset) or origin in (list, tuple, set, frozenset, typing.Sequence):
        schema = {"type": "array"}
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            schema["prefixItems"] = [schema_for(a) for a in args]
            schema["minItems"] = schema["maxItems"] = len(args)
        elif args:
            schema["items"] = schema_for(args[0])
        return schema
    if origin is Literal:
        values = list(args)
        schema = {"enum": values}
        kinds = {type(v) for v in values}
        names = {str: "string", int: "integer", bool: "boolean", float: "number"}
        if len(kinds) == 1 and next(iter(kinds)) in names:
            schema["type"] = names[next(iter(kinds))]
        return schema
    if origin is Union or origin is types.UnionType:
        members = [schema_for(a) for a in args]
        if all(set(m) == {"type"} and isinstance(m["type"], str) for m in members):
            return {"type": [m["type"] for m in members]}
        return {"anyOf": members}
    if _is_typeddict(tp):
        hints = typing.get_type_hints(tp, include_extras=True)
        return {
            "type": "object",
            "properties": {k: schema_for(v) for k, v in hints.items()},
            "required": sorted(tp.__required_keys__),
        }
    return {}


def _jsonable(value: object) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _wants_context(param: inspect.Parameter, hint: Any) -> bool:
    return hint is Context or param.name == "ctx"


@attr.s(auto_attribs=True)
class _Signature:
    """What L{_inspect} learnt about a handler."""

    wants_context: bool
    schema: dict[str, JSONValue]
    params: list[str]
    accepts_kwargs: bool
    return_hint: Any


def _inspect(func: Callable) -> _Signature:
    sig = inspect.signature(func)
    try:
        hints = typing.get_type_hints(func, include_extras=True)
    except Exception:
        # Unresolvable forward references: fall back to the raw annotations.
        hints = {name: p.annotation for name, p in sig.parameters.items()}
    params = list(sig.parameters.values())
    wants_context = False
    if params and params[0].kind in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD):
        if _wants_context(params[0], hints.get(params[0].name)):
            wants_context = True
            params = params[1:]
    properties: dict[str, JSONValue] = {}
    required: list[str] = []
    names: list[str] = []
    accepts_kwargs = False
    for p in params:
        if p.kind is p.VAR_KEYWORD:
            accepts_kwargs = True
            continue
        if p.kind is p.VAR_POSITIONAL:
            continue
        names.append(p.name)
        prop = dict(schema_for(hints.get(p.name, p.annotation)))
        if p.default is p.empty:
            required.append(p.name)
        elif _jsonable(p.default):
            prop["default"] = p.default
        properties[p.name] = prop
    schema: dict[str, JSONValue] = {"type": "object", "properties": properties}
    if not accepts_kwargs:
        # Undeclared arguments are refused rather than silently dropped: a
        # misspelt optional argument should not look like a success.
        schema["additionalProperties"] = False
    if required:
        schema["required"] = required
    return _Signature(wants_context, schema, names, accepts_kwargs, hints.get("return", sig.return_annotation))


# --------------------------------------------------------------------------
# A small validator for the schemas above (and simple hand-written ones)

_TYPE_CHECKS: dict[str, Callable[[object], bool]] = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool)
    or (isinstance(v, float) and v.is_integer()),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
}


def validate(value: object, schema: dict, path: str = "") -> Optional[str]:
    """
    Check C{value} against the subset of JSON Schema that hints produce
    (type, enum, const, properties, required, additionalProperties, items,
    prefixItems, anyOf/oneOf).  Unknown keywords are ignored.

    @return: C{None} when valid, else a short message naming the path.
    """
    where = path or "arguments"
    if not isinstance(schema, dict):
        return None
    kind = schema.get("type")
    if kind is not None:
        kinds = kind if isinstance(kind, list) else [kind]
        if not any(_TYPE_CHECKS.get(k, lambda v: True)(value) for k in kinds):
            return f"{where}: expected {' or '.join(map(str, kinds))}"
    if "enum" in schema and value not in schema["enum"]:
        return f"{where}: must be one of {schema['enum']!r}"[:300]
    if "const" in schema and value != schema["const"]:
        return f"{where}: must be {schema['const']!r}"[:300]
    for key in ("anyOf", "oneOf"):
        if key in schema and isinstance(schema[key], list):
            if all(validate(value, sub, path) is not None for sub in schema[key]):
                return f"{where}: matches none of the allowed types"
    if isinstance(value, dict):
        properties = schema.get("properties") or {}
        for name in schema.get("required") or ():
            if name not in value:
                return f"{where}: missing required argument {name!r}"[:300]
        extra = schema.get("additionalProperties", True)
        for name, item in value.items():
            sub_path = f"{path}.{name}" if path else name
            if name in properties:
                error = validate(item, properties[name], sub_path)
            elif extra is False:
                error = f"{where}: unexpected argument {name!r}"[:300]
            elif isinstance(extra, dict):
                error = validate(item, extra, sub_path)
            else:
                error = None
            if error:
                return error
    if isinstance(value, list):
        prefix = schema.get("prefixItems")
        if isinstance(prefix, list):
            for i, (item, sub) in enumerate(zip(value, prefix)):
                error = validate(item, sub, f"{where}[{i}]")
                if error:
                    return error
        elif isinstance(schema.get("items"), dict):
            for i, item in enumerate(value):
                error = validate(item, schema["items"], f"{where}[{i}]")
                if error:
                    return error
        if "minItems" in schema and len(value) < schema["minItems"]:
            return f"{where}: too few items"
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            return f"{where}: too many items"
    return None


# --------------------------------------------------------------------------
# Registrations


def _call(func: Callable, *args: Any, **kwargs: Any) -> Deferred:
    """
    Run a handler that may be a plain function, return a L{Deferred}, or be
    C{async def}, and always get a L{Deferred}.
    """
    try:
        result = func(*args, **kwargs)
    except BaseException:
        return fail()
    if inspect.iscoroutine(result):
        return Deferred.fromCoroutine(result)
    if isinstance(result, Deferred):
        return result
    if inspect.isawaitable(result):
        async def _await() -> Any:
            return await result

        return Deferred.fromCoroutine(_await())
    return succeed(result)


@attr.s(auto_attribs=True)
class Tool:
    name: str
    func: Callable
    title: Optional[str]
    description: Optional[str]
    scopes: tuple[str, ...]
    input_schema: dict
    output_schema: Optional[dict]
    annotations: Optional[dict]
    signature: _Signature
    structured: bool

    def descriptor(self, version: str) -> dict[str, JSONValue]:
        body: dict[str, JSONValue] = {"name": self.name, "inputSchema": self.input_schema}
        if self.description:
            body["description"] = self.description
        modern = version >= "2025-06-18"
        if self.title and modern:
            body["title"] = self.title
        if self.output_schema is not None and modern:
            body["outputSchema"] = self.output_schema
        if self.annotations and version >= "2025-03-26":
            body["annotations"] = self.annotations
        if self.scopes:
            # Clients ignore unknown _meta keys; humans debugging a 403 do not.
            body["_meta"] = {"smeldr/scopes": list(self.scopes)}
        return body


@attr.s(auto_attribs=True)
class Resource:
    uri: str
    name: str
    func: Callable
    title: Optional[str]
    description: Optional[str]
    mime_type: Optional[str]
    scopes: tuple[str, ...]
    signature: _Signature
    pattern: Optional[re.Pattern] = None
    variables: tuple[str, ...] = ()

    @property
    def is_template(self) -> bool:
        return self.pattern is not None

    def descriptor(self, version: str) -> dict[str, JSONValue]:
        body: dict[str, JSONValue] = {"name": self.name}
        body["uriTemplate" if self.is_template else "uri"] = self.uri
        if self.title and version >= "2025-06-18":
            body["title"] = self.title
        if self.description:
            body["description"] = self.description
        if self.mime_type:
            body["mimeType"] = self.mime_type
        return body

    def match(self, uri: str) -> Optional[dict[str, str]]:
        if self.pattern is None:
            return {} if uri == self.uri else None
        found = self.pattern.fullmatch(uri)
        if found is None:
            return None
        from urllib.parse import unquote

        return {k: unquote(v) for k, v in found.groupdict().items()}


@attr.s(auto_attribs=True)
class ResourceLister:
    func: Callable
    scopes: tuple[str, ...]
    signature: _Signature


@attr.s(auto_attribs=True)
class Prompt:
    name: str
    func: Callable
    title: Optional[str]
    description: Optional[str]
    scopes: tuple[str, ...]
    signature: _Signature

    def descriptor(self, version: str) -> dict[str, JSONValue]:
        body: dict[str, JSONValue] = {"name": self.name}
        if self.title and version >= "2025-06-18":
            body["title"] = self.title
        if self.description:
            body["description"] = self.description
        required = set(self.signature.schema.get("required", ()))
        arguments = []
        for name, schema in self.signature.schema["properties"].items():
            argument: dict[str, JSONValue] = {"name": name, "required": name in required}
            if "description" in schema:
                argument["description"] = schema["description"]
            arguments.append(argument)
        body["arguments"] = arguments
        return body


@attr.s(auto_attribs=True)
class Completion:
    func: Callable
    signature: _Signature


_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _template_pattern(uri: str) -> tuple[re.Pattern, tuple[str, ...]]:
    """
    An RFC 6570 level-1 template (C{{name}} placeholders) as a regex: a
    placeholder matches one non-empty path segment.
    """
    parts: list[str] = []
    names: list[str] = []
    position = 0
    for found in _PLACEHOLDER.finditer(uri):
        parts.append(re.escape(uri[position : found.start()]))
        parts.append(f"(?P<{found.group(1)}>[^/?#]+)")
        names.append(found.group(1))
        position = found.end()
    parts.append(re.escape(uri[position:]))
    return re.compile("".join(parts)), tuple(names)


def _first_line(text: Optional[str]) -> Optional[str]:
    if not text:
        return None
    return inspect.cleandoc(text).strip() or None


class MCPApp:
    """
    A set of tools, resources and prompts, independent of any transport.

    @ivar page_size: how many items one C{*/list} page holds before a
        C{nextCursor} is given.
    """

    def __init__(
        self,
        name: str = "smeldr",
        version: str = "0.1.0",
        instructions: Optional[str] = None,
        *,
        page_size: int = 50,
    ) -> None:
        self.name = name
        self.version = version
        self.instructions = instructions
        self.page_size = page_size
        self.tools: dict[str, Tool] = {}
        self.resources: list[Resource] = []
        self.resource_listers: list[ResourceLister] = []
        self.prompts: dict[str, Prompt] = {}
        self.completions: dict[tuple[str, str], Completion] = {}
        self._sessions: "weakref.WeakSet[Any]" = weakref.WeakSet()

    # -- registration ------------------------------------------------------

    def tool(
        self,
        name: Optional[str] = None,
        title: Optional[str] = None,
        description: Optional[str] = None,
        scopes: Iterable[str] = ("read",),
        input_schema: Optional[dict] = None,
        output_schema: Optional[dict] = None,
        annotations: Optional[dict] = None,
    ) -> Callable[[Callable], Callable]:
        def register(func: Callable) -> Callable:
            signature = _inspect(func)
            tool_name = name or func.__name__
            out = output_schema
            structured = out is not None
            if out is None:
                hint = signature.return_hint
                if hint is dict or typing.get_origin(hint) is dict:
                    out, structured = {"type": "object"}, True
                elif _is_typeddict(hint):
                    out, structured = schema_for(hint), True
            self.tools[tool_name] = Tool(
                name=tool_name,
                func=func,
                title=title,
                description=description or _first_line(func.__doc__),
                scopes=tuple(scopes),
                input_schema=input_schema if input_schema is not None else signature.schema,
                output_schema=out,
                annotations=annotations,
                signature=signature,
                structured=structured,
            )
            return func

        return register

    def resource(
        self,
        uri: str,
        name: Optional[str] = None,
        title: Optional[str] = None,
        description: Optional[str] = None,
        mime_type: Optional[str] = "text/plain",
        scopes: Iterable[str] = ("read",),
    ) -> Callable[[Callable], Callable]:
        def register(func: Callable) -> Callable:
            resource = Resource(
                uri=uri,
                name=name or func.__name__,
                func=func,
                title=title,
                description=description or _first_line(func.__doc__),
                mime_type=mime_type,
                scopes=tuple(scopes),
                signature=_inspect(func),
            )
            if _PLACEHOLDER.search(uri):
                resource.pattern, resource.variables = _template_pattern(uri)
            self.resources.append(resource)
            return func

        return register

    def resource_list(self, scopes: Iterable[str] = ("read",)) -> Callable[[Callable], Callable]:
        def register(func: Callable) -> Callable:
            self.resource_listers.append(ResourceLister(func, tuple(scopes), _inspect(func)))
            return func

        return register

    def prompt(
        self,
        name: Optional[str] = None,
        title: Optional[str] = None,
        description: Optional[str] = None,
        scopes: Iterable[str] = ("read",),
    ) -> Callable[[Callable], Callable]:
        def register(func: Callable) -> Callable:
            prompt_name = name or func.__name__
            self.prompts[prompt_name] = Prompt(
                name=prompt_name,
                func=func,
                title=title,
                description=description or _first_line(func.__doc__),
                scopes=tuple(scopes),
                signature=_inspect(func),
            )
            return func

        return register

    def completion(self, ref: str, argument: str) -> Callable[[Callable], Callable]:
        """
        Register a completion provider for argument C{argument} of the
        prompt named C{ref} or the resource template whose URI is C{ref}.
        """

        def register(func: Callable) -> Callable:
            self.completions[(ref, argument)] = Completion(func, _inspect(func))
            return func

        return register

    # -- notifications -----------------------------------------------------

    def attach(self, session: Any) -> None:
        """Called by a session when it starts, so notifications reach it."""
        self._sessions.add(session)

    def detach(self, session: Any) -> None:
        self._sessions.discard(session)

    def notify_resource_updated(self, uri: str) -> None:
        """Tell every session subscribed to C{uri} that it changed."""
        for session in list(self._sessions):
            session.resource_updated(uri)

    def notify_list_changed(self, kind: str) -> None:
        """Tell every session that the list of C{kind} changed."""
        if kind not in ("tools", "resources", "prompts"):
            raise ValueError(f"unknown list kind {kind!r}")
        for session in list(self._sessions):
            session.list_changed(kind)

    # -- queries used by the session -----------------------------------------

    def all_scopes(self) -> frozenset[str]:
        """Every scope any registration names: what a trusted local caller holds."""
        found: set[str] = set()
        for group in (self.tools.values(), self.resources, self.resource_listers, self.prompts.values()):
            for item in group:
                found.update(item.scopes)
        return frozenset(found)

    def find_resource(self, uri: str) -> Optional[tuple[Resource, dict[str, str]]]:
        for resource in self.resources:
            if not resource.is_template:
                args = resource.match(uri)
                if args is not None:
                    return resource, args
        for resource in self.resources:
            if resource.is_template:
                args = resource.match(uri)
                if args is not None:
                    return resource, args
        return None

    def capabilities(self) -> dict[str, JSONValue]:
        caps: dict[str, JSONValue] = {"logging": {}}
        if self.tools:
            caps["tools"] = {"listChanged": True}
        if self.resources or self.resource_listers:
            caps["resources"] = {"subscribe": True, "listChanged": True}
        if self.prompts:
            caps["prompts"] = {"listChanged": True}
        if self.completions:
            caps["completions"] = {}
        return caps


# --------------------------------------------------------------------------
# Running handlers and shaping their results


def invoke(func: Callable, signature: _Signature, ctx: Context, arguments: dict[str, Any]) -> Deferred:
    """Call a registered handler with the context (if wanted) and arguments."""
    if not signature.accepts_kwargs:
        arguments = {k: v for k, v in arguments.items() if k in signature.params}
    if signature.wants_context:
        return _call(func, ctx, **arguments)
    return _call(func, **arguments)


def _to_jsonable(value: object) -> JSONValue:
    # Tool results often hold datetimes, Decimals, tuples: render them as
    # strings rather than failing the call.
    return json.loads(json.dumps(value, default=str))


def _dump(value: object) -> str:
    return json.dumps(value, default=str, ensure_ascii=False)


def content_json(item: object, version: str) -> dict[str, JSONValue]:
    if isinstance(item, ResourceLink) and version < "2025-06-18":
        # resource_link did not exist yet: tell older clients in words.
        return {"type": "text", "text": f"{item.name}: {item.uri}"}
    if isinstance(item, AudioContent) and version < "2025-03-26":
        return {"type": "text", "text": f"[audio {item.mime_type} omitted]"}
    return item.as_json()  # type: ignore[attr-defined]


def tool_result(tool: Tool, value: object, version: str) -> dict[str, JSONValue]:
    """Turn what a tool returned into a C{CallToolResult}."""
    structured: Optional[JSONValue] = None
    if isinstance(value, CONTENT_TYPES):
        content = [content_json(value, version)]
    elif isinstance(value, (list, tuple)) and value and all(isinstance(v, CONTENT_TYPES) for v in value):
        content = [content_json(v, version) for v in value]
    elif value is None:
        content = []
    elif isinstance(value, str):
        content = [{"type": "text", "text": value}]
    elif isinstance(value, bytes):
        content = [{"type": "text", "text": value.decode("utf-8", "replace")}]
    else:
        jsonable = _to_jsonable(value)
        content = [{"type": "text", "text": _dump(jsonable)}]
        if tool.structured:
            structured = jsonable if isinstance(jsonable, dict) else {"result": jsonable}
    result: dict[str, JSONValue] = {"content": content, "isError": False}
    if structured is not None and version >= "2025-06-18":
        result["structuredContent"] = structured
    return result


def error_result(message: str) -> dict[str, JSONValue]:
    return {"content": [{"type": "text", "text": message}], "isError": True}


def resource_contents(resource: Resource, uri: str, value: object) -> list[dict[str, JSONValue]]:
    """Turn what a resource handler returned into C{ReadResourceResult.contents}."""
    if isinstance(value, EmbeddedResource):
        return [value.as_json()["resource"]]
    if isinstance(value, list) and value and all(isinstance(v, EmbeddedResource) for v in value):
        return [v.as_json()["resource"] for v in value]
    entry: dict[str, JSONValue] = {"uri": uri}
    if isinstance(value, bytes):
        entry["blob"] = base64.b64encode(value).decode("ascii")
        entry["mimeType"] = resource.mime_type or "application/octet-stream"
    elif isinstance(value, str):
        entry["text"] = value
        if resource.mime_type:
            entry["mimeType"] = resource.mime_type
    else:
        entry["text"] = _dump(_to_jsonable(value))
        entry["mimeType"] = "application/json"
    return [entry]


def prompt_result(prompt: Prompt, value: object, version: str) -> dict[str, JSONValue]:
    """Turn what a prompt handler returned into a C{GetPromptResult}."""
    description = prompt.description
    if isinstance(value, dict) and "messages" in value:
        description = value.get("description", description)
        value = value["messages"]
    if isinstance(value, str):
        messages = [{"role": "user", "content": {"type": "text", "text": value}}]
    elif isinstance(value, list):
        messages = []
        for item in value:
            if isinstance(item, str):
                messages.append({"role": "user", "content": {"type": "text", "text": item}})
                continue
            if not isinstance(item, dict):
                raise TypeError("prompt messages must be dicts or strings")
            role = item.get("role", "user")
            content = item.get("content", "")
            if isinstance(content, str):
                content = {"type": "text", "text": content}
            elif isinstance(content, CONTENT_TYPES):
                content = content_json(content, version)
            messages.append({"role": role, "content": content})
    else:
        raise TypeError("a prompt must return a string, a list of messages, or a dict with messages")
    result: dict[str, JSONValue] = {"messages": messages}
    if description:
        result["description"] = description
    return result


__all__ = [
    "MCPApp",
    "Context",
    "ToolError",
    "TextContent",
    "ImageContent",
    "AudioContent",
    "EmbeddedResource",
    "ResourceLink",
    "Tool",
    "Resource",
    "Prompt",
]
