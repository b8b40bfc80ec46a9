"""
Tests for L{smeldr_oauth.site.posts}: a real SQLite file in the trial temp
directory behind the real (threaded) adbapi pool; the same tests run on
PostgreSQL and on the reactor thread from C{tests.test_site_db}.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from smeldr_oauth.db import open_database
from smeldr_oauth.site.posts import (
    MAX_SLUG,
    SCHEMA,
    InvalidCursor,
    InvalidQuery,
    PostNotFound,
    PostStore,
    SlugTaken,
    ValidationError,
)
from smeldr_oauth.site.posts.search import fts_query, ts_query
from smeldr_oauth.site.posts.validation import (
    decode_cursor,
    encode_cursor,
    one_line,
    slugify,
    validate_slug,
    validate_tags,
    validate_title,
)


class PureTests(SynchronousTestCase):
    def test_slugify(self) -> None:
        self.assertEqual(slugify("Hello, World!"), "hello-world")
        self.assertEqual(
            slugify("Crème brûlée -- à la carte"), "creme-brulee-a-la-carte"
        )
        self.assertEqual(slugify("日本語"), "post")
        long = slugify("word " * 40)
        self.assertLessEqual(len(long), MAX_SLUG)
        validate_slug(long)

    @given(st.text(max_size=300))
    def test_slugify_always_valid(self, title: str) -> None:
        validate_slug(slugify(title))

    def test_validate_slug(self) -> None:
        for bad in [
            "",
            "A",
            "a b",
            "-a",
            "a-",
            "a--b",
            "a_b",
            "é",
            "a" * (MAX_SLUG + 1),
            3,
            None,
        ]:
            self.assertRaises(ValidationError, validate_slug, bad)
        self.assertEqual(validate_slug("a-1-b"), "a-1-b")

    def test_validate_tags(self) -> None:
        self.assertEqual(
            validate_tags(["Python", "python", "web-dev"]), ("python", "web-dev")
        )
        self.assertRaises(ValidationError, validate_tags, "python")
        self.assertRaises(ValidationError, validate_tags, ["two words"])
        self.assertRaises(ValidationError, validate_tags, [1])
        self.assertRaises(ValidationError, validate_tags, [f"t{i}" for i in range(21)])

    def test_one_line(self) -> None:
        """
        One rule for a title and a site token's name: trimmed, not empty,
        bounded, one line without control characters; a tab only where
        allowed (titles).
        """
        self.assertEqual(one_line("  Hello\tthere ", "title", 20), "Hello\tthere")
        self.assertEqual(one_line("x" * 20, "title", 20), "x" * 20)
        for bad in ("", "   ", "x" * 21, "a\nb", "a\rb", "a\x00b", "a\x7fb", "a\ud800", 3, None):
            with self.assertRaises(ValidationError) as caught:
                one_line(bad, "title", 20)
            self.assertEqual(caught.exception.field, "title")
        self.assertRaises(ValidationError, one_line, "a\tb", "name", 20, tab=False)
        self.assertEqual(validate_title(" A title "), "A title")

    def test_fts_query(self) -> None:
        self.assertEqual(fts_query("hello world"), '"hello" "world"')
        self.assertEqual(fts_query('title:"x" OR (y* NEAR z'), '"title" "x" "y"* "z"')
        self.assertRaises(InvalidQuery, fts_query, '"" ()*')
        self.assertRaises(InvalidQuery, fts_query, "AND OR")
        self.assertRaises(InvalidQuery, fts_query, 5)

    def test_ts_query(self) -> None:
        self.assertEqual(ts_query("hello world"), "hello & world")
        self.assertEqual(ts_query('title:"x" OR (y* NEAR z'), "title & x & y:* & z")
        self.assertRaises(InvalidQuery, ts_query, '"" ()*')

    @given(st.text(max_size=200))
    def test_fts_query_always_parses(self, query: str) -> None:
        """
        Whatever the input, the sanitised query is valid FTS5 syntax.
        """
        try:
            match = fts_query(query)
        except InvalidQuery:
            return
        connection = sqlite3.connect(":memory:")
        connection.execute("CREATE VIRTUAL TABLE t USING fts5(a)")
        connection.execute("SELECT * FROM t WHERE t MATCH ?", (match,)).fetchall()

    def test_cursor_round_trip(self) -> None:
        self.assertEqual(decode_cursor(encode_cursor(42)), 42)
        for bad in ["", "!!", "eDox", encode_cursor(1) + "A", None, 3, "x" * 100]:
            self.assertRaises(InvalidCursor, decode_cursor, bad)


class PostStoreTests(TestCase):
    """
    The post store on a SQLite file, on a database thread; see
    C{tests.test_site_db} for the other engines and modes.
    """

    threads = 1

    def location(self) -> str:
        return self.mktemp() + ".db"

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.clock = Clock()
        self.clock.advance(1000)
        self.db = open_database(self.location(), reactor, threads=self.threads, clock=self.clock)
        self.addCleanup(self.db.close)
        self.store = PostStore(self.db, clock=self.clock)

    @inlineCallbacks
    def test_create_and_get(self):
        post = yield self.store.create(
            "Hello, World", "Some *markdown*", tags=["Intro", "meta"]
        )
        self.assertEqual(post.slug, "hello-world")
        self.assertEqual(post.title, "Hello, World")
        self.assertEqual(post.status, "draft")
        self.assertEqual(post.tags, ("intro", "meta"))
        self.assertEqual(
            (post.created_at, post.updated_at, post.published_at), (1000, 1000, None)
        )
        again = yield self.store.get("hello-world")
        self.assertEqual(again, post)

    @inlineCallbacks
    def test_derived_slug_made_unique(self):
        a = yield self.store.create("Same")
        b = yield self.store.create("Same")
        c = yield self.store.create("Same")
        self.assertEqual([a.slug, b.slug, c.slug], ["same", "same-2", "same-3"])

    @inlineCallbacks
    def test_explicit_slug_taken(self):
        yield self.store.create("One", slug="taken")
        yield self.assertFailure(self.store.create("Two", slug="taken"), SlugTaken)

    @inlineCallbacks
    def test_validation_errors(self):
        yield self.assertFailure(self.store.create(""), ValidationError)
        yield self.assertFailure(
            self.store.create("x", slug="Bad Slug"), ValidationError
        )
        yield self.assertFailure(self.store.create("x", status="live"), ValidationError)
        yield self.assertFailure(self.store.create("x", body=5), ValidationError)  # type: ignore[arg-type]
        yield self.assertFailure(self.store.create("x", tags="a,b"), ValidationError)  # type: ignore[arg-type]
        yield self.assertFailure(self.store.list(limit=0), ValidationError)
        yield self.assertFailure(self.store.list(limit="5"), ValidationError)  # type: ignore[arg-type]
        yield self.assertFailure(self.store.list(cursor="nope"), InvalidCursor)
        yield self.assertFailure(self.store.get("No Such"), PostNotFound)
        yield self.assertFailure(self.store.get("missing"), PostNotFound)

    @inlineCallbacks
    def test_update(self):
        yield self.store.create("Old", body="old body", tags=["a"])
        self.clock.advance(5)
        post = yield self.store.update(
            "old", title="New", body="new body", tags=["b", "c"], new_slug="new"
        )
        self.assertEqual(
            (post.slug, post.title, post.body, post.tags),
            ("new", "New", "new body", ("b", "c")),
        )
        self.assertEqual((post.created_at, post.updated_at), (1000, 1005))
        yield self.assertFailure(self.store.get("old"), PostNotFound)
        page = yield self.store.list(tag="a")
        self.assertEqual(page.posts, ())
        page = yield self.store.list(tag="c")
        self.assertEqual([p.slug for p in page.posts], ["new"])
        yield self.assertFailure(self.store.update("old", title="x"), PostNotFound)
        yield self.store.create("Other")
        yield self.assertFailure(self.store.update("other", new_slug="new"), SlugTaken)
        # Renaming to its own slug is fine.
        same = yield self.store.update("new", new_slug="new")
        self.assertEqual(same.slug, "new")

    @inlineCallbacks
    def test_publish_keeps_first_date(self):
        yield self.store.create("P")
        self.clock.advance(10)
        post = yield self.store.publish("p")
        self.assertEqual((post.status, post.published_at), ("published", 1010))
        self.clock.advance(10)
        post = yield self.store.unpublish("p")
        self.assertEqual((post.status, post.published_at), ("draft", 1010))
        self.clock.advance(10)
        post = yield self.store.publish("p")
        self.assertEqual(
            (post.status, post.published_at, post.updated_at), ("published", 1010, 1030)
        )

    @inlineCallbacks
    def test_create_published(self):
        post = yield self.store.create("Now", status="published")
        self.assertEqual(post.published_at, 1000)

    @inlineCallbacks
    def test_delete(self):
        yield self.store.create("Gone", body="unique-word", tags=["t"])
        post = yield self.store.delete("gone")
        self.assertEqual(post.slug, "gone")
        yield self.assertFailure(self.store.get("gone"), PostNotFound)
        yield self.assertFailure(self.store.delete("gone"), PostNotFound)
        hits = yield self.store.search("unique")
        self.assertEqual(hits, [])
        # Tag rows went with it (foreign key cascade).
        count = yield self.db.read(
            SCHEMA, lambda txn: txn.execute("SELECT COUNT(*) FROM post_tags").fetchone()[0]
        )
        self.assertEqual(count, 0)

    @inlineCallbacks
    def test_list_pagination_and_filters(self):
        for i in range(7):
            yield self.store.create(
                f"Post {i}", tags=["even"] if i % 2 == 0 else ["odd"]
            )
        yield self.store.publish("post-3")
        page = yield self.store.list(limit=3)
        self.assertEqual([p.slug for p in page.posts], ["post-6", "post-5", "post-4"])
        page = yield self.store.list(limit=3, cursor=page.next_cursor)
        self.assertEqual([p.slug for p in page.posts], ["post-3", "post-2", "post-1"])
        page = yield self.store.list(limit=3, cursor=page.next_cursor)
        self.assertEqual([p.slug for p in page.posts], ["post-0"])
        self.assertIsNone(page.next_cursor)
        page = yield self.store.list(tag="odd")
        self.assertEqual([p.slug for p in page.posts], ["post-5", "post-3", "post-1"])
        page = yield self.store.list(status="published")
        self.assertEqual([p.slug for p in page.posts], ["post-3"])
        page = yield self.store.list(status="draft", tag="odd")
        self.assertEqual([p.slug for p in page.posts], ["post-5", "post-1"])

    @inlineCallbacks
    def test_search(self):
        yield self.store.create(
            "Twisted deferreds",
            body="Callbacks and errbacks explained.",
            tags=["python"],
        )
        yield self.store.create(
            "Gardening", body="Tomatoes need sun. Twisted vines too."
        )
        yield self.store.create("Cooking", body="Nothing here", tags=["twisted"])
        hits = yield self.store.search("twisted")
        # Title outweighs tags outweighs body.
        self.assertEqual(
            [h.post.slug for h in hits], ["twisted-deferreds", "cooking", "gardening"]
        )
        hits = yield self.store.search("callback")  # porter stemming
        self.assertEqual([h.post.slug for h in hits], ["twisted-deferreds"])
        self.assertIn("[Callbacks]", hits[0].snippet)
        hits = yield self.store.search("tomat*")
        self.assertEqual([h.post.slug for h in hits], ["gardening"])
        yield self.store.publish("gardening")
        hits = yield self.store.search("twisted", status="published")
        self.assertEqual([h.post.slug for h in hits], ["gardening"])
        # Index follows updates.
        yield self.store.update("cooking", body="sourdough", tags=[])
        hits = yield self.store.search("sourdough")
        self.assertEqual([h.post.slug for h in hits], ["cooking"])
        hits = yield self.store.search("twisted")
        self.assertNotIn("cooking", [h.post.slug for h in hits])
        # FTS syntax in the input is harmless.
        hits = yield self.store.search('"twisted" AND (NEAR title: *')
        self.assertEqual(len(hits), 0)
        yield self.assertFailure(self.store.search('"" ()'), InvalidQuery)

    @inlineCallbacks
    def test_search_folds_diacritics(self):
        """
        Accents do not matter, in the post or in the query.
        """
        yield self.store.create("Crème brûlée", body="Déjà vu in Zürich")
        yield self.store.create("Plain", body="creme and deja")
        for query in ("creme", "crème", "brulee", "zurich", "déjà"):
            hits = yield self.store.search(query)
            self.assertIn("creme-brulee", [h.post.slug for h in hits], query)

    @inlineCallbacks
    def test_search_every_word(self):
        """
        Short and common words are searchable too (no stop-word list), and
        every word of the query must match.
        """
        yield self.store.create("The end", body="It is what it is.")
        yield self.store.create("Other", body="Something else entirely.")
        hits = yield self.store.search("the")
        self.assertEqual([h.post.slug for h in hits], ["the-end"])
        hits = yield self.store.search("it is")
        self.assertEqual([h.post.slug for h in hits], ["the-end"])
        hits = yield self.store.search("it else")
        self.assertEqual(hits, [])

    @inlineCallbacks
    def test_search_limit_and_snippet(self):
        for n in range(5):
            yield self.store.create(f"Note {n}", body=f"alpha beta gamma {n} " + "filler " * 40)
        hits = yield self.store.search("gamma", limit=3)
        self.assertEqual(len(hits), 3)
        for hit in hits:
            self.assertIn("[gamma]", hit.snippet)

    @inlineCallbacks
    def test_slugs(self):
        yield self.store.create("Alpha one")
        yield self.store.create("Alpha two", status="published")
        yield self.store.create("Beta")
        slugs = yield self.store.slugs("alpha")
        self.assertEqual(slugs, ["alpha-one", "alpha-two"])
        slugs = yield self.store.slugs("alpha", status="published")
        self.assertEqual(slugs, ["alpha-two"])
        slugs = yield self.store.slugs("%")
        self.assertEqual(slugs, [])
        slugs = yield self.store.slugs("ALPHA")
        self.assertEqual(slugs, ["alpha-one", "alpha-two"])


class SearchPropertyTests(SynchronousTestCase):
    """
    Whatever a caller types, a search answers with hits or
    L{InvalidQuery}: never an error from the index.  (On SQLite here; on
    PostgreSQL from C{tests.test_site_db}.)
    """

    def location(self) -> str:
        return self.mktemp() + ".db"

    def setUp(self) -> None:
        from tests.test_store_sqlite import InlineReactor

        self.db = open_database(self.location(), InlineReactor(), threads=0)
        self.addCleanup(self.db.close)
        self.store = PostStore(self.db, clock=Clock())
        self.successResultOf(self.store.create("Hello world", body="Crème brûlée for_all 42 x*y"))

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.differing_executors])
    @given(st.text(max_size=120))
    def test_any_query(self, query: str) -> None:
        outcome: list[Any] = []
        self.store.search(query).addBoth(outcome.append)
        [result] = outcome
        if not isinstance(result, list):
            result.trap(InvalidQuery)
            self.assertNotIn("could not be searched", str(result.value))


class RaceOnPostgresTests(TestCase):
    """
    Two changes at once take one slug, over a real socket on PostgreSQL
    (C{twist smeldr-oauth --database URL}): the second post gets the next
    free slug, or L{SlugTaken} when its slug was given, never a tool that
    failed with a traceback; a post changed as it is deleted is not found.  The first change is another transaction's
    insert (or rename), held uncommitted until the tool call waits on it:
    what two tool calls of two processes (or two pool threads) do at once,
    every time.
    """

    @inlineCallbacks
    def setUp(self) -> Any:
        from tests import test_service_database

        yield test_service_database.ServiceOnPostgresTests.setUp(self)  # type: ignore[arg-type]
        token, _ = yield test_service_database.ServiceOnPostgresTests.tokens(self)  # type: ignore[arg-type]
        self.headers = {"Authorization": [f"Bearer {token}"], "Accept": ["application/json, text/event-stream"]}
        response = yield self.rpc(
            "initialize",
            {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
        )
        self.headers["Mcp-Session-Id"] = response.headers.getRawHeaders("mcp-session-id")
        self.headers["MCP-Protocol-Version"] = ["2025-06-18"]
        yield self.http.post(
            self.base + "/mcp", json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=self.headers
        )
        # (The posts' tables are made on their first use.)
        response = yield self.rpc("tools/call", {"name": "list_posts", "arguments": {}})
        self.assertFalse((yield response.json())["result"]["isError"])

    def post(self, path: str, form: dict[str, str]) -> Any:
        from tests import test_service_database

        return test_service_database.ServiceOnPostgresTests.post(self, path, form)  # type: ignore[arg-type]

    def rpc(self, method: str, params: dict[str, Any]) -> Any:
        return self.http.post(
            self.base + "/mcp", json={"jsonrpc": "2.0", "id": 1, "method": method, "params": params}, headers=self.headers
        )

    @inlineCallbacks
    def call_held(self, statement: str, slug: str, name: str, arguments: dict[str, Any]) -> Any:
        """
        Run C{statement} (on the post C{slug}) in a transaction of another
        connection, call the tool C{name} while it is held until the tool's
        statement waits on it, commit it: the tool's result.
        """
        import psycopg
        from twisted.internet import reactor
        from twisted.internet.task import deferLater

        holder = psycopg.connect(self.url)
        self.addCleanup(holder.close)
        watcher = psycopg.connect(self.url, autocommit=True)
        self.addCleanup(watcher.close)
        holder.execute(statement, (slug,))
        d = self.rpc("tools/call", {"name": name, "arguments": arguments})
        waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%posts%'"
        while watcher.execute(waiting).fetchone()[0] == 0:  # type: ignore[index]
            yield deferLater(reactor, 0.02, lambda: None)  # type: ignore[arg-type]
        holder.commit()
        response = yield d
        self.assertEqual(response.code, 200)
        return (yield response.json())["result"]

    INSERT = (
        "INSERT INTO posts (slug, title, body, status, tags, created_at, updated_at)"
        " VALUES (%s, 'First', '', 'draft', '', 0, 0)"
    )

    @inlineCallbacks
    def test_made_from_the_title(self) -> Any:
        result = yield self.call_held(self.INSERT, "race", "create_post", {"title": "Race"})
        self.assertFalse(result["isError"], result)
        self.assertEqual(result["structuredContent"]["slug"], "race-2")

    @inlineCallbacks
    def test_given(self) -> Any:
        result = yield self.call_held(self.INSERT, "race", "create_post", {"title": "Race", "slug": "race"})
        self.assertTrue(result["isError"], result)
        self.assertEqual(result["content"][0]["text"], "slug 'race' is already used by another post")

    @inlineCallbacks
    def test_renamed(self) -> Any:
        result = yield self.rpc("tools/call", {"name": "create_post", "arguments": {"title": "Other"}})
        self.assertFalse((yield result.json())["result"]["isError"])
        result = yield self.call_held(
            self.INSERT, "race", "update_post", {"slug": "other", "new_slug": "race"}
        )
        self.assertTrue(result["isError"], result)
        self.assertEqual(result["content"][0]["text"], "slug 'race' is already used by another post")

    @inlineCallbacks
    def test_deleted(self) -> Any:
        result = yield self.rpc("tools/call", {"name": "create_post", "arguments": {"title": "Gone"}})
        self.assertFalse((yield result.json())["result"]["isError"])
        result = yield self.call_held(
            "DELETE FROM posts WHERE slug = %s", "gone", "update_post", {"slug": "gone", "tags": ["x"], "title": "Back"}
        )
        self.assertTrue(result["isError"], result)
        self.assertEqual(result["content"][0]["text"], "no post with slug 'gone'")
