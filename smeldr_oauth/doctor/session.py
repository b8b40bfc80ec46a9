# -*- test-case-name: tests.test_doctor_session -*-
"""
The doctor as an MCP client with a token: open a Streamable HTTP session,
send a few requests on it (do they all find the session, wherever a
balancer sends them?), watch the session's event stream, and end the
session.

The token is sent only to the MCP URL the operator named.
"""

from __future__ import annotations

import json
import re
from typing import Any, Optional

import attr

from smeldr_oauth.doctor.checks import SessionProbe
from smeldr_oauth.doctor.fetch import PROTOCOL_VERSION, Fetcher
from smeldr_oauth.doctor.model import Fetched
from smeldr_oauth.doctor.sse import StreamObservation

#: A protocol version (C{2025-11-25}); a session id is visible ASCII
#: (the Streamable HTTP rule).
VERSION = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
SESSION_ID = re.compile(r"[\x21-\x7e]{1,1024}")

#: Requests sent on the session after C{initialize}: enough that a
#: round-robin balancer over two or three processes sends some elsewhere.
PINGS = 4


def initialize(request_id: int) -> dict[str, Any]:
    """
    The doctor's C{initialize} request, as the unauthenticated challenge
    (L{smeldr_oauth.doctor.run}) and the session with a token send it: one
    client identity and protocol version, so that the two requests a
    server's log shows from the doctor are the same but for their id.
    """
    return {
        "jsonrpc": "2.0",
        "id": request_id,
        "method": "initialize",
        "params": {
            "protocolVersion": PROTOCOL_VERSION,
            "capabilities": {},
            "clientInfo": {"name": "smeldr-oauth-doctor", "version": "1"},
        },
    }


def rpc_answer(fetched: Fetched) -> Optional[dict[str, Any]]:
    """
    The JSON-RPC answer in a Streamable HTTP response: the JSON body, or
    the first C{message} event's data when the server answered with a
    stream.
    """
    if fetched.media_type() == "text/event-stream":
        text = fetched.body.decode("utf-8", "replace").replace("\r\n", "\n")
        for frame in text.split("\n\n"):
            data = "\n".join(line[5:].lstrip() for line in frame.split("\n") if line.startswith("data:"))
            if not data:
                continue
            try:
                value = json.loads(data)
            except (ValueError, RecursionError):
                # RecursionError: nested deeper than the decoder goes.
                continue
            if isinstance(value, dict) and ("result" in value or "error" in value):
                return value
        return None
    body, _ = fetched.json_object()
    return body


@attr.s(auto_attribs=True)
class SessionReport:
    """
    What the session part found; either may be C{None} with C{reason}.
    """

    probe: Optional[SessionProbe] = None
    stream: Optional[StreamObservation] = None
    reason: str = ""


class MCPSession:
    """
    @param token: the access token (kept out of C{repr}, never printed).
    """

    def __init__(self, fetcher: Fetcher, mcp_url: str, token: str) -> None:
        self.fetcher = fetcher
        self.mcp_url = mcp_url
        self._token = token
        self.session_id: Optional[str] = None
        self.version = PROTOCOL_VERSION

    def __repr__(self) -> str:
        return f"<MCPSession {self.mcp_url} session={self.session_id!r}>"

    def _headers(self) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self._token}", "MCP-Protocol-Version": self.version}
        if self.session_id is not None:
            headers["Mcp-Session-Id"] = self.session_id
        return headers

    async def check(self, stream_seconds: float) -> SessionReport:
        """
        Initialize, probe, watch the stream, end the session.
        """
        report = SessionReport()
        answer = await self.fetcher.post_json(
            self.mcp_url,
            initialize(1),
            {"Authorization": f"Bearer {self._token}"},
        )
        result = rpc_answer(answer)
        if answer.status != 200 or result is None or not isinstance(result.get("result"), dict):
            report.reason = f"initialize answered {answer.answered()}"
            if answer.status == 401:
                report.reason += " (the token was refused)"
            return report
        self.version = str(result["result"].get("protocolVersion") or PROTOCOL_VERSION)
        self.session_id = answer.header("mcp-session-id")
        # Both go back in the next requests' headers: a value that cannot
        # be one (a hostile or broken server's) ends this check with the
        # reason, rather than the whole run with an encoding error.
        if not VERSION.fullmatch(self.version):
            report.reason = f"initialize answered the protocol version {self.version[:40]!r}, not a date"
            return report
        if self.session_id is not None and not SESSION_ID.fullmatch(self.session_id):
            report.reason = "initialize answered a session id that is not visible ASCII"
            return report
        await self.fetcher.post_json(
            self.mcp_url, {"jsonrpc": "2.0", "method": "notifications/initialized"}, self._headers()
        )
        statuses = []
        for number in range(PINGS):
            ping = await self.fetcher.post_json(
                self.mcp_url, {"jsonrpc": "2.0", "id": 10 + number, "method": "ping"}, self._headers()
            )
            statuses.append(ping.status)
        report.probe = SessionProbe(statuses=tuple(statuses), session_id_given=self.session_id is not None)
        try:
            report.stream = await self._watch(stream_seconds)
        finally:
            if self.session_id is not None:
                await self.fetcher.request("DELETE", self.mcp_url, self._headers())
        return report

    async def _watch(self, seconds: float) -> StreamObservation:
        """
        The session's own stream (C{GET} with C{Mcp-Session-Id}); where the
        server offers none (405, or no session at all), the legacy
        HTTP+SSE stream (C{GET} without a session).
        """
        if self.session_id is not None:
            observed = await self.fetcher.stream(self.mcp_url, self._headers(), seconds)
            if observed.status != 405:
                return observed
        headers = {"Authorization": f"Bearer {self._token}"}
        return await self.fetcher.stream(self.mcp_url, headers, seconds, transport="sse")
