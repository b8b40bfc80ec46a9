# -*- test-case-name: tests.test_mcp_http -*-
"""
Browser origins: which may call the MCP endpoints (DNS-rebinding
protection, as the MCP transport specification asks) and the CORS headers
they get.  The site's routes answer the C{OPTIONS} preflight
(L{smeldr_oauth.web.routes}), with L{ALLOWED_HEADERS}.

Requests without C{Origin} (every non-browser client) are always allowed:
the bearer token is what protects them.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import hyperlink
from twisted.logger import Logger

from smeldr_oauth.mcp import jsonrpc
from smeldr_oauth.mcp.http.errors import rpc_error

log = Logger()

#: Request headers a browser client may send.
ALLOWED_HEADERS = (
    "Authorization, Content-Type, Accept, Last-Event-ID, Mcp-Session-Id, MCP-Protocol-Version, Mcp-Method, Mcp-Name"
)
#: Response headers a browser client may read.
EXPOSED_HEADERS = b"Mcp-Session-Id, WWW-Authenticate"


def own_origin(resource_url: str) -> str:
    """The origin of C{resource_url} (default ports left out)."""
    url = hyperlink.URL.from_text(resource_url)
    port = "" if url.port in (None, 80 if url.scheme == "http" else 443) else f":{url.port}"
    return f"{url.scheme}://{url.host}{port}"


class OriginPolicy:
    """
    @param allowed: the origins allowed to call; C{None}: only the origin
        of C{resource_url}.
    """

    def __init__(self, resource_url: str, allowed: Optional[Iterable[str]] = None) -> None:
        if allowed is None:
            allowed = (own_origin(resource_url),)
        self.allowed = frozenset(o.rstrip("/").lower() for o in allowed)

    def check(self, request: Any) -> None:
        """
        Let a request without C{Origin} or from an allowed one through
        (with CORS headers); refuse the rest.

        @raise HTTPError: 403.
        """
        origins = request.requestHeaders.getRawHeaders(b"origin")
        if not origins:
            return
        # latin-1 decodes any byte: a hostile Origin is merely not allowed.
        origin = origins[-1].decode("latin-1").rstrip("/").lower()
        if len(origins) > 1 or origin not in self.allowed:
            log.info("MCP request from a forbidden Origin refused")
            raise rpc_error(403, jsonrpc.INVALID_REQUEST, "Origin not allowed")
        request.setHeader(b"Access-Control-Allow-Origin", origins[-1])
        request.setHeader(b"Vary", b"Origin")
        request.setHeader(b"Access-Control-Expose-Headers", EXPOSED_HEADERS)
