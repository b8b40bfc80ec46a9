# -*- test-case-name: tests.test_site_posts -*-
"""
L{PostStore}: the posts in a L{Database}, every input validated before a
transaction starts.
"""

from __future__ import annotations

import builtins
import re
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.defer import fail as _fail
from twisted.internet.defer import succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from smeldr_oauth.db.database import Database, Transaction
from smeldr_oauth.db.errors import StoreConflict
from smeldr_oauth.db.rows import where
from smeldr_oauth.site.db import SecondsClock, wall_clock
from smeldr_oauth.site.posts.model import (
    DRAFT,
    MAX_SLUG,
    PUBLISHED,
    InvalidQuery,
    Post,
    PostNotFound,
    PostPage,
    SearchHit,
    SlugTaken,
    ValidationError,
)
from smeldr_oauth.site.posts.schema import COLUMNS, SCHEMA, post_from_row
from smeldr_oauth.site.posts.search import SEARCH, search_terms
from smeldr_oauth.site.posts.validation import (
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

log = Logger()


def _get(txn: Transaction, slug: str) -> Post:
    row = txn.execute(f"SELECT {COLUMNS} FROM posts WHERE slug = ?", (slug,)).fetchone()
    if row is None:
        raise PostNotFound(slug)
    return post_from_row(row)


def _set_tags(txn: Transaction, post_id: int, tags: Sequence[str]) -> None:
    txn.execute("DELETE FROM post_tags WHERE post_id = ?", (post_id,))
    if tags:
        txn.executemany(
            "INSERT INTO post_tags (post_id, tag) VALUES (?, ?)",
            [(post_id, t) for t in tags],
        )


def _slug_free(txn: Transaction, slug: str, except_id: int | None = None) -> bool:
    row = txn.execute("SELECT id FROM posts WHERE slug = ?", (slug,)).fetchone()
    return row is None or row["id"] == except_id


#: What a slug's beginning can be (L{validate_slug}'s characters).
_SLUG_PREFIX = re.compile(r"[a-z0-9-]*\Z")


class PostStore:
    """
    Posts in a L{Database} (SQLite or PostgreSQL).  Every method returns a
    L{Deferred}.
    """

    schema = SCHEMA

    def __init__(self, db: Database, clock: SecondsClock | None = None) -> None:
        """
        @param clock: the source of C{created_at}/C{updated_at}/
            C{published_at}; the wall clock if C{None}.
        """
        self._db = db
        self._clock = clock if clock is not None else wall_clock()

    def _read(self, func: Any, *args: Any) -> Deferred[Any]:
        return self._db.read(SCHEMA, func, *args)

    def _write(self, func: Any, *args: Any) -> Deferred[Any]:
        return self._db.write(SCHEMA, func, *args)

    # Queries

    def get(self, slug: str) -> Deferred[Post]:
        """
        The post with this slug.

        @raise PostNotFound: (in the Deferred) there is none.
        """
        try:
            slug = validate_slug(slug)
        except ValidationError:
            # A malformed slug names no post; say so plainly.
            return _fail(PostNotFound(slug if isinstance(slug, str) else repr(slug)))
        return self._read(_get, slug)

    def list(
        self,
        status: str | None = None,
        tag: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> Deferred[PostPage]:
        """
        Posts, newest first, C{limit} at a time.

        @param status: only posts in this status.
        @param tag: only posts with this tag.
        @param cursor: the C{next_cursor} of the previous page.
        """
        try:
            if status is not None:
                status = validate_status(status)
            if tag is not None:
                tag = validate_tag(tag)
            size = validate_limit(limit)
            before = decode_cursor(cursor) if cursor is not None else None
        except ValidationError as e:
            return _fail(e)

        def list_posts(txn: Transaction) -> PostPage:
            clause, params = where(
                ("status = ?", status),
                ("id IN (SELECT post_id FROM post_tags WHERE tag = ?)", tag),
                ("id < ?", before),
            )
            rows = txn.execute(f"SELECT {COLUMNS} FROM posts{clause} ORDER BY id DESC LIMIT ?", (*params, size + 1)).fetchall()
            posts = tuple(post_from_row(r) for r in rows[:size])
            more = len(rows) > size
            return PostPage(
                posts=posts, next_cursor=encode_cursor(posts[-1].id) if more else None
            )

        return self._read(list_posts)

    def search(
        self, query: str, status: str | None = None, limit: int | None = None
    ) -> Deferred[builtins.list[SearchHit]]:
        """
        Posts matching every word of C{query} in title, body or tags, best
        first (BM25, title weighted above tags above body).

        @raise InvalidQuery: (in the Deferred) nothing searchable in
            C{query}.
        """
        try:
            search_terms(query)
            if status is not None:
                status = validate_status(status)
            size = validate_limit(limit, default=10)
        except ValidationError as e:
            return _fail(e)

        def search_posts(txn: Transaction) -> list[SearchHit]:
            try:
                return SEARCH[txn.engine.name](txn, query, status, size)
            except Exception as e:
                if txn.engine.classify(e) is not None:
                    raise
                # Defence in depth: the sanitised queries should make this
                # unreachable.
                log.warn("search query rejected by the index: {error}", error=str(e))  # noqa: G010 - twisted.logger.Logger has warn, not warning
                raise InvalidQuery("query", "could not be searched; use plain words")

        return self._read(search_posts)

    def slugs(
        self, prefix: str = "", status: str | None = None, limit: int = 100
    ) -> Deferred[builtins.list[str]]:
        """
        Slugs starting with C{prefix} (for completion), alphabetical.
        """
        if not isinstance(prefix, str):
            prefix = ""
        # Slugs are lowercase, and LIKE is case-blind on SQLite only.
        prefix = prefix[:MAX_SLUG].lower()
        if not _SLUG_PREFIX.match(prefix):
            # No slug starts so (a slug is lowercase ASCII letters, digits
            # and hyphens); a lone surrogate ("\\ud800" in JSON) could not
            # even be sent to SQLite (an internal error and a traceback).
            return succeed([])
        escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")

        def slug_list(txn: Transaction) -> list[str]:
            sql = "SELECT slug FROM posts WHERE slug LIKE ? ESCAPE '\\'"
            params: list[object] = [escaped + "%"]
            if status is not None:
                sql += " AND status = ?"
                params.append(status)
            sql += " ORDER BY slug LIMIT ?"
            params.append(limit)
            return [r["slug"] for r in txn.execute(sql, params)]

        return self._read(slug_list)

    # Changes

    def create(
        self,
        title: str,
        body: str = "",
        slug: str | None = None,
        tags: Sequence[str] = (),
        status: str = DRAFT,
    ) -> Deferred[Post]:
        """
        Add a post.  Without C{slug}, one is made from the title, with
        C{-2}, C{-3}... appended if needed to make it unique; an explicit
        slug that is taken is an error.

        @raise SlugTaken: (in the Deferred) explicit C{slug} already used.
        """
        try:
            title = validate_title(title)
            body = validate_body(body)
            tag_tuple = validate_tags(tags)
            status = validate_status(status)
            explicit = slug is not None
            base = validate_slug(slug) if slug is not None else slugify(title)
        except ValidationError as e:
            return _fail(e)
        now = self._clock.seconds()

        def create_post(txn: Transaction) -> Post:
            # The slug is taken by the insert itself (ON CONFLICT DO
            # NOTHING): a look-up first and then the insert let two posts
            # made at once on PostgreSQL both find a slug free, and the
            # second insert failed on the unique slug (a traceback, "Tool
            # execution failed"); the look-up only skips slugs seen taken.
            chosen, n = base, 1
            while True:
                if _slug_free(txn, chosen):
                    row = txn.execute(
                        "INSERT INTO posts (slug, title, body, status, tags, created_at, updated_at, published_at)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (slug) DO NOTHING RETURNING id",
                        (
                            chosen,
                            title,
                            body,
                            status,
                            " ".join(tag_tuple),
                            now,
                            now,
                            now if status == PUBLISHED else None,
                        ),
                    ).fetchone()
                    if row is not None:
                        break
                if explicit:
                    raise SlugTaken(chosen)
                n += 1
                suffix = f"-{n}"
                chosen = base[: MAX_SLUG - len(suffix)].rstrip("-") + suffix
            _set_tags(txn, row[0], tag_tuple)
            return _get(txn, chosen)

        d = self._write(create_post)
        d.addCallback(_logged, "created")
        return d

    def update(
        self,
        slug: str,
        title: str | None = None,
        body: str | None = None,
        tags: Sequence[str] | None = None,
        new_slug: str | None = None,
        status: str | None = None,
    ) -> Deferred[Post]:
        """
        Change the given fields of a post (C{None} leaves one as it is).
        Moving to C{published} sets C{published_at} if it was never set.

        @raise PostNotFound: (in the Deferred)
        @raise SlugTaken: (in the Deferred) C{new_slug} used by another post.
        """
        try:
            slug = validate_slug(slug)
            changes: dict[str, object] = {}
            if title is not None:
                changes["title"] = validate_title(title)
            if body is not None:
                changes["body"] = validate_body(body)
            tag_tuple: tuple[str, ...] | None = None
            if tags is not None:
                tag_tuple = validate_tags(tags)
                changes["tags"] = " ".join(tag_tuple)
            if new_slug is not None:
                changes["slug"] = validate_slug(new_slug, "new_slug")
            if status is not None:
                changes["status"] = validate_status(status)
        except ValidationError as e:
            if e.field == "slug":
                return _fail(
                    PostNotFound(slug if isinstance(slug, str) else repr(slug))
                )
            return _fail(e)
        now = self._clock.seconds()

        def update_post(txn: Transaction) -> Post:
            post = _get(txn, slug)
            if "slug" in changes and not _slug_free(txn, str(changes["slug"]), post.id):
                raise SlugTaken(str(changes["slug"]))
            sets = [f"{column} = ?" for column in changes]
            params = list(changes.values())
            sets.append("updated_at = ?")
            params.append(now)
            if changes.get("status") == PUBLISHED:
                sets.append("published_at = COALESCE(published_at, ?)")
                params.append(now)
            txn.execute(f"UPDATE posts SET {', '.join(sets)} WHERE id = ?", (*params, post.id))
            if txn.rowcount == 0:
                # Deleted since _get found it (PostgreSQL, a delete_post at
                # the same moment; the update waited for it): its tags
                # would have failed their foreign key with a traceback.
                raise PostNotFound(slug)
            if tag_tuple is not None:
                _set_tags(txn, post.id, tag_tuple)
            return _get(txn, str(changes.get("slug", slug)))

        def renamed_meanwhile(failure: Failure) -> Failure:
            # Another post took the new slug after update_post found it
            # free (PostgreSQL, two changes at once): the unique slug
            # refused it, as SlugTaken says.
            failure.trap(StoreConflict)
            if "slug" in changes and "slug" in str(failure.value):
                raise SlugTaken(str(changes["slug"]))
            return failure

        d = self._write(update_post)
        d.addCallbacks(_logged, renamed_meanwhile, callbackArgs=("updated",))
        return d

    def publish(self, slug: str) -> Deferred[Post]:
        """
        Make a post public.  Publishing a published post changes nothing.
        """
        return self.update(slug, status=PUBLISHED)

    def unpublish(self, slug: str) -> Deferred[Post]:
        """
        Take a post back to draft (its first C{published_at} is kept).
        """
        return self.update(slug, status=DRAFT)

    def delete(self, slug: str) -> Deferred[Post]:
        """
        Remove a post (its tags and index entry go with it); returns it as
        it was.
        """
        try:
            slug = validate_slug(slug)
        except ValidationError:
            return _fail(PostNotFound(slug if isinstance(slug, str) else repr(slug)))

        def delete_post(txn: Transaction) -> Post:
            post = _get(txn, slug)
            txn.execute("DELETE FROM posts WHERE id = ?", (post.id,))
            return post

        d = self._write(delete_post)
        d.addCallback(_logged, "deleted")
        return d


def _logged(post: Post, action: str) -> Post:
    log.info("post {slug} {action}", slug=post.slug, action=action)
    return post
