# -*- test-case-name: tests.test_mcp_http_wire -*-
"""
Reading what an MCP client sent, on the site's defensive readers
(L{smeldr_oauth.web.headers}, L{smeldr_oauth.web.body}): single-valued
headers (bytes 0x80-0xFF or a repeat: a 400, never a 500), C{Accept}
parsed by Werkzeug's parser, the JSON-RPC frame of the body.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Optional

from werkzeug.datastructures import MIMEAccept
from werkzeug.http import parse_accept_header

from smeldr_oauth.mcp import jsonrpc
from smeldr_oauth.mcp.http.errors import bad_request, invalid_frame
from smeldr_oauth.mcp.jsonrpc import JSONRPCError, Message
from smeldr_oauth.mcp.versions import SUPPORTED_VERSIONS
from smeldr_oauth.web.body import JSON, read_body
from smeldr_oauth.web.headers import header as site_header


def header(request: Any, name: bytes) -> Optional[str]:
    """
    The one value of header C{name}, stripped, or C{None}.

    @raise HTTPError: 400 when it is repeated or not printable ASCII (none
        of the headers MCP reads may carry other bytes).
    """
    return site_header(request, name, unique=True)


def accepts(request: Any) -> tuple[bool, bool]:
    """
    (JSON acceptable, SSE acceptable) from the C{Accept} header; a type
    with C{q=0} is refused, as RFC 9110 says.
    """
    return _acceptable(header(request, b"accept") or "*/*")


@lru_cache(maxsize=256)
def _acceptable(value: str) -> tuple[bool, bool]:
    # Werkzeug's parser costs some 20 us a call, more than the rest of the
    # header reading of a request; a client sends the same Accept every
    # time, so each distinct value is parsed once (bounded: a client
    # making up values only churns the cache; functools' C cache, as the
    # look-up itself showed in profiles).
    accept = parse_accept_header(value, MIMEAccept)
    return accept.quality("application/json") > 0, accept.quality("text/event-stream") > 0


def check_version(request: Any) -> Optional[str]:
    """
    @raise HTTPError: 400 for an C{MCP-Protocol-Version} this server does
        not speak.
    """
    version = header(request, b"mcp-protocol-version")
    if version is not None and version not in SUPPORTED_VERSIONS:
        raise bad_request(
            "Unsupported MCP-Protocol-Version", {"supported": list(SUPPORTED_VERSIONS), "requested": version[:64]}
        )
    return version


def read_frame(request: Any, max_body: int) -> tuple[bool, list[Message]]:
    """
    The body as one JSON-RPC frame: C{(is_batch, messages)}.

    @raise HTTPError: 415 (not JSON), 413 (over C{max_body}), 400 (not a
        frame).
    """
    body = read_body(request, JSON, max_body)
    try:
        return jsonrpc.parse_frame(body)
    except JSONRPCError as error:
        raise invalid_frame(error)
