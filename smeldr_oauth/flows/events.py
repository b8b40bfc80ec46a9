# -*- test-case-name: tests.test_flows_events -*-
"""
Which log events become flow steps, and what of each is kept.

The server already publishes its security decisions as structured
L{twisted.logger} events carrying C{smeldr_event}; the metrics count them
(L{smeldr_oauth.service.metrics}).  The timeline reads the same events:
L{step_from_event} turns one into a L{Step}, copying only the fields
named here.  Nothing else of the event is looked at, so a secret that
some day finds its way into an event's fields still never reaches the
store: the allow-list is the guarantee, not the care of every emitter.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from smeldr_oauth.flows import model
from smeldr_oauth.flows.model import Step, clip

#: C{smeldr_event} values that make a step (every other event is ignored
#: at the cost of one set look-up).
EVENTS = frozenset(
    {
        "http_step",
        "client_registered",
        "cimd_refused",
        "grant_approved",
        "grant_denied",
        "paste_refused",
        "token_issued",
        "token_refused",
        "code_replay",
        "refresh_reuse",
        "refresh_wrong_client",
        "refresh_superseded",
        "mcp_session",
        "mcp_initialize",
        "mcp_call",
        "stream_closed",
        "token_revoked",
    }
)

#: The detail fields kept from the events (the HTTP hook's path and
#: resource, the protocol version, transport, tool, duration, ...).
DETAIL_FIELDS = ("path", "resource", "challenge", "grant_type", "version", "transport", "tool", "seconds")

#: Well-known paths with a query of their own are kept without it.
WELL_KNOWN = "/.well-known/"


def _text(event: Mapping[str, Any], name: str) -> Optional[str]:
    value = event.get(name)
    if value is None or value == "":
        return None
    return clip(value)


def _detail(event: Mapping[str, Any]) -> dict[str, str]:
    return {name: clip(event[name]) for name in DETAIL_FIELDS if event.get(name) not in (None, "")}


def _http_kind(event: Mapping[str, Any]) -> Optional[str]:
    """
    The kind of an C{http_step} event (the site's hook,
    L{smeldr_oauth.web.flow_events}): a discovery request, the authorization
    page, or a 401/403 elsewhere.
    """
    path = str(event.get("path", ""))
    if path.startswith(WELL_KNOWN):
        return model.DISCOVERY
    if path.endswith("/authorize"):
        return model.AUTHORIZE
    status = event.get("status")
    if status in (401, 403):
        return model.MCP_REFUSED
    return None


def step_from_event(event: Mapping[str, Any]) -> Optional[Step]:
    """
    The step an event records, or C{None} if it records none.
    """
    name = event.get("smeldr_event")
    if name not in EVENTS:
        return None
    outcome = "ok"
    if name == "http_step":
        kind = _http_kind(event)
        if kind is None:
            return None
        status, error = event.get("status"), event.get("error")
        if error:
            outcome = clip(error)
        elif status not in (200, 302, 303):
            outcome = clip(status)
    elif name == "client_registered":
        kind = model.REGISTERED
    elif name == "cimd_refused":
        kind, outcome = model.REGISTERED, "metadata document refused"
    elif name == "grant_approved":
        kind, outcome = model.APPROVED, "approved"
    elif name == "grant_denied":
        kind, outcome = model.APPROVED, "denied"
    elif name == "paste_refused":
        kind, outcome = model.PASTE_REFUSED, "refused"
    elif name == "token_issued":
        kind = model.REFRESHED if event.get("grant_type") == "refresh_token" else model.CODE_EXCHANGED
    elif name == "token_refused":
        kind, outcome = model.TOKEN_REFUSED, clip(event.get("reason", "refused"))
    elif name in ("code_replay", "refresh_reuse", "refresh_wrong_client", "refresh_superseded"):
        kind, outcome = model.TOKEN_REFUSED, name
    elif name == "mcp_session":
        kind = model.MCP_SESSION
    elif name == "mcp_initialize":
        kind = model.MCP_INITIALIZE
    elif name == "mcp_call":
        kind, outcome = model.MCP_CALL, clip(event.get("outcome", "ok"))
    elif name == "stream_closed":
        kind = model.STREAM_CLOSED
    else:
        kind = model.REVOKED
    return Step(
        at=float(event.get("log_time") or 0.0),
        kind=kind,
        client_id=_text(event, "client_id"),
        grant_id=_text(event, "grant_id"),
        address=_text(event, "address"),
        outcome=outcome,
        detail=_detail(event),
    )
