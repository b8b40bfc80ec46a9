# -*- test-case-name: tests.test_site_posts -*-
"""
The posts of the default site: what the MCP tools read and write.

A post has a unique slug (its address: C{smeldr://posts/<slug>}), a title, a
markdown body, tags, and a status (draft or published).  Full-text search
is kept in step with the table by the database itself, so that no code path
can forget to update it: on SQLite an FTS5 index maintained by triggers, on
PostgreSQL a generated C{tsvector} column with a GIN index.  Both stem
English words (Porter/Snowball), fold Latin diacritics, weight title above
tags above body, and take the same sanitised queries (L{search_terms}), so
the tools behave the same on either.

Every input is validated here, not in the MCP layer, so that any caller
(tools, CLI, tests) gets the same typed errors: L{ValidationError} for bad
input, L{PostNotFound}, L{SlugTaken}.
"""

from __future__ import annotations

import base64
import binascii
import builtins
import re
import unicodedata
from collections.abc import Sequence
from typing import Any, Callable

import attr
from twisted.internet.defer import Deferred
from twisted.internet.defer import fail as _fail
from twisted.logger import Logger

from smeldr_oauth.db.database import Database, Transaction
from smeldr_oauth.db.migrations import Migration, Schema
from smeldr_oauth.site.db import SecondsClock, wall_clock

log = Logger()

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

_SLUG = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*\Z")
_TAG = _SLUG
# Control characters other than tab/newline/carriage return.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# FTS5 bareword-ish terms: letters/digits of any script, an optional
# trailing "*" for a prefix query.  Everything else is dropped.
_TERM = re.compile(r"(\w+)(\*?)", re.UNICODE)


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


#: Latin letters with diacritics and the plain letters they fold to, as
#: FTS5's C{remove_diacritics} does: PostgreSQL's own C{unaccent} is an
#: extension a database owner may not be allowed to install.  Constant on
#: purpose: the search index is built with it.
_FOLD_FROM = (
    "ÀÁÂÃÄÅÇÈÉÊËÌÍÎÏÑÒÓÔÕÖÙÚÛÜÝàáâãäåçèéêëìíîïñòóôõöùúûüýÿĀāĂăĄąĆćĈĉĊċČčĎďĒēĔĕĖėĘęĚěĜĝ"
    "ĞğĠġĢģĤĥĨĩĪīĬĭĮįİĴĵĶķĹĺĻļĽľŃńŅņŇňŌōŎŏŐőŔŕŖŗŘřŚśŜŝŞşŠšŢţŤťŨũŪūŬŭŮůŰűŲųŴŵŶŷŸŹźŻżŽž"
    "ſƠơƯưǍǎǏǐǑǒǓǔǕǖǗǘǙǚǛǜǞǟǠǡǦǧǨǩǪǫǬǭǰǴǵǸǹǺǻȀȁȂȃȄȅȆȇȈȉȊȋȌȍȎȏȐȑȒȓȔȕȖȗȘșȚțȞȟȦȧȨȩȪȫȬȭȮȯȰȱȲȳ"
    "ØøĐđĦħŁłŦŧı"
)
_FOLD_TO = (
    "AAAAAACEEEEIIIINOOOOOUUUUYaaaaaaceeeeiiiinooooouuuuyyAaAaAaCcCcCcCcDdEeEeEeEeEeGg"
    "GgGgGgHhIiIiIiIiIJjKkLlLlLlNnNnNnOoOoOoRrRrRrSsSsSsSsTtTtUuUuUuUuUuUuWwYyYZzZzZz"
    "sOoUuAaIiOoUuUuUuUuUuAaAaGgKkOoOojGgNnAaAaAaEeEeIiIiOoOoRrRrUuUuSsTtHhAaEeOoOoOoOoYy"
    "OoDdHhLlTti"
)

