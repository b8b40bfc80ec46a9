"""Tests for L{smeldr_oauth.mcp.app}: registration and running handlers."""

from __future__ import annotations

from typing import Optional, TypedDict

from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import SynchronousTestCase

from smeldr_oauth.mcp import Context, MCPApp
from smeldr_oauth.mcp.app import invoke
from smeldr_oauth.mcp.schema import inspect_handler
from smeldr_oauth.mcp.validation import InvalidSchema


class Point(TypedDict):
    x: int
    y: int


class RegistrationTests(SynchronousTestCase):
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

    def test_invalid_schema_refused_at_registration(self) -> None:
        """
        A schema that is not JSON Schema stops the app where it is written,
        not at the first call.
        """
        app = MCPApp()
        with self.assertRaises(InvalidSchema) as caught:
            app.tool(name="bad", input_schema={"type": "objekt"})(lambda: None)
        self.assertIn("'bad'", str(caught.exception))
        self.assertNotIn("bad", app.tools)


class InvokeTests(SynchronousTestCase):
    def test_plain_deferred_async(self) -> None:
        def plain() -> int:
            return 1

        def deferred() -> Deferred:
            return succeed(2)

        async def coroutine() -> int:
            return await succeed(3)

        def raising() -> None:
            raise ValueError("x")

        def run(f: object) -> Deferred:
            return invoke(f, inspect_handler(f), None, {})  # type: ignore[arg-type]

        self.assertEqual([self.successResultOf(run(f)) for f in (plain, deferred, coroutine)], [1, 2, 3])
        self.failureResultOf(run(raising), ValueError)

    def test_context_and_undeclared_arguments(self) -> None:
        def handler(ctx: Context, a: int, b: Optional[int] = None) -> tuple:
            return (ctx, a, b)

        marker = object()
        d = invoke(handler, inspect_handler(handler), marker, {"a": 1, "zzz": 2})  # type: ignore[arg-type]
        self.assertEqual(self.successResultOf(d), (marker, 1, None))
