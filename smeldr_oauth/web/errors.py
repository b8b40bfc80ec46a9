# -*- test-case-name: tests.test_web_errors -*-
"""
Every error status the site answers, and the one place each is rendered.

Routes and helpers never write an error response themselves: they raise,
and Klein's C{handle_errors} chain installed here turns the exception into
the answer, in the format (the L{Dialect}) of the route that raised it, or,
for a request no route took, by its path: JSON on API paths, the site's own
HTML page elsewhere.

Status by exception (what a newcomer looks for):

  - L{HTTPError}: its own status.  The constructors below are the
    catalogue: 400 L{bad_request}, L{bad_header}; 404 L{not_found};
    405 L{method_not_allowed} (sorted C{Allow}); 413 L{body_too_large};
    415 L{unsupported_media_type}; 429 L{too_many_requests}
    (C{Retry-After}); 500 L{internal_error}; 503 L{unavailable}.
  - L{smeldr_oauth.oauth.errors.OAuthError}: its C{status} (400, 401 with
    C{WWW-Authenticate: Basic} when C{Authorization} was sent, 403, 429, 500, 503),
    body per RFC 6749 section 5.2.
  - L{smeldr_oauth.oauth.errors.UntrustedRedirect}: an HTML page with its
    status (400, or 429 with C{Retry-After}); never a redirect.
  - L{smeldr_oauth.oauth.errors.AuthorizeRedirectError}: 303 to the
    client's (checked) redirect URI with C{error}, C{state} and C{iss}.
  - L{smeldr_oauth.oauth.errors.RateLimited}: 429 with C{Retry-After}.
  - L{smeldr_oauth.db.errors.StoreUnavailable} (the database cannot be
    reached: PostgreSQL restarting, a SQLite file locked too long): 503
    with C{Retry-After}, logged as one warning line; nothing was written.
  - werkzeug's C{NotFound} / C{MethodNotAllowed} / C{RequestRedirect}
    (routing found nothing): 404 / 405 / 308, in our format.
  - anything else: 500, logged once with its traceback (a bug).

Outside this module: 413 for a body over the site-wide cap and 400 for a
URL or C{Host} that is not UTF-8 are answered by
L{smeldr_oauth.web.site.SmeldrRequest} before any routing; 2xx and 303
answers are the routes' own.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Optional, Union

from klein import Klein
from twisted.internet.defer import CancelledError
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from werkzeug.exceptions import HTTPException, MethodNotAllowed
from werkzeug.routing import RequestRedirect

from smeldr_oauth.db.errors import StoreUnavailable
from smeldr_oauth.oauth import errors as oauth_errors
from smeldr_oauth.oauth.text import loggable

log = Logger()

HeaderPairs = tuple[tuple[str, str], ...]

#: JSON-RPC 2.0's code for an invalid request and for an internal error:
#: what the MCP endpoints answer an HTTP-level refusal with.
JSONRPC_INVALID_REQUEST = -32600
JSONRPC_INTERNAL_ERROR = -32603

#: Headers every JSON answer carries, error or not: it may hold tokens or
#: private data, so no cache keeps it, and it is never sniffed as HTML.
JSON_HEADERS = (
    (b"Content-Type", b"application/json"),
    (b"Cache-Control", b"no-store"),
    (b"Pragma", b"no-cache"),
    (b"X-Content-Type-Options", b"nosniff"),
)

#: Titles of the site's error pages by status.
_TITLES = {
    400: "Invalid request",
    403: "Not allowed",
    404: "Not found",
    405: "Method not allowed",
    413: "Request too large",
    415: "Unsupported content",
    429: "Too many requests",
    500: "Something went wrong",
    503: "Try again later",
}


class HTTPError(Exception):
    """
    A refusal at the HTTP edge, in no particular format: the route's
    L{Dialect} writes it.

    @ivar status: the HTTP status.
    @ivar code: a short machine-readable code (C{invalid_request},
        C{not_found}, ...): the C{error} member of a JSON answer.
    @ivar description: one sentence for people; never a secret.
    @ivar headers: extra response headers (C{Allow}, C{Retry-After}, ...).
    @ivar body: a JSON body that replaces the dialect's default (the MCP
        layer's JSON-RPC error with its id and data).
    """

    def __init__(
        self,
        status: int,
        code: str,
        description: str,
        *,
        headers: Iterable[tuple[str, str]] = (),
        body: Optional[dict[str, Any]] = None,
    ) -> None:
        super().__init__(status, code, description)
        self.status = status
        self.code = code
        self.description = description
        self.headers: HeaderPairs = tuple(headers)
        self.body = body


def bad_request(description: str) -> HTTPError:
    return HTTPError(400, "invalid_request", description)


def bad_header(name: str, problem: str) -> HTTPError:
    """
    A request header we cannot use: repeated where only one may be, or
    holding bytes that are not printable ASCII where only those make sense.
    """
    return HTTPError(400, "invalid_request", f"the {name} header is {problem}")


def not_found(description: str = "there is nothing at this address") -> HTTPError:
    return HTTPError(404, "not_found", description)


def method_not_allowed(allowed: Iterable[str]) -> HTTPError:
    """
    405 with a sorted C{Allow} (werkzeug's comes from a set, so its order
    changes from run to run).
    """
    return HTTPError(
        405,
        "invalid_request",
        "method not allowed; see the Allow header",
        headers=(("Allow", ", ".join(sorted(set(allowed)))),),
    )


def body_too_large() -> HTTPError:
    return HTTPError(413, "invalid_request", "request body too large")


def unsupported_media_type(expected: Iterable[str]) -> HTTPError:
    return HTTPError(415, "invalid_request", "the body must be " + " or ".join(expected))


def too_many_requests(retry_after: int, description: str = "too many requests; try again later") -> HTTPError:
    return HTTPError(429, "temporarily_unavailable", description, headers=(("Retry-After", str(retry_after)),))


def internal_error() -> HTTPError:
    return HTTPError(500, "server_error", "the server could not handle the request")


def unavailable(description: str = "the service is unavailable; try again later", retry_after: Optional[int] = None) -> HTTPError:
    headers = () if retry_after is None else (("Retry-After", str(retry_after)),)
    return HTTPError(503, "temporarily_unavailable", description, headers=headers)


# --- Formats -----------------------------------------------------------------


class Dialect:
    """
    How one family of routes writes an error: a JSON object, an HTML page,
    or a JSON-RPC error.  A route names its dialect; a request no route
    took gets one by its path (L{dialect_for_path}).
    """

    name = "json"

    def render(self, request: IRequest, error: HTTPError) -> bytes:
        raise NotImplementedError


class _JSON(Dialect):
    """
    C{{"error": code, "error_description": text}}: RFC 6749 section 5.2's
    shape, used by every JSON endpoint (OAuth, metadata, health).
    """

    name = "json"

    def body(self, error: HTTPError) -> dict[str, Any]:
        return {"error": error.code, "error_description": error.description}

    def render(self, request: IRequest, error: HTTPError) -> bytes:
        request.setResponseCode(error.status)
        for key, value in JSON_HEADERS:
            request.setHeader(key, value)
        for name, text in error.headers:
            request.setHeader(name, text)
        body = error.body if error.body is not None else self.body(error)
        return json.dumps(body, separators=(",", ":")).encode("utf-8")


class _JSONRPC(_JSON):
    """
    A JSON-RPC 2.0 error object with a null id: what MCP clients parse.
    """

    name = "jsonrpc"

    def body(self, error: HTTPError) -> dict[str, Any]:
        code = JSONRPC_INTERNAL_ERROR if error.status >= 500 else JSONRPC_INVALID_REQUEST
        return {"jsonrpc": "2.0", "id": None, "error": {"code": code, "message": error.description}}


class _Page(Dialect):
    """
    The site's own HTML page (no framing, no caching, CSP with a nonce).
    """

    name = "page"

    def render(self, request: IRequest, error: HTTPError) -> bytes:
        from smeldr_oauth.web import pages

        for name, text in error.headers:
            request.setHeader(name, text)
        title = _TITLES.get(error.status, "Error")
        detail = error.description[:1].upper() + error.description[1:] + "."
        return pages.respond(request, error.status, pages.error_page(title, detail))


JSON = _JSON()
JSONRPC = _JSONRPC()
PAGE = _Page()

#: Paths (prefixes) whose unknown addresses answer JSON rather than a page.
API_PREFIXES = ("/.well-known/", "/oauth/", "/mcp", "/healthz", "/token", "/register", "/revoke")

_ROUTE_DIALECT = "_smeldr_dialect"


def set_dialect(request: IRequest, dialect: Dialect) -> None:
    """
    Mark C{request} as taken by one of our routes, speaking C{dialect}
    (see L{smeldr_oauth.web.routes}).
    """
    setattr(request, _ROUTE_DIALECT, dialect)


def routed_dialect(request: IRequest) -> Optional[Dialect]:
    """
    The dialect of the route that took C{request}, or C{None}.
    """
    return getattr(request, _ROUTE_DIALECT, None)


def dialect_for_path(path: bytes, api_prefixes: Iterable[str] = API_PREFIXES) -> Dialect:
    text = path.decode("latin-1")
    return JSON if any(text.startswith(p) for p in api_prefixes) else PAGE


# --- The handlers --------------------------------------------------------------


def _authorization_sent(request: IRequest) -> bool:
    """
    Did the client try to authenticate with the C{Authorization} header?
    Then a 401 must challenge it (RFC 6749 section 5.2), whatever it sent.
    """
    return request.requestHeaders.hasHeader(b"authorization")


def as_http_error(error: BaseException) -> Optional[HTTPError]:
    """
    The domain errors every dialect can write, as L{HTTPError}s.
    """
    if isinstance(error, HTTPError):
        return error
    if isinstance(error, oauth_errors.OAuthError):
        return HTTPError(error.status, error.error, error.description, body=error.as_json())
    if isinstance(error, oauth_errors.RateLimited):
        return too_many_requests(error.retry_after)
    if isinstance(error, StoreUnavailable):
        return unavailable("the database is unavailable; try again later", retry_after=error.retry_after)
    if isinstance(error, RequestRedirect):
        return HTTPError(308, "redirect", "moved", headers=(("Location", error.new_url),))
    if isinstance(error, MethodNotAllowed):
        return method_not_allowed(error.valid_methods or ())
    if isinstance(error, HTTPException):
        code = error.code or 500
        if code == 404:
            return not_found()
        return HTTPError(code, "invalid_request" if code < 500 else "server_error", (error.name or "error").lower())
    return None


def install_error_handlers(
    app: Klein, *, site_wide: bool = False, api_prefixes: Optional[Iterable[str]] = None
) -> None:
    """
    Register the error path on C{app}.  Calling it again only widens it
    (the handlers are registered once).

    @param site_wide: also answer for requests no route of ours took:
        unknown paths and methods, and exceptions raised by other routes.
        The standalone server owns its app and turns this on; mounting into
        someone else's Klein app leaves their 404s and 500s to them.
    @param api_prefixes: paths whose unknown addresses answer JSON
        (default L{API_PREFIXES}); others get the site's page.
    """
    state: Optional[_ErrorPath] = app.__dict__.get("_smeldr_error_path")
    if state is None:
        state = _ErrorPath()
        app.__dict__["_smeldr_error_path"] = state
        state.register(app)
    if site_wide:
        state.site_wide = True
    if api_prefixes is not None:
        state.api_prefixes = tuple(dict.fromkeys(state.api_prefixes + tuple(api_prefixes)))


def render_failure(request: IRequest, failure: Failure) -> bytes:
    """
    The answer Klein's error chain gives when a route of ours (its dialect
    set on C{request}) raised C{failure}, for a route answered without
    Klein (L{smeldr_oauth.web.routes.DirectRoute}).
    """
    path = _ErrorPath()
    if failure.check(oauth_errors.AuthorizeRedirectError):
        return path.authorize_redirect(request, failure)
    if failure.check(oauth_errors.UntrustedRedirect):
        return path.untrusted_redirect(request, failure)
    answer = path.other(request, failure)
    assert isinstance(answer, bytes), "render_failure needs a routed request"
    return answer


class _ErrorPath:
    """
    The handlers of one app, and what they need to know about it.
    """

    def __init__(self) -> None:
        self.site_wide = False
        self.api_prefixes: tuple[str, ...] = API_PREFIXES

    def dialect_of(self, request: IRequest) -> Optional[Dialect]:
        dialect = routed_dialect(request)
        if dialect is None and self.site_wide:
            dialect = dialect_for_path(request.path, self.api_prefixes)
        return dialect

    def register(self, app: Klein) -> None:
        # Klein tries handlers in the order they were registered, each only
        # for the types it names; a handler returning the failure passes it
        # on (to the app's own handlers, or Klein's defaults).
        app.handle_errors(oauth_errors.AuthorizeRedirectError)(self.authorize_redirect)
        app.handle_errors(oauth_errors.UntrustedRedirect)(self.untrusted_redirect)
        app.handle_errors(Exception)(self.other)  # type: ignore[arg-type]

    def authorize_redirect(self, request: IRequest, failure: Failure) -> bytes:
        from smeldr_oauth.web.responses import see_other

        error = failure.value
        assert isinstance(error, oauth_errors.AuthorizeRedirectError)
        return see_other(request, error.location)

    def untrusted_redirect(self, request: IRequest, failure: Failure) -> bytes:
        from smeldr_oauth.web import pages

        error = failure.value
        assert isinstance(error, oauth_errors.UntrustedRedirect)
        if error.retry_after is not None:
            request.setHeader("Retry-After", str(error.retry_after))
        return pages.respond(request, error.status, pages.error_page(error.title, error.detail))

    def other(self, request: IRequest, failure: Failure) -> Union[bytes, Failure]:
        dialect = self.dialect_of(request)
        if dialect is None:
            return failure
        error = as_http_error(failure.value)
        if error is None:
            if failure.check(CancelledError):
                # The route gave up (a deadline): no bug to report.
                log.info("request to {path} was cancelled", path=loggable(request.path.decode("latin-1")))
            else:
                log.failure(
                    "{method} {path} failed",
                    failure,
                    method=loggable(request.method.decode("latin-1")),
                    path=loggable(request.path.decode("latin-1")),
                )
            error = internal_error()
        elif isinstance(failure.value, StoreUnavailable):
            log.warn(
                "{method} {path}: 503, {error}",
                method=loggable(request.method.decode("latin-1")),
                path=loggable(request.path.decode("latin-1")),
                error=str(failure.value),
            )
        elif isinstance(failure.value, oauth_errors.OAuthError) and error.status == 401 and _authorization_sent(request):
            error.headers += (("WWW-Authenticate", 'Basic realm="oauth"'),)
        return dialect.render(request, error)