#: PostgreSQL: the document a post is searched by, weighted title (A),
#: tags (B), body (C).
_DOCUMENT = (
    "setweight(to_tsvector('smeldr_search', smeldr_fold(title)), 'A')"
    " || setweight(to_tsvector('smeldr_search', smeldr_fold(tags)), 'B')"
    " || setweight(to_tsvector('smeldr_search', smeldr_fold(body)), 'C')"
)

_TAGS_TABLE = (
    """
    CREATE TABLE post_tags (
        post_id INTEGER NOT NULL REFERENCES posts (id) ON DELETE CASCADE,
        tag TEXT NOT NULL,
        PRIMARY KEY (post_id, tag)
    )
    """,
    "CREATE INDEX post_tags_tag ON post_tags (tag, post_id)",
)

SCHEMA = Schema(
    "posts",
    (
        Migration(
            1,
            sqlite=(
                """
                CREATE TABLE posts (
                    id INTEGER PRIMARY KEY AUTOINCREMENT,
                    slug TEXT NOT NULL UNIQUE,
                    title TEXT NOT NULL,
                    body TEXT NOT NULL DEFAULT '',
                    status TEXT NOT NULL DEFAULT 'draft'
                        CHECK (status IN ('draft', 'published')),
                    -- space-separated copy of post_tags, for the full-text index
                    tags TEXT NOT NULL DEFAULT '',
                    created_at REAL NOT NULL,
                    updated_at REAL NOT NULL,
                    published_at REAL
                )
                """,
                "CREATE INDEX posts_status ON posts (status, id)",
                *_TAGS_TABLE,
                """
                CREATE VIRTUAL TABLE posts_fts USING fts5(
                    title, body, tags,
                    content='posts', content_rowid='id',
                    tokenize='porter unicode61 remove_diacritics 2'
                )
                """,
                """
                CREATE TRIGGER posts_fts_insert AFTER INSERT ON posts BEGIN
                    INSERT INTO posts_fts (rowid, title, body, tags)
                    VALUES (new.id, new.title, new.body, new.tags);
                END
                """,
                """
                CREATE TRIGGER posts_fts_delete AFTER DELETE ON posts BEGIN
                    INSERT INTO posts_fts (posts_fts, rowid, title, body, tags)
                    VALUES ('delete', old.id, old.title, old.body, old.tags);
                END
                """,
                """
                CREATE TRIGGER posts_fts_update AFTER UPDATE OF title, body, tags ON posts BEGIN
                    INSERT INTO posts_fts (posts_fts, rowid, title, body, tags)
                    VALUES ('delete', old.id, old.title, old.body, old.tags);
                    INSERT INTO posts_fts (rowid, title, body, tags)
                    VALUES (new.id, new.title, new.body, new.tags);
                END
                """,
            ),
            postgresql=(
                # English stemming without a stop-word list (as FTS5's
                # porter tokenizer: searching "the" finds posts with "the").
                "CREATE TEXT SEARCH DICTIONARY smeldr_stem (TEMPLATE = snowball, Language = english)",
                "CREATE TEXT SEARCH CONFIGURATION smeldr_search (COPY = pg_catalog.english)",
                "ALTER TEXT SEARCH CONFIGURATION smeldr_search ALTER MAPPING FOR"
                " asciiword, asciihword, hword_asciipart, word, hword, hword_part WITH smeldr_stem",
                "CREATE FUNCTION smeldr_fold(text) RETURNS text LANGUAGE sql IMMUTABLE PARALLEL SAFE"
                f" AS $$ SELECT translate($1, '{_FOLD_FROM}', '{_FOLD_TO}') $$",
                f"""
                CREATE TABLE posts (
                    id INTEGER GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
                    slug TEXT NOT NULL UNIQUE,
                    title TEXT NOT NULL,
                    body TEXT NOT NULL DEFAULT '',
                    status TEXT NOT NULL DEFAULT 'draft'
                        CHECK (status IN ('draft', 'published')),
                    tags TEXT NOT NULL DEFAULT '',
                    created_at DOUBLE PRECISION NOT NULL,
                    updated_at DOUBLE PRECISION NOT NULL,
                    published_at DOUBLE PRECISION,
                    search tsvector GENERATED ALWAYS AS ({_DOCUMENT}) STORED
                )
                """,
                "CREATE INDEX posts_status ON posts (status, id)",
                "CREATE INDEX posts_search ON posts USING GIN (search)",
                *_TAGS_TABLE,
            ),
        ),
    ),
    tables=("posts", "post_tags"),
)


