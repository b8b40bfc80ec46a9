# -*- test-case-name: tests.test_flows_events -*-
"""
One step of a flow, as it is kept: when, what, for which client and grant,
from which address, with what outcome, and a few plain details.

A step never holds a secret: L{smeldr_oauth.flows.events} builds steps
from a fixed list of fields per event, none of which is a token, code,
verifier, site token or client secret.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import attr

#: Longest value of any kept field: client ids, paths, resources are cut.
MAX_FIELD = 200

# The step kinds, in the order a flow usually takes them.
DISCOVERY = "discovery"
REGISTERED = "registered"
AUTHORIZE = "authorize"
APPROVED = "approved"
PASTE_REFUSED = "paste_refused"
CODE_EXCHANGED = "code_exchanged"
REFRESHED = "refreshed"
TOKEN_REFUSED = "token_refused"
MCP_SESSION = "mcp_session"
MCP_INITIALIZE = "mcp_initialize"
MCP_CALL = "mcp_call"
MCP_REFUSED = "mcp_refused"
STREAM_CLOSED = "stream_closed"
REVOKED = "revoked"

#: What each kind is called in a table.
LABELS = {
    DISCOVERY: "discovery",
    REGISTERED: "registration",
    AUTHORIZE: "authorization page",
    APPROVED: "decision",
    PASTE_REFUSED: "paste refused",
    CODE_EXCHANGED: "code exchanged",
    REFRESHED: "refresh",
    TOKEN_REFUSED: "token refused",
    MCP_SESSION: "MCP session",
    MCP_INITIALIZE: "MCP initialize",
    MCP_CALL: "MCP tool call",
    MCP_REFUSED: "MCP refused",
    STREAM_CLOSED: "stream closed",
    REVOKED: "revoked",
}

#: The detail field of a step that stands for several identical requests
#: (L{smeldr_oauth.flows.recorder} coalesces repeated C{http_step}s and a
#: rotation chain's refreshes): how many, from the step's time on.
REPEATS = "repeats"

#: Steps that show a client used a token at the resource.
MCP_USE = frozenset({MCP_SESSION, MCP_INITIALIZE, MCP_CALL, STREAM_CLOSED})


def clip(value: object) -> str:
    """
    A value as kept: printable, at most L{MAX_FIELD} characters.
    """
    text = value if isinstance(value, str) else str(value)
    if not text.isprintable():
        text = text.encode("unicode_escape").decode("ascii")
    return text[:MAX_FIELD]


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class Step:
    """
    One thing the server saw a client do.

    @ivar at: seconds since the epoch.
    @ivar kind: one of the kinds above.
    @ivar client_id: the client, when the step names one (a discovery
        request or a request without a token does not).
    @ivar grant_id: the grant, when the step names one.
    @ivar address: the client's address as the logs write it.
    @ivar outcome: C{"ok"}, or a short reason (an OAuth error code, an
        HTTP status).
    @ivar detail: a few plain fields (path, resource, protocol version,
        transport, tool, seconds...).
    """

    at: float
    kind: str
    client_id: Optional[str] = None
    grant_id: Optional[str] = None
    address: Optional[str] = None
    outcome: str = "ok"
    detail: Mapping[str, str] = attr.ib(factory=dict)

    @property
    def count(self) -> int:
        """
        How many requests the step stands for: its L{REPEATS} detail, 1
        without one (or with one that is not a positive number).
        """
        try:
            return max(1, int(self.detail.get(REPEATS, 1)))
        except (TypeError, ValueError):
            return 1

    def as_json(self) -> dict[str, Any]:
        return {
            "at": self.at,
            "kind": self.kind,
            "client_id": self.client_id,
            "grant_id": self.grant_id,
            "address": self.address,
            "outcome": self.outcome,
            "detail": dict(self.detail),
        }
