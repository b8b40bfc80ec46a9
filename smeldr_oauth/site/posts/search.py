# -*- test-case-name: tests.test_site_posts -*-
"""
Full-text search over the posts: free text made into a safe query for
either engine (L{search_terms}: operators, quotes, column filters and
parentheses dropped), and the engine's own ranked search with a snippet.
"""

from __future__ import annotations

import re
from typing import Callable

from smeldr_oauth.db.database import Transaction
from smeldr_oauth.site.posts.model import MAX_QUERY, MAX_QUERY_TERMS, InvalidQuery, SearchHit
from smeldr_oauth.site.posts.schema import COLUMNS, post_from_row

# FTS5 bareword-ish terms: letters/digits of any script, an optional
# trailing "*" for a prefix query.  Everything else is dropped.
_TERM = re.compile(r"(\w+)(\*?)", re.UNICODE)


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


def _ranked(select: str, terms: str, status: str | None, size: int, order: str) -> tuple[str, list[object]]:
    """
    The best C{size} hits of C{select} (whose condition ends with the
    engine's match on C{terms}), in C{status} only if given.
    """
    sql = select
    params: list[object] = [terms]
    if status is not None:
        sql += " AND posts.status = ?"
        params.append(status)
    sql += f" ORDER BY {order} LIMIT ?"
    params.append(size)
    return sql, params


def _fts5_search(
    txn: Transaction, query: str, status: str | None, size: int
) -> list[SearchHit]:
    """
    SQLite: BM25 over the FTS5 index (title weighted 10, tags 5, body 1),
    a snippet of the body around the match.
    """
    sql, params = _ranked(
        f"SELECT {COLUMNS},"
        " snippet(posts_fts, 1, '[', ']', '…', 16) AS snippet,"
        " bm25(posts_fts, 10.0, 1.0, 5.0) AS rank"
        " FROM posts_fts JOIN posts ON posts.id = posts_fts.rowid"
        " WHERE posts_fts MATCH ?",
        fts_query(query),
        status,
        size,
        "rank",
    )
    rows = txn.execute(sql, params).fetchall()
    return [SearchHit(post=post_from_row(r), snippet=r["snippet"] or "", rank=r["rank"]) for r in rows]


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
    inner, params = _ranked(
        f"SELECT {COLUMNS}, q.q,"
        " -ts_rank('{0.1, 0.1, 0.5, 1.0}', posts.search, q.q) AS rank"
        " FROM posts, to_tsquery('smeldr_search', smeldr_fold(?)) AS q (q)"
        " WHERE posts.search @@ q.q",
        ts_query(query),
        status,
        size,
        "rank, posts.id DESC",
    )
    sql = (
        f"SELECT {COLUMNS.replace('posts.', 'p.')},"
        " ts_headline('smeldr_search', p.body, p.q, ?) AS snippet, p.rank"
        f" FROM ({inner}) AS p ORDER BY p.rank, p.id DESC"
    )
    rows = txn.execute(sql, [_HEADLINE, *params]).fetchall()
    return [
        SearchHit(post=post_from_row(r), snippet=_ellipsis(r["snippet"] or "", r["body"]), rank=r["rank"])
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
SEARCH: dict[str, Callable[[Transaction, str, "str | None", int], list[SearchHit]]] = {
    "sqlite": _fts5_search,
    "postgresql": _tsvector_search,
}
