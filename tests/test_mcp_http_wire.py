"""
Tests for L{smeldr_oauth.mcp.http.wire} and every header the MCP endpoints
read: bytes 0x80-0xFF (legal in HTTP header values), repeats and garbage in
any header, on every route and method, never give a 5xx or a logged
traceback.

Over real sockets for a fixed matrix, and with Hypothesis through the real
L{Site} and request-processing path (an L{HTTPChannel} on a
L{StringTransport}, everything else real) for arbitrary bytes.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from hypothesis import given, settings
from hypothesis import strategies as st
from klein import Klein
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from smeldr_oauth.mcp.http import MCPHTTP
from smeldr_oauth.web.site import SmeldrSite
from tests.test_mcp_http import METADATA, RESOURCE, TOKENS, FakeVerifier, HTTPTestBase, build_app

#: Every request header the MCP endpoints read, and two they do not.
HEADERS = (
    b"Authorization",
    b"Content-Type",
    b"Accept",
    b"Content-Length",
    b"Mcp-Session-Id",
    b"MCP-Protocol-Version",
    b"Mcp-Method",
    b"Mcp-Name",
    b"Last-Event-ID",
    b"Origin",
    b"Host",
    b"X-Unrelated",
)

HIGH_BYTES = bytes(range(0x80, 0x100))

MODERN_CALL = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "tools/call",
    "params": {
        "name": "echo",
        "arguments": {"text": "x"},
        "_meta": {
            "io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientCapabilities": {},
        },
    },
}


def build_request(method: bytes, path: bytes, headers: dict[bytes, bytes], body: Optional[dict] = None) -> bytes:
    """An HTTP/1.1 request; C{Content-Length} is computed unless given."""
    data = json.dumps(body).encode() if body is not None else b""
    all_headers = {b"Host": b"x", b"Authorization": b"Bearer alice", b"Accept": b"application/json, text/event-stream"}
    if body is not None:
        all_headers[b"Content-Type"] = b"application/json"
        all_headers[b"Content-Length"] = str(len(data)).encode()
    all_headers.update(headers)
    lines = [method + b" " + path + b" HTTP/1.1"] + [name + b": " + value for name, value in all_headers.items()]
    return b"\r\n".join(lines) + b"\r\n\r\n" + data


class Cases:
    """The requests that reach each route and method, given live session ids."""

    def __init__(self, streamable: str, legacy_endpoint: str) -> None:
        self.streamable = streamable.encode()
        self.legacy_endpoint = legacy_endpoint.encode()

    def all(self) -> list[tuple[str, bytes, bytes, dict[bytes, bytes], Optional[dict]]]:
        session = {b"Mcp-Session-Id": self.streamable, b"MCP-Protocol-Version": b"2025-06-18"}
        modern = {
            b"MCP-Protocol-Version": b"2026-07-28",
            b"Mcp-Method": b"tools/call",
            b"Mcp-Name": b"echo",
        }
        init = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"protocolVersion": "2025-06-18", "capabilities": {}}}
        call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "echo", "arguments": {"text": "x"}}}
        return [
            ("initialize", b"POST", b"/mcp", {}, init),
            ("call in session", b"POST", b"/mcp", session, call),
            ("stateless call", b"POST", b"/mcp", modern, MODERN_CALL),
            ("GET stream", b"GET", b"/mcp", {**session, b"Last-Event-ID": b"0"}, None),
            ("legacy stream", b"GET", b"/mcp", {}, None),
            ("legacy message", b"POST", self.legacy_endpoint, {}, call),
            ("preflight", b"OPTIONS", b"/mcp", {b"Origin": b"https://claude.ai"}, None),
            ("delete", b"DELETE", b"/mcp", session, None),
        ]


def variants(name: bytes) -> list[bytes]:
    """Bad values of header C{name}: high bytes, alone and after a plausible prefix."""
    found = [HIGH_BYTES, b"\xc3\x28\xa0\xa1"]
    if name == b"Authorization":
        found.append(b"Bearer " + HIGH_BYTES)
    return found


class FailureWatch:
    """Every logged failure or error event while it is installed."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        if "log_failure" in event or event.get("isError"):
            self.events.append(event)

    def __enter__(self) -> "FailureWatch":
        globalLogPublisher.addObserver(self)
        return self

    def __exit__(self, *exc: object) -> None:
        globalLogPublisher.removeObserver(self)