# Validation: plain functions of plain values.


def validate_slug(value: object, field: str = "slug") -> str:
    if not isinstance(value, str):
        raise ValidationError(field, "must be a string")
    if len(value) > MAX_SLUG:
        raise ValidationError(field, f"must be at most {MAX_SLUG} characters")
    if not _SLUG.match(value):
        raise ValidationError(
            field,
            "must be lowercase letters, digits and single hyphens (e.g. 'my-first-post')",
        )
    return value


def slugify(title: str) -> str:
    """
    A slug made from a title: accents folded to ASCII, runs of anything else
    turned into one hyphen, cut at a hyphen within L{MAX_SLUG}.  A title with
    nothing ASCII-foldable gives C{"post"}.
    """
    folded = (
        unicodedata.normalize("NFKD", title).encode("ascii", "ignore").decode("ascii")
    )
    slug = re.sub(r"[^a-z0-9]+", "-", folded.lower()).strip("-")
    if len(slug) > MAX_SLUG:
        slug = (
            slug[:MAX_SLUG].rsplit("-", 1)[0]
            if "-" in slug[:MAX_SLUG]
            else slug[:MAX_SLUG]
        )
        slug = slug.strip("-")
    return slug or "post"


def validate_title(value: object) -> str:
    if not isinstance(value, str):
        raise ValidationError("title", "must be a string")
    value = value.strip()
    if not value:
        raise ValidationError("title", "must not be empty")
    if len(value) > MAX_TITLE:
        raise ValidationError("title", f"must be at most {MAX_TITLE} characters")
    if "\n" in value or "\r" in value or _CONTROL.search(value):
        raise ValidationError("title", "must be one line without control characters")
    return value


def validate_body(value: object) -> str:
    if not isinstance(value, str):
        raise ValidationError("body", "must be a string")
    if len(value) > MAX_BODY:
        raise ValidationError("body", f"must be at most {MAX_BODY} characters")
    if _CONTROL.search(value):
        raise ValidationError("body", "must not contain control characters")
    return value


def validate_tag(value: object, field: str = "tag") -> str:
    if not isinstance(value, str):
        raise ValidationError(field, "must be a string")
    tag = value.strip().lower()
    if len(tag) > MAX_TAG or not _TAG.match(tag):
        raise ValidationError(
            field,
            f"{value[:MAX_TAG]!r} must be lowercase letters, digits and hyphens, at most {MAX_TAG}",
        )
    return tag


def validate_tags(value: object) -> tuple[str, ...]:
    """
    Tags, lowercased, de-duplicated, in the order given.
    """
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise ValidationError("tags", "must be a list of strings")
    tags: list[str] = []
    for item in value:
        tag = validate_tag(item, "tags")
        if tag not in tags:
            tags.append(tag)
    if len(tags) > MAX_TAGS:
        raise ValidationError("tags", f"at most {MAX_TAGS} tags")
    return tuple(tags)


def validate_status(value: object) -> str:
    if value not in STATUSES:
        raise ValidationError("status", "must be 'draft' or 'published'")
    assert isinstance(value, str)
    return value


def validate_limit(value: object, default: int = 20) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError("limit", "must be an integer")
    if not 1 <= value <= MAX_LIMIT:
        raise ValidationError("limit", f"must be between 1 and {MAX_LIMIT}")
    return value


