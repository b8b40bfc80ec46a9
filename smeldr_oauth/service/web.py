# -*- test-case-name: tests.test_service_web -*-
"""
The HTTP site: a L{Request} that refuses oversized bodies, and the
L{Site} that uses it.

twisted.web buffers any request body it is sent; the cap has to live in
C{handleContentChunk} (as synapse does), so a client cannot make the
server hold more than C{max_body} bytes of one request.
"""

from __future__ import annotations

import json
import time

from twisted.logger import Logger
from twisted.web.resource import IResource
from twisted.web.server import Request, Site

log = Logger()

DEFAULT_MAX_BODY = 1 << 20


class LimitedRequest(Request):
    """
    A request whose body may not exceed C{channel.site.max_body} bytes:
    beyond it the rest is discarded and the answer is a 413.
    """

    _too_big = False
    _received = 0

    def _limit(self) -> int:
        site = getattr(self.channel, "site", None)
        return getattr(site, "max_body", DEFAULT_MAX_BODY)

    def gotLength(self, length):  # type: ignore[no-untyped-def]
        if length is not None and length > self._limit():
            self._too_big = True
            length = None
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._too_big:
            return
        self._received += len(data)
        if self._received > self._limit():
            self._too_big = True
            self.content.seek(0)
            self.content.truncate()
            return
        super().handleContentChunk(data)

    _started: float = 0.0

    def process(self) -> None:
        self._started = time.perf_counter()
        if self._too_big:
            self.setResponseCode(413)
            self.setHeader(b"content-type", b"application/json")
            self.setHeader(b"connection", b"close")
            self.write(
                json.dumps(
                    {"error": "invalid_request", "error_description": "request body too large"}
                ).encode()
            )
            self.finish()
            return
        super().process()


    def finish(self) -> None:
        metrics = getattr(getattr(getattr(self, "channel", None), "site", None), "metrics", None)
        super().finish()
        if metrics is None or not self._started:
            return
        content_type = self.responseHeaders.getRawHeaders(b"content-type", [b""])[0]
        if content_type.startswith(b"text/event-stream"):
            return
        metrics.observe_request(self.path, self.method, self.code, time.perf_counter() - self._started)


class SmeldrSite(Site):
    """
    The site for every smeldr-oauth HTTP listener.
    """

    requestFactory = LimitedRequest

    def __init__(self, resource: IResource, max_body: int = DEFAULT_MAX_BODY, metrics=None, **kw) -> None:  # type: ignore[no-untyped-def]
        # Every endpoint parses its own body (the token endpoint must not
        # mix query and form parameters), so twisted.web's form parsing into
        # request.args is both unused and, through email.headerregistry, a
        # fifth of the CPU of an MCP POST.
        kw.setdefault("parsePOSTFormSubmission", False)
        super().__init__(resource, **kw)
        self.max_body = max_body
        self.metrics = metrics
