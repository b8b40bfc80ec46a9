"""Tests for L{smeldr_oauth.mcp.app}: schemas from type hints, validation, registration."""

from __future__ import annotations

from typing import Annotated, Literal, Optional, TypedDict

from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import SynchronousTestCase

from smeldr_oauth.mcp import Context, MCPApp
from smeldr_oauth.mcp.app import _call, schema_for, validate


class Point(TypedDict):
    x: int
    y: int


class SchemaTests(SynchronousTestCase):
    def test_scalars(self) -> None:
        self.assertEqual(schema_for(str), {"type": "string"})
        self.assertEqual(schema_for(int), {"type": "integer"})
        self.assertEqual(schema_for(float), {"type": "number"})
        self.assertEqual(schema_for(bool), {"type": "boolean"})

    def test_containers(self) -> None:
        self.assertEqual(schema_for(list[int]), {"type": "array", "items": {"type": "integer"}})
        self.assertEqual(schema_for(dict), {"type": "object"})
        self.assertEqual(schema_for(dict[str, int]), {"type": "object", "additionalProperties": {"type": "integer"}})
        self.assertEqual(
            schema_for(tuple[int, str]),
            {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}], "minItems": 2, "maxItems": 2},
        )

    def test_optional_union_literal(self) -> None:
        self.assertEqual(schema_for(Optional[str]), {"type": ["string", "null"]})
        self.assertEqual(schema_for(int | None), {"type": ["integer", "null"]})
        self.assertEqual(schema_for(Literal["a", "b"]), {"enum": ["a", "b"], "type": "string"})
        self.assertEqual(schema_for(list[int] | None), {"anyOf": [{"type": "array", "items": {"type": "integer"}}, {"type": "null"}]})

    def test_typeddict_and_annotated(self) -> None:
        self.assertEqual(
            schema_for(Point),
            {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}}, "required": ["x", "y"]},
        )
        self.assertEqual(schema_for(Annotated[str, "The slug"]), {"type": "string", "description": "The slug"})

    def test_unknown_is_anything(self) -> None:
        self.assertEqual(schema_for(object), {})

    def test_tool_schema_skips_context_and_uses_defaults(self) -> None:
        app = MCPApp()

        @app.tool(scopes=("write",), annotations={"readOnlyHint": False})
        def tool(ctx: Context, query: str, limit: int = 10, tags: Optional[list[str]] = None) -> Point:
            return {"x": 1, "y": 2}

        t = app.tools["tool"]
        self.assertEqual(
            t.input_schema,
            {
                "type": "object",
                "properties": {
                    "query": {"type": "string"},
                    "limit": {"type": "integer", "default": 10},
                    "tags": {"anyOf": [{"type": "array", "items": {"type": "string"}}, {"type": "null"}], "default": None},
                },
                "additionalProperties": False,
                "required": ["query"],
            },
        )
        self.assertTrue(t.structured)
        self.assertEqual(t.output_schema["required"], ["x", "y"])
        self.assertEqual(t.scopes, ("write",))
        self.assertEqual(app.all_scopes(), frozenset({"write"}))

    def test_explicit_schema_and_kwargs(self) -> None:
        app = MCPApp()
        schema = {"type": "object", "properties": {"a": {"type": "integer"}}}

        @app.tool(name="x", input_schema=schema)
        def anything(**kwargs: object) -> str:
            return "ok"

        self.assertIs(app.tools["x"].input_schema, schema)
        self.assertTrue(app.tools["x"].signature.accepts_kwargs)


class ValidateTests(SynchronousTestCase):
    def test_validate(self) -> None:
        schema = schema_for(Point)
        self.assertIsNone(validate({"x": 1, "y": 2}, schema))
        self.assertIn("missing", validate({"x": 1}, schema))
        self.assertIn("expected integer", validate({"x": "1", "y": 2}, schema))
        self.assertIn("expected integer", validate({"x": True, "y": 2}, schema))
        self.assertIsNone(validate(1.0, {"type": "integer"}))
        self.assertIsNotNone(validate("c", schema_for(Literal["a", "b"])))
        self.assertIsNotNone(validate([1, "x"], schema_for(list[int])))
        self.assertIsNone(validate(None, schema_for(Optional[str])))


class CallTests(SynchronousTestCase):
    def test_plain_deferred_async(self) -> None:
        def plain() -> int:
            return 1

        def deferred() -> Deferred:
            return succeed(2)

        async def coroutine() -> int:
            return await succeed(3)

        def raising() -> None:
            raise ValueError("x")

        self.assertEqual([self.successResultOf(_call(f)) for f in (plain, deferred, coroutine)], [1, 2, 3])
        self.failureResultOf(_call(raising), ValueError)
