# -*- test-case-name: tests.test_oauth_grants -*-
"""
The connected-apps page at C{/oauth/grants}: a person signs in by pasting a
site token, sees every grant made with it, and revokes any of them.

No JavaScript.  Signing in creates a short-lived, in-memory page session
(256-bit id in an C{HttpOnly}, C{SameSite=Strict} cookie scoped to the page's
path); each revoke form carries a per-session CSRF token that is compared in
constant time.  The site token itself is never echoed into the page.
"""

from __future__ import annotations

import time as _time
from collections import OrderedDict
from html import escape
from typing import Any, Optional
from urllib.parse import urlsplit

import attr
from klein import Klein
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.iweb import IRequest

from smeldr_oauth.oauth import pages
from smeldr_oauth.oauth.http import HSTS, BadBody, client_address, page_response, parse_form
from smeldr_oauth.oauth.model import Approval, Grant
from smeldr_oauth.oauth.secrets import constant_time_equal, new_secret
from smeldr_oauth.oauth.server import OAuthServer, loggable

log = Logger()

SESSION_TTL = 15 * 60
MAX_SESSIONS = 10000


@attr.s(auto_attribs=True, kw_only=True)
class PageSession:
    approval: Approval
    csrf: str
    expires_at: float


def _when(stamp: Optional[float]) -> str:
    if not stamp:
        return "never"
    return _time.strftime("%Y-%m-%d %H:%M UTC", _time.gmtime(stamp))


def _client_host(client_id: str) -> str:
    if client_id.startswith(("https://", "http://")):
        return urlsplit(client_id).netloc or client_id
    return "registered application"


def render_signin(nonce: str, action: str, error: Optional[str] = None) -> bytes:
    parts = ["<h1>Connected apps</h1>", "<p>Paste a site token to see the applications connected with it.</p>"]
    if error:
        parts.append(f'<p class="error" role="alert" id="signin-error">{escape(error)}</p>')
    described = ' aria-describedby="signin-error"' if error else ""
    parts.append(
        f'<form method="post" action="{escape(action)}">'
        '<input type="hidden" name="action" value="signin">'
        '<label for="site_token">Your site token</label>'
        '<input type="password" id="site_token" name="site_token" autocomplete="off" '
        f'spellcheck="false" autocapitalize="off"{described}>'
        '<div class="actions"><button type="submit" class="primary">Show connected apps</button></div>'
        "</form>"
    )
    return pages._document("Connected apps", "".join(parts), nonce)


def render_grants(
    nonce: str, action: str, grants: list[Grant], csrf: str, scope_words: Any, notice: Optional[str] = None
) -> bytes:
    parts = ["<h1>Connected apps</h1>"]
    if notice:
        parts.append(f'<p role="status">{escape(notice)}</p>')
    if not grants:
        parts.append("<p>No application is connected with this site token.</p>")
    else:
        parts.append('<ul class="grants">')
        for grant in grants:
            words = "".join(f"<li>{escape(w)}</li>" for _, w in pages.scope_words(grant.scopes, scope_words))
            name = escape(grant.client_name or "Unnamed application")
            label_id = f"g-{escape(grant.grant_id)}"
            parts.append(
                f'<li><h2 id="{label_id}">{name}</h2>'
                f'<p class="muted">{escape(_client_host(grant.client_id))}</p>'
                f'<p>It can:</p><ul class="scopes">{words}</ul>'

                f'<p class="muted">Connected {_when(grant.created_at)}; last used {_when(grant.last_used_at)}</p>'
                f'<form method="post" action="{escape(action)}">'
                '<input type="hidden" name="action" value="revoke">'
                f'<input type="hidden" name="grant_id" value="{escape(grant.grant_id)}">'
                f'<input type="hidden" name="csrf" value="{escape(csrf)}">'
                f'<button type="submit" aria-describedby="{label_id}">Disconnect</button></form></li>'
            )
        parts.append("</ul>")
    parts.append(
        f'<form method="post" action="{escape(action)}">'
        '<input type="hidden" name="action" value="signout">'
        f'<input type="hidden" name="csrf" value="{escape(csrf)}">'
        '<div class="actions"><button type="submit">Sign out</button></div></form>'
    )
    return pages._document("Connected apps", "".join(parts), nonce)


