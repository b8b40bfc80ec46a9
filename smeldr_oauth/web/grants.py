# -*- test-case-name: tests.test_web_grants -*-
"""
The connected-apps page at C{/oauth/grants}: a person signs in by pasting a
site token, sees every grant made with it, and revokes any of them.

No JavaScript.  Signing in creates a short-lived, in-memory page session
(256-bit id in an C{HttpOnly}, C{SameSite=Strict} cookie); each form
carries a per-session CSRF token that is compared in constant time.  The
site token itself is never echoed into the page.

Its answers are all pages: the sign-in form (again with a message: 400 an
unreadable form, 403 a token not accepted or a session or form that
expired, 429 too many attempts), or the list (400 an unknown action, 404 a
grant that is not the person's).
"""

from __future__ import annotations

import time as _time
from typing import Any, Callable, Optional
from urllib.parse import urlsplit

import attr
from cachetools import TTLCache
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.template import Tag, tags

from smeldr_oauth.oauth import errors as oauth_errors
from smeldr_oauth.oauth.model import Approval, Grant
from smeldr_oauth.oauth.secrets import constant_time_equal, new_secret
from smeldr_oauth.oauth.server import OAuthServer
from smeldr_oauth.oauth.text import loggable
from smeldr_oauth.web import errors, pages
from smeldr_oauth.web.body import read_form
from smeldr_oauth.web.oauth import client_address, hsts, issuer_path
from smeldr_oauth.web.routes import Route

log = Logger()

SESSION_TTL = 15 * 60
MAX_SESSIONS = 10000


@attr.s(auto_attribs=True, kw_only=True)
class PageSession:
    approval: Approval
    csrf: str


def _when(stamp: Optional[float]) -> str:
    if not stamp:
        return "never"
    return _time.strftime("%Y-%m-%d %H:%M UTC", _time.gmtime(stamp))


def _client_host(client_id: str) -> str:
    if client_id.startswith(("https://", "http://")):
        return urlsplit(client_id).netloc or client_id
    return "registered application"


def signout_form(action: str, csrf: str) -> Tag:
    """The sign-out button of a signed-in page (this one, and the flows page)."""
    return tags.form(method="post", action=action)(
        pages.hidden_fields([("action", "signout"), ("csrf", csrf)]),
        tags.div(class_="actions")(tags.button("Sign out", type="submit")),
    )


def signin_page(
    action: str,
    error: Optional[str] = None,
    *,
    title: str = "Connected apps",
    intro: str = "Paste a site token to see the applications connected with it.",
    button: str = "Show connected apps",
) -> pages.Page:
    body: list[Any] = [tags.h1(title), tags.p(intro)]
    if error:
        body.append(tags.p(error, class_="error", role="alert", id="signin-error"))
    body.append(
        tags.form(method="post", action=action)(
            pages.hidden_fields([("action", "signin")]),
            pages.site_token_field("signin-error" if error else None),
            tags.div(class_="actions")(tags.button(button, type="submit", class_="primary")),
        )
    )
    return pages.Page(title, body)


def grants_page(
    action: str, grants: list[Grant], csrf: str, scope_words: Any, notice: Optional[str] = None
) -> pages.Page:
    body: list[Any] = [tags.h1("Connected apps")]
    if notice:
        body.append(tags.p(notice, role="status"))
    if not grants:
        body.append(tags.p("No application is connected with this site token."))
    else:
        items = []
        for grant in grants:
            label_id = f"g-{grant.grant_id}"
            items.append(
                tags.li(class_="grant")(
                    tags.h2(grant.client_name or "Unnamed application", id=label_id),
                    tags.p(_client_host(grant.client_id), class_="muted"),
                    tags.p("It can:"),
                    tags.ul(class_="scopes")(
                        [tags.li(words) for _, words in pages.scope_words(grant.scopes, scope_words)]
                    ),
                    tags.p(
                        f"Connected {_when(grant.created_at)}; last used {_when(grant.last_used_at)}",
                        class_="muted",
                    ),
                    tags.form(method="post", action=action)(
                        pages.hidden_fields([("action", "revoke"), ("grant_id", grant.grant_id), ("csrf", csrf)]),
                        tags.button("Disconnect", type="submit", **{"aria-describedby": label_id}),
                    ),
                )
            )
        body.append(tags.ul(class_="grants")(items))
    body.append(signout_form(action, csrf))
    return pages.Page("Connected apps", body)


