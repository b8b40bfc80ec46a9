# -*- test-case-name: tests.test_web_authorize -*-
"""
The authorization endpoint (RFC 6749 section 3.1): the consent page on
C{GET}, the person's answer on C{POST}.

Until the client and its redirect URI are trusted, every problem is a page
(L{smeldr_oauth.oauth.errors.UntrustedRedirect}); after that, an error
goes back to the client as a 303 with C{error}, C{state} and C{iss}
(L{smeldr_oauth.oauth.errors.AuthorizeRedirectError}).  Both are written
by L{smeldr_oauth.web.errors}.  Only the consent form's own outcomes are
answered here: shown again with a message (400 no decision, 403 a token
that was not accepted, 429 too many attempts), or a 303 to the client.
"""

from __future__ import annotations

from typing import Optional

from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.template import Tag, tags

from smeldr_oauth.oauth import errors as oauth_errors
from smeldr_oauth.oauth.authorization import AuthorizationRequest
from smeldr_oauth.oauth.cimd import is_cimd_client_id
from smeldr_oauth.oauth.server import OAuthServer
from smeldr_oauth.oauth.text import loggable
from smeldr_oauth.oauth.urls import is_host, is_loopback_host, parse
from smeldr_oauth.web import errors, pages
from smeldr_oauth.web.body import read_form, read_query
from smeldr_oauth.web.oauth import client_address, hsts, issuer_path
from smeldr_oauth.web.responses import see_other
from smeldr_oauth.web.routes import Route

log = Logger()


def form_origin(url: str) -> tuple[str, ...]:
    """
    The origin of C{url} as a CSP source expression, or nothing when it
    cannot be written as one safely (the form then may only post to
    C{'self'}, and the browser will not follow the redirect: better than
    a header injection).
    """
    parsed = parse(url)
    if parsed is None:
        return ()
    scheme = parsed.scheme.lower()
    if scheme not in ("http", "https") or not is_host(parsed.host):
        return ()
    port = "" if parsed.port in (None, 80, 443) else f":{parsed.port}"
    host = f"[{parsed.host}]" if ":" in parsed.host else parsed.host
    return (f"{scheme}://{host}{port}",)


def _host(url: str) -> str:
    parsed = parse(url)
    if parsed is None:
        return url
    host = parsed.host
    if parsed.port is not None and parsed.port not in (80, 443):
        host = f"{host}:{parsed.port}"
    return host


def consent_page(
    *,
    action: str,
    site_name: str,
    client_name: Optional[str],
    client_id: str,
    client_is_url: bool,
    redirect_uri: str,
    scopes: list[tuple[str, str]],
    fields: list[tuple[str, str]],
    error: Optional[str] = None,
    resource: Optional[tuple[str, str]] = None,
) -> pages.Page:
    """
    The consent form: who is asking (name and where its identity comes
    from), where the answer goes, what it may do (and where, when the
    server protects several resources), and a place to paste a site token.

    @param resource: the name and URL of the resource being authorized,
        when it must be told apart from others.
    """
    name = client_name or "An application"
    redirect = parse(redirect_uri)
    body: list[Tag] = [tags.h1(f"{name} wants to connect to {site_name}")]
    if client_is_url:
        body.append(tags.p("Identity published by ", tags.strong(_host(client_id)), class_="muted"))
    else:
        body.append(
            tags.p(
                "Registered application ", tags.code(client_id), " (its name is self-declared)", class_="muted"
            )
        )
    body.append(tags.p("After you answer, you return to ", tags.strong(_host(redirect_uri)), class_="muted"))
    if redirect is not None and is_loopback_host(redirect.host):
        body.append(
            tags.p(
                "This application runs on this computer (it returns to a local address). "
                "Approve only if you started it yourself.",
                class_="warn",
                role="note",
            )
        )
    if resource is not None:
        body.append(tags.p("It asks for access to ", tags.strong(resource[0]), " (", tags.code(resource[1]), ")."))
    body.append(tags.p("It will be able to:"))
    body.append(
        tags.ul(class_="scopes")(
            [tags.li(words, " ", tags.span(f"({scope})", class_="muted")) for scope, words in scopes]
        )
    )
    if error:
        body.append(tags.p(error, class_="error", role="alert", id="paste-error"))
    body.append(
        tags.form(method="post", action=action)(
            pages.hidden_fields(fields),
            pages.site_token_field("paste-error" if error else None),
            tags.p("Paste a site token to approve. Deny needs no token.", class_="muted"),
            tags.div(class_="actions")(
                tags.button("Approve", type="submit", class_="primary", name="decision", value="approve"),
                tags.button("Deny", type="submit", name="decision", value="deny"),
            ),
        )
    )
    return pages.Page(f"Connect {name}", body)


