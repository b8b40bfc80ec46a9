"""
Tests for L{smeldr_oauth.gateway.http}: upstream MCP servers over HTTP,
through the proxy core.

Real upstreams on real sockets: a server built with the official Python
SDK (C{tests/upstreams/sdk_server.py}, Streamable HTTP with SSE or JSON
answers) and the official reference server in its Streamable HTTP and
legacy HTTP+SSE modes.  The channel's safety rules (credential headers,
no redirects, same-origin endpoint, per-channel cookies, size caps) are
checked against in-memory upstreams with treq's C{RequestTraversalAgent}.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from treq.testing import RequestTraversalAgent
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from smeldr_oauth.gateway import errors
from smeldr_oauth.gateway.config import Credential, IdentityHeaders, Limits, UpstreamConfig
from smeldr_oauth.gateway.http import HTTPChannel
from smeldr_oauth.gateway.proxy import Gateway
from smeldr_oauth.mcp import jsonrpc
from smeldr_oauth.mcp.jsonrpc import JSONRPCError
from smeldr_oauth.mcp.calls import Principal
from tests.gateway_fakes import RecordingOutlet
from tests.gateway_real import ALICE, BOB, Downstream, Recorder, UpstreamProcess, agent, answered, text, until

IDENTITY = IdentityHeaders(subject="X-Smeldr-Subject", client="X-Smeldr-Client", scopes="X-Smeldr-Scopes")


def http_config(url: str, **kwargs: Any) -> UpstreamConfig:
    kwargs.setdefault("limits", Limits(stop_grace=1))
    return UpstreamConfig(name="web", kind="http", url=url, **kwargs)


class HTTPTestCase(TestCase):
    timeout = 120

    def gateway(self, upstream: UpstreamConfig) -> Gateway:
        gateway = Gateway(upstream, clock=reactor, http_agent=agent(self))
        self.addCleanup(gateway.stop)
        self.recorder = Recorder(gateway)
        self.sent = self.recorder.sent
        return gateway

    @property
    def channel(self) -> Any:
        return self.recorder.channel


class PythonSDKTests(HTTPTestCase):
    """An upstream written with the official Python SDK (MCPServer, formerly FastMCP)."""

    async def sdk_gateway(self, *flags: str, **kwargs: Any) -> Gateway:
        upstream = await UpstreamProcess.sdk(self, *flags)
        credential = Credential("Authorization", "Bearer gateway-own-secret", "env:TEST")
        return self.gateway(http_config(upstream.url + "/mcp", credential=credential, identity_headers=IDENTITY, **kwargs))

    async def test_passes_through(self) -> None:
        gateway = await self.sdk_gateway()
        client = Downstream(gateway)
        result = await client.initialize("2025-03-26")
        self.assertEqual(result["protocolVersion"], "2025-03-26")
        self.assertEqual(result["serverInfo"]["name"], "sdk-upstream")
        self.assertEqual(self.channel.version, "2025-11-25")
        self.assertIsNotNone(self.channel.session_id)
        self.assertEqual(text(await client.tool("echo", {"text": "over http"})), "over http")
        names = {t["name"] for t in (await client.request("tools/list"))["result"]["tools"]}
        self.assertTrue({"echo", "progress", "sample", "hang"} <= names)
        memo = await client.request("resources/read", {"uri": "memo://one"})
        self.assertEqual(memo["result"]["contents"][0]["text"], "the first memo")
        prompt = await client.request("prompts/get", {"name": "greet", "arguments": {"name": "Bo"}})
        self.assertIn("Hello Bo", json.dumps(prompt))
        missing = await client.request("prompts/get", {"name": "nothing"})
        self.assertIn("error", missing)

    async def test_credential_and_identity_headers(self) -> None:
        gateway = await self.sdk_gateway()
        client = Downstream(gateway, Principal("alice", "https://client.example/meta.json", frozenset({"mcp", "tools:read"}), "g"))
        await client.initialize()
        seen = json.loads(text(await client.tool("whoami")))
        self.assertEqual(
            seen,
            {
                "authorization": "Bearer gateway-own-secret",
                "x-upstream-key": None,
                "x-smeldr-subject": "alice",
                "x-smeldr-client": "https://client.example/meta.json",
                "x-smeldr-scopes": "mcp tools:read",
            },
        )

    async def test_progress_sampling_elicitation_logging(self) -> None:
        gateway = await self.sdk_gateway()
        client = Downstream(gateway)
        await client.initialize()
        post = RecordingOutlet()
        answer = await client.request("tools/call", {"name": "progress", "arguments": {"steps": 3}, "_meta": {"progressToken": 7}}, outlet=post)
        self.assertEqual(text(answer), "3 steps done")
        progress = [m["params"] for m in post.messages if m.get("method") == "notifications/progress"]
        self.assertEqual([(p["progressToken"], p["progress"]) for p in progress], [(7, 1), (7, 2), (7, 3)])
        # Server requests come on the POST's stream: they go to that request's stream.
        post = RecordingOutlet()
        d = client.send("tools/call", {"name": "sample", "arguments": {"question": "capital of France?"}}, outlet=post)
        sampling = await client.client_request(post, "sampling/createMessage")
        client.respond(sampling["id"], {"role": "assistant", "content": {"type": "text", "text": "Paris"}, "model": "m"})
        self.assertEqual(text(await answered(d)), "model said: Paris")
        post = RecordingOutlet()
        d = client.send("tools/call", {"name": "ask_name", "arguments": {}}, outlet=post)
        elicitation = await client.client_request(post, "elicitation/create")
        client.respond(elicitation["id"], {"action": "accept", "content": {"name": "Ada"}})
        self.assertEqual(text(await answered(d)), "accept: Ada")
        post = RecordingOutlet()
        self.assertEqual(text(await client.tool("chatty", {"n": 3}, outlet=post)), "said it")
        logged = [m["params"]["data"] for m in post.messages if m.get("method") == "notifications/message"]
        self.assertEqual(logged, ["line 0", "line 1", "line 2"])

    async def test_timeout_cancels_upstream(self) -> None:
        gateway = await self.sdk_gateway(limits=Limits(request_timeout=1, stop_grace=1))
        client = Downstream(gateway)
        await client.initialize()
        answer = await client.tool("hang")
        self.assertEqual(answer["error"]["code"], jsonrpc.REQUEST_TIMEOUT)
        upstream_id = [m for m in self.sent if m.get("method") == "tools/call"][-1]["id"]
        # The SDK cancels the handler when the notification arrives: ask until it has.
        for _ in range(100):
            cancelled = text(await client.tool("cancelled"))  # one text item per id
            if cancelled:
                break
            await deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(cancelled, str(upstream_id))

    async def test_list_changed_from_the_get_stream(self) -> None:
        gateway = await self.sdk_gateway()
        client = Downstream(gateway)
        await client.initialize()
        # The server sends unasked messages only to a GET stream that is open already.
        await until(lambda: self.channel.streaming, 10, "the GET stream")
        self.assertEqual(text(await client.tool("changes")), "announced")
        await until(lambda: "notifications/tools/list_changed" in client.outlet.methods(), 10, "tools/list_changed")

    async def test_json_answers(self) -> None:
        gateway = await self.sdk_gateway("--json-response")
        client = Downstream(gateway)
        await client.initialize()
        self.assertEqual(text(await client.tool("echo", {"text": "json"})), "json")
        self.assertEqual(json.loads(text(await client.tool("whoami")))["x-smeldr-subject"], "alice")

    async def test_users_get_their_own_upstream_sessions(self) -> None:
        gateway = await self.sdk_gateway()
        alice, bob = Downstream(gateway, ALICE), Downstream(gateway, BOB)
        await alice.initialize()
        first = self.channel.session_id
        await bob.initialize()
        self.assertNotEqual(self.channel.session_id, first)
        self.assertEqual(json.loads(text(await bob.tool("whoami")))["x-smeldr-subject"], "bob")

    async def test_upstream_dies(self) -> None:
        upstream = await UpstreamProcess.sdk(self)
        gateway = self.gateway(http_config(upstream.url + "/mcp", limits=Limits(restart_backoff=0, stop_grace=1)))
        client = Downstream(gateway)
        await client.initialize()
        d = client.send("tools/call", {"name": "hang", "arguments": {}})
        await until(lambda: any(m.get("method") == "tools/call" for m in self.sent))
        await upstream.stop()
        answer = await answered(d)
        self.assertEqual(answer["error"]["code"], errors.UPSTREAM_UNAVAILABLE)
        again = await client.tool("echo", {"text": "x"})
        self.assertEqual(again["error"]["code"], errors.UPSTREAM_UNAVAILABLE)


async def long_operation(client: Downstream, post: RecordingOutlet) -> Any:
    """server-everything's progress-reporting tool, two steps, token C{"t"}."""
    params = {"name": "trigger-long-running-operation", "arguments": {"duration": 0.2, "steps": 2}, "_meta": {"progressToken": "t"}}
    return await client.request("tools/call", params, outlet=post)


