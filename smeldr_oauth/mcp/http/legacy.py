# -*- test-case-name: tests.test_mcp_http -*-
"""
The legacy HTTP+SSE transport (2024-11-05): C{GET /mcp} without
C{Mcp-Session-Id} opens a stream whose first event is C{endpoint};
C{POST /mcp/message?session_id=...} answers 202 and the JSON-RPC response
travels on that stream as C{event: message}, through the
L{ISessionDelivery} (with a shared backend, the POST may land on another
process than the stream).  The session ends with its stream.
"""

from __future__ import annotations

from typing import Any, Optional

import hyperlink
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from smeldr_oauth.mcp import jsonrpc
from smeldr_oauth.mcp.auth import BearerAuth, Credential
from smeldr_oauth.mcp.calls import answer_lost, outcome_now
from smeldr_oauth.mcp.http import wire
from smeldr_oauth.mcp.http.errors import bad_request
from smeldr_oauth.mcp.http.registry import LiveSession, SessionRegistry
from smeldr_oauth.mcp.http.streamauth import StreamGuard
from smeldr_oauth.mcp.state.records import LEGACY

log = Logger()


class LegacySSE:
    """
    The legacy transport's two handlers.

    @ivar path: where C{/mcp} is mounted (set by L{MCPHTTP.routes}); the
        message endpoint is C{path + "/message"}.
    """

    def __init__(self, *, sessions: SessionRegistry, guard: StreamGuard, auth: BearerAuth, max_body: int) -> None:
        self.sessions = sessions
        self.guard = guard
        self.auth = auth
        self.max_body = max_body
        self.path = "/mcp"

    def open(self, credential: Credential, request: Any) -> Any:
        """C{GET /mcp}: a new session and its stream."""
        return self.sessions.create(LEGACY, credential.info, self._opened, request, credential)

    def _opened(self, session: LiveSession, request: Any, credential: Credential) -> Any:
        stream = self.guard.open(request, credential, on_close=session.stream_closed)
        session.stream = stream
        endpoint = hyperlink.URL.from_text(self.path + "/message").set("session_id", session.session_id)
        log.info("Legacy MCP SSE stream opened for {subject}", subject=credential.info.subject)
        return stream.start(first=b"event: endpoint\ndata: " + endpoint.to_text().encode("ascii") + b"\n\n")

    def message(self, credential: Credential, request: Any) -> Any:
        """C{POST /mcp/message?session_id=...}: 202, the answer goes on the stream."""
        # Only the query string names the session (request.args would also
        # hold form fields).
        ids = _session_ids(request.uri)
        if len(ids) != 1 or not ids[0]:
            raise bad_request("session_id must be given once in the query")
        return self.sessions.use(ids[0], credential.info, LEGACY, self._message, request, credential)

    def _message(self, session: LiveSession, request: Any, credential: Credential) -> bytes:
        self.guard.follow(session.stream, credential)
        is_batch, messages = wire.read_frame(request, self.max_body)
        protocol = session.protocol
        if is_batch and not protocol.allows_batch:
            raise bad_request("Batches are not allowed at this protocol version")
        principal = credential.principal
        self.auth.require_scopes(protocol, messages, principal)
        outlet = protocol.default_outlet
        delivery = self.sessions.delivery
        session_id = session.session_id
        sessions = self.sessions
        for message in messages:
            handled = protocol.handle(message, principal, outlet)
            # Most answers are there by the time handle() returns (it never
            # fails): sent now, not through two callbacks on a Deferred that
            # has already fired.
            known = outcome_now(handled)
            if known:
                _answer(known[0], message, sessions, session, delivery, session_id)
            else:
                handled.addCallback(_answer, message, sessions, session, delivery, session_id)
        request.setResponseCode(202)
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        return b"Accepted"


def _session_ids(uri: bytes) -> list[str]:
    """
    The C{session_id} values of the query, as they were sent (not
    decoded, as hyperlink's C{URL.get} gave them; a session id is
    URL-safe as issued).  Split by hand: parsing the whole URL with
    hyperlink was a twentieth of a legacy POST's CPU.
    """
    _, _, query = uri.partition(b"?")
    query = query.partition(b"#")[0]
    ids = []
    for field in query.split(b"&"):
        name, _, value = field.partition(b"=")
        if name == b"session_id":
            try:
                ids.append(value.decode("ascii"))
            except UnicodeDecodeError:
                return []
    return ids


def _answer(
    response: Optional[dict[str, Any]],
    message: jsonrpc.Message,
    sessions: Any,
    session: LiveSession,
    delivery: Any,
    session_id: str,
) -> None:
    """
    Send C{response} to the session's stream.  An answer that changed the
    session's state (initialize) goes out once the change is saved: the
    client's next POST may land on another process.  Never raises: a
    failure on the way is L{_lost}'s.
    """
    try:
        answer = sessions.when_saved(session, response)
        if isinstance(answer, Deferred):
            answer.addCallback(_reply, delivery, session_id).addErrback(_lost, message, delivery, session_id)
            return
        _reply(answer, delivery, session_id)
    except Exception:
        _lost(Failure(), message, delivery, session_id)


def _reply(response: Optional[dict[str, Any]], delivery: Any, session_id: str) -> None:
    """The answer to a legacy POST goes to the session's stream, wherever it is."""
    if response is not None:
        delivery.deliver(session_id, jsonrpc.encode(response).decode("utf-8"))


def _lost(failure: Failure, message: jsonrpc.Message, delivery: Any, session_id: str) -> None:
    """The answer to a legacy POST could not be made, saved or delivered: see L{answer_lost}."""
    answer_lost(failure, message, lambda error: _reply(error, delivery, session_id), "the legacy stream")
