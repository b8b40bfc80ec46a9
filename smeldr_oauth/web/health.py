# -*- test-case-name: tests.test_web_health -*-
"""
C{GET /healthz} for platform health checks, and C{/favicon.ico}.
"""

from __future__ import annotations

from typing import Any

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
    says nothing else.

    @param store: anything with C{count_clients()} (an C{IOAuthStore}).
    """

    def __init__(self, store: Any, path: str = "/healthz") -> None:
        self.store = store
        self.path = path

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
        return _OK


def favicon(request: IRequest) -> bytes:
    """
    Browsers ask for it on every page; an empty answer they may cache
    keeps a 404 out of their consoles and our access log.
    """
    request.setResponseCode(204)
    request.setHeader("Cache-Control", "public, max-age=86400")
    return b""
