# -*- test-case-name: tests.test_site_tools -*-
"""
How the site's posts look to a model: summaries (lists, search hits),
whole posts, what a write tool answers, and the output schemas that
describe each (C{structuredContent}).

L{smeldr_oauth.site.tools} registers the tools; this module only shapes
their results, so the shapes and their schemas are read side by side.
"""

from __future__ import annotations

import re
import time
from typing import Any

from smeldr_oauth.mcp.context import Context
from smeldr_oauth.site.posts import PUBLISHED, Post, SearchHit

POST_URI = "smeldr://posts/{slug}"
EXCERPT = 200


def post_uri(slug: str) -> str:
    return POST_URI.replace("{slug}", slug)


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def excerpt(body: str) -> str:
    flat = re.sub(r"\s+", " ", body).strip()
    return flat if len(flat) <= EXCERPT else flat[: EXCERPT - 1].rstrip() + "…"


def post_summary(post: Post) -> dict[str, Any]:
    """
    A post without its body: what lists and search results carry.
    """
    summary: dict[str, Any] = {
        "slug": post.slug,
        "title": post.title,
        "status": post.status,
        "tags": list(post.tags),
        "created_at": _iso(post.created_at),
        "updated_at": _iso(post.updated_at),
        "published_at": _iso(post.published_at),
        "excerpt": excerpt(post.body),
    }
    if post.status == PUBLISHED:
        summary["uri"] = post_uri(post.slug)
    return summary


def post_json(post: Post) -> dict[str, Any]:
    """
    A whole post, as tools return it.
    """
    full = post_summary(post)
    del full["excerpt"]
    full["body"] = post.body
    return full


def written_json(post: Post, ctx: Context) -> dict[str, Any]:
    """
    What a write tool answers: the post as written, with its body only when
    the caller may also read.  A token with the C{write} scope alone must
    not be able to read a draft by making a no-op change to it.
    """
    scopes = getattr(ctx, "scopes", None)
    if scopes is None or "read" in scopes:
        # No context: called directly from Python, not over MCP.
        return post_json(post)
    written = post_summary(post)
    del written["excerpt"]
    return written


def hit_json(hit: SearchHit) -> dict[str, Any]:
    found = post_summary(hit.post)
    found["snippet"] = hit.snippet
    return found


# Output schemas: what structuredContent holds.

_NULLABLE_STRING = {"type": ["string", "null"]}
_SUMMARY_PROPERTIES: dict[str, Any] = {
    "slug": {"type": "string"},
    "title": {"type": "string"},
    "status": {"type": "string", "enum": ["draft", "published"]},
    "tags": {"type": "array", "items": {"type": "string"}},
    "created_at": {"type": "string", "format": "date-time"},
    "updated_at": {"type": "string", "format": "date-time"},
    "published_at": {**_NULLABLE_STRING, "format": "date-time"},
    "uri": {"type": "string", "description": "resource URI (published posts only)"},
}
_REQUIRED = [
    "slug",
    "title",
    "status",
    "tags",
    "created_at",
    "updated_at",
    "published_at",
]
POST_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        **_SUMMARY_PROPERTIES,
        "body": {"type": "string", "description": "markdown"},
    },
    "required": _REQUIRED + ["body"],
}
WRITTEN_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        **_SUMMARY_PROPERTIES,
        "body": {"type": "string", "description": "markdown; only for callers that may also read"},
    },
    "required": _REQUIRED,
}
SUMMARY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {**_SUMMARY_PROPERTIES, "excerpt": {"type": "string"}},
    "required": _REQUIRED + ["excerpt"],
}
LIST_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "posts": {"type": "array", "items": SUMMARY_SCHEMA},
        "next_cursor": {
            **_NULLABLE_STRING,
            "description": "pass as cursor to get the next page; null on the last page",
        },
    },
    "required": ["posts", "next_cursor"],
}
SEARCH_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "results": {
            "type": "array",
            "items": {
                **SUMMARY_SCHEMA,
                "properties": {
                    **SUMMARY_SCHEMA["properties"],
                    "snippet": {
                        "type": "string",
                        "description": "matching text, terms in [brackets]",
                    },
                },
            },
        },
    },
    "required": ["results"],
}
DELETED_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"deleted": {"type": "string"}, "title": {"type": "string"}},
    "required": ["deleted", "title"],
}