class GrantsPage:
    """
    The connected-apps page of one L{OAuthServer}.
    """

    path = "/oauth/grants"

    def __init__(self, server: OAuthServer, clock: IReactorTime) -> None:
        self.server = server
        self.clock = clock
        self.sessions: OrderedDict[str, PageSession] = OrderedDict()
        secure = server.config.issuer.startswith("https://")
        self.cookie_name = b"__Host-smeldr_grants" if secure else b"smeldr_grants"
        self.secure = secure

    def register(self, app: Klein) -> None:
        app.route(self.path, methods=["GET", "HEAD"], branch=False, endpoint="smeldr_grants_get")(self.get)
        app.route(self.path, methods=["POST"], branch=False, endpoint="smeldr_grants_post")(self.post)

    def _hsts(self, request: IRequest) -> None:
        if self.secure:
            request.setHeader("Strict-Transport-Security", HSTS)

    @property
    def action(self) -> str:
        return self.server.config.endpoint(self.path)

    def _session(self, request: IRequest) -> Optional[tuple[str, PageSession]]:
        cookie = request.getCookie(self.cookie_name)
        if not cookie:
            return None
        key = cookie.decode("ascii", "replace")
        session = self.sessions.get(key)
        if session is None:
            return None
        if session.expires_at <= self.clock.seconds():
            del self.sessions[key]
            return None
        return key, session

    def _set_cookie(self, request: IRequest, value: str, max_age: int) -> None:
        attrs = [f"{self.cookie_name.decode()}={value}", "Path=/", "HttpOnly", "SameSite=Strict", f"Max-Age={max_age}"]
        if self.secure:
            attrs.append("Secure")
        request.setHeader("Set-Cookie", "; ".join(attrs))

    async def _grants_of(self, approval: Approval) -> list[Grant]:
        if approval.site_token_id is not None:
            return await self.server.store.list_grants(site_token_id=approval.site_token_id)
        return await self.server.store.list_grants(subject=approval.subject)

    async def _show(self, request: IRequest, session: PageSession, notice: Optional[str] = None, status: int = 200) -> bytes:
        grants = await self._grants_of(session.approval)
        return page_response(
            request,
            status,
            lambda nonce: render_grants(nonce, self.action, grants, session.csrf, self.server.config.scopes, notice),
        )

    def _signin(self, request: IRequest, error: Optional[str] = None, status: int = 200) -> bytes:
        return page_response(request, status, lambda nonce: render_signin(nonce, self.action, error))

    async def get(self, request: IRequest) -> bytes:
        self._hsts(request)
        found = self._session(request)
        if found is None:
            return self._signin(request)
        return await self._show(request, found[1])

    async def post(self, request: IRequest) -> bytes:
        self._hsts(request)
        try:
            form = parse_form(request)
        except BadBody:
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
        if action == ["signout"]:
            del self.sessions[key]
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

    async def _do_signin(self, request: IRequest, form: dict[str, list[str]]) -> bytes:
        address = client_address(request)
        limiter = self.server.paste_limiter
        # Spend first, refund on success: see OAuthHTTP._authorize.
        if not limiter.hit(address):
            request.setHeader("Retry-After", "60")
            log.warn(
                "refused site token paste from {address}: rate limited",
                address=loggable(address),
                endpoint="grants",
                smeldr_event="rate_limited",
            )
            return self._signin(request, "Too many failed attempts. Wait a minute and try again.", 429)
        pasted = form.get("site_token", [""])
        approval = await self.server.verify_paste(pasted[0] if len(pasted) == 1 else "")
        if approval is None:
            log.warn(
                "refused site token paste on the connected-apps page from {address}",
                address=loggable(address),
                smeldr_event="paste_refused",
            )
            return self._signin(request, "That site token was not accepted.", 403)
        limiter.refund(address)
        now = self.clock.seconds()
        key = new_secret()
        session = PageSession(approval=approval, csrf=new_secret(), expires_at=now + SESSION_TTL)
        self.sessions[key] = session
        while len(self.sessions) > MAX_SESSIONS:
            self.sessions.popitem(last=False)
        self._set_cookie(request, key, SESSION_TTL)
        return await self._show(request, session)
