# -*- test-case-name: tests.test_web_health -*-
"""
C{GET /healthz} for platform health checks, and C{/favicon.ico}.

The route asks the store on every request.  The standalone server answers
C{GET /healthz} from L{HealthCheck} instead: the store is asked once a
second by a timer, and the answer is the last one it gave, so a check costs
what a static document costs however often the platform (or a load
balancer, every few hundred milliseconds per instance) asks.  Still true:
at most one interval old, and a check that has not answered within an
interval counts as a failure (a hung database is unhealthy, not "still
fine").
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from smeldr_oauth.web import errors
from smeldr_oauth.web.routes import Route

log = Logger()

_OK = b'{"status":"ok"}'
_UNAVAILABLE = b'{"status":"unavailable"}'
_HEADERS = ((b"Content-Type", b"application/json"), (b"Cache-Control", b"no-store"))


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
                headers=_HEADERS,
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


class HealthCheck:
    """
    The store's reachability, asked every C{interval} seconds while
    running: L{healthy} is C{True} after a check that answered, C{False}
    after one that failed or did not answer within an interval, C{None}
    before the first answer.  Failures are logged when the state changes,
    not once a second.

    @param store: anything with C{count_clients()}.
    """

    def __init__(self, store: Any, clock: IReactorTime, interval: float = 1.0) -> None:
        self.store = store
        self.interval = interval
        self.healthy: Optional[bool] = None
        self._pending = False
        self._loop = LoopingCall(self._tick)
        self._loop.clock = clock

    def start(self) -> None:
        self._loop.start(self.interval, now=True)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def _tick(self) -> None:
        if self._pending:
            self._set(False, "health check: the OAuth store has not answered for {interval}s", None)
            return
        self.check()

    def check(self) -> "Deferred[bool]":
        """
        Ask the store now; fires with the new state.
        """
        self._pending = True

        def answered(_: Any) -> bool:
            self._pending = False
            self._set(True, "health check: the OAuth store answers again", None)
            return True

        def failed(f: Failure) -> bool:
            self._pending = False
            self._set(False, "health check: the OAuth store did not answer", f)
            return False

        return maybeDeferred(self.store.count_clients).addCallbacks(answered, failed)

    def _set(self, healthy: bool, message: str, failure: Optional[Failure]) -> None:
        if healthy == self.healthy:
            return
        was, self.healthy = self.healthy, healthy
        if healthy and was is not None:
            log.info(message)
        elif failure is not None:
            log.failure(message, failure, interval=self.interval)
        elif not healthy:
            log.error(message, interval=self.interval)

    def resource(self) -> Resource:
        """
        C{GET /healthz} answered from L{healthy}, for
        L{smeldr_oauth.web.site.SmeldrSite.static}: the same answers as
        L{Health.health}.  Before the first answer it asks the store.
        """
        return _CachedHealth(self)


class _CachedHealth(Resource):
    isLeaf = True

    def __init__(self, check: HealthCheck) -> None:
        super().__init__()
        self.check = check

    def render_GET(self, request: IRequest) -> Any:
        for key, value in _HEADERS:
            request.setHeader(key, value)
        healthy = self.check.healthy
        if healthy is not None:
            return self._body(request, healthy)
        finished: list[Any] = []
        request.notifyFinish().addBoth(finished.append)  # type: ignore[attr-defined]

        def answer(ok: bool) -> None:
            if not finished:
                request.write(self._body(request, ok))
                request.finish()

        self.check.check().addCallback(answer)
        return NOT_DONE_YET

    def _body(self, request: IRequest, healthy: bool) -> bytes:
        if healthy:
            return _OK
        request.setResponseCode(503)
        return _UNAVAILABLE
