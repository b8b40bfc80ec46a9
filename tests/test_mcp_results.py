"""
Tests for L{smeldr_oauth.mcp.results}: what a tool returns, as a
C{CallToolResult}.
"""

from __future__ import annotations

import datetime
import json
from decimal import Decimal
from types import SimpleNamespace

from twisted.trial.unittest import SynchronousTestCase

from smeldr_oauth.mcp.results import to_jsonable, tool_result


class ToolResultTests(SynchronousTestCase):
    value = {
        "when": datetime.datetime(2026, 12, 3, 22, 0, tzinfo=datetime.timezone.utc),
        "price": Decimal("1.50"),
        "pair": (1, 2),
        "name": "Zoë",
        "n": 3,
        "nested": [{"f": 0.1}],
    }

    def test_structured(self) -> None:
        """
        Values JSON has no type for become strings, in the text and in the
        structured content alike; the text is the structured content as
        JSON, non-ASCII kept as it is.
        """
        result = tool_result(SimpleNamespace(structured=True), self.value, "2025-06-18")  # type: ignore[arg-type]
        expected = to_jsonable(self.value)
        self.assertEqual(expected["when"], "2026-12-03 22:00:00+00:00")
        self.assertEqual(expected["price"], "1.50")
        self.assertEqual(result["structuredContent"], expected)
        self.assertEqual(result["content"], [{"type": "text", "text": json.dumps(expected, ensure_ascii=False)}])
        self.assertIn("Zoë", result["content"][0]["text"])
        self.assertIs(result["isError"], False)

    def test_a_list_is_wrapped(self) -> None:
        result = tool_result(SimpleNamespace(structured=True), [1, "a"], "2025-06-18")  # type: ignore[arg-type]
        self.assertEqual(result["structuredContent"], {"result": [1, "a"]})
        self.assertEqual(result["content"][0]["text"], '[1, "a"]')

    def test_unstructured_and_older_versions(self) -> None:
        plain = tool_result(SimpleNamespace(structured=False), self.value, "2025-06-18")  # type: ignore[arg-type]
        self.assertNotIn("structuredContent", plain)
        self.assertEqual(json.loads(plain["content"][0]["text"]), to_jsonable(self.value))
        old = tool_result(SimpleNamespace(structured=True), self.value, "2025-03-26")  # type: ignore[arg-type]
        self.assertNotIn("structuredContent", old)