class AuthorizeRoutes:
    """
    The authorization endpoint of one L{OAuthServer}.
    """

    def __init__(self, server: OAuthServer) -> None:
        self.server = server
        self.config = server.config
        self.prefix = issuer_path(self.config.issuer)
        self.hsts = hsts(self.config.issuer)

    def routes(self) -> list[Route]:
        methods = {"GET": self.get, "POST": self.post}
        return [
            # direct: without Klein's routing (docs/performance.md), as the
            # token endpoint that follows it in every flow.
            Route(
                path=path, methods=methods, dialect=errors.PAGE, headers=self.hsts, name=f"oauth:{path}", direct=True
            )
            for path in dict.fromkeys([self.prefix + "/oauth/authorize", "/authorize"])
        ]

    async def get(self, request: IRequest) -> bytes:
        authz = await self.server.validate_authorization_request(read_query(request), client_address(request))
        return self._consent(request, authz, None, 200)

    async def post(self, request: IRequest) -> bytes:
        """
        The consent form.  Only the body counts: a query string on the
        POST is ignored, so nothing outside the form can change it.
        """
        form = read_form(request)
        address = client_address(request)
        authz = await self.server.validate_authorization_request(form, address)
        decisions = form.get("decision", [])
        if decisions == ["deny"]:
            log.info("user denied client {client_id}", client_id=loggable(authz.client.client_id), smeldr_event="grant_denied")
            return see_other(request, self.server.deny(authz))
        if decisions != ["approve"]:
            return self._consent(request, authz, "Choose Approve or Deny.", 400)
        pasted = form.get("site_token", [])
        try:
            # A repeated field is refused like a wrong token: only one paste.
            approval = await self.server.check_paste(pasted[0] if len(pasted) == 1 else "", address, authz)
        except oauth_errors.RateLimited as e:
            request.setHeader("Retry-After", str(e.retry_after))
            return self._consent(request, authz, "Too many failed attempts. Wait a minute and try again.", 429)
        except oauth_errors.PasteRefused:
            return self._consent(request, authz, "That site token was not accepted.", 403)
        return see_other(request, await self.server.approve(authz, approval))

    def _consent(
        self, request: IRequest, authz: AuthorizationRequest, error: Optional[str], status: int
    ) -> bytes:
        client = authz.client
        protected = self.config.protected_resource(authz.resource)
        words = dict(self.config.scopes)
        shown: Optional[tuple[str, str]] = None
        if protected is not None:
            words.update(protected.scope_words)
            if len(self.config.resources) > 1 or protected.name:
                shown = (protected.name or self.config.service_name, protected.url)
        page = consent_page(
            action=self.config.endpoint("/oauth/authorize"),
            site_name=self.config.service_name,
            client_name=client.client_name,
            client_id=client.client_id,
            client_is_url=client.kind == "cimd" or is_cimd_client_id(client.client_id, allow_insecure=True),
            redirect_uri=authz.redirect_uri,
            scopes=pages.scope_words(authz.scopes, words),
            fields=authz.form_fields(),
            error=error,
            resource=shown,
        )
        return pages.respond(request, status, page, form_targets=form_origin(authz.redirect_uri))

