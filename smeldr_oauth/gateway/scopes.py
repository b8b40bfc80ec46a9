# -*- test-case-name: tests.test_gateway_scopes -*-
"""
Which OAuth scopes a call to an upstream needs, from glob patterns in the
configuration.

An upstream knows nothing of our scopes, so the operator maps them: each
tool, resource and prompt is matched against an ordered list of patterns
(shell globs, case-sensitive: C{*}, C{?}, C{[...]}), and the first match
names the scopes it needs, on top of the upstream's C{required} scopes.  A
name no pattern matches needs only the C{required} scopes, so a catch-all
C{"*"} at the end of a list is how to make "everything else" need more.

Everything here is a pure function of the configuration and the request
parameters, so the HTTP front can refuse a call with 403
C{insufficient_scope} before it reaches the upstream, exactly as it does
for native tools.
"""

from __future__ import annotations

import fnmatch
from typing import Any, Iterable, Optional

import attr

#: The C{_meta} key native tools use for the scopes they need (see
#: L{smeldr_oauth.mcp.app}); the gateway marks upstream items the same way.
SCOPES_META_KEY = "smeldr/scopes"

#: What to do with list items (tools, resources, prompts) the caller lacks
#: scopes for: C{show} lists them, marked with L{SCOPES_META_KEY}, like
#: native tools (a client sees what a step-up would give); C{hide} leaves
#: them out.
LIST_POLICIES = ("show", "hide")


def _merge(*groups: Iterable[str]) -> tuple[str, ...]:
    merged: list[str] = []
    for group in groups:
        for scope in group:
            if scope not in merged:
                merged.append(scope)
    return tuple(merged)


@attr.s(frozen=True, auto_attribs=True)
class ScopeRule:
    """One pattern and the scopes a match needs."""

    pattern: str
    scopes: tuple[str, ...]

    def matches(self, name: str) -> bool:
        return fnmatch.fnmatchcase(name, self.pattern)


def _first(rules: tuple[ScopeRule, ...], name: str) -> tuple[str, ...]:
    for rule in rules:
        if rule.matches(name):
            return rule.scopes
    return ()


