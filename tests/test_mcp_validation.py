"""
Tests for L{smeldr_oauth.mcp.validation}: tool arguments checked by a real
JSON Schema validator, every keyword a schema author writes enforced.
"""

from __future__ import annotations

import json
import socket
from typing import Any, Literal, Optional, TypedDict


from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from smeldr_oauth.mcp import MCPApp
from smeldr_oauth.mcp.jsonrpc import parse_frame
from smeldr_oauth.mcp.schema import schema_for
from smeldr_oauth.mcp.session import CallbackOutlet, Principal, ServerSession
from smeldr_oauth.mcp.validation import ArgumentValidator, InvalidSchema, _compile


class Point(TypedDict):
    x: int
    y: int


def problem(schema: dict[str, Any], value: object) -> Optional[str]:
    return ArgumentValidator(schema).problem(value)


class KeywordTests(SynchronousTestCase):
    """
    Each keyword the old hand-written checker ignored (or got wrong) is now
    enforced; each test's first assertion is a value that checker let
    through.
    """

    def test_one_of_means_exactly_one(self) -> None:
        schema = {"type": "object", "properties": {"n": {"oneOf": [{"type": "integer"}, {"minimum": 0}]}}}
        # 5 matches both branches: anyOf would accept it, oneOf must not.
        self.assertIn("more than one", problem(schema, {"n": 5}) or "")
        self.assertIsNone(problem(schema, {"n": -5}))
        self.assertIsNone(problem(schema, {"n": 2.5}))
        self.assertIn("none of the allowed", problem(schema, {"n": -2.5}) or "")

    def test_pattern(self) -> None:
        schema = {"type": "object", "properties": {"slug": {"type": "string", "pattern": "^[a-z-]+$"}}}
        self.assertEqual(problem(schema, {"slug": "Not A Slug"}), "slug: does not match the pattern '^[a-z-]+$'")
        self.assertIsNone(problem(schema, {"slug": "a-slug"}))

    def test_max_length_and_min_length(self) -> None:
        schema = {"type": "object", "properties": {"title": {"type": "string", "minLength": 1, "maxLength": 5}}}
        self.assertEqual(problem(schema, {"title": "toolong"}), "title: longer than 5 characters")
        self.assertEqual(problem(schema, {"title": ""}), "title: shorter than 1 characters")
        self.assertIsNone(problem(schema, {"title": "ok"}))

    def test_minimum_and_maximum(self) -> None:
        schema = {"type": "object", "properties": {"limit": {"type": "integer", "minimum": 1, "maximum": 100}}}
        self.assertEqual(problem(schema, {"limit": 0}), "limit: less than the minimum of 1")
        self.assertEqual(problem(schema, {"limit": 101}), "limit: greater than the maximum of 100")
        self.assertIsNone(problem(schema, {"limit": 100}))

    def test_exclusive_bounds_and_multiple_of(self) -> None:
        schema = {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}
        self.assertEqual(problem(schema, 0), "arguments: must be greater than 0")
        self.assertEqual(problem(schema, 1), "arguments: must be less than 1")
        self.assertEqual(problem({"multipleOf": 5}, 12), "arguments: not a multiple of 5")

    def test_arrays(self) -> None:
        schema = {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 2, "uniqueItems": True}
        self.assertEqual(problem(schema, []), "arguments: too few items (at least 1)")
        self.assertEqual(problem(schema, ["a", "b", "c"]), "arguments: too many items (at most 2)")
        self.assertEqual(problem(schema, ["a", "a"]), "arguments: items must be unique")
        self.assertEqual(problem(schema, ["a", 1]), "arguments[1]: expected string")

    def test_const_enum_not_and_any_of(self) -> None:
        self.assertEqual(problem({"const": "yes"}, "no"), "arguments: must be 'yes'")
        self.assertEqual(problem({"enum": ["a", "b"]}, "c"), "arguments: must be one of ['a', 'b']")
        self.assertEqual(problem({"not": {"type": "string"}}, "x"), "arguments: matches a schema it must not match")
        self.assertEqual(
            problem({"anyOf": [{"type": "string"}, {"type": "null"}]}, 3),
            "arguments: matches none of the allowed schemas",
        )

    def test_local_references(self) -> None:
        schema = {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "type": "object",
            "$defs": {"address": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
            "properties": {"address": {"$ref": "#/$defs/address"}},
        }
        self.assertEqual(problem(schema, {"address": {}}), "address: missing required argument 'city'")
        self.assertIsNone(problem(schema, {"address": {"city": "Oslo"}}))

    def test_older_dialect_by_its_schema_keyword(self) -> None:
        # draft-07's boolean exclusiveMaximum is draft-04's; 2020-12 wants a number.
        schema = {"$schema": "http://json-schema.org/draft-04/schema#", "maximum": 5, "exclusiveMaximum": True}
        self.assertIsNotNone(problem(schema, 5))
        self.assertIsNone(problem(schema, 4))

    def test_schemas_from_hints(self) -> None:
        schema = schema_for(Point)
        self.assertIsNone(problem(schema, {"x": 1, "y": 2}))
        self.assertEqual(problem(schema, {"x": 1}), "arguments: missing required argument 'y'")
        self.assertEqual(problem(schema, {"x": "1", "y": 2}), "x: expected integer")
        self.assertEqual(problem(schema, {"x": True, "y": 2}), "x: expected integer")
        # JSON has one number type: 1.0 is an integer.
        self.assertIsNone(problem({"type": "integer"}, 1.0))
        self.assertIsNotNone(problem(schema_for(Literal["a", "b"]), "c"))
        self.assertEqual(problem(schema_for(list[int]), [1, "x"]), "arguments[1]: expected integer")
        self.assertIsNone(problem(schema_for(Optional[str]), None))
        closed = {"type": "object", "properties": {"a": {}}, "additionalProperties": False}
        self.assertEqual(problem(closed, {"a": 1, "b": 2}), "arguments: unexpected argument 'b'")

    def test_messages_never_echo_the_value(self) -> None:
        huge = "secret" * 100000
        found = problem({"type": "object", "properties": {"t": {"maxLength": 3}}}, {"t": huge}) or ""
        self.assertNotIn("secret", found)
        self.assertLessEqual(len(found), 300)

    def test_invalid_schema(self) -> None:
        self.assertRaises(InvalidSchema, ArgumentValidator, {"type": "objekt"})
        self.assertRaises(InvalidSchema, ArgumentValidator, {"properties": {"a": {"minimum": "one"}}})


class RemoteReferenceTests(SynchronousTestCase):
    """
    jsonschema's default registry fetches an unknown C{$ref} with a
    blocking urlopen (in the reactor thread: the whole server would wait);
    a tool's schema must never make the server connect anywhere.
    """

    def test_remote_reference_never_fetched(self) -> None:
        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        # Were it fetched, urlopen would wait for an answer: not for long.
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(2)
        self.addCleanup(socket.setdefaulttimeout, previous)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/schema.json"
        found = problem({"type": "object", "properties": {"a": {"$ref": url}}}, {"a": 1})
        self.assertEqual(found, "arguments: the tool's input schema cannot be checked")
        listener.setblocking(False)
        # No connection waits to be accepted: nothing was fetched.
        self.assertRaises(BlockingIOError, listener.accept)


class SessionTests(SynchronousTestCase):
    """The validator as C{tools/call} uses it."""

    def call(self, version: str, arguments: dict[str, Any]) -> dict[str, Any]:
        app = MCPApp()

        @app.tool(input_schema={"type": "object", "properties": {"slug": {"type": "string", "pattern": "^[a-z]+$"}}})
        def tool(slug: str = "x") -> str:
            return "ran " + slug

        session = ServerSession(app, Clock(), default_outlet=CallbackOutlet(lambda m: None))
        principal = Principal("alice", None, frozenset({"read"}))
        results: list = []
        init = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"protocolVersion": version, "capabilities": {}}}
        call = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "tool", "arguments": arguments}}
        for body in (init, call):
            _, [message] = parse_frame(json.dumps(body).encode())
            session.handle(message, principal).addCallback(results.append)
        return results[-1]

    def test_invalid_params_before_2025_11_25(self) -> None:
        response = self.call("2025-06-18", {"slug": "NOPE"})
        self.assertEqual(response["error"]["code"], -32602)
        self.assertIn("slug: does not match the pattern", response["error"]["message"])

    def test_tool_error_from_2025_11_25(self) -> None:
        response = self.call("2025-11-25", {"slug": "NOPE"})
        self.assertTrue(response["result"]["isError"])
        self.assertIn("does not match the pattern", response["result"]["content"][0]["text"])
        self.assertEqual(self.call("2025-11-25", {"slug": "ok"})["result"]["content"][0]["text"], "ran ok")





