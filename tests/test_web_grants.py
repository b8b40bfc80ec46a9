"""
Tests for L{smeldr_oauth.web.grants}: the connected-apps page.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlencode

from klein import Klein
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent
from treq.client import HTTPClient

from smeldr_oauth.oauth.config import Config
from smeldr_oauth.web.grants import SESSION_TTL, GrantsPage
from smeldr_oauth.web.routes import mount_routes
from smeldr_oauth.oauth.model import Approval, AuthorizationCode, Grant
from smeldr_oauth.oauth.server import OAuthServer
from smeldr_oauth.store.memory import MemoryStore

URL = "http://127.0.0.1:8080/oauth/grants"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def verify(token: str) -> Any:
    return {
        "alice-token": Approval(subject="alice", site_token_id="t-alice"),
        "bob-token": Approval(subject="bob", site_token_id="t-bob"),
    }.get(token)


class GrantsPageTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.store = MemoryStore(self.clock)
        config = Config(issuer="http://127.0.0.1:8080", verify_bearer=verify)
        self.server = OAuthServer(config, self.store, self.clock)
        self.revoked: list[str] = []
        self.server.add_revocation_observer(self.revoked.append)
        app = Klein()
        self.page = GrantsPage(self.server, self.clock)
        mount_routes(app, self.page.routes())
        self.resource = app.resource()
        self.treq = StubTreq(self.resource)
        for name, token_id in [("alice", "t-alice"), ("bob", "t-bob")]:
            grant = Grant(
                grant_id=f"g-{name}",
                client_id="https://claude.ai/oauth/client.json",
                subject=name,
                scopes=("read", "offline_access"),
                resource="http://127.0.0.1:8080/mcp",
                created_at=self.clock.seconds(),
                site_token_id=token_id,
                client_name=f"<Claude for {name}>",
            )
            code = AuthorizationCode(
                code_hash=f"h-{name}",
                grant_id=grant.grant_id,
                client_id=grant.client_id,
                redirect_uri="https://claude.ai/api/mcp/auth_callback",
                code_challenge="x" * 43,
                scopes=grant.scopes,
                resource=grant.resource,
                expires_at=self.clock.seconds() + 300,
                issue_refresh=True,
            )
            self.successResultOf(self.store.create_grant(grant, code))

    def request(
        self, method: str, body: dict[str, str] | None = None, cookie: str | None = None
    ) -> tuple[Any, str]:
        headers = dict(FORM)
        if cookie:
            headers["Cookie"] = cookie
        d: Deferred[Any] = self.treq.request(
            method, URL, data=urlencode(body).encode() if body is not None else None, headers=headers
        )
        response = self.successResultOf(d)
        text = self.successResultOf(response.text())
        return response, text

    def signin(self, token: str = "alice-token") -> tuple[str, str, str]:
        response, text = self.request("POST", {"action": "signin", "site_token": token})
        self.assertEqual(response.code, 200)
        cookie = response.headers.getRawHeaders("set-cookie")[0]
        self.assertIn("HttpOnly", cookie)
        self.assertIn("SameSite=Strict", cookie)
        csrf = re.search(r'name="csrf" value="([^"]+)"', text).group(1)  # type: ignore[union-attr]
        return cookie.split(";")[0], csrf, text

    def test_signin_page_headers(self) -> None:
        response, text = self.request("GET")
        self.assertEqual(response.code, 200)
        h = response.headers
        self.assertIn("frame-ancestors 'none'", h.getRawHeaders("content-security-policy")[0])
        self.assertEqual(h.getRawHeaders("x-frame-options"), ["DENY"])
        self.assertEqual(h.getRawHeaders("cache-control"), ["no-store"])
        self.assertEqual(h.getRawHeaders("referrer-policy"), ["no-referrer"])
        self.assertIn('<label for="site_token">', text)
        self.assertNotIn("<script", text)

    def test_shows_only_own_grants_escaped(self) -> None:
        _, _, text = self.signin()
        self.assertIn("&lt;Claude for alice&gt;", text)
        self.assertNotIn("Claude for bob", text)
        self.assertIn("claude.ai", text)
        self.assertNotIn("alice-token", text)

    def test_wrong_token(self) -> None:
        response, text = self.request("POST", {"action": "signin", "site_token": "nope"})
        self.assertEqual(response.code, 403)
        self.assertIsNone(response.headers.getRawHeaders("set-cookie"))

    def test_revoke(self) -> None:
        cookie, csrf, _ = self.signin()
        response, text = self.request(
            "POST", {"action": "revoke", "grant_id": "g-alice", "csrf": csrf}, cookie
        )
        self.assertEqual(response.code, 200)
        self.assertIn("Disconnected", text)
        self.assertEqual(self.revoked, ["g-alice"])
        self.assertEqual([g.grant_id for g in self.successResultOf(self.store.list_grants())], ["g-bob"])

    def test_revoke_needs_csrf(self) -> None:
        cookie, csrf, _ = self.signin()
        response, _ = self.request(
            "POST", {"action": "revoke", "grant_id": "g-alice", "csrf": "forged"}, cookie
        )
        self.assertEqual(response.code, 403)
        response, _ = self.request("POST", {"action": "revoke", "grant_id": "g-alice"}, cookie)
        self.assertEqual(response.code, 403)
        self.assertEqual(self.revoked, [])

    def test_revoke_needs_session(self) -> None:
        _, csrf, _ = self.signin()
        # A fresh client: StubTreq keeps cookies like a browser would.
        self.treq = StubTreq(self.resource)
        response, _ = self.request("POST", {"action": "revoke", "grant_id": "g-alice", "csrf": csrf})
        self.assertEqual(response.code, 403)
        self.assertEqual(self.revoked, [])

    def test_cannot_revoke_anothers_grant(self) -> None:
        cookie, csrf, _ = self.signin()
        response, _ = self.request("POST", {"action": "revoke", "grant_id": "g-bob", "csrf": csrf}, cookie)
        self.assertEqual(response.code, 404)
        self.assertEqual(self.revoked, [])

    def test_session_expires(self) -> None:
        cookie, csrf, _ = self.signin()
        self.clock.advance(SESSION_TTL + 1)
        response, _ = self.request("POST", {"action": "revoke", "grant_id": "g-alice", "csrf": csrf}, cookie)
        self.assertEqual(response.code, 403)

    def test_signout(self) -> None:
        cookie, csrf, _ = self.signin()
        response, _ = self.request("POST", {"action": "signout", "csrf": csrf}, cookie)
        self.assertEqual(response.code, 200)
        response, text = self.request("GET", cookie=cookie)
        self.assertIn('name="site_token"', text)

    def test_bad_bodies(self) -> None:
        cookie, csrf, _ = self.signin()
        response = self.successResultOf(
            self.treq.post(URL, data=b"\xff\xfe=1", headers={**FORM, "Cookie": cookie})
        )
        self.assertEqual(response.code, 400)
        response = self.successResultOf(
            self.treq.post(URL, data=b"{}", headers={"Content-Type": "application/json"})
        )
        self.assertEqual(response.code, 400)
        response, _ = self.request("POST", {"action": "dance", "csrf": csrf}, cookie)
        self.assertEqual(response.code, 400)
        self.assertEqual(self.revoked, [])

    def test_paste_rate_limited(self) -> None:
        for _ in range(self.server.config.paste_failures_per_minute):
            self.request("POST", {"action": "signin", "site_token": "nope"})
        response, _ = self.request("POST", {"action": "signin", "site_token": "alice-token"})
        self.assertEqual(response.code, 429)
        self.clock.advance(60)
        response, _ = self.request("POST", {"action": "signin", "site_token": "alice-token"})
        self.assertEqual(response.code, 200)


class RevokedSiteTokenTests(GrantsPageTests):
    """
    With the site's tokens known (C{site_token_live}), a page session ends
    with its token.
    """

    def setUp(self) -> None:
        super().setUp()
        self.live = {"t-alice", "t-bob"}
        self.page.site_token_live = lambda token_id: succeed(token_id in self.live)

    def test_session_ends_with_its_token(self) -> None:
        cookie, csrf, _ = self.signin()
        self.live.discard("t-alice")
        response, text = self.request("GET", cookie=cookie)
        self.assertEqual(response.code, 403)
        self.assertIn("That site token was revoked", text)
        self.assertNotIn("Claude for alice", text)
        self.assertIn("Max-Age=0", response.headers.getRawHeaders("set-cookie")[0])
        # Nor can its forms act, and the session is gone for good.
        self.live.add("t-alice")
        response, _ = self.request("POST", {"action": "revoke", "grant_id": "g-alice", "csrf": csrf}, cookie)
        self.assertEqual(response.code, 403)
        self.assertEqual(self.revoked, [])

    def test_form_refused_after_revocation(self) -> None:
        cookie, csrf, _ = self.signin()
        self.live.discard("t-alice")
        response, text = self.request("POST", {"action": "revoke", "grant_id": "g-alice", "csrf": csrf}, cookie)
        self.assertEqual(response.code, 403)
        self.assertIn("That site token was revoked", text)

    def test_revoked_token_cannot_sign_in(self) -> None:
        self.live.discard("t-bob")
        response, text = self.request("POST", {"action": "signin", "site_token": "bob-token"})
        self.assertEqual(response.code, 403)
        self.assertIsNone(response.headers.getRawHeaders("set-cookie"))


class GrantsPageLimitTests(SynchronousTestCase):
    """
    The connected-apps sign-in shares the paste limiter, spends before the
    slow check and refunds on success; over https it sends HSTS.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.pending: list[Deferred[Any]] = []

        def slow(token: str) -> Deferred[Any]:
            d: Deferred[Any] = Deferred()
            self.pending.append(d)
            return d

        config = Config(issuer="https://as.example", verify_bearer=slow, paste_failures_per_minute=5)
        self.server = OAuthServer(config, MemoryStore(self.clock), self.clock)
        app = Klein()
        mount_routes(app, GrantsPage(self.server, self.clock).routes())
        self.treq = StubTreq(app.resource())

    def signin(self) -> Deferred[Any]:
        return self.treq.request(
            "POST",
            "https://as.example/oauth/grants",
            data=urlencode({"action": "signin", "site_token": "x"}).encode(),
            headers=FORM,
        )

    def test_parallel_pastes(self) -> None:
        started = [self.signin() for _ in range(20)]
        self.assertEqual(len(self.pending), 5)
        for d in self.pending:
            d.callback(None)
        self.treq.flush()
        codes = [self.successResultOf(d).code for d in started]
        self.assertEqual((codes.count(403), codes.count(429)), (5, 15))

    def test_success_refunded(self) -> None:
        for _ in range(12):
            d = self.signin()
            self.pending.pop().callback(Approval(subject="alice"))
            self.treq.flush()
            self.assertEqual(self.successResultOf(d).code, 200)

    def test_hsts(self) -> None:
        for method in ("GET", "POST"):
            response = self.successResultOf(
                self.treq.request(method, "https://as.example/oauth/grants", data=b"", headers=FORM)
            )
            self.assertEqual(
                response.headers.getRawHeaders("strict-transport-security"), ["max-age=31536000"]
            )