class EverythingHTTPTests(HTTPTestCase):
    """The official reference server over HTTP."""

    async def test_streamable_http(self) -> None:
        upstream = await UpstreamProcess.everything(self, "streamableHttp")
        gateway = self.gateway(http_config(upstream.url + "/mcp"))
        client = Downstream(gateway)
        await client.initialize("2024-11-05")
        self.assertEqual(self.channel.mode, "streamable")
        self.assertEqual(text(await client.tool("echo", {"message": "hi"})), "Echo: hi")
        post = RecordingOutlet()
        self.assertIn("completed", text(await long_operation(client, post)))
        self.assertEqual([m["params"]["progress"] for m in post.messages if m.get("method") == "notifications/progress"], [1, 2])
        d = client.send("tools/call", {"name": "trigger-sampling-request", "arguments": {"prompt": "hi"}}, outlet=post)
        sampling = await client.client_request(post, "sampling/createMessage")
        client.respond(sampling["id"], {"role": "assistant", "content": {"type": "text", "text": "hello back"}, "model": "m"})
        self.assertIn("hello back", text(await answered(d)))
        # Unasked messages come on the GET stream, to the session's own channel.
        await client.request("logging/setLevel", {"level": "debug"})
        await until(lambda: self.channel.streaming, 10, "the GET stream")
        await client.tool("toggle-simulated-logging")
        await until(lambda: "notifications/message" in client.outlet.methods(), 15, "a log message on the GET stream")
        await client.tool("toggle-simulated-logging")

    async def test_legacy_fallback(self) -> None:
        """An upstream that only speaks HTTP+SSE (2024-11-05) is found and used."""
        upstream = await UpstreamProcess.everything(self, "sse")
        gateway = self.gateway(http_config(upstream.url + "/sse"))
        client = Downstream(gateway)
        result = await client.initialize("2025-11-25")
        self.assertEqual(result["protocolVersion"], "2025-11-25")
        self.assertEqual(self.channel.mode, "legacy")
        self.assertTrue(self.channel.endpoint.startswith(upstream.url + "/message"))
        self.assertEqual(text(await client.tool("echo", {"message": "legacy"})), "Echo: legacy")
        post = RecordingOutlet()
        self.assertIn("completed", text(await long_operation(client, post)))
        self.assertEqual(len([m for m in post.messages if m.get("method") == "notifications/progress"]), 2)
        # No stream per request here: the server's request goes to the caller in flight.
        d = client.send("tools/call", {"name": "trigger-sampling-request", "arguments": {"prompt": "hi"}}, outlet=post)
        sampling = await client.client_request(post, "sampling/createMessage")
        client.respond(sampling["id"], {"role": "assistant", "content": {"type": "text", "text": "over sse"}, "model": "m"})
        self.assertIn("over sse", text(await answered(d)))


