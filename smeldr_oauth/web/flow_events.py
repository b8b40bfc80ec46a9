# -*- test-case-name: tests.test_web_flow_events -*-
"""
The site's one hook into the flow timeline (L{smeldr_oauth.flows}, which
reads it from the log like every other step): after a response, publish
an C{http_step} event for the requests that no protocol layer reports and
an operator needs to see.

  - discovery (any C{/.well-known/} path): which URL the client tried,
    and what it got;
  - the authorization endpoint shown to a browser (C{GET .../authorize}):
    the C{client_id} and C{resource} of the query;
  - any 401 or 403: with whether the answer carried C{WWW-Authenticate}.

Every other request (a token refresh, an MCP tool call) costs one status
comparison and one prefix test, and publishes nothing.  The timeline keeps
identical steps that come in a burst once, counted
(L{smeldr_oauth.flows.recorder}).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlsplit

from twisted.logger import Logger, LogLevel

from smeldr_oauth.oauth.routine import routine
from smeldr_oauth.oauth.text import loggable

log = Logger()


def _arg(request: Any, name: bytes) -> str:
    values = (request.args or {}).get(name) or []
    return loggable(values[0].decode("utf-8", "replace")) if len(values) == 1 else ""


def _redirect_error(request: Any) -> str:
    """
    The C{error} of an authorization error redirect (RFC 6749 section
    4.1.2.1), or C{""}.
    """
    location = request.responseHeaders.getRawHeaders(b"location")
    if not location:
        return ""
    query = parse_qs(urlsplit(location[0].decode("ascii", "replace")).query)
    return loggable(query["error"][0]) if len(query.get("error", [])) == 1 else ""


def request_finished(request: Any) -> None:
    """
    Publish the C{http_step} event of a finished C{request}, if it is one
    the timeline keeps (see the module's docstring).
    """
    code = request.code
    path: bytes = request.path
    if code not in (401, 403) and not path.startswith(b"/.well-known/") and not (
        path.endswith(b"/authorize") and request.method == b"GET"
    ):
        return
    address = getattr(request.getClientAddress(), "host", None) or "unknown"
    # A routine event (one per discovery request): handed to the timeline
    # directly unless someone keeps debug events (smeldr_oauth.oauth.routine),
    # not built for every observer of the log and filtered out by the file's.
    routine.emit(
        log,
        LogLevel.debug,
        "{method} {path} answered {status}",
        method=request.method.decode("ascii", "replace"),
        path=loggable(path.decode("utf-8", "replace")),
        status=code,
        error=_redirect_error(request) if code in (302, 303) else "",
        address=loggable(address),
        client_id=_arg(request, b"client_id"),
        resource=_arg(request, b"resource"),
        challenge=(
            ("yes" if request.responseHeaders.hasHeader(b"www-authenticate") else "no")
            if code in (401, 403)
            else None
        ),
        smeldr_event="http_step",
    )
