# -*- test-case-name: tests.test_site_posts -*-
"""
The posts' tables, on SQLite and on PostgreSQL, and how a row becomes a
L{Post}.

Full-text search is kept in step with the table by the database itself, so
that no code path can forget to update it: on SQLite an FTS5 index
maintained by triggers, on PostgreSQL a generated C{tsvector} column with a
GIN index.  Both stem English words (Porter/Snowball), fold Latin
diacritics and weight title above tags above body
(L{smeldr_oauth.site.posts.search} queries them).
"""

from __future__ import annotations

from typing import Any

from smeldr_oauth.db.migrations import Migration, Schema
from smeldr_oauth.db.rows import from_row
from smeldr_oauth.site.posts.model import Post

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


# Row handling (in the pool's thread, or on the reactor thread).

#: The columns a L{Post} is read from, in its fields' order.
_FIELDS = ("id", "slug", "title", "body", "status", "tags", "created_at", "updated_at", "published_at")

#: The select list of L{_FIELDS}.
COLUMNS = ", ".join(f"posts.{name}" for name in _FIELDS)


def post_from_row(row: Any) -> Post:
    """
    The post in a row of L{COLUMNS}: the fields by name, the space-separated
    tags as a tuple.
    """
    return from_row(Post, row, tags=tuple(row["tags"].split()))
