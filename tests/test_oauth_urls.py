"""
Tests for L{smeldr_oauth.oauth.urls}.
"""

from hypothesis import given, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from smeldr_oauth.oauth.urls import (
    canonical_resource,
    redirect_uri_matches,
    valid_redirect_uri,
    with_query,
)


class CanonicalResourceTests(SynchronousTestCase):
    def test_forms_of_the_same_resource(self) -> None:
        """
        Trailing slashes (Python SDK 1.x), case, default ports and query
        strings (ChatGPT) do not make a different resource.
        """
        for value in [
            "https://example.com/mcp",
            "https://example.com/mcp/",
            "HTTPS://EXAMPLE.com/mcp",
            "https://example.com:443/mcp",
            "https://example.com/mcp?x=1",
        ]:
            self.assertEqual(canonical_resource(value), "https://example.com/mcp", value)

    def test_bare_origin(self) -> None:
        self.assertEqual(canonical_resource("https://example.com/"), "https://example.com")
        self.assertEqual(canonical_resource("http://127.0.0.1:8080"), "http://127.0.0.1:8080")

    def test_different(self) -> None:
        self.assertNotEqual(canonical_resource("https://example.com/mcp2"), "https://example.com/mcp")
        self.assertNotEqual(canonical_resource("https://example.com:8443/mcp"), "https://example.com/mcp")

    def test_not_urls(self) -> None:
        for value in [
            "",
            "mcp",
            "/mcp",
            "ftp://example.com/mcp",
            "https://u:p@example.com/mcp",
            "https://exa mple.com",
        ]:
            self.assertIsNone(canonical_resource(value), value)

    @given(st.text(max_size=200))
    def test_never_raises(self, value: str) -> None:
        canonical_resource(value)


class RedirectMatchTests(SynchronousTestCase):
    def test_exact(self) -> None:
        self.assertTrue(
            redirect_uri_matches(
                "https://claude.ai/api/mcp/auth_callback", "https://claude.ai/api/mcp/auth_callback"
            )
        )
        self.assertFalse(
            redirect_uri_matches(
                "https://claude.ai/api/mcp/auth_callback", "https://claude.ai/api/mcp/auth_callback/"
            )
        )
        self.assertFalse(redirect_uri_matches("https://claude.ai/cb", "https://claude.ai:444/cb"))
        self.assertFalse(redirect_uri_matches("https://claude.ai/cb", "https://claude.ai/cb?x=1"))

    def test_loopback_any_port(self) -> None:
        """
        RFC 8252 section 7.3: Claude Code registers portless loopback URIs.
        """
        self.assertTrue(redirect_uri_matches("http://localhost/callback", "http://localhost:53123/callback"))
        self.assertTrue(redirect_uri_matches("http://127.0.0.1/callback", "http://127.0.0.1:9/callback"))
        self.assertTrue(redirect_uri_matches("http://[::1]:1/callback", "http://[::1]:2/callback"))
        self.assertFalse(redirect_uri_matches("http://localhost/callback", "http://localhost:5/other"))
        self.assertFalse(redirect_uri_matches("http://localhost/callback", "http://127.0.0.1:5/callback"))
        self.assertFalse(redirect_uri_matches("https://example.com/cb", "https://example.com:5/cb"))
        self.assertFalse(
            redirect_uri_matches("http://localhost/callback", "http://localhost.evil.com/callback")
        )

    def test_registrable(self) -> None:
        self.assertTrue(valid_redirect_uri("https://claude.ai/api/mcp/auth_callback"))
        self.assertTrue(valid_redirect_uri("http://localhost:3000/callback"))
        self.assertFalse(valid_redirect_uri("http://example.com/callback"))
        self.assertFalse(valid_redirect_uri("https://example.com/cb#frag"))
        self.assertFalse(valid_redirect_uri("javascript:alert(1)"))
        self.assertFalse(valid_redirect_uri("https://user@example.com/cb"))

    def test_with_query_keeps_existing(self) -> None:
        self.assertEqual(
            with_query("https://a.example/cb?x=1", [("code", "c d"), ("state", "s&t")]),
            "https://a.example/cb?x=1&code=c%20d&state=s%26t",
        )
