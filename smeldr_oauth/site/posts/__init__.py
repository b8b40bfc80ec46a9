# -*- test-case-name: tests.test_site_posts -*-
"""
The posts of the default site: what the MCP tools read and write.

A post has a unique slug (its address: C{smeldr://posts/<slug>}), a title, a
markdown body, tags, and a status (draft or published).  Every input is
validated here, not in the MCP layer, so that any caller (tools, CLI, tests)
gets the same typed errors: L{ValidationError} for bad input,
L{PostNotFound}, L{SlugTaken}.

One module per concern:

  - L{model<smeldr_oauth.site.posts.model>}: the records, the limits, the
    errors;
  - L{validation<smeldr_oauth.site.posts.validation>}: each field, and the
    pagination cursor;
  - L{schema<smeldr_oauth.site.posts.schema>}: the tables and their
    full-text index on SQLite and PostgreSQL, a row as a L{Post};
  - L{search<smeldr_oauth.site.posts.search>}: free text as a safe query,
    and each engine's ranked search;
  - L{store<smeldr_oauth.site.posts.store>}: L{PostStore}, the
    transactions.
"""

from smeldr_oauth.site.posts.model import (
    DRAFT,
    MAX_BODY,
    MAX_LIMIT,
    MAX_QUERY,
    MAX_QUERY_TERMS,
    MAX_SLUG,
    MAX_TAG,
    MAX_TAGS,
    MAX_TITLE,
    PUBLISHED,
    STATUSES,
    InvalidCursor,
    InvalidQuery,
    Post,
    PostNotFound,
    PostPage,
    SearchHit,
    SiteError,
    SlugTaken,
    ValidationError,
)
from smeldr_oauth.site.posts.schema import SCHEMA
from smeldr_oauth.site.posts.search import fts_query, search_terms, ts_query
from smeldr_oauth.site.posts.store import PostStore
from smeldr_oauth.site.posts.validation import (
    _CONTROL,
    decode_cursor,
    encode_cursor,
    slugify,
    validate_body,
    validate_limit,
    validate_slug,
    validate_status,
    validate_tag,
    validate_tags,
    validate_title,
)

__all__ = [
    "DRAFT",
    "MAX_BODY",
    "MAX_LIMIT",
    "MAX_QUERY",
    "MAX_QUERY_TERMS",
    "MAX_SLUG",
    "MAX_TAG",
    "MAX_TAGS",
    "MAX_TITLE",
    "PUBLISHED",
    "SCHEMA",
    "STATUSES",
    "InvalidCursor",
    "InvalidQuery",
    "Post",
    "PostNotFound",
    "PostPage",
    "PostStore",
    "SearchHit",
    "SiteError",
    "SlugTaken",
    "ValidationError",
    # site/tokens.py checks token names with the same rule.
    "_CONTROL",
    "decode_cursor",
    "encode_cursor",
    "fts_query",
    "search_terms",
    "slugify",
    "ts_query",
    "validate_body",
    "validate_limit",
    "validate_slug",
    "validate_status",
    "validate_tag",
    "validate_tags",
    "validate_title",
]