# -- the compiled fast path ------------------------------------------------------

_names = st.sampled_from(["a", "b", "limit", "tag", "ß"])
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 5),
    st.sampled_from([0.0, 1.0, -1.5, 2.5, 1e300, float("nan"), float("inf")]),
    st.sampled_from(["", "a", "draft", "published", "ab1", "ÄÖ", "x" * 5]),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(_names, inner, max_size=3)),
    max_leaves=8,
)
_type_names = st.sampled_from(["object", "array", "string", "boolean", "null", "integer", "number"])
_bounds = st.one_of(
    st.fixed_dictionaries({"type": _type_names}),
    st.fixed_dictionaries({"type": st.lists(_type_names, min_size=1, max_size=3, unique=True)}),
    st.fixed_dictionaries({"enum": st.lists(st.one_of(st.none(), st.sampled_from(["a", "draft", ""])), min_size=1)}),
    st.fixed_dictionaries({k: st.integers(-2, 3) for k in ("minimum", "maximum")}),
    st.fixed_dictionaries({k: st.sampled_from([0, 1.5, -1]) for k in ("exclusiveMinimum", "exclusiveMaximum")}),
    st.fixed_dictionaries({k: st.integers(0, 3) for k in ("minLength", "maxLength", "minItems", "maxItems")}),
    st.fixed_dictionaries({"pattern": st.sampled_from(["^a", "[0-9]", "^$"]), "description": st.just("d")}),
    st.just({"default": None, "title": "t", "format": "uri"}),
    st.booleans(),
)
_schemas = st.recursive(
    _bounds,
    lambda inner: st.one_of(
        st.fixed_dictionaries(
            {"properties": st.dictionaries(_names, inner, max_size=3)},
            optional={
                "type": st.just("object"),
                "required": st.lists(_names, unique=True, max_size=2),
                "additionalProperties": st.booleans(),
            },
        ),
        st.fixed_dictionaries({"anyOf": st.lists(inner, min_size=1, max_size=3)}),
        st.fixed_dictionaries({"items": inner}, optional={"type": st.just("array")}),
    ),
    max_leaves=6,
)


