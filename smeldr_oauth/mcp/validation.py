# -*- test-case-name: tests.test_mcp_validation -*-
"""
Tool arguments checked against the tool's C{inputSchema} by a real JSON
Schema validator (C{jsonschema}), so that every keyword a tool author
writes and clients are shown (C{oneOf}, C{pattern}, C{maxLength},
C{minimum}, C{$ref} into C{$defs}, ...) is also enforced.

A schema is checked against its meta-schema and compiled once, when the
tool is registered: a broken schema stops the application at start-up,
not at the first call.  The dialect is the schema's C{$schema}, else JSON
Schema 2020-12 (the MCP default).  C{format} is an annotation, as that
dialect says, and is not asserted.

Remote references are never fetched.  jsonschema's default registry
retrieves an unknown C{$ref} URL with a blocking C{urlopen}: a schema could
make the server fetch any address, inside the reactor thread.  Every
validator here gets an empty registry instead, so such a reference is
refused as unresolvable.

The messages name the argument and the rule, never the value: a
megabyte-long string that is too long is not echoed back to the caller.
"""

from __future__ import annotations

import re
from collections import deque
from typing import Any, Optional

import referencing
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError, ValidationError, best_match
from jsonschema.validators import validator_for
from twisted.logger import Logger

log = Logger()

#: Longest message a validation problem produces.
MAX_MESSAGE = 300

_EMPTY_REGISTRY: referencing.Registry = referencing.Registry()


class InvalidSchema(ValueError):
    """A tool's C{inputSchema} is not a valid JSON Schema."""


class ArgumentValidator:
    """
    One tool's compiled input schema.

    @ivar schema: the schema, as published in C{tools/list}.
    """

    __slots__ = ("schema", "_validator")

    def __init__(self, schema: dict[str, Any]) -> None:
        cls = validator_for(schema, default=Draft202012Validator)
        try:
            cls.check_schema(schema)
        except SchemaError as e:
            where = _path(e.absolute_path) if e.absolute_path else "the schema"
            raise InvalidSchema(f"invalid input schema at {where}: {e.message[:200]}") from None
        self.schema = schema
        self._validator = cls(schema, registry=_EMPTY_REGISTRY)

    def problem(self, arguments: object) -> Optional[str]:
        """
        @return: C{None} when C{arguments} satisfy the schema, else one
            short message naming the argument and the rule it breaks.
        """
        try:
            error = best_match(self._validator.iter_errors(arguments))
        except referencing.exceptions.Unresolvable as e:
            log.warn("A tool's input schema refers to {ref}, which is never fetched", ref=str(e.ref)[:200])
            return "arguments: the tool's input schema cannot be checked"
        if error is None:
            return None
        return f"{_path(error.absolute_path)}: {describe(error)}"[:MAX_MESSAGE]


def _path(path: deque) -> str:
    """C{deque(["tags", 0])} as C{tags[0]}; the empty path as C{arguments}."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text = f"{text or 'arguments'}[{part}]"
        else:
            text = f"{text}.{part}" if text else str(part)
    return text or "arguments"


def _short(value: object, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _types(value: object) -> str:
    return " or ".join(map(str, value)) if isinstance(value, list) else str(value)


def _extras(error: ValidationError) -> list[str]:
    instance = error.instance if isinstance(error.instance, dict) else {}
    schema = error.schema if isinstance(error.schema, dict) else {}
    declared = schema.get("properties") or {}
    patterns = list((schema.get("patternProperties") or {}).keys())
    return [k for k in instance if k not in declared and not any(re.search(p, k) for p in patterns)]


def describe(error: ValidationError) -> str:
    """
    What one validation error means, in words that name the rule but not
    the offending value.
    """
    keyword, expected = error.validator, error.validator_value
    instance = error.instance
    if keyword == "type":
        return f"expected {_types(expected)}"
    if keyword == "required":
        missing = [k for k in expected if isinstance(instance, dict) and k not in instance]
        return f"missing required argument {_short(missing[0] if missing else expected)}"
    if keyword in ("additionalProperties", "unevaluatedProperties"):
        extras = _extras(error)
        return f"unexpected argument {_short(extras[0])}" if extras else "unexpected argument"
    if keyword == "enum":
        return f"must be one of {_short(expected, 200)}"
    if keyword == "const":
        return f"must be {_short(expected)}"
    if keyword == "pattern":
        return f"does not match the pattern {_short(expected)}"
    if keyword == "maxLength":
        return f"longer than {expected} characters"
    if keyword == "minLength":
        return f"shorter than {expected} characters"
    if keyword == "minimum":
        return f"less than the minimum of {expected}"
    if keyword == "maximum":
        return f"greater than the maximum of {expected}"
    if keyword == "exclusiveMinimum":
        return f"must be greater than {expected}"
    if keyword == "exclusiveMaximum":
        return f"must be less than {expected}"
    if keyword == "multipleOf":
        return f"not a multiple of {expected}"
    if keyword == "minItems":
        return f"too few items (at least {expected})"
    if keyword == "maxItems":
        return f"too many items (at most {expected})"
    if keyword == "uniqueItems":
        return "items must be unique"
    if keyword == "minProperties":
        return f"too few properties (at least {expected})"
    if keyword == "maxProperties":
        return f"too many properties (at most {expected})"
    if keyword == "oneOf":
        if error.context:
            return "matches none of the allowed schemas"
        return "matches more than one of the allowed schemas (exactly one must match)"
    if keyword == "anyOf":
        return "matches none of the allowed schemas"
    if keyword == "not":
        return "matches a schema it must not match"
    if keyword is None:
        return "not allowed here"
    return f"does not satisfy {_short(keyword, 40)}"
