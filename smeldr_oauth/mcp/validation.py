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

A schema made only of the plain keywords generated tool signatures use
(C{type}, C{properties}, C{required}, C{additionalProperties},
C{anyOf}, C{items}, string C{enum}s, length, size and range bounds,
C{pattern}, annotations) is also compiled into a few nested closures
(L{_compile}) that answer "valid or not" several times faster than
jsonschema's validator, which evolves a validator object per
sub-schema: a call whose arguments pass is answered by them alone.
They can only say "valid" sooner, never more often: arguments they
refuse, and every schema with another keyword, go to jsonschema, whose
answer (and message) is the one returned.  A property test holds the two
to the same answer on every schema shape the compiler accepts.
"""

from __future__ import annotations

import re
from collections import deque
from numbers import Number
from typing import Any, Callable, Optional

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

    __slots__ = ("schema", "_validator", "_fast")

    def __init__(self, schema: dict[str, Any]) -> None:
        cls = validator_for(schema, default=Draft202012Validator)
        try:
            cls.check_schema(schema)
        except SchemaError as e:
            where = _path(e.absolute_path) if e.absolute_path else "the schema"
            raise InvalidSchema(f"invalid input schema at {where}: {e.message[:200]}") from None
        self.schema = schema
        self._validator = cls(schema, registry=_EMPTY_REGISTRY)
        self._fast = _compile(schema) if cls is Draft202012Validator else None

    def problem(self, arguments: object) -> Optional[str]:
        """
        @return: C{None} when C{arguments} satisfy the schema, else one
            short message naming the argument and the rule it breaks.
        """
        fast = self._fast
        if fast is not None and fast(arguments):
            return None
        try:
            error = best_match(self._validator.iter_errors(arguments))
        except referencing.exceptions.Unresolvable as e:
            log.warn("A tool's input schema refers to {ref}, which is never fetched", ref=str(e.ref)[:200])
            return "arguments: the tool's input schema cannot be checked"
        if error is None:
            return None
        return f"{_path(error.absolute_path)}: {describe(error)}"[:MAX_MESSAGE]


_Check = Callable[[Any], bool]

#: Keywords that assert nothing (2020-12 annotations; C{format} is one,
#: since validators here get no format checker).
_ANNOTATIONS = frozenset(
    ("title", "description", "default", "examples", "deprecated", "readOnly", "writeOnly", "$comment", "format")
)

_TYPES: dict[str, _Check] = {
    "object": lambda v: type(v) is dict,
    "array": lambda v: type(v) is list,
    "string": lambda v: type(v) is str,
    "boolean": lambda v: type(v) is bool,
    "null": lambda v: v is None,
    # JSON Schema's integer includes 1.0; neither number includes a bool.
    "integer": lambda v: type(v) is int or (type(v) is float and v.is_integer()),
    "number": lambda v: type(v) is int or type(v) is float,
}


def _is_number(value: object) -> bool:
    # As wide as jsonschema's "number" (numbers.Number, not bool): a bound
    # applies wherever jsonschema would apply it.
    return isinstance(value, Number) and not isinstance(value, bool)


def _compile(schema: Any) -> Optional[_Check]:
    """
    A plain predicate with jsonschema's (2020-12) answer for C{schema}, or
    C{None} when the schema uses anything beyond the plain keywords listed
    in the module docstring (jsonschema alone then decides).

    Where a keyword applies to a kind of value, the predicate asks as
    jsonschema does (C{isinstance}); where it says what a value I{is}
    (C{type}, C{enum}) it takes only the exact types C{json.loads} makes,
    so that anything unusual is refused here and left to jsonschema.
    """
    if schema is True:
        return lambda v: True
    if schema is False:
        return lambda v: False
    if not isinstance(schema, dict):
        return None
    checks: list[_Check] = []
    for keyword, value in schema.items():
        if keyword in _ANNOTATIONS:
            continue
        check = _keyword(keyword, value, schema)
        if check is None:
            return None
        checks.append(check)
    if not checks:
        return lambda v: True
    if len(checks) == 1:
        return checks[0]
    return lambda v: all(check(v) for check in checks)


def _keyword(keyword: str, value: Any, schema: dict[str, Any]) -> Optional[_Check]:
    """One keyword's predicate (true for instances it does not apply to)."""
    if keyword == "type":
        names = value if isinstance(value, list) else [value]
        if not names or not all(isinstance(n, str) and n in _TYPES for n in names):
            return None
        tests = [_TYPES[n] for n in names]
        if len(tests) == 1:
            return tests[0]
        return lambda v: any(test(v) for test in tests)
    if keyword == "enum":
        # Strings and null only: jsonschema's equality for those is Python's.
        if not isinstance(value, list) or not all(m is None or isinstance(m, str) for m in value):
            return None
        strings = frozenset(m for m in value if m is not None)
        null_ok = None in value
        return lambda v: (type(v) is str and v in strings) or (v is None and null_ok)
    if keyword == "properties":
        if not isinstance(value, dict):
            return None
        subs = {}
        for name, sub in value.items():
            compiled = _compile(sub)
            if compiled is None:
                return None
            subs[name] = compiled
        pairs = tuple(subs.items())
        return lambda v: not isinstance(v, dict) or all(name not in v or check(v[name]) for name, check in pairs)
    if keyword == "required":
        if not isinstance(value, list) or not all(isinstance(n, str) for n in value):
            return None
        required = tuple(value)
        return lambda v: not isinstance(v, dict) or all(name in v for name in required)
    if keyword == "additionalProperties":
        if value is True:
            return lambda v: True
        if value is not False or "patternProperties" in schema:
            return None
        declared = frozenset(schema.get("properties") or ())
        return lambda v: not isinstance(v, dict) or declared.issuperset(v)
    if keyword == "anyOf":
        if not isinstance(value, list) or not value:
            return None
        options = [_compile(sub) for sub in value]
        if any(o is None for o in options):
            return None
        return lambda v: any(option(v) for option in options)  # type: ignore[misc]
    if keyword == "items":
        each = _compile(value)
        if each is None:
            return None
        return lambda v: not isinstance(v, list) or all(each(item) for item in v)
    return _bound(keyword, value)


def _bound(keyword: str, value: Any) -> Optional[_Check]:
    """Length, size and range keywords, and C{pattern}."""
    if keyword == "pattern":
        if not isinstance(value, str):
            return None
        search = re.compile(value).search
        return lambda v: not isinstance(v, str) or search(v) is not None
    if keyword in ("minLength", "maxLength", "minItems", "maxItems"):
        if type(value) is not int:
            return None
        kind = str if keyword.endswith("Length") else list
        if keyword.startswith("min"):
            return lambda v: not isinstance(v, kind) or len(v) >= value
        return lambda v: not isinstance(v, kind) or len(v) <= value
    if keyword in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        if not _is_number(value):
            return None
        # The same comparisons as jsonschema's, so NaN and the like agree.
        if keyword == "minimum":
            return lambda v: not _is_number(v) or not v < value
        if keyword == "maximum":
            return lambda v: not _is_number(v) or not v > value
        if keyword == "exclusiveMinimum":
            return lambda v: not _is_number(v) or not v <= value
        return lambda v: not _is_number(v) or not v >= value
    return None


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
