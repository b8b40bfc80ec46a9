"""
Tests for L{smeldr_oauth.site.tools}: the site app driven through a real
L{ServerSession}, on a real SQLite file (threaded pool, real reactor).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase, TestCase

from smeldr_oauth.mcp.app import invoke
from smeldr_oauth.mcp.jsonrpc import (
    INSUFFICIENT_SCOPE,
    INVALID_PARAMS,
    RESOURCE_NOT_FOUND,
    Request,
)
from smeldr_oauth.mcp.session import CallbackOutlet, Principal, ServerSession
from smeldr_oauth.site.stores import open_site
from smeldr_oauth.site.tools import build_app, site_scopes

EVERYTHING = Principal(
    subject="alice", client_id="c1", scopes=frozenset({"read", "write"})
)
READ_ONLY = Principal(subject="alice", client_id="c1", scopes=frozenset({"read"}))
WRITE_ONLY = Principal(subject="alice", client_id="c1", scopes=frozenset({"write"}))


class ScopesTests(SynchronousTestCase):
    def test_site_scopes(self) -> None:
        self.assertEqual(set(site_scopes()), {"read", "write"})

    def test_every_registration_uses_known_scopes(self) -> None:
        from smeldr_oauth.site.posts import PostStore

        app = build_app(PostStore(None))  # type: ignore[arg-type]
        self.assertEqual(app.all_scopes(), frozenset(site_scopes()))
        for name in ["list_posts", "get_post", "search_posts"]:
            self.assertEqual(app.tools[name].scopes, ("read",))
            self.assertTrue(app.tools[name].annotations["readOnlyHint"])
        for name in ["create_post", "update_post", "publish_post", "delete_post"]:
            self.assertEqual(app.tools[name].scopes, ("write",))
            self.assertFalse(app.tools[name].annotations["readOnlyHint"])
        self.assertTrue(app.tools["delete_post"].annotations["destructiveHint"])


class SiteToolsTests(TestCase):
    def setUp(self) -> None:
        from twisted.internet import reactor

        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        path = self.mktemp()
        self.site = open_site(path, reactor, clock=self.clock)
        self.addCleanup(self.site.close)
        self.app = build_app(self.site)
        self.sent: list[dict[str, Any]] = []
        self.session = ServerSession(
            self.app,
            reactor,
            session_id="s1",
            default_outlet=CallbackOutlet(self.sent.append),
        )
        self.addCleanup(self.session.close)
        self.next_id = 0

    @inlineCallbacks
    def call(
        self, method: str, params: dict[str, Any], principal: Principal = EVERYTHING
    ):
        self.next_id += 1
        response = yield self.session.handle(
            Request(self.next_id, method, params), principal
        )
        return response

    @inlineCallbacks
    def initialize(self):
        response = yield self.call(
            "initialize",
            {
                "protocolVersion": "2025-11-25",
                "capabilities": {},
                "clientInfo": {"name": "t"},
            },
        )
        self.assertIn("result", response)
        return response["result"]

    @inlineCallbacks
    def tool(self, name: str, principal: Principal = EVERYTHING, **arguments):
        response = yield self.call(
            "tools/call", {"name": name, "arguments": arguments}, principal
        )
        self.assertIn("result", response, response)
        return response["result"]

    @inlineCallbacks
    def test_initialize_and_list(self):
        result = yield self.initialize()
        self.assertIn("resources", result["capabilities"])
        self.assertIn("smeldr://posts/", result["instructions"])
        response = yield self.call("tools/list", {})
        tools = {t["name"]: t for t in response["result"]["tools"]}
        self.assertEqual(
            set(tools),
            {
                "list_posts",
                "get_post",
                "search_posts",
                "create_post",
                "update_post",
                "publish_post",
                "delete_post",
            },
        )
        for tool in tools.values():
            self.assertTrue(tool["description"])
            self.assertIn("outputSchema", tool)
            self.assertIn("annotations", tool)
        response = yield self.call("resources/templates/list", {})
        self.assertEqual(
            response["result"]["resourceTemplates"][0]["uriTemplate"],
            "smeldr://posts/{slug}",
        )
        response = yield self.call("prompts/list", {})
        self.assertEqual(
            {p["name"] for p in response["result"]["prompts"]},
            {"draft_post", "summarize_post"},
        )

    @inlineCallbacks
    def test_create_get_list(self):
        yield self.initialize()
        result = yield self.tool(
            "create_post", title="Hello There", body="# Hi\n\nText.", tags=["Intro"]
        )
        self.assertFalse(result["isError"])
        post = result["structuredContent"]
        self.assertEqual(post["slug"], "hello-there")
        self.assertEqual(post["status"], "draft")
        self.assertEqual(post["tags"], ["intro"])
        self.assertEqual(post["created_at"], "2023-11-14T22:13:20Z")
        self.assertIsNone(post["published_at"])
        self.assertNotIn("uri", post)
        result = yield self.tool("get_post", slug="hello-there")
        self.assertEqual(result["structuredContent"]["body"], "# Hi\n\nText.")
        result = yield self.tool("list_posts", limit=10.0)
        self.assertFalse(result["isError"], result)
        listing = result["structuredContent"]
        self.assertEqual([p["slug"] for p in listing["posts"]], ["hello-there"])
        self.assertEqual(listing["posts"][0]["excerpt"], "# Hi Text.")
        self.assertIsNone(listing["next_cursor"])

    @inlineCallbacks
    def test_pagination(self):
        yield self.initialize()
        for i in range(3):
            yield self.tool("create_post", title=f"P{i}")
        result = yield self.tool("list_posts", limit=2)
        first = result["structuredContent"]
        self.assertEqual([p["slug"] for p in first["posts"]], ["p2", "p1"])
        result = yield self.tool("list_posts", limit=2, cursor=first["next_cursor"])
        self.assertEqual(
            [p["slug"] for p in result["structuredContent"]["posts"]], ["p0"]
        )
        result = yield self.tool("list_posts", cursor="garbage")
        self.assertTrue(result["isError"])
        self.assertIn("cursor", result["content"][0]["text"])

    @inlineCallbacks
    def test_errors_are_tool_errors(self):
        yield self.initialize()
        result = yield self.tool("get_post", slug="missing")
        self.assertTrue(result["isError"])
        self.assertIn("no post with slug 'missing'", result["content"][0]["text"])
        result = yield self.tool("create_post", title="x", slug="Not A Slug")
        self.assertTrue(result["isError"])
        self.assertIn("slug", result["content"][0]["text"])
        result = yield self.tool("create_post", title="x", tags=["bad tag"])
        self.assertTrue(result["isError"])
        yield self.tool("create_post", title="x", slug="taken")
        result = yield self.tool("create_post", title="y", slug="taken")
        self.assertTrue(result["isError"])
        self.assertIn("already used", result["content"][0]["text"])
        result = yield self.tool("list_posts", limit=1000)
        self.assertTrue(result["isError"])
        result = yield self.tool("update_post", slug="nope", title="z")
        self.assertTrue(result["isError"])
        result = yield self.tool("delete_post", slug="nope")
        self.assertTrue(result["isError"])
        # Schema validation (before the handler) is also a tool error at 2025-11-25.
        result = yield self.tool("get_post")
        self.assertTrue(result["isError"])

    @inlineCallbacks
    def test_search(self):
        yield self.initialize()
        yield self.tool(
            "create_post",
            title="Deferreds explained",
            body="Callbacks chain results.",
            tags=["twisted"],
        )
        yield self.tool("create_post", title="Gardening", body="Water the tomatoes.")
        result = yield self.tool("search_posts", query="callback")
        hits = result["structuredContent"]["results"]
        self.assertEqual([h["slug"] for h in hits], ["deferreds-explained"])
        self.assertIn("[Callbacks]", hits[0]["snippet"])
        for nasty in [
            '"unterminated',
            "title:",
            "a AND",
            "(((",
            "NEAR(",
            "*",
            "tomato* OR -x",
        ]:
            result = yield self.tool("search_posts", query=nasty)
            self.assertIn("content", result, nasty)
            if result["isError"]:
                self.assertIn("query", result["content"][0]["text"])
        result = yield self.tool("search_posts", query='"" ()')
        self.assertTrue(result["isError"])
        self.assertIn("no words", result["content"][0]["text"])

    @inlineCallbacks
    def test_scopes_enforced(self):
        yield self.initialize()
        response = yield self.call(
            "tools/call",
            {"name": "create_post", "arguments": {"title": "x"}},
            READ_ONLY,
        )
        self.assertEqual(response["error"]["code"], INSUFFICIENT_SCOPE)
        page = yield self.site.posts.list()
        self.assertEqual(page.posts, ())
        result = yield self.tool("list_posts", READ_ONLY)
        self.assertFalse(result["isError"])

    @inlineCallbacks
    def test_write_only_cannot_read_through_writes(self):
        """
        A token with C{write} alone can change a draft but a no-op update
        does not hand it the draft's body.
        """
        yield self.initialize()
        yield self.tool("create_post", title="Secret plan", body="the secret body")
        result = yield self.tool("update_post", WRITE_ONLY, slug="secret-plan")
        self.assertFalse(result["isError"], result)
        self.assertNotIn("body", result["structuredContent"])
        self.assertNotIn("the secret body", repr(result))
        result = yield self.tool("update_post", EVERYTHING, slug="secret-plan")
        self.assertEqual(result["structuredContent"]["body"], "the secret body")

    @inlineCallbacks
    def test_resources_and_notifications(self):
        yield self.initialize()
        yield self.tool("create_post", title="Draft one", body="secret draft")
        response = yield self.call(
            "resources/read", {"uri": "smeldr://posts/draft-one"}
        )
        self.assertEqual(response["error"]["code"], RESOURCE_NOT_FOUND)
        response = yield self.call("resources/read", {"uri": "smeldr://posts/nothing"})
        self.assertEqual(response["error"]["code"], RESOURCE_NOT_FOUND)
        response = yield self.call("resources/list", {})
        self.assertEqual(response["result"]["resources"], [])

        response = yield self.call(
            "resources/subscribe", {"uri": "smeldr://posts/draft-one"}
        )
        self.assertEqual(response["result"], {})
        del self.sent[:]
        result = yield self.tool("publish_post", slug="draft-one")
        post = result["structuredContent"]
        self.assertEqual(
            (post["status"], post["uri"]), ("published", "smeldr://posts/draft-one")
        )
        self.assertIn(
            {
                "jsonrpc": "2.0",
                "method": "notifications/resources/updated",
                "params": {"uri": "smeldr://posts/draft-one"},
            },
            self.sent,
        )
        self.assertIn(
            "notifications/resources/list_changed", [m["method"] for m in self.sent]
        )

        response = yield self.call(
            "resources/read", {"uri": "smeldr://posts/draft-one"}
        )
        (contents,) = response["result"]["contents"]
        self.assertEqual(contents["text"], "# Draft one\n\nsecret draft")
        self.assertEqual(contents["mimeType"], "text/markdown")
        response = yield self.call("resources/list", {})
        (entry,) = response["result"]["resources"]
        self.assertEqual(
            (entry["uri"], entry["title"]), ("smeldr://posts/draft-one", "Draft one")
        )

        del self.sent[:]
        yield self.tool("update_post", slug="draft-one", body="edited")
        self.assertEqual(
            [m["method"] for m in self.sent],
            ["notifications/resources/updated", "notifications/resources/list_changed"],
        )
        del self.sent[:]
        result = yield self.tool("delete_post", slug="draft-one")
        self.assertEqual(
            result["structuredContent"], {"deleted": "draft-one", "title": "Draft one"}
        )
        self.assertIn(
            "notifications/resources/updated", [m["method"] for m in self.sent]
        )
        response = yield self.call(
            "resources/read", {"uri": "smeldr://posts/draft-one"}
        )
        self.assertEqual(response["error"]["code"], RESOURCE_NOT_FOUND)

    @inlineCallbacks
    def test_unpublish_and_rename(self):
        yield self.initialize()
        yield self.tool("create_post", title="Live", status="published")
        result = yield self.tool(
            "update_post", slug="live", new_slug="renamed", status="draft"
        )
        self.assertEqual(result["structuredContent"]["slug"], "renamed")
        self.assertEqual(result["structuredContent"]["status"], "draft")
        response = yield self.call("resources/list", {})
        self.assertEqual(response["result"]["resources"], [])

    @inlineCallbacks
    def test_completion(self):
        yield self.initialize()
        yield self.tool("create_post", title="Alpha", status="published")
        yield self.tool("create_post", title="Alpine")
        response = yield self.call(
            "completion/complete",
            {
                "ref": {"type": "ref/resource", "uri": "smeldr://posts/{slug}"},
                "argument": {"name": "slug", "value": "al"},
            },
        )
        self.assertEqual(response["result"]["completion"]["values"], ["alpha"])
        response = yield self.call(
            "completion/complete",
            {
                "ref": {"type": "ref/prompt", "name": "summarize_post"},
                "argument": {"name": "slug", "value": "al"},
            },
        )
        self.assertEqual(
            response["result"]["completion"]["values"], ["alpha", "alpine"]
        )

    @inlineCallbacks
    def test_lone_surrogates(self):
        """
        A lone surrogate (JSON lets a client send C{"\\ud800"}) has no
        UTF-8, so SQLite cannot store or compare it: in a title or a body
        it is a tool error naming the field, in a completion prefix it
        completes nothing; neither is a failure logged with a traceback
        nor, for the completion, an internal error.
        """
        yield self.initialize()
        yield self.tool("create_post", title="Alpha", status="published")
        with capturedLogs() as events:
            for arguments, field in (
                ({"title": "a\ud800"}, "title"),
                ({"title": "ok", "body": "b\udfff"}, "body"),
            ):
                result = yield self.tool("create_post", **arguments)
                self.assertTrue(result["isError"], result)
                self.assertTrue(result["content"][0]["text"].startswith(field + ":"), result)
            result = yield self.tool("update_post", slug="alpha", title="\udc80")
            self.assertTrue(result["isError"], result)
            response = yield self.call(
                "completion/complete",
                {
                    "ref": {"type": "ref/resource", "uri": "smeldr://posts/{slug}"},
                    "argument": {"name": "slug", "value": "a\ud800"},
                },
            )
            self.assertEqual(response["result"]["completion"]["values"], [], response)
        self.assertEqual([e for e in events if "log_failure" in e], [])
        result = yield self.tool("get_post", slug="alpha")
        self.assertEqual(result["structuredContent"]["title"], "Alpha")

    @inlineCallbacks
    def test_prompts(self):
        yield self.initialize()
        yield self.tool(
            "create_post",
            title="Deferreds",
            body="All about callbacks.",
            tags=["twisted"],
        )
        response = yield self.call(
            "prompts/get",
            {"name": "summarize_post", "arguments": {"slug": "deferreds"}},
        )
        (message,) = response["result"]["messages"]
        self.assertEqual(message["role"], "user")
        self.assertIn("All about callbacks.", message["content"]["text"])
        self.assertIn("bullet points", message["content"]["text"])
        response = yield self.call(
            "prompts/get", {"name": "summarize_post", "arguments": {"slug": "nope"}}
        )
        self.assertEqual(response["error"]["code"], INVALID_PARAMS)
        response = yield self.call(
            "prompts/get",
            {"name": "draft_post", "arguments": {"topic": "Klein", "length": "short"}},
        )
        text = response["result"]["messages"][0]["content"]["text"]
        self.assertIn("Klein", text)
        self.assertIn("create_post", text)


class BuildFromPathTests(TestCase):
    @inlineCallbacks
    def test_path(self):
        """
        Given a path, L{build_app} opens the site database itself (its pool
        closes with the reactor, through adbapi's shutdown trigger).
        """
        from twisted.internet import reactor

        path = self.mktemp()
        app = build_app(path, reactor)
        tool = app.tools["create_post"]
        result = yield invoke(tool.func, tool.signature, None, {"title": "From path"})
        self.assertEqual(result["slug"], "from-path")
        site = open_site(path, reactor)
        self.addCleanup(site.close)
        post = yield site.posts.get("from-path")
        self.assertEqual(post.title, "From path")