def status_of(data: bytes) -> int:
    return int(data.split(b" ", 2)[1])


class SocketHeaderTests(HTTPTestBase):
    """Each header, each bad value, each route, over a real socket."""

    timeout = 120

    async def cases(self) -> Cases:
        session_id = await self.initialize()
        _, endpoint = await self.open_legacy()
        init = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"protocolVersion": "2024-11-05", "capabilities": {}}}
        await self.request("POST", path=endpoint, body=init)
        return Cases(session_id, endpoint)

    async def test_high_bytes_in_every_header(self) -> None:
        cases = await self.cases()
        seen: dict[int, int] = {}
        with FailureWatch() as watch:
            for label, method, path, headers, body in cases.all():
                if label == "delete":
                    continue  # last: it ends the session the others use
                for name in HEADERS:
                    for value in variants(name):
                        raw = build_request(method, path, {**headers, name: value}, body)
                        client = await self.raw(raw)
                        data = await client.wait_for(b"\r\n")
                        status = status_of(data)
                        seen[status] = seen.get(status, 0) + 1
                        self.assertLess(status, 500, f"{label}, {name!r}: {data[:300]!r}")
                        client.transport.abortConnection()
            for name in HEADERS:
                fresh = Cases(await self.initialize(), "/unused")
                label, method, path, headers, body = fresh.all()[-1]
                client = await self.raw(build_request(method, path, {**headers, name: HIGH_BYTES}, body))
                data = await client.wait_for(b"\r\n")
                self.assertLess(status_of(data), 500, f"delete, {name!r}: {data[:300]!r}")
        self.assertEqual(watch.events, [])
        # The refusals are the endpoints' own: 400s and 401s, not only 200s.
        self.assertIn(400, seen)
        self.assertIn(401, seen)


class InMemorySite:
    """
    The real L{Site}, Klein resource and MCP endpoints, fed bytes through an
    L{HTTPChannel} on a L{StringTransport}: the request-processing path of
    a socket without one (everything here fires synchronously).
    """

    def __init__(self) -> None:
        self.clock = Clock()
        self.mcp = MCPHTTP(
            self.clock,
            build_app(),
            FakeVerifier(dict(TOKENS)),
            resource_url=RESOURCE,
            resource_metadata_url=METADATA,
            challenge_scope="read write",
            allowed_origins=("https://claude.ai",),
            max_body=1000,
        )
        klein = Klein()
        self.mcp.register(klein)
        self.site = SmeldrSite(klein.resource(), max_body=1000)

    def send(self, raw: bytes) -> bytes:
        channel = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1234))
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(raw)
        answer = transport.value()
        channel.connectionLost(Failure(ConnectionDone()))
        return answer

    def session(self) -> str:
        answer = self.send(
            build_request(
                b"POST",
                b"/mcp",
                {},
                {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"protocolVersion": "2025-06-18", "capabilities": {}}},
            )
        )
        headers = answer.split(b"\r\n\r\n", 1)[0].lower()
        return headers.split(b"mcp-session-id: ", 1)[1].split(b"\r\n", 1)[0].decode()


header_bytes = st.binary(max_size=48).map(lambda b: bytes(x for x in b if x not in (10, 13)))


class FuzzHeaderTests(SynchronousTestCase):
    """Arbitrary bytes in any header, on any route: never a 5xx, never a traceback."""

    def setUp(self) -> None:
        self.site = InMemorySite()
        self.cases = Cases(self.site.session(), "/mcp/message?session_id=unknown").all()

    @settings(max_examples=300, deadline=None)
    @given(
        case=st.integers(min_value=0, max_value=7),
        name=st.sampled_from(HEADERS),
        value=header_bytes | st.just(HIGH_BYTES),
        repeat=st.booleans(),
    )
    def test_any_bytes_any_header(self, case: int, name: bytes, value: bytes, repeat: bool) -> None:
        label, method, path, headers, body = self.cases[case]
        raw = build_request(method, path, {**headers, name: value}, body)
        if repeat:
            # The same header twice: the second line repeats it.
            head, rest = raw.split(b"\r\n", 1)
            raw = head + b"\r\n" + name + b": " + value + b"\r\n" + rest
        with FailureWatch() as watch:
            answer = self.site.send(raw)
        if answer:
            self.assertLess(status_of(answer), 500, f"{label}, {name!r}={value!r}: {answer[:300]!r}")
        self.assertEqual(watch.events, [], f"{label}, {name!r}={value!r}")

