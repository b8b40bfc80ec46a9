"""
The doctor against hostile servers, over real sockets on 127.0.0.1: a
server that sends headers and then never ends its body, and one whose
answers carry values that cannot go back into a request header.  The
doctor must finish its report (no hang, no lost report) whatever the
server does.
"""

from __future__ import annotations

import io
import json
from typing import Any

from twisted.internet import reactor as _globalReactor
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from smeldr_oauth.doctor.cli import run
from smeldr_oauth.doctor.fetch import Fetcher, guarded_fetcher, load_trust_root
from smeldr_oauth.doctor.run import DoctorOptions, diagnose
from smeldr_oauth.doctor.session import MCPSession
from smeldr_oauth.doctor.sse import CLOSED
from smeldr_oauth.site.admin import parse
from tests.test_doctor_fetch import LOOPBACK, serveOnLoopback

reactor: Any = _globalReactor


class Hostile(Resource):
    """
    An MCP URL at C{/mcp} whose GET (the event stream) answers 401 with a
    body it never finishes, and whose C{initialize} answer names the given
    protocol version and session id (both go back in request headers).
    """

    isLeaf = True

    def __init__(self, version: str, session_id: bytes) -> None:
        super().__init__()
        self.version = version
        self.session_id = session_id
        self.pending: list[Any] = []

    def render_GET(self, request: Any) -> Any:
        if request.path == b"/mcp":
            request.setResponseCode(401)
            request.setHeader(b"content-type", b"text/plain")
            request.setHeader(b"content-length", b"1000")
            request.write(b"not yet")
            self.pending.append(request)
            return NOT_DONE_YET
        request.setResponseCode(404)
        return b"no"

    def render_POST(self, request: Any) -> bytes:
        message = json.loads(request.content.read())
        request.setHeader(b"content-type", b"application/json")
        if message.get("method") == "initialize" and self.version == "nested":
            # An event stream whose message is nested deeper than any JSON
            # decoder goes.
            request.setHeader(b"content-type", b"text/event-stream")
            return b"event: message\ndata: " + b"[" * 5000 + b"]" * 5000 + b"\n\n"
        if message.get("method") == "initialize":
            request.setHeader(b"mcp-session-id", self.session_id)
            result = {"protocolVersion": self.version, "capabilities": {}, "serverInfo": {"name": "x", "version": "1"}}
            return json.dumps({"jsonrpc": "2.0", "id": message["id"], "result": result}).encode()
        if "id" in message:
            return json.dumps({"jsonrpc": "2.0", "id": message["id"], "result": {}}).encode()
        request.setResponseCode(202)
        return b""

    def render_DELETE(self, request: Any) -> bytes:
        return b""


class HostileTests(TestCase):
    #: A hang is the failure these tests look for: end it well before
    #: trial's two minutes (each test needs well under a second).
    timeout = 20

    async def serve(self, version: str = "2025-11-25", session_id: bytes = b"s1") -> str:
        return await serveOnLoopback(self, Hostile(version, session_id)) + "/mcp"

    def fetcher(self) -> Fetcher:
        return guarded_fetcher(reactor, load_trust_root(None), 5.0, LOOPBACK)

    async def test_streamBodyNeverEnds(self) -> None:
        """
        A stream answered with a status and headers but a body that never
        ends: the watch still ends when its time is up (it used to wait
        for the body for ever).
        """
        url = await self.serve()
        observed = await self.fetcher().stream(url, {}, 0.5)
        self.assertEqual((observed.status, observed.content_type, observed.ended), (401, "text/plain", CLOSED))

    async def test_protocolVersionNotLatin1(self) -> None:
        """
        A server whose C{initialize} names a protocol version that cannot
        be a header value: the session check reports it instead of the
        whole run failing.
        """
        url = await self.serve(version="2025-\u20ac")
        report = await MCPSession(self.fetcher(), url, "token").check(0.5)
        self.assertIsNone(report.probe)
        self.assertEqual(report.reason, "initialize answered the protocol version '2025-\u20ac', not a date")

    async def test_answerNestedTooDeep(self) -> None:
        """
        An C{initialize} answered with an event whose data is nested too
        deep to decode: the session check fails with what came (it used to
        end the run with a RecursionError).
        """
        url = await self.serve(version="nested")
        report = await MCPSession(self.fetcher(), url, "token").check(0.5)
        self.assertEqual(report.reason, "initialize answered 200 text/event-stream")

    async def test_sessionIdNotVisibleASCII(self) -> None:
        url = await self.serve(session_id=b"s\xe91")
        report = await MCPSession(self.fetcher(), url, "token").check(0.5)
        self.assertIsNone(report.probe)
        self.assertEqual(report.reason, "initialize answered a session id that is not visible ASCII")

    async def test_accessTokenNotLatin1(self) -> None:
        """
        An access token that cannot be a header value (a character outside
        Latin-1): the command refuses it in one line before any request
        (it used to end the run with 'doctor: failed: UnicodeEncodeError'
        when the session sent it).
        """
        url = await self.serve()
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as f:
            f.write("t\u00f6k\u20acn\n")
        options = parse(["doctor", url, "--access-token-file", path, "--keepalive", "0.2", "--timeout", "5"])
        out, err = io.StringIO(), io.StringIO()
        status = await run(reactor, options, out, err, io.StringIO())
        self.assertEqual(
            (status, out.getvalue(), err.getvalue()),
            (2, "", f"doctor: {path} does not hold one access token (a token is visible ASCII)\n"),
        )

    async def test_wholeRun(self) -> None:
        """
        The whole doctor with an access token against such servers (the
        stream watched, or the session refused): every check has its
        verdict.
        """
        for version in ("2025-11-25", "2025-\u20ac", "nested"):
            url = await self.serve(version=version)
            verdicts = await diagnose(self.fetcher(), DoctorOptions(url=url, access_token="token", keepalive=0.2))
            self.assertEqual([v.check for v in verdicts][-2:], ["session", "stream"])