def search_terms(query: object) -> list[tuple[str, bool]]:
    """
    The words of a free-text query, each with whether it ends in C{*} (a
    prefix search).  Operators, quotes, column filters and parentheses are
    dropped, so that what is left is always a valid query for either
    engine.

    @raise InvalidQuery: no searchable word.
    """
    if not isinstance(query, str):
        raise InvalidQuery("query", "must be a string")
    if len(query) > MAX_QUERY:
        raise InvalidQuery("query", f"must be at most {MAX_QUERY} characters")
    terms = []
    for word, star in _TERM.findall(query):
        if word.upper() in ("AND", "OR", "NOT", "NEAR"):
            continue
        terms.append((word, bool(star)))
        if len(terms) == MAX_QUERY_TERMS:
            break
    if not terms:
        raise InvalidQuery("query", "has no words to search for")
    return terms


def fts_query(query: object) -> str:
    """
    Free text as a safe FTS5 query: each word becomes a quoted string (a
    trailing C{*} keeps prefix matching), all of them required.

    @raise InvalidQuery: no searchable word.
    """
    # "_" is a word character for the regex but a separator for the
    # unicode61 tokenizer; either way it is safe inside quotes.
    return " ".join(f'"{word}"' + ("*" if prefix else "") for word, prefix in search_terms(query))


def ts_query(query: object) -> str:
    """
    Free text as a safe PostgreSQL C{to_tsquery} text: the same words, all
    of them required (C{&}), a trailing C{*} as C{:*}.  Words are letters,
    digits and underscores only, which C{to_tsquery} never reads as syntax.

    @raise InvalidQuery: no searchable word.
    """
    return " & ".join(word + (":*" if prefix else "") for word, prefix in search_terms(query))


