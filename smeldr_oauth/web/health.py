# -*- test-case-name: tests.test_web_health -*-
"""
C{GET /healthz} for platform health checks, and C{/favicon.ico}.

200 when the OAuth store answers a query; 503 (with C{Retry-After}) when
it does not, with a C{reason}: C{database unreachable} (PostgreSQL down or
restarting, a SQLite file locked beyond the busy timeout, a check that did
not answer in time: a balancer takes this process out of rotation until it
answers again) or C{database error} (the database answered with an error:
a bug, a broken schema; logged).  It says nothing else: no address, no
URL, no error text (those go to the log), but for the OAuth gateway's
upstreams when there are some.

The route (L{Health}) asks the store on every request: right for a site
that mounts our routes into its own app.  The standalone server answers
C{GET /healthz} from L{HealthCheck} instead: the store is asked once a
second by a timer, and the answer is the last one it gave, so a check costs
what a static document costs however often the platform (or a load
balancer, every few hundred milliseconds per instance) asks.  Still true:
at most one interval old, and a check that has not answered within an
interval counts as a failure (a hung database is unhealthy, not "still
fine").
"""

from __future__ import annotations

import json
from typing import Any, Callable, Optional

import attr
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from smeldr_oauth.db.errors import StoreUnavailable
from smeldr_oauth.web import errors
from smeldr_oauth.web.routes import Route

log = Logger()

_OK = b'{"status":"ok"}'
_HEADERS = ((b"Content-Type", b"application/json"), (b"Cache-Control", b"no-store"))

#: What reports the gateway's upstreams (instances, counters; no subjects,
#: no secrets).  An upstream that is down does not make the server
#: unhealthy: the server still answers, and the upstream restarts.
Upstreams = Optional[Callable[[], dict[str, Any]]]


@attr.s(frozen=True, auto_attribs=True)
class Verdict:
    """
    One answer of the health check: C{reason} is C{None} when healthy.
    """

    reason: Optional[str] = None
    retry_after: int = 1

    @classmethod
    def of(cls, failure: Optional[Failure]) -> "Verdict":
        """The verdict after the store answered (C{None}) or failed."""
        if failure is None:
            return HEALTHY
        if failure.check(StoreUnavailable):
            return cls("database unreachable", failure.value.retry_after)
        return cls("database error")

    def render(self, request: IRequest, upstreams: Upstreams = None) -> bytes:
        """Set the status (and C{Retry-After}); the JSON body."""
        if self.reason is None and upstreams is None:
            return _OK
        body: dict[str, Any] = {"status": "ok" if self.reason is None else "unavailable"}
        if self.reason is not None:
            request.setResponseCode(503)
            request.setHeader("Retry-After", str(self.retry_after))
            body["reason"] = self.reason
        elif upstreams is not None:
            body["upstreams"] = upstreams()
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


HEALTHY = Verdict()
#: A check still waiting after a whole interval: as good as unreachable.
_HUNG = Verdict("database unreachable")


def _log(verdict: Verdict, failure: Optional[Failure]) -> None:
    if failure is None:
        log.error("health check: the OAuth store has not answered in time")
    elif verdict.reason == "database unreachable":
        log.warn("health check: the database is unreachable: {error}", error=str(failure.value))
    else:
        log.failure("health check: the OAuth store did not answer", failure)


class Health:
    """
    The C{/healthz} route, asking the store on every request.

    @param store: anything with C{count_clients()} (an C{IOAuthStore}).
    @param upstreams: the state of each upstream of the OAuth gateway,
        shown under C{"upstreams"} when healthy.
    """

    def __init__(self, store: Any, path: str = "/healthz", upstreams: Upstreams = None) -> None:
        self.store = store
        self.path = path
        self.upstreams = upstreams

    def routes(self) -> list[Route]:
        return [
            Route(path=self.path, methods={"GET": self.health}, headers=_HEADERS, name="smeldr_healthz"),
            Route(path="/favicon.ico", methods={"GET": favicon}, dialect=errors.PAGE, name="smeldr_favicon"),
        ]

    async def health(self, request: IRequest) -> bytes:
        try:
            await self.store.count_clients()
        except Exception:
            failure = Failure()
            verdict = Verdict.of(failure)
            _log(verdict, failure)
            return verdict.render(request)
        return HEALTHY.render(request, self.upstreams)


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
    running: L{verdict} is the last answer (C{None} before the first).
    Failures are logged when the state changes, not once a second.

    @param store: anything with C{count_clients()}.
    @param upstreams: as for L{Health}.
    """

    def __init__(
        self, store: Any, clock: IReactorTime, interval: float = 1.0, upstreams: Upstreams = None
    ) -> None:
        self.store = store
        self.interval = interval
        self.upstreams = upstreams
        self.verdict: Optional[Verdict] = None
        self._pending = False
        self._loop = LoopingCall(self._tick)
        self._loop.clock = clock

    @property
    def healthy(self) -> Optional[bool]:
        """C{True} or C{False} after the first answer; C{None} before."""
        return None if self.verdict is None else self.verdict.reason is None

    def start(self) -> None:
        self._loop.start(self.interval, now=True)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def _tick(self) -> None:
        if self._pending:
            self._set(_HUNG, None)
            return
        self.check()

    def check(self) -> "Deferred[Verdict]":
        """
        Ask the store now; fires with the new verdict.
        """
        self._pending = True

        def answered(result: Any) -> Verdict:
            self._pending = False
            failure = result if isinstance(result, Failure) else None
            verdict = Verdict.of(failure)
            self._set(verdict, failure)
            return verdict

        return maybeDeferred(self.store.count_clients).addBoth(answered)

    def _set(self, verdict: Verdict, failure: Optional[Failure]) -> None:
        was, self.verdict = self.verdict, verdict
        if was is not None and (was.reason is None) == (verdict.reason is None):
            return
        if verdict.reason is None:
            if was is not None:
                log.info("health check: the OAuth store answers again")
        else:
            _log(verdict, failure)

    def resource(self) -> Resource:
        """
        C{GET /healthz} answered from L{verdict}, for
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
        verdict = self.check.verdict
        if verdict is not None:
            return verdict.render(request, self.check.upstreams)
        finished: list[Any] = []
        request.notifyFinish().addBoth(finished.append)  # type: ignore[attr-defined]

        def answer(verdict: Verdict) -> None:
            if not finished:
                request.write(verdict.render(request, self.check.upstreams))
                request.finish()

        self.check.check().addCallback(answer)
        return NOT_DONE_YET
