# -*- test-case-name: tests.test_mcp_schema -*-
"""
JSON Schemas from Python type hints: what a handler's signature says its
arguments are, published as a tool's C{inputSchema} (and a prompt's
arguments) and checked by L{smeldr_oauth.mcp.validation}.

Unknown annotations give the empty schema (anything), never an error: a
tool author's exotic type must not stop the server from starting.
"""

from __future__ import annotations

import inspect
import json
import types
import typing
from typing import Any, Callable, Literal, Union

import attr

from smeldr_oauth.mcp.context import Context

JSONValue = Any

_NONE = type(None)


def is_typeddict(tp: Any) -> bool:
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
    if is_typeddict(tp):
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
class Signature:
    """
    What L{inspect_handler} learnt about a handler: whether it takes the
    L{Context}, the schema of its other parameters, their names, whether
    it takes C{**kwargs}, and its return annotation.
    """

    wants_context: bool
    schema: dict[str, JSONValue]
    params: list[str]
    accepts_kwargs: bool
    return_hint: Any


def inspect_handler(func: Callable) -> Signature:
    """Read a handler's signature and type hints once, at registration."""
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
    return Signature(wants_context, schema, names, accepts_kwargs, hints.get("return", sig.return_annotation))
