# -*- test-case-name: tests.test_mcp_http -*-
"""
The request-body cap twisted.web lacks.  It belongs to the site, not to
MCP: the site-wide HTTP edge takes it over, and this module goes.
"""

from __future__ import annotations

from typing import Optional

from twisted.web import server


class CappedRequest(server.Request):
    """
    A request that stops storing its body past C{max_body} bytes (twisted.web
    has no limit of its own), so a huge or endless upload costs no memory;
    the MCP routes then answer 413.  Use with
    C{site.requestFactory = capped_request_factory(limit)}.
    """

    max_body = 1 << 20
    body_too_large = False
    _received = 0

    def gotLength(self, length: Optional[int]) -> None:
        if length is not None and length > self.max_body:
            self.body_too_large = True
        super().gotLength(length if not self.body_too_large else 0)

    def handleContentChunk(self, data: bytes) -> None:
        self._received += len(data)
        if self.body_too_large or self._received > self.max_body:
            self.body_too_large = True
            return
        super().handleContentChunk(data)


def capped_request_factory(max_body: int) -> type:
    return type("CappedRequest", (CappedRequest,), {"max_body": max_body})
