# -*- test-case-name: tests.test_oauth_http -*-
"""
Klein glue for the authorization server.

Routes translate HTTP into calls on L{OAuthServer} and its answers or
errors back into HTTP: RFC 6749 section 5.2 JSON errors at the token,
revocation and registration endpoints; error redirects with C{iss} or a plain
page at the authorization endpoint.  No protocol decision is made here.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any, Awaitable, Callable, Optional
from urllib.parse import parse_qs, unquote

from hyperlink import URL
from klein import Klein
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.iweb import IRequest

from smeldr_oauth.oauth import errors, pages
from smeldr_oauth.oauth.server import AuthorizationRequest, OAuthServer, loggable
from smeldr_oauth.oauth.urls import valid_host

log = Logger()

MAX_FORM = 64 * 1024
MAX_JSON = 64 * 1024

#: RFC 6797: once a browser has seen this over https it never talks to the
#: issuer over plain http again (a year, the usual preload minimum).
HSTS = "max-age=31536000"

CORS_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Headers": "Authorization, Content-Type, MCP-Protocol-Version",
    "Access-Control-Max-Age": "86400",
}


class BadBody(Exception):
    """
    A request body that cannot be parsed: wrong content type, too big, not
    UTF-8, or malformed.
    """


def client_address(request: IRequest) -> str:
    """
    The peer address used as the rate-limit key (the forwarded client's
    when the peer is a proxy named by C{--trust-forwarded-from}: see
    L{smeldr_oauth.service.web}).  The limiters fold IPv6 addresses into
    their /64 (L{smeldr_oauth.oauth.ratelimit.bucket_key}).
    """
    peer = request.getClientAddress()
    return getattr(peer, "host", None) or "unknown"


def read_body(request: IRequest, limit: int) -> bytes:
    """
    The request body, at most C{limit} bytes (the site's request factory
    also caps what it buffers).
    """
    content = request.content
    if content is None:
        return b""
    content.seek(0)
    data = content.read(limit + 1)
    if len(data) > limit:
        raise BadBody("request body too large")
    return data


def _media_type(request: IRequest) -> str:
    raw = request.getHeader("content-type") or ""
    return raw.split(";", 1)[0].strip().lower()


def parse_form(request: IRequest, limit: int = MAX_FORM) -> dict[str, list[str]]:
    """
    Parse an C{application/x-www-form-urlencoded} body ourselves: Klein's
    C{request.args} merges the query string into the form, and the token
    endpoint must not take parameters from the URL.
    """
    if _media_type(request) != "application/x-www-form-urlencoded":
        raise BadBody("the body must be application/x-www-form-urlencoded")
    data = read_body(request, limit)
    try:
        text = data.decode("utf-8")
        return parse_qs(
            text, keep_blank_values=True, strict_parsing=False, max_num_fields=100, errors="strict"
        )
    except (UnicodeDecodeError, ValueError):
        raise BadBody("the body is not a valid form")


def parse_query(request: IRequest) -> dict[str, list[str]]:
    uri = request.uri
    query = uri.split(b"?", 1)[1] if b"?" in uri else b""
    try:
        return parse_qs(query.decode("utf-8"), keep_blank_values=True, max_num_fields=100, errors="strict")
    except (UnicodeDecodeError, ValueError):
        raise BadBody("the query string is not valid")


def basic_credentials(request: IRequest) -> Optional[tuple[str, str]]:
    """
    C{client_secret_basic} credentials (RFC 6749 section 2.3.1: both parts
    form-urlencoded before base64), or C{None} when the header is absent.
    """
    header = request.getHeader("authorization")
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        raise errors.invalid_client("unsupported client authentication scheme")
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise errors.invalid_client("malformed Basic credentials")
    user, sep, password = decoded.partition(":")
    if not sep:
        raise errors.invalid_client("malformed Basic credentials")
    return unquote(user.replace("+", " ")), unquote(password.replace("+", " "))


def json_response(request: IRequest, status: int, body: Any, cors: bool = True) -> bytes:
    request.setResponseCode(status)
    request.setHeader("Content-Type", "application/json")
    request.setHeader("Cache-Control", "no-store")
    request.setHeader("Pragma", "no-cache")
    request.setHeader("X-Content-Type-Options", "nosniff")
    if cors:
        for key, value in CORS_HEADERS.items():
            request.setHeader(key, value)
    return json.dumps(body, separators=(",", ":")).encode("utf-8")


def oauth_error_response(request: IRequest, error: errors.OAuthError, basic_used: bool = False) -> bytes:
    if error.status == 401 and basic_used:
        request.setHeader("WWW-Authenticate", 'Basic realm="oauth"')
    return json_response(request, error.status, error.as_json())


def page_response(
    request: IRequest, status: int, render: Callable[[str], bytes], form_targets: tuple[str, ...] = ()
) -> bytes:
    nonce = pages.new_nonce()
    request.setResponseCode(status)
    for key, value in pages.page_headers(nonce, form_targets).items():
        request.setHeader(key, value)
    return render(nonce)


def _origin(url: str) -> tuple[str, ...]:
    """
    The origin of C{url} as a CSP source expression, or nothing when it
    cannot be written as one safely (the form then may only post to
    C{'self'}, and the browser will not follow the redirect: better than
    a header injection).
    """
    try:
        parsed = URL.from_text(url)
    except Exception:
        return ()
    scheme = parsed.scheme.lower()
    if scheme not in ("http", "https") or not valid_host(parsed.host):
        return ()
    port = "" if parsed.port in (None, 80, 443) else f":{parsed.port}"
    host = f"[{parsed.host}]" if ":" in parsed.host else parsed.host
    return (f"{scheme}://{host}{port}",)


class OAuthHTTP:
    """
    Mounts the authorization server's endpoints on a Klein app.
    """

    def __init__(self, server: OAuthServer) -> None:
        self.server = server
        self.config = server.config
        self.hsts = self.config.issuer.startswith("https://")

    def register(self, app: Klein) -> None:
        """
        Mount every endpoint.  The authorize, token and register endpoints
        also answer at the origin root, where clients that skip metadata
        (the 2025-03-26 fallback, Claude.ai at times) look for them.

        Every path also answers the methods it does not support, with a
        405 in its own format (JSON, or a page for C{authorize}) and a
        sorted C{Allow}, instead of Werkzeug's HTML.  Only the metadata,
        token, revocation and registration endpoints speak CORS (and so
        answer C{OPTIONS}); the authorization endpoint never does.
        """
        resource_path = URL.from_text(self.config.resource or "").path
        prm_paths = ["/.well-known/oauth-protected-resource"]
        suffix = "/".join(p for p in resource_path if p)
        if suffix:
            prm_paths.append("/.well-known/oauth-protected-resource/" + suffix)
        routes: list[tuple[str, dict[str, Callable[[IRequest], Any]], bool]] = [
            ("/.well-known/oauth-authorization-server", {"GET": self.as_metadata}, True),
            ("/.well-known/openid-configuration", {"GET": self.no_oidc}, True),
        ]
        routes += [(path, {"GET": self.pr_metadata}, True) for path in prm_paths]
        for prefix in ("/oauth", ""):
            routes += [
                (prefix + "/authorize", {"GET": self.authorize_get, "POST": self.authorize_post}, False),
                (prefix + "/token", {"POST": self.token}, True),
                (prefix + "/register", {"POST": self.register_client}, True),
                (prefix + "/revoke", {"POST": self.revoke}, True),
            ]
        for path, handlers, cors in routes:
            self._mount(app, path, handlers, cors)

    def _mount(
        self,
        app: Klein,
        path: str,
        handlers: dict[str, Callable[[IRequest], Any]],
        cors: bool,
    ) -> None:
        methods = set(handlers)
        if "GET" in methods:
            methods.add("HEAD")
        if cors:
            methods.add("OPTIONS")
        allow = ", ".join(sorted(methods))

        def dispatch(request: IRequest) -> Any:
            if self.hsts:
                request.setHeader("Strict-Transport-Security", HSTS)
            method = request.method.decode("ascii", "replace").upper()
            handler = handlers.get("GET" if method == "HEAD" else method)
            if handler is not None:
                return handler(request)
            if method == "OPTIONS" and cors:
                request.setResponseCode(204)
                for k, v in CORS_HEADERS.items():
                    request.setHeader(k, v)
                request.setHeader("Access-Control-Allow-Methods", allow)
                return b""
            request.setHeader("Allow", allow)
            if not cors:
                return self._error_page(
                    request, "Method not allowed", "This address does not answer that method.", 405
                )
            return json_response(
                request,
                405,
                {"error": "invalid_request", "error_description": "method not allowed; see the Allow header"},
            )

        app.route(path, branch=False, endpoint=f"oauth:{path}")(dispatch)

    # -- metadata -------------------------------------------------------------

    def as_metadata(self, request: IRequest) -> bytes:
        body = json_response(request, 200, self.server.authorization_server_metadata())
        request.setHeader("Cache-Control", "public, max-age=300")
        return body

    def pr_metadata(self, request: IRequest) -> bytes:
        body = json_response(request, 200, self.server.protected_resource_metadata())
        request.setHeader("Cache-Control", "public, max-age=300")
        return body

    def no_oidc(self, request: IRequest) -> bytes:
        """
        This server is not an OpenID provider; a 404 is what clients that
        probe for OIDC discovery (ChatGPT, the Python SDK) handle well.
        """
        return json_response(
            request, 404, {"error": "not_found", "error_description": "this server is not an OpenID provider"}
        )

    # -- authorization endpoint -------------------------------------------

    async def authorize_get(self, request: IRequest) -> bytes:
        try:
            params = parse_query(request)
        except BadBody as e:
            return self._error_page(request, "Invalid request", str(e))
        return await self._guarded(request, params, None)

    async def authorize_post(self, request: IRequest) -> bytes:
        """
        The consent form.  Only the body counts: a query string on the
        POST is ignored, so nothing outside the form can change it.
        """
        try:
            params = parse_form(request)
        except BadBody as e:
            return self._error_page(request, "Invalid request", str(e))
        return await self._guarded(request, params, params)

    async def _guarded(
        self,
        request: IRequest,
        params: dict[str, list[str]],
        form: Optional[dict[str, list[str]]],
    ) -> bytes:
        try:
            return await self._authorize(request, params, form)
        except Exception:
            # Never a traceback, never a redirect we did not decide on.
            log.failure("the authorization endpoint failed")
            return self._error_page(
                request, "Something went wrong", "The request could not be handled. Try again later.", 500
            )

    def _error_page(self, request: IRequest, title: str, detail: str, status: int = 400) -> bytes:
        return page_response(request, status, lambda nonce: pages.error_page(title, detail, nonce))

    async def _authorize(
        self,
        request: IRequest,
        params: dict[str, list[str]],
        form: Optional[dict[str, list[str]]],
    ) -> bytes:
        try:
            authz = await self.server.validate_authorization_request(params, client_address(request))
        except errors.UntrustedRedirect as e:
            if e.retry_after is not None:
                request.setHeader("Retry-After", str(e.retry_after))
            return self._error_page(request, e.title, e.detail, e.status)
        except errors.AuthorizeRedirectError as e:
            return self._redirect(request, self.server.error_redirect(e))
        if form is None:
            return self._consent(request, authz, None, 200)
        decisions = form.get("decision", [])
        if decisions == ["deny"]:
            log.info("user denied client {client_id}", client_id=loggable(authz.client.client_id))
            return self._redirect(request, self.server.deny(authz))
        if decisions != ["approve"]:
            return self._consent(request, authz, "Choose Approve or Deny.", 400)
        address = client_address(request)
        # Spend an attempt before the (possibly slow) check and give it
        # back on success: checking first and spending after the await
        # would let any number of parallel pastes through the check.
        if not self.server.paste_limiter.hit(address):
            log.warn(
                "refused site token paste from {address}: rate limited",
                address=loggable(address),
                endpoint="authorize",
                smeldr_event="rate_limited",
            )
            request.setHeader("Retry-After", "60")
            return self._consent(
                request, authz, "Too many failed attempts. Wait a minute and try again.", 429
            )
        pasted = form.get("site_token", [])
        # A repeated field is refused like a wrong token: only one paste.
        approval = await self.server.verify_paste(pasted[0] if len(pasted) == 1 else "")
        if approval is None:
            log.warn(
                "refused site token paste from {address} for client {client_id}",
                address=loggable(address),
                client_id=loggable(authz.client.client_id),
                smeldr_event="paste_refused",
            )
            return self._consent(request, authz, "That site token was not accepted.", 403)
        self.server.paste_limiter.refund(address)
        location = await self.server.approve(authz, approval)
        return self._redirect(request, location)

    def _consent(
        self, request: IRequest, authz: AuthorizationRequest, error: Optional[str], status: int
    ) -> bytes:
        from smeldr_oauth.oauth.cimd import is_cimd_client_id

        client = authz.client
        return page_response(
            request,
            status,
            lambda nonce: pages.consent_page(
                action=self.config.endpoint("/oauth/authorize"),
                site_name=self.config.service_name,
                client_name=client.client_name,
                client_id=client.client_id,
                client_is_url=client.kind == "cimd"
                or is_cimd_client_id(client.client_id, allow_insecure=True),
                redirect_uri=authz.redirect_uri,
                scopes=pages.scope_words(authz.scopes, self.config.scopes),
                fields=authz.form_fields(),
                nonce=nonce,
                error=error,
            ),
            form_targets=_origin(authz.redirect_uri),
        )

    def _redirect(self, request: IRequest, location: str) -> bytes:
        """
        303 See Other: after a POST the browser follows with a GET, so the
        pasted site token is never re-posted to the client (a 307 would).
        """
        request.setResponseCode(303)
        request.setHeader("Location", location)
        request.setHeader("Cache-Control", "no-store")
        request.setHeader("Referrer-Policy", "no-referrer")
        request.setHeader("X-Frame-Options", "DENY")
        request.setHeader("Content-Security-Policy", "default-src 'none'; frame-ancestors 'none'")
        request.setHeader("Content-Type", "text/plain; charset=utf-8")
        return b"Redirecting\n"

    # -- JSON endpoints -------------------------------------------------------

    async def _json_endpoint(
        self,
        request: IRequest,
        call: Callable[[dict[str, list[str]], Optional[tuple[str, str]]], Awaitable[Any]],
        status: int = 200,
    ) -> bytes:
        basic = None
        basic_sent = bool(request.getHeader("authorization"))
        try:
            try:
                params = parse_form(request)
            except BadBody as e:
                raise errors.invalid_request(str(e))
            basic = basic_credentials(request)
            result = await call(params, basic)
        except errors.OAuthError as e:
            return oauth_error_response(request, e, basic_used=basic_sent)
        except Exception:
            # A bug or a failing store: log it, and answer in the
            # endpoint's own format without saying what went wrong.
            log.failure("{path} failed", path=loggable(request.path.decode("ascii", "replace")))
            return oauth_error_response(request, errors.server_error())
        return json_response(request, status, result if result is not None else {})

    def token(self, request: IRequest) -> "Deferred[bytes]":
        return Deferred.fromCoroutine(self._json_endpoint(request, self.server.token))

    def revoke(self, request: IRequest) -> "Deferred[bytes]":
        async def call(params: dict[str, list[str]], basic: Optional[tuple[str, str]]) -> dict[str, Any]:
            await self.server.revoke(params, basic)
            return {}

        return Deferred.fromCoroutine(self._json_endpoint(request, call))

    async def register_client(self, request: IRequest) -> bytes:
        if not self.config.dynamic_registration:
            return json_response(
                request,
                404,
                {"error": "not_found", "error_description": "dynamic client registration is disabled"},
            )
        address = client_address(request)
        if not self.server.register_limiter.hit(address):
            log.warn(
                "refused registration from {address}: rate limited",
                address=loggable(address),
                endpoint="register",
                smeldr_event="rate_limited",
            )
            request.setHeader("Retry-After", "60")
            return oauth_error_response(
                request, errors.temporarily_unavailable("too many registrations; try again later", 429)
            )
        try:
            if _media_type(request) != "application/json":
                raise errors.invalid_client_metadata("the body must be application/json")
            try:
                metadata = json.loads(read_body(request, MAX_JSON).decode("utf-8"))
            except (BadBody, UnicodeDecodeError, ValueError, RecursionError):
                raise errors.invalid_client_metadata("the body is not a JSON object")
            result = await self.server.register(metadata)
        except errors.OAuthError as e:
            return oauth_error_response(request, e)
        except Exception:
            log.failure("registration failed")
            return oauth_error_response(request, errors.server_error())
        return json_response(request, 201, result)
