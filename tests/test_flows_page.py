"""
Tests for L{smeldr_oauth.flows.page}: the operator's page, open to admin
site tokens only.
"""

from __future__ import annotations

import re
from typing import Any, Optional
from urllib.parse import urlencode

from klein import Klein
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from smeldr_oauth.flows import model, patterns
from smeldr_oauth.flows.model import Step
from smeldr_oauth.flows.store import FlowStore
from smeldr_oauth.oauth.config import Config
from smeldr_oauth.oauth.model import Approval
from smeldr_oauth.oauth.server import OAuthServer
from smeldr_oauth.store.memory import MemoryStore
from smeldr_oauth.flows.page import FlowsPage
from smeldr_oauth.web.routes import mount_routes

URL = "http://127.0.0.1:8080/oauth/flows"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def verify(token: str) -> Any:
    return {
        "admin-token": Approval(subject="operator", site_token_id="t-admin"),
        "alice-token": Approval(subject="alice", site_token_id="t-alice"),
    }.get(token)


class FlowsPageTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        config = Config(issuer="http://127.0.0.1:8080", verify_bearer=verify)
        self.server = OAuthServer(config, MemoryStore(self.clock), self.clock)
        self.admins = {"t-admin"}
        self.admin_checks = 0
        self.flows = FlowStore.in_memory(self.clock)
        self.addCleanup(self.flows.close)
        now = self.clock.seconds()
        self.successResultOf(
            self.flows.record(
                [
                    Step(at=now - 900, kind=model.REGISTERED, client_id="<c1>", address="10.0.0.1"),
                    Step(at=now - 890, kind=model.CODE_EXCHANGED, client_id="<c1>", grant_id="g1"),
                ]
            )
        )
        app = Klein()
        mount_routes(app, FlowsPage(self.server, self.clock, self.flows, self.is_admin).routes())
        self.treq = StubTreq(app.resource())

    def is_admin(self, token_id: Optional[str]) -> "Deferred[bool]":
        self.admin_checks += 1
        return succeed(token_id in self.admins)

    def request(self, method: str, body: Optional[dict[str, str]] = None, cookie: str = "", query: str = "") -> tuple[Any, str]:
        headers = dict(FORM, Cookie=cookie) if cookie else dict(FORM)
        d = self.treq.request(
            method, URL + query, data=urlencode(body).encode() if body is not None else None, headers=headers
        )
        response = self.successResultOf(d)
        return response, self.successResultOf(response.text())

    def signin(self, token: str = "admin-token") -> tuple[Any, str]:
        return self.request("POST", {"action": "signin", "site_token": token})

    def session(self) -> tuple[str, str]:
        response, text = self.signin()
        self.assertEqual(response.code, 200)
        cookie = response.headers.getRawHeaders("set-cookie")[0]
        self.assertTrue(cookie.startswith("smeldr_flows="))
        csrf = re.search(r'name="csrf" value="([^"]+)"', text).group(1)  # type: ignore[union-attr]
        return cookie.split(";")[0], csrf

    def test_page_headers(self) -> None:
        response, text = self.request("GET")
        h = response.headers
        self.assertEqual(response.code, 200)
        self.assertIn("frame-ancestors 'none'", h.getRawHeaders("content-security-policy")[0])
        self.assertEqual(h.getRawHeaders("x-frame-options"), ["DENY"])
        self.assertEqual(h.getRawHeaders("cache-control"), ["no-store"])
        self.assertIn("admin site token", text)

    def test_ordinary_token_refused(self) -> None:
        response, text = self.signin("alice-token")
        self.assertEqual(response.code, 403)
        self.assertIn("not an admin token", text)
        self.assertIsNone(response.headers.getRawHeaders("set-cookie"))

    def test_clients_with_their_pattern(self) -> None:
        response, text = self.signin()
        self.assertIn("&lt;c1&gt;", text)
        self.assertIn('href="?client=%3Cc1%3E"', text)
        self.assertIn(patterns.NEVER_USED, text)
        self.assertNotIn("admin-token", text)

    def test_one_client(self) -> None:
        cookie, _ = self.session()
        response, text = self.request("GET", cookie=cookie, query="?client=%3Cc1%3E")
        self.assertEqual(response.code, 200)
        self.assertIn("code exchanged", text)
        self.assertIn("no MCP request with this grant", text)
        self.assertIn(f"docs/troubleshooting.md#{patterns.NEVER_USED}", text)

    def test_grant_ids_told_apart_by_their_end(self) -> None:
        """
        A grant's id starts with its creation time (the same for grants
        made within a minute): the page shows its end, the whole id as the
        title.
        """
        now = self.clock.seconds()
        first, second = "0190aabbccdd" + "1" * 12 + "aaaa0001", "0190aabbccdd" + "2" * 12 + "bbbb0002"
        self.successResultOf(
            self.flows.record(
                [
                    Step(at=now - 10, kind=model.CODE_EXCHANGED, client_id="<c1>", grant_id=first),
                    Step(at=now - 5, kind=model.CODE_EXCHANGED, client_id="<c1>", grant_id=second),
                ]
            )
        )
        cookie, _ = self.session()
        _, text = self.request("GET", cookie=cookie, query="?client=%3Cc1%3E")
        for grant_id in (first, second):
            self.assertIn(f'title="{grant_id}">…{grant_id[-8:]}<', text)

    def test_admin_flag_checked_on_every_view(self) -> None:
        """
        An admin token revoked after the sign-in closes the page, and ends
        the session; the flag is asked once per request, not once per
        layer.
        """
        cookie, _ = self.session()
        self.admin_checks = 0
        response, text = self.request("GET", cookie=cookie)
        self.assertEqual(response.code, 200)
        self.assertEqual(self.admin_checks, 1)
        self.admins.clear()
        response, text = self.request("GET", cookie=cookie)
        self.assertEqual(response.code, 403)
        self.assertEqual(self.admin_checks, 2)
        self.assertNotIn("&lt;c1&gt;", text)
        self.assertIn("Max-Age=0", response.headers.getRawHeaders("set-cookie")[0])
        self.admins.add("t-admin")
        response, text = self.request("GET", cookie=cookie)
        self.assertIn("Paste an admin site token", text)

    def test_no_revoke_action_here(self) -> None:
        cookie, csrf = self.session()
        response, _ = self.request("POST", {"action": "revoke", "grant_id": "g1", "csrf": csrf}, cookie)
        self.assertEqual(response.code, 400)

    def test_signout_needs_csrf(self) -> None:
        cookie, csrf = self.session()
        response, _ = self.request("POST", {"action": "signout", "csrf": "wrong"}, cookie)
        self.assertEqual(response.code, 403)
        response, _ = self.request("POST", {"action": "signout", "csrf": csrf}, cookie)
        self.assertEqual(response.code, 200)
        response, text = self.request("GET", cookie=cookie)
        self.assertIn("Paste an admin site token", text)
