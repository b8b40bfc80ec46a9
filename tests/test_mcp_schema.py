"""Tests for L{smeldr_oauth.mcp.schema}: JSON Schemas from type hints."""

from __future__ import annotations

from typing import Annotated, Literal, Optional, TypedDict

from twisted.trial.unittest import SynchronousTestCase

from smeldr_oauth.mcp.schema import schema_for


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