@attr.s(frozen=True, auto_attribs=True)
class ScopeMap:
    """
    The scope mapping of one upstream.

    @ivar required: scopes every request to this upstream needs.
    @ivar tools: rules matched against tool names.
    @ivar resources: rules matched against resource URIs (and the
        C{uriTemplate} of resource templates, when listing).
    @ivar prompts: rules matched against prompt names.
    @ivar list_policy: one of L{LIST_POLICIES}.
    """

    required: tuple[str, ...] = ()
    tools: tuple[ScopeRule, ...] = ()
    resources: tuple[ScopeRule, ...] = ()
    prompts: tuple[ScopeRule, ...] = ()
    list_policy: str = "show"

    def for_tool(self, name: str) -> tuple[str, ...]:
        return _merge(self.required, _first(self.tools, name))

    def for_resource(self, uri: str) -> tuple[str, ...]:
        return _merge(self.required, _first(self.resources, uri))

    def for_prompt(self, name: str) -> tuple[str, ...]:
        return _merge(self.required, _first(self.prompts, name))

    def needed(self, method: str, params: dict[str, Any]) -> tuple[str, ...]:
        """
        Every scope a request needs.  Parameters of the wrong type need only
        the C{required} scopes: the upstream refuses them anyway, and no
        pattern can be matched against a number.
        """
        if method == "tools/call":
            name = params.get("name")
            return self.for_tool(name) if isinstance(name, str) else self.required
        if method == "prompts/get":
            name = params.get("name")
            return self.for_prompt(name) if isinstance(name, str) else self.required
        if method in ("resources/read", "resources/subscribe"):
            uri = params.get("uri")
            return self.for_resource(uri) if isinstance(uri, str) else self.required
        if method == "completion/complete":
            ref = params.get("ref")
            if isinstance(ref, dict):
                if ref.get("type") == "ref/prompt" and isinstance(ref.get("name"), str):
                    return self.for_prompt(ref["name"])
                if ref.get("type") == "ref/resource" and isinstance(ref.get("uri"), str):
                    return self.for_resource(ref["uri"])
        return self.required

    def missing(self, method: str, params: dict[str, Any], held: frozenset[str]) -> Optional[tuple[str, ...]]:
        """
        All the scopes the request needs when C{held} lacks any of them (what
        an C{insufficient_scope} step-up asks for), else C{None}.
        """
        needed = self.needed(method, params)
        if needed and not held.issuperset(needed):
            return needed
        return None

    def all_scopes(self) -> frozenset[str]:
        """Every scope the mapping names: for C{scopes_supported} and consent."""
        found = set(self.required)
        for rules in (self.tools, self.resources, self.prompts):
            for rule in rules:
                found.update(rule.scopes)
        return frozenset(found)

    def catalogue(self) -> list[dict[str, Any]]:
        """
        The mapping as plain data, for a consent page to explain what each
        scope opens (kind, pattern, scopes; in match order).
        """
        rows: list[dict[str, Any]] = []
        for kind, rules in (("tool", self.tools), ("resource", self.resources), ("prompt", self.prompts)):
            rows.extend({"kind": kind, "pattern": r.pattern, "scopes": list(r.scopes)} for r in rules)
        return rows

    def describe(self, upstream: str) -> dict[str, str]:
        """
        What each scope opens, in words for the consent page: C{"Call the
        tools read_*, get_*; read the resources file:///srv/*"}.  Patterns
        are quoted as configured (first match wins, so a pattern listed
        after a broader one may open less than it says).

        @param upstream: the upstream's name, for the C{required} scopes.
        """
        words: dict[str, list[str]] = {}
        for scope in self.required:
            words.setdefault(scope, []).append(f"Use {upstream or 'the server'}")
        for kind, verb, rules in (
            ("tools", "call the tools", self.tools),
            ("resources", "read the resources", self.resources),
            ("prompts", "use the prompts", self.prompts),
        ):
            by_scope: dict[str, list[str]] = {}
            for rule in rules:
                for scope in rule.scopes:
                    by_scope.setdefault(scope, []).append(f"any of the {kind}" if rule.pattern == "*" else rule.pattern)
            for scope, patterns in by_scope.items():
                if any(p.startswith("any of") for p in patterns):
                    text = f"{verb.split(' the ')[0]} any of the {kind}"
                else:
                    text = f"{verb} " + ", ".join(patterns)
                words.setdefault(scope, []).append(text)
        return {scope: "; ".join(parts)[:1].upper() + "; ".join(parts)[1:] for scope, parts in words.items()}

    def shape_list(self, method: str, result: Any, held: frozenset[str]) -> Any:
        """
        Apply the list policy to an upstream's C{*/list} result: mark each
        item with the scopes it needs, and leave out those C{held} does not
        cover when the policy is C{hide}.  Anything that is not a well-formed
        list result is returned as it is.
        """
        key, field, lookup = _LISTS.get(method, (None, None, None))
        if key is None or not isinstance(result, dict) or not isinstance(result.get(key), list):
            return result
        shaped: list[Any] = []
        for item in result[key]:
            if not isinstance(item, dict):
                continue
            name = item.get(field) if field != "uri" else item.get("uri", item.get("uriTemplate"))
            if not isinstance(name, str):
                continue
            needed = lookup(self, name)  # type: ignore[misc]
            if needed and not held.issuperset(needed):
                if self.list_policy == "hide":
                    continue
            if needed:
                item = dict(item)
                meta = item.get("_meta")
                item["_meta"] = {**(meta if isinstance(meta, dict) else {}), SCOPES_META_KEY: list(needed)}
            shaped.append(item)
        return {**result, key: shaped}


_LISTS = {
    "tools/list": ("tools", "name", ScopeMap.for_tool),
    "prompts/list": ("prompts", "name", ScopeMap.for_prompt),
    "resources/list": ("resources", "uri", ScopeMap.for_resource),
    "resources/templates/list": ("resourceTemplates", "uri", ScopeMap.for_resource),
}
