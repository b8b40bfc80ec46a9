# -*- test-case-name: tests.test_site_posts -*-
"""
What a post is: its records, its limits and the site stores' typed errors
(every caller, tools, CLI or tests, gets the same ones).
"""

from __future__ import annotations

import attr

DRAFT = "draft"
PUBLISHED = "published"
STATUSES = (DRAFT, PUBLISHED)

MAX_SLUG = 80
MAX_TITLE = 200
MAX_BODY = 200_000
MAX_TAG = 40
MAX_TAGS = 20
MAX_QUERY = 500
MAX_QUERY_TERMS = 16
MAX_LIMIT = 100

class SiteError(Exception):
    """
    Base of the site stores' errors; C{str()} is a message fit to show to
    the caller (it never contains a secret).
    """


class ValidationError(SiteError):
    """
    An argument is malformed.

    @ivar field: the argument's name.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class InvalidQuery(ValidationError):
    """
    A search query has no searchable term, or the index rejected it.
    """


class InvalidCursor(ValidationError):
    """
    A pagination cursor was not one this store issued.
    """


class PostNotFound(SiteError):
    def __init__(self, slug: str) -> None:
        super().__init__(f"no post with slug {slug!r}")
        self.slug = slug


class SlugTaken(SiteError):
    def __init__(self, slug: str) -> None:
        super().__init__(f"slug {slug!r} is already used by another post")
        self.slug = slug


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class Post:
    """
    One post.  Times are POSIX seconds.

    @ivar published_at: when it was first published (kept if it goes back
        to draft, so re-publishing does not re-date it), or C{None}.
    """

    id: int
    slug: str
    title: str
    body: str
    status: str
    tags: tuple[str, ...]
    created_at: float
    updated_at: float
    published_at: float | None = None


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class PostPage:
    """
    One page of L{PostStore.list}: C{next_cursor} fetches the next page, or
    is C{None} on the last one.
    """

    posts: tuple[Post, ...]
    next_cursor: str | None = None


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class SearchHit:
    """
    A search result: the post, and a fragment of its body around the match
    with the matched terms in C{[brackets]}.
    """

    post: Post
    snippet: str
    rank: float
