# -*- test-case-name: tests.test_mcp_session -*-
"""
What a tool, resource, prompt or completion handler sees of its call: the
L{Context} (who is calling, which session and request, and the ways to
talk back to the client) and L{ToolError}, the way to report a failure the
model should read.

The context talks to its session only through C{notify},
C{client_request} and C{log_level}, so it works the same on every
transport and in both protocol eras.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet.defer import Deferred, fail, succeed

JSONValue = Any

#: The MCP log levels, lowest first (RFC 5424 severities).
LOG_LEVELS = ("debug", "info", "notice", "warning", "error", "critical", "alert", "emergency")


class ToolError(Exception):
    """
    Raised by a tool to report a failure the model should see: the call
    answers with C{isError: true} and this message as text content.
    """



class Context:
    """
    What a handler knows about its call: who is calling (from the access
    token of I{this} request, so a refreshed token's scopes apply at
    once), which session and request, and ways to talk back to the client.

    The awaitables return L{Deferred}s, so plain functions can add
    callbacks to them and C{async def} handlers can C{await} them.

    @ivar cancelled: set when the client cancels this request.
    """

    def __init__(
        self,
        *,
        session: Any,
        subject: str,
        client_id: Optional[str],
        scopes: frozenset[str],
        request_id: Any,
        protocol_version: Optional[str],
        outlet: Any,
        progress_token: Any = None,
        log_level: Optional[str] = "session",
    ) -> None:
        self._session = session
        self._outlet = outlet
        self._progress_token = progress_token
        self._log_level = log_level
        self.subject = subject
        self.client_id = client_id
        self.scopes = scopes
        self.session_id = getattr(session, "session_id", None)
        self.request_id = request_id
        self.protocol_version = protocol_version
        self.cancelled = False

    def report_progress(
        self, progress: float, total: Optional[float] = None, message: Optional[str] = None
    ) -> Deferred:
        """
        Send C{notifications/progress} for this request, if the client
        asked for progress (sent a C{progressToken}); otherwise do nothing.
        """
        if self._progress_token is not None and not self.cancelled:
            params: dict[str, JSONValue] = {"progressToken": self._progress_token, "progress": progress}
            if total is not None:
                params["total"] = total
            if message is not None:
                params["message"] = message
            self._session.notify(self._outlet, "notifications/progress", params)
        return succeed(None)

    def log(self, level: str, data: JSONValue, logger: Optional[str] = None) -> Deferred:
        """
        Send C{notifications/message} when C{level} reaches the level the
        client chose (C{logging/setLevel}, or the 2026-07-28 per-request
        C{io.modelcontextprotocol/logLevel}).
        """
        if level not in LOG_LEVELS:
            return fail(ValueError(f"unknown log level {level!r}"))
        # "session": the level set by logging/setLevel; None: send nothing.
        threshold = self._session.log_level if self._log_level == "session" else self._log_level
        if threshold is not None and LOG_LEVELS.index(level) >= LOG_LEVELS.index(threshold):
            params: dict[str, JSONValue] = {"level": level, "data": data}
            if logger is not None:
                params["logger"] = logger
            self._session.notify(self._outlet, "notifications/message", params)
        return succeed(None)

    def sample(self, messages: list, max_tokens: int, **kw: Any) -> Deferred:
        """Ask the client's model for a completion (C{sampling/createMessage})."""
        params = {"messages": messages, "maxTokens": max_tokens}
        params.update(kw)
        return self._session.client_request(self._outlet, "sampling/createMessage", params, "sampling")

    def elicit(self, message: str, requested_schema: dict) -> Deferred:
        """Ask the user for structured input (C{elicitation/create})."""
        params = {"message": message, "requestedSchema": requested_schema}
        return self._session.client_request(self._outlet, "elicitation/create", params, "elicitation")

    def list_roots(self) -> Deferred:
        """The client's roots (C{roots/list}), as a list of dicts."""
        d = self._session.client_request(self._outlet, "roots/list", {}, "roots")
        return d.addCallback(lambda result: list((result or {}).get("roots", [])))
