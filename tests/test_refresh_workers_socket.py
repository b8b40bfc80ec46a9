"""
Two workers on one PostgreSQL database, over real sockets: each its own
L{OAuthServer} and store on its own port, as C{--workers 2} runs them,
with a clock of its own, so that which request read its clock first is
the test's to say.
"""

from __future__ import annotations

import json
from typing import Any, Optional
from urllib.parse import parse_qs, urlencode

from klein import Klein

from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from smeldr_oauth.oauth.config import Config
from smeldr_oauth.oauth.model import Approval
from smeldr_oauth.oauth.server import OAuthServer
from smeldr_oauth.store import open_store
from smeldr_oauth.web.authorize import AuthorizeRoutes
from smeldr_oauth.web.oauth import OAuthRoutes
from smeldr_oauth.web.routes import mount_routes
from smeldr_oauth.web.site import SmeldrSite
from tests import postgres
from tests.oauth_socket import OAuthSocketMixin, approval_form

SITE_TOKEN = "workers-site-token-0123456789abcdef"
FORM = {"Content-Type": ["application/x-www-form-urlencoded"]}
#: When the first worker's clock reads.
T0 = 1_700_000_000.0


def verify_bearer(pasted: str) -> Optional[Approval]:
    return Approval(subject="alice", site_token_id="st-workers") if pasted == SITE_TOKEN else None


class ParallelRefreshAcrossWorkersTests(OAuthSocketMixin, TestCase):
    timeout = 60

    async def worker(self, app: Klein, url: str, seconds: float) -> Clock:
        """An OAuth server on C{app} with its own store of C{url}; its clock at C{seconds}."""
        store = open_store(url, reactor, threads=1)
        self.addCleanup(store.close)
        await store.ready
        clock = Clock()
        clock.advance(seconds)
        server = OAuthServer(Config(issuer=self.issuer, verify_bearer=verify_bearer), store, clock)
        mount_routes(app, OAuthRoutes(server).routes() + AuthorizeRoutes(server).routes())
        return clock

    async def refresh(self, origin: str, token: str, client_id: str) -> tuple[int, dict[str, Any]]:
        body = urlencode({"grant_type": "refresh_token", "refresh_token": token, "client_id": client_id})
        response, answer = await self.call("POST", origin + "/oauth/token", data=body.encode(), headers=FORM)
        return response.code, json.loads(answer)

    async def test_started_first_answered_second(self) -> None:
        """
        Two parallel refreshes of one token: the request that read its
        clock first (this worker's) reaches the database after its
        sibling, on the other worker, has spent the token.  It is the
        grace window's race, a sibling token, not reuse: that revoked
        the grant (over a real socket on PostgreSQL with C{--workers 2},
        30 parallel refreshes of one token revoked 4 grants of 5).
        """
        url = postgres.database_url(self)
        first = await self.serve()
        await self.worker(first, url, T0)
        second = Klein()
        port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(SmeldrSite(second.resource()))
        self.addCleanup(port.stopListening)
        other = f"http://127.0.0.1:{port.getHost().port}"
        await self.worker(second, url, T0 + 0.005)
        issued = await self.token(self.issuer + "/mcp", "read offline_access", SITE_TOKEN)
        client_id = parse_qs(approval_form(self.page, SITE_TOKEN)[1].decode())["client_id"][0]
        code, winner = await self.refresh(other, issued["refresh_token"], client_id)
        self.assertEqual(code, 200, winner)
        code, loser = await self.refresh(self.origin, issued["refresh_token"], client_id)
        self.assertEqual(code, 200, loser)
        self.assertNotEqual(loser["refresh_token"], winner["refresh_token"])
        # The grant lives on: the winner's branch rotates.
        code, answer = await self.refresh(other, winner["refresh_token"], client_id)
        self.assertEqual(code, 200, answer)
