# -*- test-case-name: tests.test_web_routes -*-
"""
The one way a path is put on the site: a L{Route} names its path, a
handler per method, its error L{Dialect}, its CORS policy and the headers
every answer carries; L{mount_routes} puts a list of them on a Klein app.

What every route then gets for free, the same way everywhere:
  - C{HEAD} served by the C{GET} handler;
  - C{OPTIONS}: a CORS preflight answer (204) when the route speaks CORS,
    otherwise a 405 like any other method it does not answer;
  - any other method: 405 with a sorted C{Allow}, in the route's format;
  - errors raised by the handler written by L{smeldr_oauth.web.errors}, in
    the route's format.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Iterable, Mapping, Optional

import attr
from klein import Klein
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET

from smeldr_oauth.web import errors
from smeldr_oauth.web.errors import Dialect
from smeldr_oauth.web.responses import StaticJSON

Handler = Callable[[IRequest], Any]

log = Logger()


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class CORS:
    """
    A route's cross-origin policy.

    @ivar allow_origin: the C{Access-Control-Allow-Origin} every answer
        carries; C{None} when the route decides per request (the MCP
        endpoint echoes an allowed C{Origin} from its L{Route.before}).
    @ivar allow_headers: request headers a preflight allows.
    @ivar max_age: seconds a browser may remember the preflight.
    @ivar expose_headers: response headers a browser script may read.
    """

    allow_headers: str
    allow_origin: Optional[str] = "*"
    max_age: int = 86400
    expose_headers: Optional[str] = None

    def headers(self) -> tuple[tuple[bytes, bytes], ...]:
        pairs = []
        if self.allow_origin is not None:
            pairs.append((b"Access-Control-Allow-Origin", self.allow_origin.encode("ascii")))
        if self.expose_headers is not None:
            pairs.append((b"Access-Control-Expose-Headers", self.expose_headers.encode("ascii")))
        return tuple(pairs)


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class Route:
    """
    One path and what it answers.

    @ivar path: the Klein path (no variables needed so far).
    @ivar methods: handler per method name (C{"GET"}, C{"POST"}, ...).
        A handler takes the request and returns bytes, a Deferred or a
        coroutine; it raises to refuse.
    @ivar dialect: how its errors are written (L{errors.JSON},
        L{errors.PAGE}, L{errors.JSONRPC}).
    @ivar cors: its CORS policy, or C{None} (no CORS; C{OPTIONS} is 405).
    @ivar headers: set on every answer, before the handler runs (so they
        stay on error answers too).
    @ivar before: a check run before the handler, for every method
        (C{OPTIONS} included); it raises to refuse.
    @ivar name: the Klein endpoint name (unique per app); default the path.
    @ivar head: answer C{HEAD} with the C{GET} handler (off for a C{GET}
        that opens a stream).
    @ivar direct: answer it without Klein (L{direct_answers}) whatever its
        dialect; JSON and JSON-RPC routes always are.
    """

    path: str
    methods: Mapping[str, Handler]
    dialect: Dialect = errors.JSON
    cors: Optional[CORS] = None
    headers: tuple[tuple[bytes, bytes], ...] = ()
    before: Optional[Callable[[IRequest], None]] = None
    name: Optional[str] = None
    head: bool = True
    direct: bool = False

    def fixed_headers(self) -> tuple[tuple[bytes, bytes], ...]:
        """
        The header pairs every answer of the route carries, in the order
        they are set: its own, then its CORS policy's (the same through
        Klein, L{DirectRoute} and L{StaticAnswer}).
        """
        return self.headers + (self.cors.headers() if self.cors is not None else ())

    def allowed(self) -> list[str]:
        """
        Every method the route answers, sorted.
        """
        methods = set(self.methods)
        if "GET" in methods and self.head:
            methods.add("HEAD")
        if self.cors is not None:
            methods.add("OPTIONS")
        return sorted(methods)


def _dispatcher(route: Route) -> Handler:
    allowed = route.allowed()
    allow = ", ".join(allowed).encode("ascii")
    fixed = route.fixed_headers()
    handlers = {m.encode("ascii"): h for m, h in route.methods.items()}
    if b"GET" in handlers and route.head:
        handlers.setdefault(b"HEAD", handlers[b"GET"])
    dialect = route.dialect
    cors = route.cors
    before = route.before

    def dispatch(request: IRequest) -> Any:
        errors.set_dialect(request, dialect)
        for key, value in fixed:
            request.setHeader(key, value)
        if before is not None:
            before(request)
        handler = handlers.get(request.method)
        if handler is not None:
            return handler(request)
        if request.method == b"OPTIONS" and cors is not None:
            request.setResponseCode(204)
            request.setHeader(b"Allow", allow)
            request.setHeader(b"Access-Control-Allow-Methods", allow)
            request.setHeader(b"Access-Control-Allow-Headers", cors.allow_headers.encode("ascii"))
            request.setHeader(b"Access-Control-Max-Age", str(cors.max_age).encode("ascii"))
            return b""
        raise errors.method_not_allowed(allowed)

    return dispatch


def mount_routes(app: Klein, routes: Iterable[Route]) -> None:
    """
    Put C{routes} on C{app}, and the error path they rely on
    (L{errors.install_error_handlers}; mounting into someone else's app
    does not make it site-wide).

    Each path becomes one Klein route answering every method (C{branch}
    off: C{/x/} and C{/x/y} are not C{/x}); the dispatcher picks the
    handler, so a method nobody answers is our 405, not Werkzeug's.
    """
    errors.install_error_handlers(app)
    for route in routes:
        name = route.name or f"smeldr:{route.path}"
        app.route(route.path, branch=False, endpoint=name)(_dispatcher(route))


class StaticAnswer(Resource):
    """
    The C{GET} answer of a route whose document is known at start-up,
    as a plain twisted.web leaf: the route's fixed headers, the
    document's headers and its bytes, all computed once.
    """

    isLeaf = True

    def __init__(self, headers: tuple[tuple[bytes, bytes], ...], body: bytes) -> None:
        super().__init__()
        self.headers = headers
        self.body = body

    def render_GET(self, request: IRequest) -> bytes:
        for key, value in self.headers:
            request.setHeader(key, value)
        return self.body


def static_answers(routes: Iterable[Route]) -> dict[bytes, IResource]:
    """
    Path -> L{StaticAnswer} for each route whose C{GET} answer is a
    L{StaticJSON} and depends on nothing in the request (no C{before}
    check), for L{smeldr_oauth.web.site.SmeldrSite.static}.

    Why: a metadata document is the same bytes for everyone, yet through
    Klein each C{GET} paid for Werkzeug's URL matching, Klein's request
    glue and a Deferred chain, about as much again as twisted.web itself
    (C{docs/performance.md}).  Answered from the site by exact path, it
    costs what a bare twisted.web resource costs.  The answer is the same
    as the route's: the same header pairs are set in the same order
    (L{_dispatcher} then L{StaticJSON}), which a test compares.
    """
    found: dict[bytes, IResource] = {}
    for route in routes:
        handler = route.methods.get("GET")
        if not isinstance(handler, StaticJSON) or route.before is not None:
            continue
        found[route.path.encode("utf-8")] = StaticAnswer(route.fixed_headers() + handler.headers, handler.body)
    return found


class DirectRoute(Resource):
    """
    A route answered by a plain twisted.web leaf: the same dispatcher
    (L{_dispatcher}: fixed headers, C{before}, handler per method,
    preflight, 405) and the same error path
    (L{errors.render_failure}) as through Klein, without Werkzeug's URL
    matching and Klein's request glue (a tenth of a refresh's CPU in the
    profile).  For L{smeldr_oauth.web.site.SmeldrSite.direct}.

    A handler's result is treated as Klein treats it: bytes (or text) are
    the body, C{None} ends a response the handler wrote itself (a stream),
    a failure goes through the error path unless the request is already
    over; the handler's Deferred (for a coroutine, what it awaits:
    L{_Driven}) is cancelled when the client goes away.
    One difference: bytes that are already there when the handler returns
    (SQLite on the reactor thread: a whole token request usually is) are
    returned from C{render}, so twisted.web frames them with a
    C{Content-Length} rather than chunks.

    @ivar skip: methods left to the site's resource tree (Klein).
    """

    isLeaf = True

    def __init__(self, route: Route, skip: Iterable[bytes] = ()) -> None:
        super().__init__()
        self.route = route
        self.skip = frozenset(skip)
        self._dispatch = _dispatcher(route)

    def render(self, request: IRequest) -> Any:
        try:
            result = self._dispatch(request)
        except Exception:
            return errors.render_failure(request, Failure())
        if isinstance(result, bytes):
            return result
        if inspect.iscoroutine(result):
            driven = _Driven(request, result)
            if not driven.step(None):
                # Waiting (a group commit, a call still running): answered
                # by _settle when it returns; cancelled, as a Deferred
                # would be, when the client goes away first.
                request.notifyFinish().addBoth(_ended, driven.over, driven)  # type: ignore[attr-defined]
                return NOT_DONE_YET
            d: Deferred[Any] = driven.finished()
        elif isinstance(result, Deferred):
            d = result
        else:
            d = succeed(result)
        over: list[Any] = []
        # One notification, plain functions: an open stream holds these for
        # as long as it is open.
        request.notifyFinish().addBoth(_ended, over, d)  # type: ignore[attr-defined]
        if not d.called:
            # Answered later (a stream, a call still running): one
            # callback, which an idle stream holds for as long as it is open.
            d.addBoth(_settle, request, over)
            return NOT_DONE_YET
        answer: list[Any] = []
        d.addErrback(_failed, request, over).addBoth(answer.append)
        if answer and isinstance(answer[0], bytes) and not over and not getattr(request, "startedWriting", False):
            return answer[0]
        d.addCallback(_deliver_answer, request, answer, over)
        return NOT_DONE_YET


def _ended(result: Any, over: list[Any], d: "Deferred[Any] | _Driven") -> None:
    """The response ended (or the client left: then the handler is cancelled)."""
    over.append(result)
    if isinstance(result, Failure):
        d.cancel()


class _Driven:
    """
    A handler's coroutine run to its end, each L{Deferred} it awaits
    resumed by a plain callback, its result answered by L{_settle}.

    Why not C{ensureDeferred}: for a coroutine that waits once (a token
    request waiting for its group commit) Twisted's driver makes a
    cancellable L{Deferred}, a cancellation status, a copy of the
    C{contextvars} context (run around every step; nothing here uses
    context variables) and a callback chain to the route's own callback:
    46,500 against 25,900 instructions under callgrind for the same
    coroutine and answer (docs/performance.md, round twelve).  What it
    keeps of Twisted's: a failure is thrown into the coroutine where it
    awaited (C{Failure.throwExceptionIntoGenerator}); cancelling cancels
    the L{Deferred} awaited, whose C{CancelledError} the coroutine then
    sees; a coroutine that finishes at once is handed back as a fired
    L{Deferred} (L{finished}), to go the way an immediate answer always
    went.

    @ivar over: what L{_ended} records: the response ended, or the client
        left.
    """

    __slots__ = ("request", "coro", "over", "waiting", "result")

    def __init__(self, request: IRequest, coro: Any) -> None:
        self.request = request
        self.coro = coro
        self.over: list[Any] = []
        self.waiting: Optional[Deferred[Any]] = None
        self.result: Any = None

    def step(self, result: Any) -> bool:
        """
        Send C{result} (a L{Failure}: throw it) into the coroutine and run
        it to its next wait.

        @return: whether it finished, its result (or L{Failure}) in
            C{self.result}.
        """
        self.waiting = None
        try:
            if isinstance(result, Failure):
                awaited = result.throwExceptionIntoGenerator(self.coro)
            else:
                awaited = self.coro.send(result)
        except StopIteration as e:
            self.result = e.value
            return True
        except BaseException:
            self.result = Failure()
            return True
        if type(awaited) not in _DEFERRED_TYPES and not isinstance(awaited, Deferred):
            # Only a Deferred's __await__ yields (an asyncio future, say,
            # cannot be waited for here): as if it had raised.
            return self.step(Failure(TypeError(f"a route awaited {type(awaited).__name__}, not a Deferred")))
        self.waiting = awaited
        awaited.addBoth(self._resume)
        return False

    def _resume(self, result: Any) -> None:
        if self.step(result):
            _settle(self.result, self.request, self.over)

    def finished(self) -> Deferred[Any]:
        """The result of a coroutine that finished at once, as a fired L{Deferred}."""
        return fail(self.result) if isinstance(self.result, Failure) else succeed(self.result)

    def cancel(self) -> None:
        """Cancel what the coroutine awaits (L{_ended}: the client left)."""
        waiting = self.waiting
        if waiting is not None:
            waiting.cancel()


#: Deferred's own type, tested first (C{isinstance} of a Deferred goes
#: through C{ABCMeta}).
_DEFERRED_TYPES = (Deferred,)


def _deliver_answer(_: Any, request: IRequest, answer: list[Any], over: list[Any]) -> None:
    _deliver(request, answer[0], over)


def _settle(result: Any, request: IRequest, over: list[Any]) -> None:
    """A later answer: what L{_failed} then L{_deliver_answer} do, in one callback."""
    _deliver(request, _failed(result, request, over) if isinstance(result, Failure) else result, over)


def _failed(failure: Failure, request: IRequest, over: list[Any]) -> Optional[bytes]:
    if over:
        # The answer is gone (or the client is): nobody to tell.
        if not failure.check(CancelledError):
            log.failure("{path} failed after its answer ended", failure, path=request.path)
        return None
    return errors.render_failure(request, failure)


def _deliver(request: IRequest, body: Any, over: list[Any]) -> None:
    if isinstance(body, str):
        body = body.encode("utf-8")
    if isinstance(body, Failure) or not (body is None or isinstance(body, bytes)):
        failure = body if isinstance(body, Failure) else Failure(TypeError(f"a route answered {type(body).__name__}"))
        if not over:
            request.processingFailed(failure)  # type: ignore[attr-defined]
        else:
            log.failure("could not answer {path}", failure, path=request.path)
        return
    if over:
        return
    if body:
        if not getattr(request, "startedWriting", True):
            # The whole body is here, as when render returns it: framed
            # by its length, not as one chunk plus the closing one (a
            # refresh answers here, after its group commit).
            request.setHeader(b"content-length", b"%d" % (len(body),))
        request.write(body)
    request.finish()


def direct_answers(routes: Iterable[Route], *, dialects: Iterable[Dialect] = (errors.JSON, errors.JSONRPC)) -> dict[bytes, "DirectRoute"]:
    """
    Path -> L{DirectRoute} for every route of C{dialects} and every route
    marked L{Route.direct}, for L{smeldr_oauth.web.site.SmeldrSite.direct}:
    the token, revocation and registration endpoints and the MCP endpoints,
    streams included (an idle stream then holds no Werkzeug URL adapter and
    no Klein closures), and the authorization endpoint (the consent page
    and the consent form's C{POST}, a third of a full flow).
    A C{HEAD} answered by a C{GET} handler stays with Klein, which sends
    no body for it (twisted.web would log a warning).
    """
    kinds = tuple(dialects)
    return {
        route.path.encode("utf-8"): DirectRoute(route, skip=(b"HEAD",) if "GET" in route.methods and route.head else ())
        for route in routes
        if route.dialect in kinds or route.direct
    }
