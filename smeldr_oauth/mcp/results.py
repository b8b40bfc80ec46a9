# -*- test-case-name: tests.test_mcp_results -*-
"""
What handlers return, turned into MCP results, per protocol version: a
tool's value into a C{CallToolResult}, a resource's into
C{ReadResourceResult.contents}, a prompt's into a C{GetPromptResult}, and
any result into the 2026-07-28 envelope.

This is the one place that knows which revision introduced what in a
result (C{structuredContent} and C{resource_link} in 2025-06-18, audio in
2025-03-26, C{resultType} and cache hints in 2026-07-28), so older
clients get what they understand.
"""

from __future__ import annotations

import base64
import json
from typing import TYPE_CHECKING, Any, Optional

from smeldr_oauth.mcp.content import CONTENT_TYPES, AudioContent, EmbeddedResource, ResourceLink
from smeldr_oauth.mcp.versions import CACHEABLE, SERVER_INFO_KEY
from smeldr_oauth.oauth.jsontext import encoder

if TYPE_CHECKING:
    from smeldr_oauth.mcp.app import Prompt, Resource, Tool

JSONValue = Any


def to_jsonable(value: object) -> JSONValue:
    """
    Tool results often hold datetimes, Decimals, tuples: render them as
    strings rather than failing the call.
    """
    return json.loads(json.dumps(value, default=str))


#: Built once: C{json.dumps} with options makes a new encoder per call,
#: C{JSONEncoder.encode} a new C encoder (see L{smeldr_oauth.oauth.jsontext}).
#: The standard separators: the text a tool's result has always had.
_dump = encoder(separators=(", ", ": "), ensure_ascii=False, default=str)


def content_json(item: object, version: str) -> dict[str, JSONValue]:
    """One content record as a client speaking C{version} understands it."""
    if isinstance(item, ResourceLink) and version < "2025-06-18":
        # resource_link did not exist yet: tell older clients in words.
        return {"type": "text", "text": f"{item.name}: {item.uri}"}
    if isinstance(item, AudioContent) and version < "2025-03-26":
        return {"type": "text", "text": f"[audio {item.mime_type} omitted]"}
    return item.as_json()  # type: ignore[attr-defined]


def tool_result(tool: "Tool", value: object, version: str) -> dict[str, JSONValue]:
    """Turn what a tool returned into a C{CallToolResult}."""
    structured: Optional[JSONValue] = None
    if isinstance(value, CONTENT_TYPES):
        content = [content_json(value, version)]
    elif isinstance(value, (list, tuple)) and value and all(isinstance(v, CONTENT_TYPES) for v in value):
        content = [content_json(v, version) for v in value]
    elif value is None:
        content = []
    elif isinstance(value, str):
        content = [{"type": "text", "text": value}]
    elif isinstance(value, bytes):
        content = [{"type": "text", "text": value.decode("utf-8", "replace")}]
    else:
        # One encoding for the text; decoded again only for structured
        # content (the same values to_jsonable gives: strings for what
        # JSON has no type for).
        text = _dump(value)
        content = [{"type": "text", "text": text}]
        if tool.structured:
            jsonable = json.loads(text)
            structured = jsonable if isinstance(jsonable, dict) else {"result": jsonable}
    result: dict[str, JSONValue] = {"content": content, "isError": False}
    if structured is not None and version >= "2025-06-18":
        result["structuredContent"] = structured
    return result


def error_result(message: str) -> dict[str, JSONValue]:
    """A C{CallToolResult} that reports a failure the model should read."""
    return {"content": [{"type": "text", "text": message}], "isError": True}


def resource_contents(resource: "Resource", uri: str, value: object) -> list[dict[str, JSONValue]]:
    """Turn what a resource handler returned into C{ReadResourceResult.contents}."""
    if isinstance(value, EmbeddedResource):
        return [value.as_json()["resource"]]
    if isinstance(value, list) and value and all(isinstance(v, EmbeddedResource) for v in value):
        return [v.as_json()["resource"] for v in value]
    entry: dict[str, JSONValue] = {"uri": uri}
    if isinstance(value, bytes):
        entry["blob"] = base64.b64encode(value).decode("ascii")
        entry["mimeType"] = resource.mime_type or "application/octet-stream"
    elif isinstance(value, str):
        entry["text"] = value
        if resource.mime_type:
            entry["mimeType"] = resource.mime_type
    else:
        entry["text"] = _dump(to_jsonable(value))
        entry["mimeType"] = "application/json"
    return [entry]


def prompt_result(prompt: "Prompt", value: object, version: str) -> dict[str, JSONValue]:
    """Turn what a prompt handler returned into a C{GetPromptResult}."""
    description = prompt.description
    if isinstance(value, dict) and "messages" in value:
        description = value.get("description", description)
        value = value["messages"]
    if isinstance(value, str):
        messages = [{"role": "user", "content": {"type": "text", "text": value}}]
    elif isinstance(value, list):
        messages = []
        for item in value:
            if isinstance(item, str):
                messages.append({"role": "user", "content": {"type": "text", "text": item}})
                continue
            if not isinstance(item, dict):
                raise TypeError("prompt messages must be dicts or strings")
            role = item.get("role", "user")
            content = item.get("content", "")
            if isinstance(content, str):
                content = {"type": "text", "text": content}
            elif isinstance(content, CONTENT_TYPES):
                content = content_json(content, version)
            messages.append({"role": role, "content": content})
    else:
        raise TypeError("a prompt must return a string, a list of messages, or a dict with messages")
    result: dict[str, JSONValue] = {"messages": messages}
    if description:
        result["description"] = description
    return result


def modern_envelope(method: str, result: dict[str, JSONValue], server_info: dict[str, str]) -> dict[str, JSONValue]:
    """
    A result as the 2026-07-28 exchange sends it: C{resultType}, cache
    hints on the cacheable methods (private, immediately stale: answers
    depend on the caller's scopes), and the server's name and version in
    C{_meta}.
    """
    shaped = dict(result)
    shaped.setdefault("resultType", "complete")
    if method in CACHEABLE:
        shaped.setdefault("ttlMs", 0)
        shaped.setdefault("cacheScope", "private")
    meta = dict(shaped.get("_meta") or {})
    meta.setdefault(SERVER_INFO_KEY, server_info)
    shaped["_meta"] = meta
    return shaped
