"""
Tests for L{smeldr_oauth.service.wiring}: L{mount} with C{whole_site}, the
standalone server's app (its service: L{tests.test_service_standalone}).
"""

from __future__ import annotations

import json
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from smeldr_oauth.oauth.config import Config
from smeldr_oauth.oauth.server import OAuthServer


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
        # An https issuer's every page carries HSTS (web.oauth.hsts).
        self.assertEqual(headers.getRawHeaders("strict-transport-security"), ["max-age=31536000"])

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