class RevokedSiteTokenOverSocketTests(TestCase):
    """
    C{twist smeldr-oauth} over a real socket: revoking a site token with
    the admin command ends the connected-apps session it opened.
    """

    timeout = 60

    async def test_revokedTokenEndsTheSession(self) -> None:
        from twisted.internet import reactor

        from tests import e2e

        server = await e2e.startServer(self, reactor)
        token = await e2e.createSiteToken(reactor, server, name="revoked-later")
        http = HTTPClient(Agent(reactor))
        url = server.issuer + "/oauth/grants"
        response = await http.post(url, data={"action": "signin", "site_token": token})
        self.assertEqual(response.code, 200, server.annotate("sign-in refused"))
        cookie = response.headers.getRawHeaders("set-cookie")[0].split(";")[0]
        await response.content()
        response = await http.get(url, headers={"Cookie": cookie})
        self.assertIn("Connected apps", await response.text())
        out, err, code = await e2e.runProgram(reactor, [*e2e.adminCommand(), "token", "list", "--site-db", server.siteDB])
        [token_id] = [line.split()[0] for line in out.splitlines() if line.rstrip().endswith("revoked-later")]
        out, err, code = await e2e.runProgram(
            reactor,
            [*e2e.adminCommand(), "token", "revoke", token_id, "--site-db", server.siteDB, "--oauth-db", server.oauthDB],
        )
        self.assertEqual(code, 0, err)
        response = await http.get(url, headers={"Cookie": cookie})
        self.assertEqual(response.code, 403)
        self.assertIn("That site token was revoked", await response.text())
