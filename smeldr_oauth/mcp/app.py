# -*- test-case-name: tests.test_mcp_app -*-
"""
The tool-author API: L{MCPApp} is the registry of tools, resources,
prompts and completions, and the records it keeps for each.

Nothing here knows about a transport or a protocol version beyond each
record's descriptor: L{smeldr_oauth.mcp.session} and
L{smeldr_oauth.mcp.methods} call the registry, L{smeldr_oauth.mcp.results}
shapes what handlers return.  The content records, the L{Context} and
L{ToolError} live in their own modules and are re-exported by
L{smeldr_oauth.mcp} (and the last two here).
"""

from __future__ import annotations

import inspect
import re
import typing
import weakref
from typing import Any, Callable, Iterable, Optional

import attr
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.python.failure import Failure
from twisted.python.reflect import namedAny

from smeldr_oauth.mcp.context import Context, ToolError
from smeldr_oauth.mcp.schema import Signature, inspect_handler, is_typeddict, schema_for
from smeldr_oauth.mcp.validation import ArgumentValidator, InvalidSchema

JSONValue = Any


# --------------------------------------------------------------------------
# Registrations


@attr.s(auto_attribs=True)
class Tool:
    """A registered tool: its handler, what it publishes, its compiled input schema."""

    name: str
    func: Callable
    title: Optional[str]
    description: Optional[str]
    scopes: tuple[str, ...]
    input_schema: dict
    output_schema: Optional[dict]
    annotations: Optional[dict]
    signature: Signature
    structured: bool
    validator: ArgumentValidator

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
    """A fixed resource, or a template when its URI has C{{placeholders}}."""

    uri: str
    name: str
    func: Callable
    title: Optional[str]
    description: Optional[str]
    mime_type: Optional[str]
    scopes: tuple[str, ...]
    signature: Signature
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
    """A handler that adds resources to C{resources/list}."""

    func: Callable
    scopes: tuple[str, ...]
    signature: Signature


@attr.s(auto_attribs=True)
class Prompt:
    """A registered prompt; its arguments are its handler's parameters."""

    name: str
    func: Callable
    title: Optional[str]
    description: Optional[str]
    scopes: tuple[str, ...]
    signature: Signature

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
    """A completion provider for one argument of a prompt or resource template."""

    func: Callable
    signature: Signature


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
        # Told of every change notified here, as C{(change, value)}:
        # C{("resource", uri)} or C{("list", kind)} (the processes sharing
        # sessions relay them to each other).
        self.change_observers: list[Callable[[str, str], None]] = []

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
            signature = inspect_handler(func)
            tool_name = name or func.__name__
            out = output_schema
            structured = out is not None
            if out is None:
                hint = signature.return_hint
                if hint is dict or typing.get_origin(hint) is dict:
                    out, structured = {"type": "object"}, True
                elif is_typeddict(hint):
                    out, structured = schema_for(hint), True
            schema = input_schema if input_schema is not None else signature.schema
            try:
                validator = ArgumentValidator(schema)
            except InvalidSchema as e:
                raise InvalidSchema(f"tool {tool_name!r}: {e}") from None
            self.tools[tool_name] = Tool(
                name=tool_name,
                func=func,
                title=title,
                description=description or _first_line(func.__doc__),
                scopes=tuple(scopes),
                input_schema=schema,
                output_schema=out,
                annotations=annotations,
                signature=signature,
                structured=structured,
                validator=validator,
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
                signature=inspect_handler(func),
            )
            if _PLACEHOLDER.search(uri):
                resource.pattern, resource.variables = _template_pattern(uri)
            self.resources.append(resource)
            return func

        return register

    def resource_list(self, scopes: Iterable[str] = ("read",)) -> Callable[[Callable], Callable]:
        def register(func: Callable) -> Callable:
            self.resource_listers.append(ResourceLister(func, tuple(scopes), inspect_handler(func)))
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
                signature=inspect_handler(func),
            )
            return func

        return register

    def completion(self, ref: str, argument: str) -> Callable[[Callable], Callable]:
        """
        Register a completion provider for argument C{argument} of the
        prompt named C{ref} or the resource template whose URI is C{ref}.
        """

        def register(func: Callable) -> Callable:
            self.completions[(ref, argument)] = Completion(func, inspect_handler(func))
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
        for observer in self.change_observers:
            observer("resource", uri)

    def notify_list_changed(self, kind: str) -> None:
        """Tell every session that the list of C{kind} changed."""
        if kind not in ("tools", "resources", "prompts"):
            raise ValueError(f"unknown list kind {kind!r}")
        for session in list(self._sessions):
            session.list_changed(kind)
        for observer in self.change_observers:
            observer("list", kind)

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
# Running handlers


def invoke(func: Callable, signature: Signature, ctx: Optional[Context], arguments: dict[str, Any]) -> Deferred:
    """
    Call a registered handler with the context (if it wants one) and the
    arguments it declares.  Plain values, L{Deferred}s and coroutines
    (C{async def}) all come back as a L{Deferred}, and an exception as a
    failed one (Twisted's L{maybeDeferred}).
    """
    if not signature.accepts_kwargs:
        arguments = {k: v for k, v in arguments.items() if k in signature.params}
    if signature.wants_context:
        return maybeDeferred(func, ctx, **arguments)
    return maybeDeferred(func, **arguments)


# --------------------------------------------------------------------------
# Loading an application by name


class AppLoadError(ValueError):
    """C{--app} names nothing usable; the message says why, for the command line."""


def load_app(spec: str, *args: Any) -> "Deferred[MCPApp]":
    """
    The L{MCPApp} named by C{spec} (C{package.module:attribute}, the
    attribute may be dotted), for C{twist smeldr-oauth --app} and
    C{smeldr-oauth-stdio --app}.

    The attribute is an L{MCPApp}, or a factory called with C{args} (what
    the command has to offer, e.g. the site database and the reactor) that
    returns one, a L{Deferred} of one, or a coroutine.

    @return: a L{Deferred} firing with the app, or failing with
        L{AppLoadError} (it fires at once unless the factory is
        asynchronous).
    """
    module, sep, attribute = spec.partition(":")
    if not sep or not module or not attribute:
        return fail(AppLoadError(f"--app must look like module:attribute, not {spec!r}"))
    try:
        target = namedAny(f"{module}.{attribute}")
    except Exception as e:
        return fail(AppLoadError(f"--app {spec!r}: {type(e).__name__}: {e}"))
    if isinstance(target, MCPApp):
        return succeed(target)
    if not callable(target):
        return fail(AppLoadError(f"--app {spec!r} is not an MCPApp"))

    def check(app: object) -> MCPApp:
        if not isinstance(app, MCPApp):
            raise AppLoadError(f"--app {spec!r} did not give an MCPApp")
        return app

    def failed(failure: Failure) -> MCPApp:
        # The factory could not make the app (a callable that is no factory
        # of one, json:loads; a factory's own error): said in one line as
        # an attribute that cannot be imported is, where smeldr-oauth-stdio
        # logged it as a crash with a traceback.
        raise AppLoadError(f"--app {spec!r}: {failure.type.__name__}: {failure.value}")

    return maybeDeferred(target, *args).addCallbacks(check, failed)


# Context and ToolError are re-exported: the tool-author API was imported
# from here before they had modules of their own.
__all__ = ["MCPApp", "Tool", "Resource", "ResourceLister", "Prompt", "Completion", "invoke", "load_app", "AppLoadError"]
__all__ += ["Context", "ToolError"]
