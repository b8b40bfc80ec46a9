"""
Tests for L{smeldr_oauth.gateway.scopes}: glob patterns mapping upstream
tools, resources and prompts to OAuth scopes.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from smeldr_oauth.gateway.scopes import SCOPES_META_KEY, ScopeMap, ScopeRule

MAP = ScopeMap(
    required=("mcp",),
    tools=(ScopeRule("read_*", ("files:read",)), ScopeRule("*", ("files:write",))),
    resources=(ScopeRule("memo://secret/*", ("secrets",)),),
    prompts=(ScopeRule("greet", ("prompts",)),),
)


class NeededTests(SynchronousTestCase):
    def test_first_match_wins(self) -> None:
        self.assertEqual(MAP.for_tool("read_note"), ("mcp", "files:read"))
        self.assertEqual(MAP.for_tool("write_note"), ("mcp", "files:write"))

    def test_unmatched_needs_only_required(self) -> None:
        self.assertEqual(MAP.for_resource("memo://one"), ("mcp",))
        self.assertEqual(MAP.for_prompt("other"), ("mcp",))

    def test_glob_is_case_sensitive(self) -> None:
        self.assertEqual(ScopeMap(tools=(ScopeRule("read_*", ("r",)),)).for_tool("READ_x"), ())

    def test_methods(self) -> None:
        self.assertEqual(MAP.needed("tools/call", {"name": "read_a"}), ("mcp", "files:read"))
        self.assertEqual(MAP.needed("resources/read", {"uri": "memo://secret/x"}), ("mcp", "secrets"))
        self.assertEqual(MAP.needed("resources/subscribe", {"uri": "memo://secret/x"}), ("mcp", "secrets"))
        self.assertEqual(MAP.needed("prompts/get", {"name": "greet"}), ("mcp", "prompts"))
        self.assertEqual(
            MAP.needed("completion/complete", {"ref": {"type": "ref/prompt", "name": "greet"}}), ("mcp", "prompts")
        )
        self.assertEqual(
            MAP.needed("completion/complete", {"ref": {"type": "ref/resource", "uri": "memo://secret/{n}"}}),
            ("mcp", "secrets"),
        )
        self.assertEqual(MAP.needed("tools/list", {}), ("mcp",))
        self.assertEqual(MAP.needed("ping", {}), ("mcp",))

    def test_wrong_types_need_only_required(self) -> None:
        self.assertEqual(MAP.needed("tools/call", {"name": 3}), ("mcp",))
        self.assertEqual(MAP.needed("resources/read", {"uri": None}), ("mcp",))
        self.assertEqual(MAP.needed("completion/complete", {"ref": "x"}), ("mcp",))

    def test_missing(self) -> None:
        self.assertEqual(MAP.missing("tools/call", {"name": "x"}, frozenset({"mcp"})), ("mcp", "files:write"))
        self.assertIsNone(MAP.missing("tools/call", {"name": "x"}, frozenset({"mcp", "files:write"})))
        self.assertIsNone(ScopeMap().missing("tools/call", {"name": "x"}, frozenset()))

    def test_all_scopes_and_catalogue(self) -> None:
        self.assertEqual(MAP.all_scopes(), {"mcp", "files:read", "files:write", "secrets", "prompts"})
        self.assertEqual(MAP.catalogue()[0], {"kind": "tool", "pattern": "read_*", "scopes": ["files:read"]})
        self.assertEqual([r["kind"] for r in MAP.catalogue()], ["tool", "tool", "resource", "prompt"])

    @settings(deadline=None)  # no timing in tests: a loaded CI box is slow
    @given(st.text(max_size=40), st.dictionaries(st.text(max_size=10), st.none() | st.integers() | st.text(max_size=5)))
    def test_any_params(self, method: str, params: dict) -> None:
        """Whatever a client sends, the answer is a tuple starting with the required scopes."""
        needed = MAP.needed(method, params)
        self.assertEqual(needed[:1], ("mcp",))


class ShapeListTests(SynchronousTestCase):
    TOOLS = {"tools": [{"name": "read_a"}, {"name": "write_b", "_meta": {"x": 1}}, "junk", {"name": 4}], "nextCursor": "c"}

    def test_show_marks(self) -> None:
        shaped = MAP.shape_list("tools/list", self.TOOLS, frozenset({"mcp", "files:read"}))
        self.assertEqual(
            shaped["tools"],
            [
                {"name": "read_a", "_meta": {SCOPES_META_KEY: ["mcp", "files:read"]}},
                {"name": "write_b", "_meta": {"x": 1, SCOPES_META_KEY: ["mcp", "files:write"]}},
            ],
        )
        self.assertEqual(shaped["nextCursor"], "c")

    def test_hide_leaves_out(self) -> None:
        hiding = ScopeMap(tools=MAP.tools, list_policy="hide")
        shaped = hiding.shape_list("tools/list", self.TOOLS, frozenset({"files:read"}))
        self.assertEqual([t["name"] for t in shaped["tools"]], ["read_a"])

    def test_templates_by_uri_template(self) -> None:
        hiding = ScopeMap(resources=MAP.resources, list_policy="hide")
        result = {"resourceTemplates": [{"uriTemplate": "memo://secret/{name}", "name": "s"}, {"uriTemplate": "memo://x/{a}", "name": "x"}]}
        shaped = hiding.shape_list("resources/templates/list", result, frozenset())
        self.assertEqual([t["name"] for t in shaped["resourceTemplates"]], ["x"])

    def test_not_a_list_result(self) -> None:
        self.assertEqual(MAP.shape_list("tools/list", {"tools": "x"}, frozenset()), {"tools": "x"})
        self.assertEqual(MAP.shape_list("tools/call", {"content": []}, frozenset()), {"content": []})
        self.assertIsNone(MAP.shape_list("tools/list", None, frozenset()))
