# -*- test-case-name: tests.test_web_health -*-
"""
C{GET /healthz} for platform health checks, and C{/favicon.ico}.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Optional

from twisted.logger import Logger
from twisted.web.iweb import IRequest

from smeldr_oauth.web import errors
from smeldr_oauth.web.routes import Route

log = Logger()

_OK = b'{"status":"ok"}'
_UNAVAILABLE = b'{"status":"unavailable"}'


class Health:
    """
    200 when the OAuth store answers a query, 503 when it does not.  It
    says nothing else, but for the OAuth gateway's upstreams.

    @param store: anything with C{count_clients()} (an C{IOAuthStore}).
    @param upstreams: the state of each upstream of the OAuth gateway
        (instances, counters; no subjects, no secrets), shown under
        C{"upstreams"}.  An upstream that is down does not make the server
        unhealthy: the server still answers, and the upstream restarts.
    """

    def __init__(
        self, store: Any, path: str = "/healthz", upstreams: Optional[Callable[[], dict[str, Any]]] = None
    ) -> None:
        self.store = store
        self.path = path
        self.upstreams = upstreams

    def routes(self) -> list[Route]:
        return [
            Route(
                path=self.path,
                methods={"GET": self.health},
                headers=((b"Content-Type", b"application/json"), (b"Cache-Control", b"no-store")),
                name="smeldr_healthz",
            ),
            Route(path="/favicon.ico", methods={"GET": favicon}, dialect=errors.PAGE, name="smeldr_favicon"),
        ]

    async def health(self, request: IRequest) -> bytes:
        try:
            await self.store.count_clients()
        except Exception:
            log.failure("health check: the OAuth store did not answer")
            request.setResponseCode(503)
            return _UNAVAILABLE
        if self.upstreams is not None:
            return json.dumps({"status": "ok", "upstreams": self.upstreams()}, sort_keys=True).encode()
        return _OK


def favicon(request: IRequest) -> bytes:
    """
    Browsers ask for it on every page; an empty answer they may cache
    keeps a 404 out of their consoles and our access log.
    """
    request.setResponseCode(204)
    request.setHeader("Cache-Control", "public, max-age=86400")
    return b""