# --------------------------------------------------------------------------
# The channel's rules, against in-memory upstreams


class FakeUpstream(Resource):
    """Just enough Streamable HTTP (or HTTP+SSE) to check what the channel sends and accepts."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[tuple[bytes, dict[bytes, list[bytes]], bytes]] = []
        self.status = 200
        self.extra: dict[bytes, bytes] = {}
        self.body: Optional[bytes] = None
        self.legacy_endpoint: Optional[bytes] = None
        self.streams: list[Any] = []

    def render(self, request: Any) -> Any:
        body = request.content.read()
        self.requests.append((request.method, dict(request.requestHeaders.getAllRawHeaders()), body))
        for name, value in self.extra.items():
            request.setHeader(name, value)
        if request.method == b"GET" and self.legacy_endpoint is not None:
            request.setHeader(b"Content-Type", b"text/event-stream")
            request.write(b"event: endpoint\ndata: " + self.legacy_endpoint + b"\n\n")
            self.streams.append(request)
            return NOT_DONE_YET
        if request.method == b"GET":
            request.setResponseCode(405)
            return b""
        request.setResponseCode(self.status)
        if self.body is not None:
            request.setHeader(b"Content-Type", b"application/json")
            return self.body
        message = json.loads(body) if body else {}
        if "id" not in message or request.method != b"POST":
            request.setResponseCode(202 if self.status == 200 else self.status)
            return b""
        request.setHeader(b"Content-Type", b"application/json")
        if message.get("method") == "initialize" and b"Mcp-Session-Id" not in self.extra:
            request.setHeader(b"Mcp-Session-Id", b"session-1")
            request.setHeader(b"Set-Cookie", b"sticky=node-7; Path=/")
        return json.dumps({"jsonrpc": "2.0", "id": message["id"], "result": {"ok": True}}).encode()


class Receiver:
    def __init__(self) -> None:
        self.messages: list[Any] = []
        self.lost: list[tuple[str, str]] = []

    def messageReceived(self, message: Any, related: Any) -> None:
        self.messages.append((message, related))

    def channelLost(self, reason: str, detail: str) -> None:
        self.lost.append((reason, detail))


class ChannelRuleTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.upstream = FakeUpstream()
        self.agent = RequestTraversalAgent(self.upstream)
        self.receiver = Receiver()

    def channel(self, **kwargs: Any) -> HTTPChannel:
        config = UpstreamConfig(name="web", kind="http", url=kwargs.pop("url", "http://up.example/mcp"), **kwargs)
        channel = HTTPChannel(self.agent, Clock(), config)
        self.successResultOf(channel.start(self.receiver))  # type: ignore[arg-type]
        return channel

    def send(self, channel: HTTPChannel, message: dict, identity: Any = None) -> Deferred:
        d = channel.send(message, identity)
        self.agent.flush()
        return d

    def test_headers(self) -> None:
        channel = self.channel(
            credential=Credential("X-Api-Key", "k-1", "env:K"), identity_headers=IDENTITY
        )
        self.successResultOf(self.send(channel, jsonrpc.request(1, "initialize", {})))
        channel.negotiated("2025-06-18")
        who = Principal("al\u00efce\r\nX-Evil: 1", "c%1", frozenset({"b", "a"}), None)
        self.successResultOf(self.send(channel, jsonrpc.request(2, "tools/list", {}), who))
        headers = self.upstream.requests[-1][1]
        self.assertEqual(headers[b"X-Api-Key"], [b"k-1"])
        self.assertEqual(headers[b"Mcp-Session-Id"], [b"session-1"])
        self.assertEqual(headers[b"Mcp-Protocol-Version"], [b"2025-06-18"])
        self.assertEqual(headers[b"X-Smeldr-Subject"], [b"al%C3%AFce%0D%0AX-Evil: 1"])
        self.assertEqual(headers[b"X-Smeldr-Client"], [b"c%251"])
        self.assertEqual(headers[b"X-Smeldr-Scopes"], [b"a b"])
        self.assertNotIn(b"Authorization", headers)
        self.assertEqual(headers[b"Accept"], [b"application/json, text/event-stream"])
        self.assertEqual(self.receiver.messages[-1][1], 2)  # attributed to its request

    def recording(self) -> tuple[Any, list[Any]]:
        """An agent in front of C{self.agent} and the headers each request was given."""
        sent: list[Any] = []
        traversal = self.agent

        class Recording:
            def request(self, method: bytes, uri: bytes, headers: Any = None, body: Any = None) -> Deferred:
                sent.append(headers)
                return traversal.request(method, uri, headers, body)

        return Recording(), sent

    def test_post_headers_kept_while_nothing_changes(self) -> None:
        """
        A POST's headers are the last POST's again while the session id,
        the version and the caller are the same (so the agent can send
        their lines as they are); a new session id, version or caller gets
        new ones, never another caller's identity.
        """
        recording, sent = self.recording()
        self.upstream.extra[b"Mcp-Session-Id"] = b"session-1"  # and no cookie
        config = UpstreamConfig(name="web", kind="http", url="http://up.example/mcp", identity_headers=IDENTITY)
        channel = HTTPChannel(recording, Clock(), config)  # type: ignore[arg-type]
        self.successResultOf(channel.start(self.receiver))  # type: ignore[arg-type]
        alice = Principal("alice", "c1", frozenset({"a"}), None)
        bob = Principal("bob", "c1", frozenset({"a"}), None)
        self.successResultOf(self.send(channel, jsonrpc.request(1, "initialize", {}), alice))
        channel.negotiated("2025-06-18")
        for n, who in enumerate([alice, alice, bob, alice, Principal("alice", "c1", frozenset({"a"}), None)]):
            self.successResultOf(self.send(channel, jsonrpc.request(n + 2, "tools/list", {}), who))
        first, *rest = sent
        self.assertIsNot(first, sent[1])  # the session id and the version came after it
        self.assertIs(sent[1], sent[2])
        self.assertIsNot(sent[3], sent[2])
        self.assertIsNot(sent[4], sent[3])
        self.assertIs(sent[5], sent[4])  # the same caller, another principal object
        subjects = [request[1][b"X-Smeldr-Subject"] for request in self.upstream.requests]
        self.assertEqual(subjects, [[b"alice"]] * 3 + [[b"bob"]] + [[b"alice"]] * 2)
        self.assertEqual(self.upstream.requests[-1][1][b"Mcp-Session-Id"], [b"session-1"])

    def test_post_headers_with_cookies_are_new(self) -> None:
        """Once the upstream set a cookie, every POST gets new headers (the jar adds to them)."""
        recording, sent = self.recording()
        config = UpstreamConfig(name="web", kind="http", url="http://up.example/mcp")
        channel = HTTPChannel(recording, Clock(), config)  # type: ignore[arg-type]
        self.successResultOf(channel.start(self.receiver))  # type: ignore[arg-type]
        for n in range(3):
            self.successResultOf(self.send(channel, jsonrpc.request(n + 1, "initialize" if n == 0 else "tools/list", {})))
        self.assertIsNot(sent[1], sent[2])
        self.assertEqual([request[1].get(b"Cookie") for request in self.upstream.requests[1:]], [[b"sticky=node-7"]] * 2)

    def test_notification_exchanges_are_bounded(self) -> None:
        channel = self.channel(limits=Limits(request_timeout=5))
        self.upstream.render = lambda request: NOT_DONE_YET  # type: ignore[method-assign]
        d = self.send(channel, jsonrpc.notification("notifications/roots/list_changed", {}))
        self.assertNoResult(d)
        channel.clock.advance(5)  # type: ignore[attr-defined]
        self.failureResultOf(d)

    def test_owner_identity_on_requests_without_a_caller(self) -> None:
        config = UpstreamConfig(name="web", kind="http", url="http://up.example/mcp", identity_headers=IDENTITY)
        channel = HTTPChannel(self.agent, Clock(), config, Principal("alice", None, frozenset(), None))
        self.successResultOf(channel.start(self.receiver))  # type: ignore[arg-type]
        self.successResultOf(self.send(channel, jsonrpc.request(1, "initialize", {})))
        headers = self.upstream.requests[-1][1]
        self.assertEqual(headers[b"X-Smeldr-Subject"], [b"alice"])
        self.assertNotIn(b"X-Smeldr-Client", headers)

    def test_cookies_stay_in_their_channel(self) -> None:
        first = self.channel()
        self.successResultOf(self.send(first, jsonrpc.request(1, "initialize", {})))
        self.successResultOf(self.send(first, jsonrpc.request(2, "tools/list", {})))
        self.assertEqual(self.upstream.requests[-1][1].get(b"Cookie"), [b"sticky=node-7"])
        second = self.channel()
        self.successResultOf(self.send(second, jsonrpc.request(1, "tools/list", {})))
        self.assertNotIn(b"Cookie", self.upstream.requests[-1][1])

    def test_credential_refused(self) -> None:
        channel = self.channel()
        self.upstream.status = 401
        error = self.failureResultOf(self.send(channel, jsonrpc.request(1, "tools/list", {})), JSONRPCError).value
        self.assertEqual(error.message, "Upstream unavailable: it refused the gateway's credential (HTTP 401)")

    def test_redirects_are_not_followed(self) -> None:
        channel = self.channel()
        self.upstream.status = 302
        self.upstream.extra[b"Location"] = b"http://elsewhere.example/steal"
        error = self.failureResultOf(self.send(channel, jsonrpc.request(1, "tools/list", {})), JSONRPCError).value
        self.assertEqual(error.message, "Upstream unavailable: it answered HTTP 302")
        self.assertEqual(len(self.upstream.requests), 1)

    def test_json_rpc_error_in_an_error_status(self) -> None:
        channel = self.channel()
        self.upstream.status = 400
        self.upstream.body = json.dumps({"jsonrpc": "2.0", "id": 1, "error": {"code": -32602, "message": "bad"}}).encode()
        self.successResultOf(self.send(channel, jsonrpc.request(1, "tools/list", {})))
        self.assertEqual(self.receiver.messages[-1][0].error, {"code": -32602, "message": "bad"})

    def test_answer_that_does_not_answer(self) -> None:
        channel = self.channel()
        self.upstream.body = b'{"jsonrpc": "2.0", "id": 99, "result": {}}'
        error = self.failureResultOf(self.send(channel, jsonrpc.request(1, "tools/list", {})), JSONRPCError).value
        self.assertEqual(error.message, "Upstream unavailable: its answer did not answer the request")

    def test_oversized_answer(self) -> None:
        channel = self.channel(limits=Limits(max_message_bytes=2048))
        self.upstream.body = b'{"jsonrpc": "2.0", "id": 1, "result": {"x": "' + b"y" * 4096 + b'"}}'
        error = self.failureResultOf(self.send(channel, jsonrpc.request(1, "tools/list", {})), JSONRPCError).value
        self.assertEqual(error.message, "Upstream unavailable: its answer is larger than 2048 bytes")

    def test_session_gone(self) -> None:
        channel = self.channel()
        self.successResultOf(self.send(channel, jsonrpc.request(1, "initialize", {})))
        self.upstream.status = 404
        error = self.failureResultOf(self.send(channel, jsonrpc.request(2, "tools/list", {})), JSONRPCError).value
        self.assertEqual(error.data["reason"], "exited")
        self.assertEqual(self.receiver.lost, [("exited", "the upstream ended its HTTP session")])
        self.assertEqual(self.failureResultOf(channel.send(jsonrpc.request(3, "x", {})), JSONRPCError).value.data["reason"], "exited")

    def test_bad_session_id(self) -> None:
        channel = self.channel()
        self.upstream.extra[b"Mcp-Session-Id"] = b"has space"
        error = self.failureResultOf(self.send(channel, jsonrpc.request(1, "initialize", {})), JSONRPCError).value
        self.assertIn("not visible ASCII", error.message)

    def test_close_ends_the_session(self) -> None:
        channel = self.channel()
        self.successResultOf(self.send(channel, jsonrpc.request(1, "initialize", {})))
        d = channel.close()
        self.agent.flush()
        self.successResultOf(d)
        method, headers, _ = self.upstream.requests[-1]
        self.assertEqual((method, headers[b"Mcp-Session-Id"]), (b"DELETE", [b"session-1"]))

    def test_legacy_endpoint_must_be_same_origin(self) -> None:
        self.upstream.legacy_endpoint = b"http://evil.example/collect"
        config = UpstreamConfig(name="web", kind="http", url="http://up.example/sse", transport="sse")
        channel = HTTPChannel(self.agent, Clock(), config)
        d = channel.start(self.receiver)  # type: ignore[arg-type]
        self.agent.flush()
        error = self.failureResultOf(d, JSONRPCError).value
        self.assertEqual(error.message, "Upstream unavailable: it named a message endpoint on another origin")

    def test_legacy_endpoint_relative(self) -> None:
        self.upstream.legacy_endpoint = b"/messages?sessionId=abc"
        config = UpstreamConfig(name="web", kind="http", url="http://up.example/sse", transport="sse")
        channel = HTTPChannel(self.agent, Clock(), config)
        d = channel.start(self.receiver)  # type: ignore[arg-type]
        self.agent.flush()
        self.successResultOf(d)
        self.assertEqual(channel.endpoint, "http://up.example/messages?sessionId=abc")
        for stream in self.upstream.streams:
            stream.finish()
        self.agent.flush()
        self.assertEqual(self.receiver.lost, [("exited", "the upstream closed its event stream")])


class StreamingUpstream(Resource):
    """A Streamable HTTP upstream that answers over event streams, and drops them."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.gets: list[dict[bytes, list[bytes]]] = []
        self.get_bodies: list[bytes] = []

    def render_POST(self, request: Any) -> Any:
        message = json.loads(request.content.read())
        if "id" not in message:
            request.setResponseCode(202)
            return b""
        request.setHeader(b"Content-Type", b"text/event-stream")
        if message["method"] == "initialize":
            request.setHeader(b"Mcp-Session-Id", b"s-1")
            answer = {"jsonrpc": "2.0", "id": message["id"], "result": {"ok": 1}}
            return b"event: message\ndata: " + json.dumps(answer).encode() + b"\n\n"
        # The 2025-11-25 polling pattern: an event id, then the stream ends before the answer.
        progress = {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progressToken": 1, "progress": 1}}
        return b"id: ev-1\nretry: 250\ndata:\n\nid: ev-2\ndata: " + json.dumps(progress).encode() + b"\n\n"

    def render_GET(self, request: Any) -> Any:
        self.gets.append(dict(request.requestHeaders.getAllRawHeaders()))
        request.setHeader(b"Content-Type", b"text/event-stream")
        if self.get_bodies:
            return self.get_bodies.pop(0)
        return b""


class StreamRuleTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.upstream = StreamingUpstream()
        self.agent = RequestTraversalAgent(self.upstream)
        self.clock = Clock()
        self.receiver = Receiver()
        config = UpstreamConfig(name="web", kind="http", url="http://up.example/mcp")
        self.channel = HTTPChannel(self.agent, self.clock, config)
        self.successResultOf(self.channel.start(self.receiver))  # type: ignore[arg-type]
        d = self.channel.send(jsonrpc.request(1, "initialize", {}))
        self.agent.flush()
        self.successResultOf(d)
        self.channel.negotiated("2025-11-25")

    def test_post_stream_resumed_with_last_event_id(self) -> None:
        answer = {"jsonrpc": "2.0", "id": 2, "result": {"resumed": True}}
        self.upstream.get_bodies.append(b"id: ev-3\nevent: message\ndata: " + json.dumps(answer).encode() + b"\n\n")
        d = self.channel.send(jsonrpc.request(2, "tools/call", {}))
        self.agent.flush()
        self.assertNoResult(d)  # waits for the server's retry interval
        self.clock.advance(0.25)
        self.agent.flush()
        self.successResultOf(d)
        self.assertEqual(self.upstream.gets[-1][b"Last-Event-Id"], [b"ev-2"])
        self.assertEqual(self.upstream.gets[-1][b"Mcp-Session-Id"], [b"s-1"])
        messages = [m for m, _ in self.receiver.messages]
        self.assertEqual(messages[-2].method, "notifications/progress")
        self.assertEqual(messages[-1].result, {"resumed": True})
        self.assertEqual({related for _, related in self.receiver.messages[1:]}, {2})

    def test_post_stream_without_answer_or_id_fails(self) -> None:
        self.upstream.render_POST = lambda request: (request.setHeader(b"Content-Type", b"text/event-stream"), b": nothing\n\n")[1]  # type: ignore[method-assign]
        d = self.channel.send(jsonrpc.request(2, "tools/call", {}))
        self.agent.flush()
        self.assertEqual(self.failureResultOf(d, JSONRPCError).value.message, "Upstream unavailable: it ended the stream without answering")

    def test_get_stream_reconnects(self) -> None:
        note = {"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}
        self.upstream.get_bodies.append(b"retry: 2000\nid: g-1\ndata: " + json.dumps(note).encode() + b"\n\n")
        d = self.channel.send(jsonrpc.notification("notifications/initialized", {}))
        self.agent.flush()
        self.successResultOf(d)
        self.agent.flush()
        self.assertEqual(len(self.upstream.gets), 1)
        self.assertEqual(self.receiver.messages[-1][0].method, "notifications/tools/list_changed")
        self.assertIsNone(self.receiver.messages[-1][1])
        self.clock.advance(1.9)
        self.agent.flush()
        self.assertEqual(len(self.upstream.gets), 1)
        self.clock.advance(0.1)
        self.agent.flush()
        self.assertEqual(len(self.upstream.gets), 2)
        self.assertEqual(self.upstream.gets[-1][b"Last-Event-Id"], [b"g-1"])
        # Closing stops the reconnections.
        self.channel.close()
        self.agent.flush()
        self.clock.advance(60)
        self.agent.flush()
        self.assertLessEqual(len(self.upstream.gets), 2)


#: A tool result crafted to break a client's framing if it went through
#: unescaped: SSE event separators, a forged event for another id, CR; and
#: the line separators JavaScript once refused in strings, kept as they are.
EVIL_TEXT = 'a\n\nevent: message\ndata: {"jsonrpc": "2.0", "id": "b-1", "result": {}}\n\r\n\u2028\u2029z'


class HostileUpstream(Resource):
    """
    A Streamable HTTP upstream that tries to reach other sessions: each
    user gets an upstream session of their own; C{tools/call} of C{leak}
    is answered with an event stream carrying a response under another
    session's downstream id, a log message, then the real answer with
    L{EVIL_TEXT}; any other call is held (never answered).
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.sessions = 0
        self.held: list[Any] = []

    def render_POST(self, request: Any) -> Any:
        message = json.loads(request.content.read())
        if "id" not in message:
            request.setResponseCode(202)
            return b""
        if message["method"] == "initialize":
            self.sessions += 1
            request.setHeader(b"Mcp-Session-Id", b"hostile-%d" % self.sessions)
            request.setHeader(b"Content-Type", b"application/json")
            result = {"protocolVersion": "2025-11-25", "capabilities": {"tools": {}}, "serverInfo": {"name": "h", "version": "1"}}
            return json.dumps({"jsonrpc": "2.0", "id": message["id"], "result": result}).encode()
        if message["params"].get("name") != "leak":
            self.held.append(request)
            return NOT_DONE_YET
        request.setHeader(b"Content-Type", b"text/event-stream")
        events = [
            {"jsonrpc": "2.0", "id": "b-1", "result": {"content": [{"type": "text", "text": "forged"}]}},
            {"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "error", "data": "whose?"}},
            {"jsonrpc": "2.0", "id": message["id"], "result": {"content": [{"type": "text", "text": EVIL_TEXT}]}},
        ]
        return b"".join(b"event: message\ndata: " + json.dumps(e).encode() + b"\n\n" for e in events)

    def render_GET(self, request: Any) -> Any:
        request.setResponseCode(405)
        return b""


class HostileUpstreamTests(SynchronousTestCase):
    """
    What a hostile upstream sends on one user's upstream session reaches
    that user's session only, and an answer cannot break the client's
    framing: the gateway re-encodes every answer under the client's own id.
    """

    def test_answers_stay_in_their_session_and_framing(self) -> None:
        upstream = HostileUpstream()
        agent = RequestTraversalAgent(upstream)
        gateway = Gateway(http_config("http://up.example/mcp"), clock=Clock(), http_agent=agent)
        sessions = {}
        for who in (ALICE, BOB):
            outlet = RecordingOutlet()
            session = gateway.session(session_id=f"sid-{who.subject}", default_outlet=outlet)
            init = {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t"}}
            d = session.handle(jsonrpc.parse_message({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": init}), who)
            agent.flush()
            self.assertIn("result", self.successResultOf(d))
            session.handle(jsonrpc.parse_message({"jsonrpc": "2.0", "method": "notifications/initialized"}), who)
            agent.flush()
            sessions[who.subject] = (session, outlet)
        self.assertEqual(upstream.sessions, 2)

        def call(who: Principal, msg_id: str, tool: str, outlet: Any) -> Deferred:
            session = sessions[who.subject][0]
            message = {"jsonrpc": "2.0", "id": msg_id, "method": "tools/call", "params": {"name": tool, "arguments": {}}}
            d = session.handle(jsonrpc.parse_message(message), who, outlet)
            agent.flush()
            return d

        bob_outlet, alice_outlet = RecordingOutlet(), RecordingOutlet()
        bob_call = call(BOB, "b-1", "wait", bob_outlet)
        answer = self.successResultOf(call(ALICE, "a-1", "leak", alice_outlet))
        self.assertEqual(answer["id"], "a-1")
        self.assertEqual(answer["result"]["content"], [{"type": "text", "text": EVIL_TEXT}])
        # One line on the wire, whatever the text: an SSE data line or a JSON
        # body.  (U+2028/U+2029 end no SSE line and are valid in JSON strings.)
        encoded = jsonrpc.encode(answer)
        self.assertNotIn(b"\n", encoded)
        self.assertNotIn(b"\r", encoded)
        self.assertEqual(json.loads(encoded), answer)
        # The forged answer under Bob's id went nowhere; the log went to Alice's request only.
        self.assertNoResult(bob_call)
        self.assertEqual(bob_outlet.messages + sessions["bob"][1].messages, [])
        self.assertEqual([m["method"] for m in alice_outlet.messages], ["notifications/message"])
        for request in upstream.held:
            request.finish()


class BodyTests(SynchronousTestCase):
    """L{smeldr_oauth.gateway.http._read} over the gateway's own agent."""

    def test_read_body_leaves_no_cycle(self) -> None:
        """
        Once a body has ended, nothing of it waits for the garbage
        collector: the response, its headers and the reader go as soon as
        the channel drops them.  (The reader kept its transport, which
        holds the response, which holds the reader: some 25 objects a
        relayed call went to the collector, docs/performance.md, "Round
        ten (gateway)".)
        """
        import gc
        import weakref

        from twisted.web.http_headers import Headers

        from smeldr_oauth.gateway.agent import UpstreamAgent
        from smeldr_oauth.gateway.http import _BytesProducer, _read
        from tests.test_gateway_agent import CHUNKED, SSE, URL, Endpoints

        endpoints = Endpoints()
        agent = UpstreamAgent(Clock(), endpoints=endpoints)
        self.addCleanup(agent.close)
        if gc.isenabled():
            gc.disable()
            self.addCleanup(gc.enable)
        for early in (True, False):
            d = agent.request(b"POST", URL, Headers({}), _BytesProducer(b"{}"))
            link = endpoints.links[-1]
            chunks: list[bytes] = []
            if early:
                # The whole response before the body is asked for.
                link.receive(CHUNKED)
                answer = self.successResultOf(d)
                body, done = _read(answer, chunks.append, None)
            else:
                head, rest = CHUNKED.split(b"\r\n\r\n", 1)
                link.receive(head + b"\r\n\r\n")
                answer = self.successResultOf(d)
                body, done = _read(answer, chunks.append, None)
                link.receive(rest)
            self.assertIsNone(self.successResultOf(done))
            self.assertEqual(b"".join(chunks), SSE)
            response = weakref.ref(answer)
            reader = weakref.ref(body)
            del answer, body, done, d
            self.assertIsNone(reader(), "the body reader waits for the garbage collector")
            self.assertIsNone(response(), "the response waits for the garbage collector")


class HeldDelete(Resource):
    """
    A Streamable HTTP upstream that works until its session is ended: it
    takes the C{DELETE} and never answers it (a hung or dying server), or
    (C{headers_first}) answers its headers and never ends the body.
    """

    isLeaf = True

    def __init__(self, headers_first: bool) -> None:
        super().__init__()
        self.headers_first = headers_first
        self.held: list[Any] = []

    def render_GET(self, request: Any) -> bytes:
        request.setResponseCode(405)
        return b""

    def render_DELETE(self, request: Any) -> Any:
        self.held.append(request)
        if self.headers_first:
            request.setHeader(b"Content-Length", b"1000")
            request.write(b"ending")
        return NOT_DONE_YET

    def render_POST(self, request: Any) -> bytes:
        message = json.loads(request.content.read())
        if "id" not in message:
            request.setResponseCode(202)
            return b""
        request.setHeader(b"Content-Type", b"application/json")
        result: dict[str, Any] = {}
        if message["method"] == "initialize":
            request.setHeader(b"Mcp-Session-Id", b"held-1")
            result = {"protocolVersion": "2025-11-25", "capabilities": {"tools": {}}, "serverInfo": {"name": "held", "version": "1"}}
        return json.dumps({"jsonrpc": "2.0", "id": message["id"], "result": result}).encode()


class HeldDeleteTests(HTTPTestCase):
    #: The failure looked for is a hang: well before trial's two minutes.
    timeout = 30

    async def test_stop_does_not_wait_for_a_hung_upstream(self) -> None:
        """
        Over a real socket: the gateway's stop (the server's shutdown)
        ends the upstream session with C{DELETE}, waits for its answer at
        most C{stop_grace}, then drops it; it used to wait for ever.
        """
        await self.stopWith(HeldDelete(headers_first=False))

    async def test_stop_does_not_wait_for_an_endless_answer(self) -> None:
        """
        The same when the C{DELETE}'s answer starts and never ends.
        """
        await self.stopWith(HeldDelete(headers_first=True))

    async def stopWith(self, upstream: HeldDelete) -> None:
        from twisted.internet.endpoints import TCP4ServerEndpoint
        from twisted.web.server import Site

        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(upstream))
        self.addCleanup(port.stopListening)
        gateway = self.gateway(http_config(f"http://127.0.0.1:{port.getHost().port}/mcp", limits=Limits(stop_grace=0.5)))
        client = Downstream(gateway)
        await client.initialize()
        self.assertEqual(self.channel.session_id, "held-1")
        await gateway.stop()
        self.assertEqual([request.method for request in upstream.held], [b"DELETE"])
        # The connection was dropped, not left open to the upstream.
        await until(lambda: all(request._disconnected for request in upstream.held), 10, "the DELETE dropped")