class CompiledTests(SynchronousTestCase):
    """
    The compiled predicate (L{validation._compile}) answers exactly as
    jsonschema does wherever it exists, so that it may answer "valid"
    alone; the schemas it does not cover get none.
    """

    @settings(max_examples=400, deadline=None)
    @given(_schemas, st.lists(_values, min_size=1, max_size=6))
    def test_same_answer_as_jsonschema(self, schema: Any, values: list[Any]) -> None:
        fast = _compile(schema)
        self.assertIsNotNone(fast, schema)
        validator = Draft202012Validator(schema)
        for value in values:
            self.assertEqual(fast(value), validator.is_valid(value), (schema, value))  # type: ignore[misc]

    def test_every_leaf_on_every_value(self) -> None:
        """
        Each keyword the compiler knows, alone and inside C{properties},
        C{items}, C{anyOf} and C{required}/C{additionalProperties}, on each
        kind of value: the same answer as jsonschema.
        """
        leaves: list[Any] = [True, False, {}, {"description": "d", "default": 1, "format": "email"}]
        leaves += [{"type": name} for name in ("object", "array", "string", "boolean", "null", "integer", "number")]
        leaves += [{"type": ["string", "null"]}, {"type": ["integer", "boolean"]}, {"type": ["number", "array"]}]
        leaves += [{"enum": ["a", "draft"]}, {"enum": ["a", None]}, {"enum": [None]}, {"enum": [""]}]
        for keyword in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
            leaves += [{keyword: bound} for bound in (0, 1, -1.5, 2.5)]
        for keyword in ("minLength", "maxLength", "minItems", "maxItems"):
            leaves += [{keyword: bound} for bound in (0, 1, 2)]
        leaves += [{"pattern": p} for p in ("^a", "[0-9]", "^$", "é")]
        values: list[Any] = [None, True, False, 0, 1, -1, 2, 3, 0.0, 1.0, 1.5, -1.5, 2.5, 3.0, 1e300]
        values += [float("nan"), float("inf"), -float("inf"), "", "a", "ab", "abc", "a1", "draft", "é", "None"]
        values += [[], [1], [1, "a"], [None, None, True], {}, {"a": 1}, {"a": "x", "b": None}, {"b": []}]
        schemas: list[Any] = []
        for leaf in leaves:
            schemas += [
                leaf,
                {"type": "object", "properties": {"a": leaf}},
                {"properties": {"a": leaf, "b": {"type": "null"}}, "required": ["a"], "additionalProperties": False},
                {"items": leaf},
                {"anyOf": [leaf, {"type": "null"}]},
                {"anyOf": [{"type": "string"}, leaf]},
            ]
        wrapped = values + [{"a": v} for v in values] + [[v] for v in values] + [{"a": v, "c": 1} for v in values[:4]]
        for schema in schemas:
            fast = _compile(schema)
            self.assertIsNotNone(fast, schema)
            validator = Draft202012Validator(schema)
            for value in wrapped:
                self.assertEqual(fast(value), validator.is_valid(value), (schema, value))  # type: ignore[misc]

    def test_site_tools_are_compiled(self) -> None:
        """Every schema generated from a signature has the fast path."""

        schema = {
            "type": "object",
            "properties": {
                "status": schema_for(Optional[Literal["draft", "published"]]),
                "tags": schema_for(Optional[list[str]]),
                "n": {"type": "integer", "default": 1},
            },
            "additionalProperties": False,
            "required": ["n"],
        }
        self.assertIsNotNone(_compile(schema))
        validator = ArgumentValidator(schema)
        self.assertIsNone(validator.problem({"n": 1.0, "status": None, "tags": ["a"]}))
        self.assertEqual(validator.problem({"n": True}), "n: expected integer")
        self.assertEqual(validator.problem({"n": 1, "status": "x"}), "status: must be one of ['draft', 'published']")
        self.assertEqual(validator.problem({"n": 1, "x": 1}), "arguments: unexpected argument 'x'")
        self.assertEqual(validator.problem({}), "arguments: missing required argument 'n'")

    def test_other_keywords_are_left_to_jsonschema(self) -> None:
        for schema in (
            {"oneOf": [{"type": "integer"}]},
            {"properties": {"a": {"$ref": "#/$defs/x"}}, "$defs": {"x": {}}},
            {"const": 1},
            {"enum": [1, 2]},
            {"multipleOf": 2},
            {"patternProperties": {"^x": {}}, "additionalProperties": False},
            {"additionalProperties": {"type": "string"}},
            {"type": "object", "unknownKeyword": 1},
        ):
            self.assertIsNone(_compile(schema), schema)

    def test_refusals_still_named_by_jsonschema(self) -> None:
        """A value the fast path refuses gets jsonschema's message."""
        self.assertEqual(
            problem({"type": "object", "properties": {"s": {"type": "string", "maxLength": 2}}}, {"s": "abc"}),
            "s: longer than 2 characters",
        )
