# -*- test-case-name: tests.test_web_health -*-
"""
C{GET /healthz} for platform health checks, and C{/favicon.ico}.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger
from twisted.web.iweb import IRequest

from smeldr_oauth.db.errors import StoreUnavailable
from smeldr_oauth.web import errors
from smeldr_oauth.web.routes import Route

log = Logger()

_OK = b'{"status":"ok"}'
#: The database could not be reached (PostgreSQL down or restarting, a
#: SQLite file locked beyond the busy timeout): a balancer takes this
#: process out of rotation until it answers again.
_UNREACHABLE = b'{"status":"unavailable","reason":"database unreachable"}'
#: The database answered with an error (a bug, a broken schema): logged.
_FAILED = b'{"status":"unavailable","reason":"database error"}'


class Health:
    """
    200 when the OAuth store answers a query, 503 (with C{Retry-After})
    when it does not, with a C{reason}: C{database unreachable} or
    C{database error}.  It says nothing else: no address, no URL, no
    error text (those go to the log).

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
        except StoreUnavailable as e:
            log.warn("health check: the database is unreachable: {error}", error=str(e))
            request.setResponseCode(503)
            request.setHeader("Retry-After", str(e.retry_after))
            return _UNREACHABLE
        except Exception:
            log.failure("health check: the OAuth store did not answer")
            request.setResponseCode(503)
            request.setHeader("Retry-After", "1")
            return _FAILED
        return _OK


def favicon(request: IRequest) -> bytes:
    """
    Browsers ask for it on every page; an empty answer they may cache
    keeps a 404 out of their consoles and our access log.
    """
    request.setResponseCode(204)
    request.setHeader("Cache-Control", "public, max-age=86400")
    return b""
