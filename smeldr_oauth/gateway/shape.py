# -*- test-case-name: tests.test_gateway_proxy -*-
"""
Translating between the protocol version the upstream speaks and the one
each downstream client negotiated: the two are chosen independently, so a
2024-11-05 client can sit in front of a 2025-11-25 upstream and the other
way round.

Older clients are given only what their version defines (content types
that did not exist yet become text, as the native server does); 2026-07-28
stateless requests get that revision's envelope (result type, cache hints,
server info in C{_meta}) and lose the per-request C{_meta} keys the
upstream, which speaks a session-era version, does not know.
"""

from __future__ import annotations

from typing import Any

from smeldr_oauth.mcp.versions import CACHEABLE, SERVER_INFO_KEY

#: Capabilities passed from the upstream to downstream clients; others
#: (tasks, experimental, extensions) are not passed through by the gateway.
PASSED_CAPABILITIES = ("tools", "resources", "prompts", "logging", "completions")

#: The reserved C{_meta} prefix of the 2026-07-28 per-request envelope.
MODERN_META_PREFIX = "io.modelcontextprotocol/"


def capabilities(upstream: dict[str, Any], modern: bool) -> dict[str, Any]:
    """What the gateway advertises downstream, from what the upstream declared."""
    caps = {k: v for k, v in upstream.items() if k in PASSED_CAPABILITIES and isinstance(v, dict)}
    if modern:
        # No logging/setLevel, subscriptions or list-changed flags in 2026-07-28.
        caps.pop("logging", None)
        for key in ("tools", "prompts", "resources"):
            if key in caps:
                caps[key] = {}
    return caps


def _content(item: Any, version: str) -> Any:
    if not isinstance(item, dict):
        return item
    kind = item.get("type")
    if kind == "resource_link" and version < "2025-06-18":
        return {"type": "text", "text": f"{item.get('name', '')}: {item.get('uri', '')}"}
    if kind == "audio" and version < "2025-03-26":
        return {"type": "text", "text": f"[audio {item.get('mimeType', '')} omitted]"}
    return item


def for_version(method: str, result: Any, version: str) -> Any:
    """An upstream result as a client at C{version} may receive it."""
    if not isinstance(result, dict) or version >= "2025-06-18":
        return result
    if method == "tools/call" and isinstance(result.get("content"), list):
        shaped = {k: v for k, v in result.items() if k != "structuredContent"}
        shaped["content"] = [_content(item, version) for item in result["content"]]
        return shaped
    if method == "prompts/get" and isinstance(result.get("messages"), list):
        messages = []
        for message in result["messages"]:
            if isinstance(message, dict) and "content" in message:
                message = {**message, "content": _content(message["content"], version)}
            messages.append(message)
        return {**result, "messages": messages}
    return result


def strip_modern_meta(params: dict[str, Any]) -> dict[str, Any]:
    """A 2026-07-28 request's parameters without the envelope keys."""
    meta = params.get("_meta")
    if not isinstance(meta, dict) or not any(k.startswith(MODERN_META_PREFIX) for k in meta):
        return params
    kept = {k: v for k, v in meta.items() if not k.startswith(MODERN_META_PREFIX)}
    shaped = {k: v for k, v in params.items() if k != "_meta"}
    if kept:
        shaped["_meta"] = kept
    return shaped


def modern_result(method: str, result: Any, server_info: dict[str, Any]) -> Any:
    """The 2026-07-28 envelope around a result."""
    if not isinstance(result, dict):
        return result
    shaped = dict(result)
    shaped.setdefault("resultType", "complete")
    if method in CACHEABLE:
        # Results depend on the caller's scopes: private caches only.
        shaped.setdefault("ttlMs", 0)
        shaped.setdefault("cacheScope", "private")
    meta = shaped.get("_meta")
    meta = dict(meta) if isinstance(meta, dict) else {}
    meta.setdefault(SERVER_INFO_KEY, server_info)
    shaped["_meta"] = meta
    return shaped