def encode_cursor(post_id: int) -> str:
    return base64.urlsafe_b64encode(f"p1:{post_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: object) -> int:
    if not isinstance(cursor, str) or len(cursor) > 64:
        raise InvalidCursor("cursor", "is not a cursor from a previous page")
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode(
            "ascii"
        )
    except (binascii.Error, ValueError):
        raise InvalidCursor("cursor", "is not a cursor from a previous page")
    prefix, _, number = raw.partition(":")
    if prefix != "p1" or not number.isdigit() or len(number) > 18:
        raise InvalidCursor("cursor", "is not a cursor from a previous page")
    return int(number)


# Row handling (in the pool's thread, or on the reactor thread).

_COLUMNS = (
    "posts.id, posts.slug, posts.title, posts.body, posts.status, posts.tags,"
    " posts.created_at, posts.updated_at, posts.published_at"
)


def _post(row: Any) -> Post:
    return Post(
        id=row["id"],
        slug=row["slug"],
        title=row["title"],
        body=row["body"],
        status=row["status"],
        tags=tuple(row["tags"].split()),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        published_at=row["published_at"],
    )


def _get(txn: Transaction, slug: str) -> Post:
    row = txn.execute(f"SELECT {_COLUMNS} FROM posts WHERE slug = ?", (slug,)).fetchone()
    if row is None:
        raise PostNotFound(slug)
    return _post(row)


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


def _fts5_search(
    txn: Transaction, query: str, status: str | None, size: int
) -> list[SearchHit]:
    """
    SQLite: BM25 over the FTS5 index (title weighted 10, tags 5, body 1),
    a snippet of the body around the match.
    """
    sql = (
        f"SELECT {_COLUMNS},"
        " snippet(posts_fts, 1, '[', ']', '…', 16) AS snippet,"
        " bm25(posts_fts, 10.0, 1.0, 5.0) AS rank"
        " FROM posts_fts JOIN posts ON posts.id = posts_fts.rowid"
        " WHERE posts_fts MATCH ?"
    )
    params: list[object] = [fts_query(query)]
    if status is not None:
        sql += " AND posts.status = ?"
        params.append(status)
    sql += " ORDER BY rank LIMIT ?"
    params.append(size)
    rows = txn.execute(sql, params).fetchall()
    return [SearchHit(post=_post(r), snippet=r["snippet"] or "", rank=r["rank"]) for r in rows]


#: C{ts_headline} options giving what FTS5's C{snippet()} gives.
_HEADLINE = "StartSel=[, StopSel=], MaxWords=16, MinWords=8, MaxFragments=1"


def _tsvector_search(
    txn: Transaction, query: str, status: str | None, size: int
) -> list[SearchHit]:
    """
    PostgreSQL: C{ts_rank} with weights matching the FTS5 ranking's order
    (title, then tags, then body), negated so that lower is better as with
    BM25; the headline is made for the page of hits only.
    """
    inner = (
        f"SELECT {_COLUMNS}, q.q,"
        " -ts_rank('{0.1, 0.1, 0.5, 1.0}', posts.search, q.q) AS rank"
        " FROM posts, to_tsquery('smeldr_search', smeldr_fold(?)) AS q (q)"
        " WHERE posts.search @@ q.q"
    )
    params: list[object] = [ts_query(query)]
    if status is not None:
        inner += " AND posts.status = ?"
        params.append(status)
    inner += " ORDER BY rank, posts.id DESC LIMIT ?"
    params.append(size)
    sql = (
        f"SELECT {_COLUMNS.replace('posts.', 'p.')},"
        " ts_headline('smeldr_search', p.body, p.q, ?) AS snippet, p.rank"
        f" FROM ({inner}) AS p ORDER BY p.rank, p.id DESC"
    )
    rows = txn.execute(sql, [_HEADLINE, *params]).fetchall()
    return [
        SearchHit(post=_post(r), snippet=_ellipsis(r["snippet"] or "", r["body"]), rank=r["rank"])
        for r in rows
    ]


def _ellipsis(headline: str, body: str) -> str:
    """
    Mark, as FTS5 does, a headline that does not reach the start or the end
    of the body.
    """
    plain = headline.replace("[", "").replace("]", "").strip()
    if not plain:
        return headline
    if not body.lstrip().startswith(plain[:20]):
        headline = "…" + headline
    if not body.rstrip().endswith(plain[-20:]):
        headline += "…"
    return headline


#: Full-text search, by engine.
_SEARCH: dict[str, Callable[[Transaction, str, "str | None", int], list[SearchHit]]] = {
    "sqlite": _fts5_search,
    "postgresql": _tsvector_search,
}


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
            where: list[str] = []
            params: list[object] = []
            if status is not None:
                where.append("status = ?")
                params.append(status)
            if tag is not None:
                where.append("id IN (SELECT post_id FROM post_tags WHERE tag = ?)")
                params.append(tag)
            if before is not None:
                where.append("id < ?")
                params.append(before)
            sql = f"SELECT {_COLUMNS} FROM posts"
            if where:
                sql += " WHERE " + " AND ".join(where)
            sql += " ORDER BY id DESC LIMIT ?"
            rows = txn.execute(sql, (*params, size + 1)).fetchall()
            posts = tuple(_post(r) for r in rows[:size])
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
                return _SEARCH[txn.engine.name](txn, query, status, size)
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
            chosen = base
            if not _slug_free(txn, chosen):
                if explicit:
                    raise SlugTaken(chosen)
                n = 2
                while True:
                    suffix = f"-{n}"
                    chosen = base[: MAX_SLUG - len(suffix)].rstrip("-") + suffix
                    if _slug_free(txn, chosen):
                        break
                    n += 1
            row = txn.execute(
                "INSERT INTO posts (slug, title, body, status, tags, created_at, updated_at, published_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
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
            if tag_tuple is not None:
                _set_tags(txn, post.id, tag_tuple)
            return _get(txn, str(changes.get("slug", slug)))

        d = self._write(update_post)
        d.addCallback(_logged, "updated")
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
