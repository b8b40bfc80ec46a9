"""
Tests for L{smeldr_oauth.service.wiring}: revocations made by another
process on the same database reach a running server's token cache.
"""

from __future__ import annotations

import json
from typing import Any

import attr
from twisted.trial.unittest import SynchronousTestCase

from smeldr_oauth.oauth.config import Config
from smeldr_oauth.oauth.secrets import hash_secret
from smeldr_oauth.oauth.server import OAuthServer
from smeldr_oauth.service.wiring import watch_external_changes
from tests.test_store_memory import RESOURCE, T0, access, make_code, make_grant
from tests.test_store_sqlite import inline_store


class ExternalChangesTests(SynchronousTestCase):
    def test_revocation_by_another_process(self) -> None:
        """
        The admin command (another connection to the same file) revokes a
        grant; within one poll the server stops accepting its token, even
        though the token's answer was cached.
        """
        path = self.mktemp() + ".db"
        server_store = inline_store(self, path)
        admin_store = inline_store(self, path)
        clock = server_store._clock
        clock.advance(T0)
        self.successResultOf(server_store.create_grant(make_grant("g1"), make_code("c1", "g1")))
        token = "the-access-token"
        record = attr.evolve(access("ignored"), token_hash=hash_secret(token), grant_id="g1", resource=RESOURCE)
        self.successResultOf(server_store.add_tokens("g1", record, None))
        config = Config(issuer="https://example.com", verify_bearer=lambda t: False)
        oauth = OAuthServer(config, server_store, clock)
        loop = watch_external_changes(server_store, oauth, clock, interval=1.0)
        self.addCleanup(loop.stop)
        self.assertIsNotNone(self.successResultOf(oauth.verify_access_token(token)))

        self.assertTrue(self.successResultOf(admin_store.revoke_grant("g1", T0 + 1)))
        # Still cached until the next poll...
        self.assertIsNotNone(self.successResultOf(oauth.verify_access_token(token)))
        clock.advance(1.0)
        # ...which sees the outside write and drops the cache.
        self.assertIsNone(self.successResultOf(oauth.verify_access_token(token)))

    def test_own_writes_do_not_clear(self) -> None:
        """
        C{data_version} does not change for the server's own commits, so its
        own traffic does not empty the cache.
        """
        path = self.mktemp() + ".db"
        store = inline_store(self, path)
        first = self.successResultOf(store.data_version())
        self.successResultOf(store.create_grant(make_grant("g1"), make_code("c1", "g1")))
        self.assertEqual(self.successResultOf(store.data_version()), first)


class WholeSiteTests(SynchronousTestCase):
    """
    L{mount} with C{whole_site}: the standalone server's app.  Every path
    and method answers in the project's own format, and an issuer with a
    path serves everything under it.
    """

    def site(self, issuer: str) -> Any:
        from klein import Klein
        from treq.testing import StubTreq
        from twisted.internet.task import Clock

        from smeldr_oauth.mcp import MCPApp
        from smeldr_oauth.service.wiring import mount
        from smeldr_oauth.store.memory import MemoryStore

        clock = Clock()
        store = MemoryStore(clock)
        oauth = OAuthServer(Config(issuer=issuer, verify_bearer=lambda t: False), store, clock)
        tools = MCPApp(name="t", version="1")

        @tools.tool()
        def echo(text: str) -> str:
            return text

        app = Klein()
        mounted = mount(app, oauth, tools, reactor=clock, whole_site=True)
        self.addCleanup(mounted.shutdown)
        return StubTreq(app.resource())

    def get(self, treq: Any, method: str, url: str) -> tuple[int, Any, bytes]:
        response = self.successResultOf(treq.request(method, url, allow_redirects=False))
        return response.code, response.headers, self.successResultOf(treq.content(response))

    def test_unknown_paths_and_methods(self) -> None:
        """
        The answers Werkzeug used to give: C{GET /nope}, C{PUT
        /oauth/grants} and C{PUT /healthz}.
        """
        treq = self.site("https://as.example")
        status, headers, body = self.get(treq, "GET", "https://as.example/nope")
        self.assertEqual(status, 404)
        self.assertEqual(headers.getRawHeaders("content-type"), ["text/html; charset=utf-8"])
        self.assertEqual(headers.getRawHeaders("x-frame-options"), ["DENY"])
        self.assertNotIn(b"werkzeug", body.lower())
        status, headers, body = self.get(treq, "PUT", "https://as.example/oauth/grants")
        self.assertEqual((status, headers.getRawHeaders("allow")), (405, ["GET, HEAD, POST"]))
        self.assertEqual(headers.getRawHeaders("content-type"), ["text/html; charset=utf-8"])
        status, headers, body = self.get(treq, "PUT", "https://as.example/healthz")
        self.assertEqual((status, headers.getRawHeaders("allow")), (405, ["GET, HEAD"]))
        self.assertEqual(json.loads(body)["error"], "invalid_request")
        status, headers, body = self.get(treq, "GET", "https://as.example/oauth/nope")
        self.assertEqual((status, json.loads(body)["error"]), (404, "not_found"))
        status, headers, body = self.get(treq, "GET", "https://as.example/mcp/nope")
        self.assertEqual((status, json.loads(body)["error"]), (404, "not_found"))

    def test_landing(self) -> None:
        treq = self.site("https://as.example")
        status, headers, body = self.get(treq, "GET", "https://as.example/")
        self.assertEqual(status, 200)
        self.assertIn(b"https://as.example/mcp", body)
        self.assertIn(b"https://as.example/oauth/grants", body)
        self.assertEqual(headers.getRawHeaders("x-frame-options"), ["DENY"])

    def test_issuer_with_path(self) -> None:
        """
        Issuer C{https://as.example/auth}: metadata at the RFC 8414
        section 3.1 URL (and the root one), the MCP endpoint at
        C{/auth/mcp} naming its RFC 9728 document at the origin, the
        landing page where C{service_documentation} points.
        """
        treq = self.site("https://as.example/auth")
        for url in (
            "https://as.example/.well-known/oauth-authorization-server/auth",
            "https://as.example/.well-known/oauth-authorization-server",
        ):
            status, _, body = self.get(treq, "GET", url)
            self.assertEqual((status, json.loads(body)["issuer"]), (200, "https://as.example/auth"))
        meta = json.loads(body)
        status, _, _ = self.get(treq, "GET", meta["service_documentation"])
        self.assertEqual(status, 200)
        status, headers, _ = self.get(treq, "POST", "https://as.example/auth/mcp")
        self.assertEqual(status, 401)
        [challenge] = headers.getRawHeaders("www-authenticate")
        expected = "https://as.example/.well-known/oauth-protected-resource/auth/mcp"
        self.assertIn(f'resource_metadata="{expected}"', challenge)
        status, _, body = self.get(treq, "GET", expected)
        self.assertEqual((status, json.loads(body)["resource"]), (200, "https://as.example/auth/mcp"))
        status, _, body = self.get(treq, "GET", "https://as.example/auth/oauth/nope")
        self.assertEqual((status, json.loads(body)["error"]), (404, "not_found"))
