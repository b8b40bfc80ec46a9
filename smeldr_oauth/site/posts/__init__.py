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

Here: what the rest of the site uses (the records, the errors, the store
and its schema); the field rules from their own modules.
"""

from smeldr_oauth.site.posts.model import (
    DRAFT,
    MAX_LIMIT,
    MAX_SLUG,
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
from smeldr_oauth.site.posts.store import PostStore
from smeldr_oauth.site.posts.validation import one_line

__all__ = [
    "DRAFT",
    "MAX_LIMIT",
    "MAX_SLUG",
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
    "one_line",
]