class GrantsPage:
    """
    The connected-apps page of one L{OAuthServer}.

    @param site_token_live: whether a site token id still names a live
        (unrevoked) token.  Given, a page session ends with its token: a
        revoked token's session is refused at its next request, not at the
        end of its fifteen minutes.  Without it (a site whose site tokens
        are not ours) a session lives its time.
    """

    def __init__(
        self,
        server: OAuthServer,
        clock: IReactorTime,
        site_token_live: Optional[Callable[[str], "Deferred[bool]"]] = None,
    ) -> None:
        self.server = server
        self.clock = clock
        self.site_token_live = site_token_live
        self.path = issuer_path(server.config.issuer) + "/oauth/grants"
        self.sessions: TTLCache[str, PageSession] = TTLCache(MAX_SESSIONS, SESSION_TTL, timer=clock.seconds)
        secure = server.config.issuer.startswith("https://")
        self.cookie_name = b"__Host-smeldr_grants" if secure else b"smeldr_grants"
        self.secure = secure
        self.route_name = "smeldr_grants"

    def routes(self) -> list[Route]:
        return [
            Route(
                path=self.path,
                methods={"GET": self.get, "POST": self.post},
                dialect=errors.PAGE,
                headers=hsts(self.server.config.issuer),
                name=self.route_name,
            )
        ]

    @property
    def action(self) -> str:
        return self.server.config.endpoint("/oauth/grants")

    def _session(self, request: IRequest) -> Optional[tuple[str, PageSession]]:
        cookie = request.getCookie(self.cookie_name)
        if not cookie:
            return None
        key = cookie.decode("ascii", "replace")
        session = self.sessions.get(key)
        return None if session is None else (key, session)

    def _set_cookie(self, request: IRequest, value: str, max_age: int) -> None:
        attrs = [f"{self.cookie_name.decode()}={value}", "Path=/", "HttpOnly", "SameSite=Strict", f"Max-Age={max_age}"]
        if self.secure:
            attrs.append("Secure")
        request.setHeader("Set-Cookie", "; ".join(attrs))

    async def _grants_of(self, approval: Approval) -> list[Grant]:
        if approval.site_token_id is not None:
            return await self.server.store.list_grants(site_token_id=approval.site_token_id)
        return await self.server.store.list_grants(subject=approval.subject)

    async def _show(
        self, request: IRequest, session: PageSession, notice: Optional[str] = None, status: int = 200
    ) -> bytes:
        grants = await self._grants_of(session.approval)
        page = grants_page(self.action, grants, session.csrf, self.server.config.scopes, notice)
        return pages.respond(request, status, page)

    def _signin(self, request: IRequest, error: Optional[str] = None, status: int = 200) -> bytes:
        return pages.respond(request, status, signin_page(self.action, error))

    async def _still_admitted(self, request: IRequest, key: str, session: PageSession) -> Optional[bytes]:
        """
        The sign-in page when the session's token may no longer open this
        page (revoked since, or no longer what L{_admit} asks): the session
        ends.  C{None}: go on.
        """
        refusal = await self._admit(session.approval)
        if refusal is None:
            return None
        self.sessions.pop(key, None)
        self._set_cookie(request, "", 0)
        return self._signin(request, refusal, 403)

    async def get(self, request: IRequest) -> bytes:
        found = self._session(request)
        if found is None:
            return self._signin(request)
        ended = await self._still_admitted(request, *found)
        if ended is not None:
            return ended
        return await self._show(request, found[1])

    async def post(self, request: IRequest) -> bytes:
        try:
            form = read_form(request)
        except errors.HTTPError:
            return self._signin(request, "The form could not be read.", 400)
        action = form.get("action", [""])
        if action == ["signin"]:
            return await self._do_signin(request, form)
        found = self._session(request)
        if found is None:
            return self._signin(request, "Your session ended. Paste your site token again.", 403)
        key, session = found
        csrf = form.get("csrf", [""])
        if len(csrf) != 1 or not constant_time_equal(csrf[0], session.csrf):
            log.warn(
                "refused connected-apps form without a valid CSRF token from {address}",
                address=loggable(client_address(request)),
                smeldr_event="csrf_refused",
            )
            return self._signin(request, "That form has expired. Sign in again.", 403)
        ended = await self._still_admitted(request, key, session)
        if ended is not None:
            return ended
        return await self._act(request, key, session, action, form)

    async def _act(
        self, request: IRequest, key: str, session: PageSession, action: list[str], form: dict[str, list[str]]
    ) -> bytes:
        """
        A signed-in form, its CSRF token checked: sign out, or disconnect
        an app.  (The operator's page, L{smeldr_oauth.flows.page}, has its
        own actions.)
        """
        if action == ["signout"]:
            self.sessions.pop(key, None)
            self._set_cookie(request, "", 0)
            return self._signin(request)
        if action == ["revoke"]:
            grant_ids = form.get("grant_id", [])
            if len(grant_ids) != 1:
                return await self._show(request, session, "Choose one application to disconnect.", 400)
            mine = {g.grant_id for g in await self._grants_of(session.approval)}
            if grant_ids[0] not in mine:
                return await self._show(request, session, "That application is not connected with this token.", 404)
            await self.server.revoke_grant(grant_ids[0])
            log.info(
                "grant {grant_id} revoked from the connected-apps page by {subject}",
                grant_id=loggable(grant_ids[0]),
                subject=loggable(session.approval.subject),
            )
            return await self._show(request, session, "Disconnected.")
        return await self._show(request, session, "Unknown action.", 400)

    async def _admit(self, approval: Approval) -> Optional[str]:
        """
        Why a verified site token may not open this page (C{None}: it may):
        asked at sign-in and again at every request of its session.  Every
        live token opens the connected-apps page.
        """
        token_id = approval.site_token_id
        if token_id is None or self.site_token_live is None or await self.site_token_live(token_id):
            return None
        return "That site token was revoked. Paste a live one."

    async def _do_signin(self, request: IRequest, form: dict[str, list[str]]) -> bytes:
        pasted = form.get("site_token", [""])
        try:
            approval = await self.server.check_paste(pasted[0] if len(pasted) == 1 else "", client_address(request))
        except oauth_errors.RateLimited as e:
            request.setHeader("Retry-After", str(e.retry_after))
            return self._signin(request, "Too many failed attempts. Wait a minute and try again.", 429)
        except oauth_errors.PasteRefused:
            return self._signin(request, "That site token was not accepted.", 403)
        refusal = await self._admit(approval)
        if refusal is not None:
            return self._signin(request, refusal, 403)
        key = new_secret()
        session = PageSession(approval=approval, csrf=new_secret())
        self.sessions[key] = session
        self._set_cookie(request, key, SESSION_TTL)
        return await self._show(request, session)
