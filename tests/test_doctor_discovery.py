"""
Tests for L{smeldr_oauth.doctor.discovery}: the URLs clients derive, and
the resource comparison the SDKs make (checked against the Python SDK's own
function where it is installed, and against the TypeScript SDK's rule on
crafted cases).
"""

from __future__ import annotations

from hypothesis import given
from mcp.shared.auth_utils import check_resource_allowed
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from smeldr_oauth.doctor.discovery import (
    authorization_server_metadata_url,
    compare_resource,
    openid_configuration_url,
    parse_mcp_url,
    protected_resource_metadata_urls,
)


def url(text: str):  # type: ignore[no-untyped-def]
    parsed, problem = parse_mcp_url(text)
    assert parsed is not None, problem
    return parsed


class ParseTests(SynchronousTestCase):
    def test_good(self) -> None:
        for text in ("https://example.com/mcp", "http://127.0.0.1:8080/mcp", "http://localhost/mcp", "https://EXAMPLE.com"):
            parsed, problem = parse_mcp_url(text)
            self.assertIsNotNone(parsed, text)
            self.assertIsNone(problem)

    def test_refused(self) -> None:
        cases = {
            "example.com/mcp": "not an absolute URL",
            "ftp://example.com/mcp": "not an http(s) URL",
            "https://example.com/mcp#x": "fragment",
            "https://user:pw@example.com/mcp": "user name or password",
            "http://example.com/mcp": "plain http",
            "": "not an absolute URL",
        }
        for text, words in cases.items():
            parsed, problem = parse_mcp_url(text)
            self.assertIsNone(parsed, text)
            assert problem is not None
            self.assertIn(words, problem, text)


class DerivedURLTests(SynchronousTestCase):
    def test_pathInsertedThenRoot(self) -> None:
        self.assertEqual(
            protected_resource_metadata_urls(url("https://Example.com:443/mcp")),
            [
                ("prm-path", "https://example.com/.well-known/oauth-protected-resource/mcp"),
                ("prm-root", "https://example.com/.well-known/oauth-protected-resource"),
            ],
        )

    def test_trailingSlashStripped(self) -> None:
        """
        As the TypeScript SDK does (the Python SDK keeps the slash and
        falls back to the root when that answers 404).
        """
        self.assertEqual(
            protected_resource_metadata_urls(url("https://example.com:8443/a/mcp/"))[0][1],
            "https://example.com:8443/.well-known/oauth-protected-resource/a/mcp",
        )

    def test_noPathRootOnly(self) -> None:
        for text in ("https://example.com", "https://example.com/"):
            self.assertEqual(
                protected_resource_metadata_urls(url(text)),
                [("prm-root", "https://example.com/.well-known/oauth-protected-resource")],
            )

    def test_authorizationServerMetadata(self) -> None:
        self.assertEqual(
            authorization_server_metadata_url("https://example.com"),
            "https://example.com/.well-known/oauth-authorization-server",
        )
        self.assertEqual(
            authorization_server_metadata_url("https://example.com/tenant/"),
            "https://example.com/.well-known/oauth-authorization-server/tenant",
        )
        self.assertIsNone(authorization_server_metadata_url("not a url"))

    def test_openid(self) -> None:
        self.assertEqual(
            openid_configuration_url(url("https://example.com/mcp")),
            "https://example.com/.well-known/openid-configuration",
        )


class CompareResourceTests(SynchronousTestCase):
    def test_exact(self) -> None:
        match = compare_resource("https://example.com/mcp", "https://EXAMPLE.com:443/mcp")
        self.assertEqual((match.accepted, match.exact), (True, True))

    def test_urlTrailingSlashAccepted(self) -> None:
        match = compare_resource("https://example.com/mcp/", "https://example.com/mcp")
        self.assertEqual((match.accepted, match.exact), (True, True))

    def test_resourceTrailingSlashRefused(self) -> None:
        """
        The TypeScript SDK refuses a URL path shorter than the resource's.
        """
        match = compare_resource("https://example.com/mcp", "https://example.com/mcp/")
        self.assertFalse(match.accepted)
        assert match.problem is not None
        self.assertIn("ends with a slash", match.problem)

    def test_prefix(self) -> None:
        match = compare_resource("https://example.com/mcp", "https://example.com")
        self.assertEqual((match.accepted, match.exact), (True, False))

    def test_notPrefix(self) -> None:
        for configured in ("https://example.com/mc", "https://example.com/api", "https://example.com/mcp/x"):
            match = compare_resource("https://example.com/mcp", configured)
            self.assertFalse(match.accepted, configured)
            assert match.problem is not None
            self.assertIn("not a prefix", match.problem)

    def test_otherOrigin(self) -> None:
        for configured in ("http://example.com/mcp", "https://example.com:8443/mcp", "https://www.example.com/mcp"):
            match = compare_resource("https://example.com/mcp", configured)
            self.assertFalse(match.accepted, configured)
            assert match.problem is not None
            self.assertIn("another origin", match.problem)

    def test_notAURL(self) -> None:
        match = compare_resource("https://example.com/mcp", "/mcp")
        self.assertFalse(match.accepted)

    @given(
        st.sampled_from(["https://example.com", "https://example.com:8443", "http://127.0.0.1:9"]),
        st.lists(st.sampled_from(["mcp", "a", "mcp2", ""]), max_size=3),
        st.lists(st.sampled_from(["mcp", "a", "mcp2", ""]), max_size=3),
        st.booleans(),
    )
    def test_neverLooserThanPythonSDK(self, base: str, want: list[str], have: list[str], slash: bool) -> None:
        """
        Whatever the doctor accepts, the Python SDK accepts too (the doctor
        is stricter only where the TypeScript SDK is).
        """
        requested = base + "".join("/" + p for p in want)
        configured = base + "".join("/" + p for p in have) + ("/" if slash else "")
        match = compare_resource(requested, configured)
        if match.accepted:
            self.assertTrue(check_resource_allowed(requested, configured), (requested, configured))
        if check_resource_allowed(requested, configured) and not match.accepted:
            # Only the TypeScript SDK's shorter-path rule may refuse more.
            self.assertLess(len(requested.split("://", 1)[1]), len(configured.split("://", 1)[1]))
