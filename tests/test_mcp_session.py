"""
Tests for L{smeldr_oauth.mcp.session}: the transport-independent MCP state
machine, driven with parsed frames and a L{Clock}.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from smeldr_oauth.mcp import (
    AudioContent,
    Context,
    EmbeddedResource,
    ImageContent,
    MCPApp,
    ResourceLink,
    TextContent,
    ToolError,
)
from smeldr_oauth.mcp import jsonrpc
from smeldr_oauth.mcp.session import CallbackOutlet, Principal, ServerSession
from smeldr_oauth.mcp.versions import check_modern_headers

READER = Principal("alice", "client-1", frozenset({"read"}), "grant-1")
WRITER = Principal("alice", "client-1", frozenset({"read", "write"}), "grant-1")
MODERN_META = {
    "io.modelcontextprotocol/protocolVersion": "2026-07-28",
    "io.modelcontextprotocol/clientCapabilities": {},
}


def build_app() -> MCPApp:
    app = MCPApp(name="test", version="9.9", instructions="be nice", page_size=2)

    @app.tool(scopes=("read",))
    def echo(text: str) -> str:
        """Echo the text back."""
        return text

    @app.tool(scopes=("write",))
    def write(text: str) -> str:
        return "wrote " + text

    @app.tool()
    def structured(n: int) -> dict:
        return {"n": n, "double": n * 2}

    @app.tool()
    def failing() -> str:
        raise ToolError("that did not work")

    @app.tool()
    def crashing() -> str:
        raise RuntimeError("secret internal detail")

    @app.tool()
    def contents() -> list:
        return [
            TextContent("t"),
            ImageContent(b"\x89PNG", "image/png"),
            AudioContent(b"RIFF", "audio/wav"),
            EmbeddedResource("test://r", "text/plain", text="inline"),
            ResourceLink("test://posts/a", "a", mime_type="text/markdown"),
        ]

    @app.tool()
    async def slow(ctx: Context) -> str:
        await ctx.report_progress(1, 3, "one")
        await ctx.log("debug", "quiet")
        await ctx.log("warning", "loud", logger="t")
        await Deferred()  # never fires unless cancelled
        return "never"

    @app.tool()
    async def ask(ctx: Context) -> dict:
        answer = await ctx.elicit("Name?", {"type": "object", "properties": {"name": {"type": "string"}}})
        sampled = await ctx.sample([{"role": "user", "content": {"type": "text", "text": "hi"}}], 10)
        roots = await ctx.list_roots()
        return {"answer": answer, "sampled": sampled, "roots": roots, "who": [ctx.subject, ctx.client_id]}

    @app.tool()
    async def chatty(ctx: Context) -> str:
        for level in ("debug", "info", "warning", "error"):
            await ctx.log(level, level)
        return "said"

    @app.tool()
    async def sample_only(ctx: Context) -> dict:
        return await ctx.sample([{"role": "user", "content": {"type": "text", "text": "hi"}}], 10)

    @app.tool()
    async def elicit_only(ctx: Context) -> dict:
        return await ctx.elicit("Name?", {"type": "object"})

    @app.tool()
    async def roots_only(ctx: Context) -> list:
        return await ctx.list_roots()

    @app.resource("test://about", name="about")
    def about() -> str:
        return "about text"

    @app.resource("test://posts/{slug}", name="post", mime_type="text/markdown")
    def post(ctx: Context, slug: str) -> Optional[str]:
        return None if slug == "missing" else f"# {slug}"

    @app.resource("test://blob", name="blob", mime_type="application/octet-stream")
    def blob() -> bytes:
        return b"\x00\x01"

    @app.resource_list()
    def lister(ctx: Context) -> list:
        return [{"uri": "test://posts/a", "name": "a"}, {"uri": "test://posts/b", "name": "b"}]

    @app.prompt()
    def summarize(slug: str, style: str = "short") -> str:
        return f"Summarize {slug} ({style})"

    @app.prompt(scopes=("write",))
    def rewrite(slug: str) -> list:
        return [{"role": "user", "content": "rewrite " + slug}, {"role": "assistant", "content": "ok"}]

    @app.completion("test://posts/{slug}", argument="slug")
    def complete_slug(ctx: Context, value: str) -> list:
        return [s for s in ("alpha", "beta", "alps") if s.startswith(value)]

    return app


class Harness:
    """A session plus a recording outlet, for terse tests."""

    def __init__(self, app: Optional[MCPApp] = None, **kw: Any) -> None:
        self.clock = Clock()
        self.app = app or build_app()
        self.sent: list[dict[str, Any]] = []
        self.outlet = CallbackOutlet(self.sent.append)
        self.session = ServerSession(self.app, self.clock, session_id="s1", default_outlet=self.outlet, **kw)

    def send(self, body: Any, principal: Principal = READER) -> list:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        _, messages = jsonrpc.parse_frame(raw)
        results: list = []
        for message in messages:
            self.session.handle(message, principal, self.outlet).addCallback(results.append)
        return results

    def call(self, method: str, params: Optional[dict] = None, id: Any = 1, principal: Principal = READER) -> dict:
        body: dict[str, Any] = {"jsonrpc": "2.0", "id": id, "method": method}
        if params is not None:
            body["params"] = params
        results = self.send(body, principal)
        assert len(results) == 1, results
        return results[0]

    def init(self, version: str = "2025-06-18", capabilities: Optional[dict] = None) -> dict:
        response = self.call(
            "initialize",
            {"protocolVersion": version, "capabilities": capabilities or {}, "clientInfo": {"name": "t", "version": "1"}},
            id=0,
        )
        self.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        return response


class LifecycleTests(SynchronousTestCase):
    def test_negotiates_each_session_version(self) -> None:
        for version in ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25"):
            h = Harness()
            result = h.init(version)["result"]
            self.assertEqual(result["protocolVersion"], version)
            self.assertEqual(result["serverInfo"], {"name": "test", "version": "9.9"})
            self.assertEqual(result["instructions"], "be nice")
            self.assertEqual(h.session.state, "ready")

    def test_unknown_version_gets_latest_session_version(self) -> None:
        for version in ("1999-01-01", "2026-07-28"):
            h = Harness()
            self.assertEqual(h.init(version)["result"]["protocolVersion"], "2025-11-25")

    def test_initialize_needs_a_string_version(self) -> None:
        h = Harness()
        response = h.call("initialize", {"protocolVersion": 5, "capabilities": {}})
        self.assertEqual(response["error"]["code"], jsonrpc.INVALID_PARAMS)
        self.assertEqual(h.session.state, "new")

    def test_second_initialize_refused(self) -> None:
        h = Harness()
        h.init()
        response = h.call("initialize", {"protocolVersion": "2025-06-18", "capabilities": {}})
        self.assertEqual(response["error"]["code"], jsonrpc.INVALID_REQUEST)

    def test_requests_before_initialize_refused_except_ping(self) -> None:
        h = Harness()
        self.assertEqual(h.call("tools/list")["error"]["code"], jsonrpc.INVALID_REQUEST)
        self.assertEqual(h.call("ping")["result"], {})

    def test_capabilities(self) -> None:
        caps = Harness().init()["result"]["capabilities"]
        self.assertEqual(caps["tools"], {"listChanged": True})
        self.assertEqual(caps["resources"], {"subscribe": True, "listChanged": True})
        self.assertIn("prompts", caps)
        self.assertIn("completions", caps)
        self.assertIn("logging", caps)

    def test_batches_only_in_2025_03_26(self) -> None:
        h = Harness()
        h.init("2025-03-26")
        self.assertTrue(h.session.allows_batch)
        h2 = Harness()
        h2.init("2025-06-18")
        self.assertFalse(h2.session.allows_batch)

    def test_closed_session_refuses(self) -> None:
        h = Harness()
        h.init()
        h.session.close()
        self.assertEqual(h.call("ping")["error"]["code"], jsonrpc.INVALID_REQUEST)


class ErrorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness()
        self.h.init()

    def test_parse_error(self) -> None:
        with self.assertRaises(jsonrpc.JSONRPCError) as caught:
            jsonrpc.parse_frame(b"{not json")
        self.assertEqual(caught.exception.code, jsonrpc.PARSE_ERROR)

    def test_invalid_request_shapes(self) -> None:
        for body in (
            b"5",
            b'{"jsonrpc":"1.0","id":1,"method":"ping"}',
            b'{"jsonrpc":"2.0","id":1,"method":5}',
            b'{"jsonrpc":"2.0","id":true,"method":"ping"}',
            b'{"jsonrpc":"2.0","id":1}',
        ):
            [response] = self.h.send(body)
            self.assertEqual(response["error"]["code"], jsonrpc.INVALID_REQUEST, body)

    def test_empty_batch(self) -> None:
        with self.assertRaises(jsonrpc.JSONRPCError) as caught:
            jsonrpc.parse_frame(b"[]")
        self.assertEqual(caught.exception.code, jsonrpc.INVALID_REQUEST)

    def test_positional_params(self) -> None:
        [response] = self.h.send(b'{"jsonrpc":"2.0","id":7,"method":"ping","params":[1]}')
        self.assertEqual(response["error"]["code"], jsonrpc.INVALID_PARAMS)
        self.assertEqual(response["id"], 7)

    def test_method_not_found(self) -> None:
        response = self.h.call("no/such", id="abc")
        self.assertEqual(response["error"]["code"], jsonrpc.METHOD_NOT_FOUND)
        self.assertEqual(response["id"], "abc")

    def test_server_discover_not_in_session_era(self) -> None:
        self.assertEqual(self.h.call("server/discover")["error"]["code"], jsonrpc.METHOD_NOT_FOUND)

    def test_unknown_tool(self) -> None:
        response = self.h.call("tools/call", {"name": "nope", "arguments": {}})
        self.assertEqual(response["error"]["code"], jsonrpc.INVALID_PARAMS)

    def test_wrong_argument_types(self) -> None:
        for arguments in ({"text": 5}, {}, {"text": "x", "extra": 1}, "notadict"):
            response = self.h.call("tools/call", {"name": "echo", "arguments": arguments})
            self.assertEqual(response["error"]["code"], jsonrpc.INVALID_PARAMS, arguments)

    def test_wrong_argument_types_are_tool_errors_from_2025_11_25(self) -> None:
        h = Harness()
        h.init("2025-11-25")
        result = h.call("tools/call", {"name": "echo", "arguments": {"text": 5}})["result"]
        self.assertTrue(result["isError"])
        self.assertIn("text", result["content"][0]["text"])

    def test_internal_error_hides_details(self) -> None:
        result = self.h.call("tools/call", {"name": "crashing"})["result"]
        self.assertTrue(result["isError"])
        self.assertNotIn("secret", json.dumps(result))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_insufficient_scope(self) -> None:
        response = self.h.call("tools/call", {"name": "write", "arguments": {"text": "x"}})
        self.assertEqual(response["error"]["code"], jsonrpc.INSUFFICIENT_SCOPE)
        self.assertEqual(response["error"]["data"], {"error": "insufficient_scope", "scope": "write"})
        ok = self.h.call("tools/call", {"name": "write", "arguments": {"text": "x"}}, principal=WRITER)
        self.assertEqual(ok["result"]["content"][0]["text"], "wrote x")

    def test_missing_scopes_precheck(self) -> None:
        _, [message] = jsonrpc.parse_frame(
            b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"write"}}'
        )
        self.assertEqual(self.h.session.missing_scopes(message, READER), ("write",))
        self.assertIsNone(self.h.session.missing_scopes(message, WRITER))

    def test_bad_cursor(self) -> None:
        for cursor in ("!!!", "bm9wZQ==", 5):
            response = self.h.call("tools/list", {"cursor": cursor})
            self.assertEqual(response["error"]["code"], jsonrpc.INVALID_PARAMS)

    def test_resource_not_found(self) -> None:
        for uri in ("test://nothing", "test://posts/missing"):
            response = self.h.call("resources/read", {"uri": uri})
            self.assertEqual(response["error"]["code"], jsonrpc.RESOURCE_NOT_FOUND)

    def test_bad_log_level(self) -> None:
        self.assertEqual(self.h.call("logging/setLevel", {"level": "loud"})["error"]["code"], jsonrpc.INVALID_PARAMS)

    def test_duplicate_request_id_in_flight(self) -> None:
        first = self.h.send({"jsonrpc": "2.0", "id": 9, "method": "tools/call", "params": {"name": "slow"}})
        self.assertEqual(first, [])
        second = self.h.call("ping", id=9)
        self.assertEqual(second["error"]["code"], jsonrpc.INVALID_REQUEST)

    def test_prompt_argument_errors(self) -> None:
        for arguments in ({}, {"slug": 1}, {"slug": "a", "nope": "b"}):
            response = self.h.call("prompts/get", {"name": "summarize", "arguments": arguments})
            self.assertEqual(response["error"]["code"], jsonrpc.INVALID_PARAMS, arguments)
        self.assertEqual(self.h.call("prompts/get", {"name": "zzz"})["error"]["code"], jsonrpc.INVALID_PARAMS)


class ToolTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness()
        self.h.init()

    def test_list_with_cursors(self) -> None:
        names: list[str] = []
        params: dict[str, Any] = {}
        pages = 0
        while True:
            result = self.h.call("tools/list", params)["result"]
            names.extend(t["name"] for t in result["tools"])
            pages += 1
            if "nextCursor" not in result:
                break
            params = {"cursor": result["nextCursor"]}
        self.assertEqual(names, list(self.h.app.tools))
        # Two per page (page_size=2).
        self.assertEqual(pages, (len(names) + 1) // 2)
        self.assertGreater(pages, 2)

    def test_descriptor(self) -> None:
        tools = {t["name"]: t for t in self.h.call("tools/list")["result"]["tools"]}
        self.assertEqual(tools["echo"]["description"], "Echo the text back.")
        self.assertEqual(tools["echo"]["inputSchema"]["required"], ["text"])
        tools = {t["name"]: t for t in self.h.call("tools/list", {"cursor": self.h.call("tools/list")["result"]["nextCursor"]})["result"]["tools"]}
        self.assertEqual(tools["structured"]["outputSchema"], {"type": "object"})

    def test_text_result(self) -> None:
        result = self.h.call("tools/call", {"name": "echo", "arguments": {"text": "hi"}})["result"]
        self.assertEqual(result, {"content": [{"type": "text", "text": "hi"}], "isError": False})

    def test_structured_content(self) -> None:
        result = self.h.call("tools/call", {"name": "structured", "arguments": {"n": 2}})["result"]
        self.assertEqual(result["structuredContent"], {"n": 2, "double": 4})
        self.assertEqual(json.loads(result["content"][0]["text"]), {"n": 2, "double": 4})

    def test_structured_content_not_before_2025_06_18(self) -> None:
        h = Harness()
        h.init("2025-03-26")
        result = h.call("tools/call", {"name": "structured", "arguments": {"n": 2}})["result"]
        self.assertNotIn("structuredContent", result)

    def test_tool_error(self) -> None:
        result = self.h.call("tools/call", {"name": "failing"})["result"]
        self.assertEqual(result, {"content": [{"type": "text", "text": "that did not work"}], "isError": True})

    def test_every_content_type(self) -> None:
        content = self.h.call("tools/call", {"name": "contents"})["result"]["content"]
        self.assertEqual([c["type"] for c in content], ["text", "image", "audio", "resource", "resource_link"])
        self.assertEqual(content[1], {"type": "image", "data": "iVBORw==", "mimeType": "image/png"})
        self.assertEqual(content[2]["mimeType"], "audio/wav")
        self.assertEqual(content[3]["resource"], {"uri": "test://r", "mimeType": "text/plain", "text": "inline"})
        self.assertEqual(content[4]["uri"], "test://posts/a")

    def test_resource_link_downgraded_for_old_clients(self) -> None:
        h = Harness()
        h.init("2024-11-05")
        content = h.call("tools/call", {"name": "contents"})["result"]["content"]
        self.assertEqual(content[4]["type"], "text")
        self.assertEqual(content[2]["type"], "text")

    def test_progress_and_logging_then_cancel(self) -> None:
        self.h.call("logging/setLevel", {"level": "info"})
        results = self.h.send(
            {"jsonrpc": "2.0", "id": 5, "method": "tools/call", "params": {"name": "slow", "_meta": {"progressToken": "p"}}}
        )
        self.assertEqual(results, [])
        methods = [m["method"] for m in self.h.sent]
        self.assertEqual(methods, ["notifications/progress", "notifications/message"])
        self.assertEqual(self.h.sent[0]["params"], {"progressToken": "p", "progress": 1, "total": 3, "message": "one"})
        self.assertEqual(self.h.sent[1]["params"], {"level": "warning", "data": "loud", "logger": "t"})
        self.h.send({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 5}})
        # Cancelled: no response at all (None), and the id is free again.
        self.assertEqual(results, [None])
        self.assertEqual(self.h.call("ping", id=5)["result"], {})

    def test_no_progress_without_token(self) -> None:
        self.h.send({"jsonrpc": "2.0", "id": 5, "method": "tools/call", "params": {"name": "slow"}})
        self.assertNotIn("notifications/progress", [m["method"] for m in self.h.sent])

    def test_server_to_client_requests(self) -> None:
        h = Harness()
        h.init(capabilities={"elicitation": {}, "sampling": {}, "roots": {}})
        results = h.send({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "ask"}})
        answers = [{"action": "accept", "content": {"name": "bob"}}, {"role": "assistant"}, {"roots": [{"uri": "file:///x"}]}]
        for expected_method, answer in zip(("elicitation/create", "sampling/createMessage", "roots/list"), answers):
            request = h.sent[-1]
            self.assertEqual(request["method"], expected_method)
            h.send({"jsonrpc": "2.0", "id": request["id"], "result": answer})
        [response] = results
        self.assertEqual(
            response["result"]["structuredContent"],
            {"answer": answers[0], "sampled": answers[1], "roots": [{"uri": "file:///x"}], "who": ["alice", "client-1"]},
        )

    def test_log_level_decides_what_is_sent(self) -> None:
        """
        logging/setLevel changes which log notifications leave: the default
        is info, and each level lets through itself and everything above.
        """

        def sent_levels(level: Optional[str]) -> list:
            h = Harness()
            h.init()
            if level is not None:
                self.assertEqual(h.call("logging/setLevel", {"level": level})["result"], {})
            h.sent.clear()
            self.assertEqual(h.call("tools/call", {"name": "chatty"})["result"]["content"][0]["text"], "said")
            return [m["params"]["level"] for m in h.sent if m["method"] == "notifications/message"]

        self.assertEqual(sent_levels(None), ["info", "warning", "error"])
        self.assertEqual(sent_levels("error"), ["error"])
        self.assertEqual(sent_levels("warning"), ["warning", "error"])
        self.assertEqual(sent_levels("debug"), ["debug", "info", "warning", "error"])

    def test_each_server_request_checks_its_own_capability(self) -> None:
        """
        A client that declared the other capabilities but not the one a
        request needs gets no request, and the tool learns which one is
        missing; with that capability alone the request goes out.
        """
        for tool, capability, method in (
            ("sample_only", "sampling", "sampling/createMessage"),
            ("elicit_only", "elicitation", "elicitation/create"),
            ("roots_only", "roots", "roots/list"),
        ):
            others = {c: {} for c in ("sampling", "elicitation", "roots") if c != capability}
            h = Harness()
            h.init(capabilities=others)
            [response] = h.send({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": tool}})
            self.assertTrue(response["result"]["isError"])
            self.assertIn(repr(capability), response["result"]["content"][0]["text"])
            self.assertNotIn(method, [m.get("method") for m in h.sent])
            h = Harness()
            h.init(capabilities={capability: {}})
            self.assertEqual(h.send({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": tool}}), [])
            self.assertEqual(h.sent[-1]["method"], method)

    def test_server_request_needs_capability(self) -> None:
        [response] = self.h.send({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "ask"}})
        self.assertTrue(response["result"]["isError"])
        self.assertIn("elicitation", response["result"]["content"][0]["text"])

    def test_server_request_error_reply_and_timeout(self) -> None:
        h = Harness(request_timeout=10)
        h.init(capabilities={"elicitation": {}})
        results = h.send({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "ask"}})
        h.send({"jsonrpc": "2.0", "id": h.sent[-1]["id"], "error": {"code": -1, "message": "user said no"}})
        self.assertEqual(results[0]["result"]["content"][0]["text"], "user said no")
        results = h.send({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "ask"}})
        h.clock.advance(10)
        self.assertTrue(results[0]["result"]["isError"])

    def test_response_to_unknown_request_ignored(self) -> None:
        self.assertEqual(self.h.send({"jsonrpc": "2.0", "id": "srv-99", "result": {}}), [None])

    def test_close_cancels_in_flight(self) -> None:
        results = self.h.send({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "slow"}})
        self.h.session.close()
        self.assertEqual(results, [None])


class ResourcePromptTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness()
        self.h.init()

    def test_list_resources_includes_lister(self) -> None:
        result = self.h.call("resources/list")["result"]
        uris = [r["uri"] for r in result["resources"]]
        self.assertEqual(uris, ["test://about", "test://blob"])
        more = self.h.call("resources/list", {"cursor": result["nextCursor"]})["result"]
        self.assertEqual([r["uri"] for r in more["resources"]], ["test://posts/a", "test://posts/b"])

    def test_templates(self) -> None:
        result = self.h.call("resources/templates/list")["result"]
        self.assertEqual(result["resourceTemplates"], [{"name": "post", "uriTemplate": "test://posts/{slug}", "mimeType": "text/markdown"}])

    def test_read_template_and_blob(self) -> None:
        contents = self.h.call("resources/read", {"uri": "test://posts/hello%20world"})["result"]["contents"]
        self.assertEqual(contents, [{"uri": "test://posts/hello%20world", "text": "# hello world", "mimeType": "text/markdown"}])
        blob = self.h.call("resources/read", {"uri": "test://blob"})["result"]["contents"][0]
        self.assertEqual(blob["blob"], "AAE=")

    def test_subscribe_and_notify(self) -> None:
        self.h.call("resources/subscribe", {"uri": "test://posts/a"})
        self.h.app.notify_resource_updated("test://posts/b")
        self.assertEqual(self.h.sent, [])
        self.h.app.notify_resource_updated("test://posts/a")
        self.assertEqual(self.h.sent, [jsonrpc.notification("notifications/resources/updated", {"uri": "test://posts/a"})])
        self.h.call("resources/unsubscribe", {"uri": "test://posts/a"})
        self.h.app.notify_resource_updated("test://posts/a")
        self.assertEqual(len(self.h.sent), 1)

    def test_list_changed(self) -> None:
        self.h.app.notify_list_changed("tools")
        self.assertEqual(self.h.sent, [jsonrpc.notification("notifications/tools/list_changed", {})])
        self.h.session.close()
        self.h.app.notify_list_changed("tools")
        self.assertEqual(len(self.h.sent), 1)

    def test_prompts(self) -> None:
        prompts = self.h.call("prompts/list")["result"]["prompts"]
        self.assertEqual(
            prompts[0]["arguments"], [{"name": "slug", "required": True}, {"name": "style", "required": False}]
        )
        result = self.h.call("prompts/get", {"name": "summarize", "arguments": {"slug": "a"}})["result"]
        self.assertEqual(result["messages"], [{"role": "user", "content": {"type": "text", "text": "Summarize a (short)"}}])
        refused = self.h.call("prompts/get", {"name": "rewrite", "arguments": {"slug": "a"}})
        self.assertEqual(refused["error"]["code"], jsonrpc.INSUFFICIENT_SCOPE)
        result = self.h.call("prompts/get", {"name": "rewrite", "arguments": {"slug": "a"}}, principal=WRITER)["result"]
        self.assertEqual([m["role"] for m in result["messages"]], ["user", "assistant"])

    def test_completion(self) -> None:
        params = {"ref": {"type": "ref/resource", "uri": "test://posts/{slug}"}, "argument": {"name": "slug", "value": "al"}}
        result = self.h.call("completion/complete", params)["result"]
        self.assertEqual(result, {"completion": {"values": ["alpha", "alps"], "total": 2, "hasMore": False}})
        params["argument"] = {"name": "other", "value": ""}
        self.assertEqual(self.h.call("completion/complete", params)["result"]["completion"]["values"], [])
        bad = self.h.call("completion/complete", {"ref": {"type": "ref/x"}, "argument": {"name": "a", "value": ""}})
        self.assertEqual(bad["error"]["code"], jsonrpc.INVALID_PARAMS)


class ModernTests(SynchronousTestCase):
    """The 2026-07-28 stateless exchange."""

    def setUp(self) -> None:
        self.h = Harness(modern_only=True)

    def test_discover(self) -> None:
        result = self.h.call("server/discover", {"_meta": MODERN_META})["result"]
        self.assertEqual(result["supportedVersions"], ["2026-07-28"])
        self.assertEqual(result["resultType"], "complete")
        self.assertEqual(result["cacheScope"], "private")
        self.assertEqual(result["ttlMs"], 0)
        self.assertEqual(result["_meta"]["io.modelcontextprotocol/serverInfo"], {"name": "test", "version": "9.9"})
        self.assertIn("tools", result["capabilities"])

    def test_call_without_initialize(self) -> None:
        result = self.h.call("tools/call", {"name": "echo", "arguments": {"text": "x"}, "_meta": MODERN_META})["result"]
        self.assertEqual(result["content"], [{"type": "text", "text": "x"}])
        self.assertEqual(result["resultType"], "complete")

    def test_missing_meta(self) -> None:
        for params in ({}, {"_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28"}}):
            self.assertEqual(self.h.call("tools/list", params)["error"]["code"], jsonrpc.INVALID_PARAMS)

    def test_unsupported_version(self) -> None:
        meta = dict(MODERN_META, **{"io.modelcontextprotocol/protocolVersion": "2030-01-01"})
        error = self.h.call("tools/list", {"_meta": meta})["error"]
        self.assertEqual(error["code"], jsonrpc.UNSUPPORTED_PROTOCOL_VERSION)
        self.assertEqual(error["data"]["supported"], ["2026-07-28"])

    def test_removed_methods(self) -> None:
        for method in ("ping", "logging/setLevel", "resources/subscribe", "initialize"):
            self.assertEqual(self.h.call(method, {"_meta": MODERN_META})["error"]["code"], jsonrpc.METHOD_NOT_FOUND)

    def test_logs_only_when_asked_per_request(self) -> None:
        self.h.send({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "slow", "_meta": MODERN_META}})
        self.assertEqual(self.h.sent, [])
        meta = dict(MODERN_META, **{"io.modelcontextprotocol/logLevel": "debug"})
        self.h.send({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "slow", "_meta": meta}})
        self.assertEqual([m["params"]["data"] for m in self.h.sent], ["quiet", "loud"])

    def test_no_server_requests(self) -> None:
        [response] = self.h.send({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "ask", "_meta": MODERN_META}})
        self.assertTrue(response["result"]["isError"])

    def test_session_era_session_accepts_modern_request_before_initialize(self) -> None:
        h = Harness()
        result = h.call("server/discover", {"_meta": MODERN_META})["result"]
        self.assertEqual(result["supportedVersions"], ["2026-07-28"])
        self.assertEqual(h.session.state, "new")

    def test_header_checks(self) -> None:
        request = jsonrpc.Request(1, "tools/call", {"name": "echo", "_meta": MODERN_META})
        good = {"mcp-protocol-version": "2026-07-28", "mcp-method": "tools/call", "mcp-name": "echo"}
        check_modern_headers(request, good)
        check_modern_headers(request, dict(good, **{"mcp-name": "=?base64?ZWNobw==?="}))
        for bad in (
            dict(good, **{"mcp-protocol-version": None}),
            dict(good, **{"mcp-protocol-version": "2025-06-18"}),
            dict(good, **{"mcp-method": "tools/list"}),
            dict(good, **{"mcp-name": "other"}),
            dict(good, **{"mcp-name": "=?base64?!!?="}),
        ):
            with self.assertRaises(jsonrpc.JSONRPCError) as caught:
                check_modern_headers(request, bad)
            self.assertEqual(caught.exception.code, jsonrpc.HEADER_MISMATCH)


class CallEventTests(SynchronousTestCase):
    """
    The C{mcp_call} event of each C{tools/call}: debug when the call went
    well (the file log leaves it out at the default level; the metrics
    still count it), info when it did not.
    """

    def test_levels(self) -> None:
        from twisted.logger import LogLevel, capturedLogs

        h = Harness()
        h.init()
        with capturedLogs() as events:
            h.call("tools/call", {"name": "echo", "arguments": {"text": "x"}})
            h.call("tools/call", {"name": "failing"})
        calls = [e for e in events if e.get("smeldr_event") == "mcp_call"]
        self.assertEqual(
            [(e["outcome"], e["log_level"]) for e in calls], [("ok", LogLevel.debug), ("tool_error", LogLevel.info)]
        )
