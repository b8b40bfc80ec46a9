"""
Tests for L{smeldr_oauth.oauth.urls}.
"""

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from smeldr_oauth.oauth.urls import (
    InvalidRedirectURI,
    canonical_resource,
    check_redirect_uri,
    is_host,
    is_host_name,
    is_loopback_host,
    parse,
    redirect_uri_matches,
    valid_redirect_uri,
    _canonical_resource,
    _hyperlink_with_query,
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

    @given(st.one_of(st.text(max_size=60), st.sampled_from(["https://A.example:443/mcp/", "http://[::1]:8/x?q"])))
    def test_remembered_answer_is_the_answer(self, value: str) -> None:
        """
        Asked again, the same answer as computed afresh.
        """
        first = canonical_resource(value)
        self.assertEqual(canonical_resource(value), first)
        self.assertEqual(_canonical_resource.__wrapped__(value), first)

    def test_not_text(self) -> None:
        for value in (None, 7, b"https://a.example/mcp", ["https://a.example/mcp"]):
            self.assertIsNone(canonical_resource(value), value)  # type: ignore[arg-type]


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

    def test_with_query_shapes(self) -> None:
        """
        Bases with no query, an empty one, a trailing C{&}, a fragment, no
        path; no parameters; empty names and values.
        """
        cases = [
            ("https://a.example/cb", [("code", "c")], "https://a.example/cb?code=c"),
            ("https://a.example/cb?", [("code", "c")], "https://a.example/cb?code=c"),
            ("https://a.example/cb?x", [("code", "c")], "https://a.example/cb?x&code=c"),
            ("https://a.example/cb?x=1&", [("code", "c")], "https://a.example/cb?x=1&&code=c"),
            ("https://a.example", [("code", "c")], "https://a.example/?code=c"),
            ("https://a.example/cb#f", [("code", "c")], "https://a.example/cb?code=c#f"),
            ("http://127.0.0.1:8080/cb", [("", ""), ("state", "")], "http://127.0.0.1:8080/cb?=&state="),
            ("https://a.example/cb?x=1", [], "https://a.example/cb?x=1"),
            ("cursor://anysphere.cursor-retrieval/oauth/cb", [("iss", "https://as.example/auth")],
             "cursor://anysphere.cursor-retrieval/oauth/cb?iss=https%3A%2F%2Fas.example%2Fauth"),
        ]
        for base, params, expected in cases:
            self.assertEqual(with_query(base, params), expected, base)
            self.assertEqual(_hyperlink_with_query(base, params), expected, base)

    @settings(max_examples=300)
    @given(
        st.one_of(
            st.sampled_from(
                [
                    "https://claude.ai/api/mcp/auth_callback",
                    "https://chatgpt.com/connector_platform_oauth_redirect",
                    "http://localhost:6274/oauth/callback/debug",
                    "http://127.0.0.1:33418/callback?x=1&y",
                    "https://a.example/cb?q=%2F%20+x",
                    "https://A.EXAMPLE:443/p%61th/",
                    "https://user@a.example/cb",
                ]
            ),
            st.builds(
                "{}://{}{}{}{}".format,
                st.sampled_from(["https", "http", "cursor", "com.example.app"]),
                st.sampled_from(["a.example", "127.0.0.1:3000", "[::1]:8080", "xn--bcher-kva.example", "b\u00fccher.example"]),
                st.text(alphabet="/abc%20-._~!$'()*+,;=:@\u00e9", max_size=12),
                st.one_of(st.just(""), st.text(alphabet="?&=abc%2B+ /\u00e9", max_size=12).map(lambda q: "?" + q)),
                st.one_of(st.just(""), st.text(alphabet="#abc", max_size=4).map(lambda f: "#" + f)),
            ),
        ),
        st.lists(st.tuples(st.text(max_size=10), st.text(max_size=30)), max_size=4),
    )
    def test_with_query_as_hyperlink(self, base: str, params: list[tuple[str, str]]) -> None:
        """
        The string-built answer is hyperlink's, byte for byte, or both
        refuse the base alike.
        """
        try:
            expected: object = _hyperlink_with_query(base, params)
        except Exception as e:
            expected = type(e)
        try:
            answer: object = with_query(base, params)
        except Exception as e:
            answer = type(e)
        self.assertEqual(answer, expected, (base, params))


BAD_PORTS = [
    "99999",
    "65536",
    "-1",
    "0",
    "00000",
    "+1234",
    "\uff11\uff12\uff13\uff14",  # fullwidth digits
    "\u0661\u0662\u0663\u0664",  # Arabic-Indic digits
    "1_000",
    " 80",
    "123456",
]


class PortTests(SynchronousTestCase):
    """
    A port must be 1 to 5 ASCII digits naming 1 to 65535: hyperlink (via
    C{int()}) takes much more, and loopback redirect URIs match on any port.
    """

    def test_parse_refuses_bad_ports(self) -> None:
        for port in BAD_PORTS:
            for host in ("127.0.0.1", "[::1]", "a.example", "u:p@a.example"):
                self.assertIsNone(parse(f"https://{host}:{port}/cb"), (host, port))

    def test_parse_accepts_good_ports(self) -> None:
        for port, value in (("1", 1), ("80", 80), ("8080", 8080), ("65535", 65535), ("0443", 443)):
            url = parse(f"http://127.0.0.1:{port}/cb")
            assert url is not None, port
            self.assertEqual(url.port, value)
        self.assertIsNotNone(parse("http://[::1]:9/cb"))
        self.assertIsNotNone(parse("https://a.example/cb?x=a:b@c:99999"))

    def test_loopback_match_refuses_bad_ports(self) -> None:
        for registered in ("http://127.0.0.1/cb", "http://localhost/cb", "http://[::1]/cb"):
            host = registered.split("/")[2]
            for port in BAD_PORTS:
                self.assertFalse(
                    redirect_uri_matches(registered, f"http://{host}:{port}/cb"), (registered, port)
                )
            self.assertTrue(redirect_uri_matches(registered, f"http://{host}:51234/cb"))

    def test_exact_match_with_bad_port_refused(self) -> None:
        """
        Even byte-for-byte equal URIs do not match when the port is bad: a
        registration stored before ports were checked stops working.
        """
        self.assertFalse(redirect_uri_matches("http://127.0.0.1:0/cb", "http://127.0.0.1:0/cb"))
        self.assertTrue(redirect_uri_matches("https://a.example:8443/cb", "https://a.example:8443/cb"))

    def test_registration_refuses_bad_ports(self) -> None:
        for port in BAD_PORTS:
            self.assertFalse(valid_redirect_uri(f"https://a.example:{port}/cb"), port)
            self.assertFalse(valid_redirect_uri(f"http://127.0.0.1:{port}/cb"), port)
        self.assertTrue(valid_redirect_uri("https://a.example:8443/cb"))

    @given(
        st.text(
            alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="@/?#[]"),
            min_size=1,
            max_size=8,
        )
    )
    def test_any_port_text(self, port: str) -> None:
        """
        Whatever follows the colon, a URL parses only if it is a valid
        ASCII port, and then the port is that number.
        """
        url = parse(f"http://127.0.0.1:{port}/cb")
        plain = port.isascii() and port.isdigit() and 1 <= int(port) <= 65535
        if url is not None:
            self.assertTrue(plain, repr(port))
            self.assertEqual(url.port, int(port))
        if plain:
            self.assertIsNotNone(url)


#: Redirect URIs and whether a client may have them, by the one rule.
REDIRECT_CASES = [
    ("https://claude.ai/api/mcp/auth_callback", True),
    ("https://chatgpt.com/connector/oauth/abc", True),
    ("https://Client.Example:8443/cb?x=1", True),
    ("http://localhost/callback", True),
    ("http://localhost:3000/oauth/callback", True),
    ("http://127.0.0.1/callback", True),
    ("http://127.0.0.1:6276/oauth/callback", True),
    ("http://[::1]:8080/cb", True),
    # RFC 8252 and OAuth 2.1 name 127.0.0.1 and [::1]; other loopback
    # addresses are not loopback redirect URIs here.
    ("http://127.0.0.2/cb", False),
    ("http://127.1/cb", False),
    ("http://[::ffff:127.0.0.1]/cb", False),
    ("http://localhost.example.com/cb", False),
    ("http://example.com/cb", False),
    ("https://example.com/cb#frag", False),
    ("https://user@example.com/cb", False),
    ("https://exa_mple.com/cb", False),
    ("https://example.com./cb", False),
    ("https://example.123/cb", False),
    ("https://exa mple.com/cb", False),
    ("https://ex\u00e4mple.com/cb", False),
    ("HTTPS://example.com/cb", False),
    ("com.example.app:/cb", False),
    ("javascript:alert(1)", False),
    ("//example.com/cb", False),
    ("https:example.com/cb", False),
]


class OneRedirectRuleTests(SynchronousTestCase):
    """
    Dynamic registration and metadata documents accept exactly the same
    redirect URIs, by L{check_redirect_uri}.
    """

    def registered(self, uri: object) -> bool:
        from twisted.internet.defer import Deferred
        from twisted.internet.task import Clock

        from smeldr_oauth.oauth.config import Config
        from smeldr_oauth.oauth.errors import OAuthError
        from smeldr_oauth.oauth.ratelimit import RateLimiter
        from smeldr_oauth.oauth.registration import Registration
        from smeldr_oauth.store.memory import MemoryStore

        clock = Clock()
        config = Config(issuer="https://as.example", verify_bearer=lambda t: None)
        registration = Registration(config, MemoryStore(clock), clock, RateLimiter(clock, 1))
        results: list[object] = []
        Deferred.fromCoroutine(registration.register({"redirect_uris": [uri]})).addBoth(results.append)
        [result] = results
        if isinstance(result, dict):
            return True
        assert isinstance(getattr(result, "value", None), OAuthError), result
        return False

    def published(self, uri: object) -> bool:
        import json

        from smeldr_oauth.oauth.cimd import CIMDError, parse_document

        client_id = "https://app.example/client.json"
        body = json.dumps({"client_id": client_id, "redirect_uris": [uri]}).encode()
        try:
            parse_document(client_id, body)
        except CIMDError:
            return False
        return True

    def test_cases(self) -> None:
        for uri, allowed in REDIRECT_CASES:
            self.assertEqual(valid_redirect_uri(uri), allowed, uri)
            self.assertEqual(self.registered(uri), allowed, uri)
            self.assertEqual(self.published(uri), allowed, uri)

    def test_reason(self) -> None:
        with self.assertRaises(InvalidRedirectURI) as caught:
            check_redirect_uri("http://127.0.0.2/cb")
        self.assertIn("localhost, 127.0.0.1 or [::1]", str(caught.exception))

    def test_development(self) -> None:
        """
        C{allow_insecure} (C{--dev}) lets http through on any host, and
        nothing else.
        """
        self.assertEqual(check_redirect_uri("http://127.0.0.2/cb", allow_insecure=True), "http://127.0.0.2/cb")
        self.assertFalse(valid_redirect_uri("http://a.example/cb#f", allow_insecure=True))

    @given(st.one_of(st.text(max_size=60), st.sampled_from([u for u, _ in REDIRECT_CASES])))
    def test_same_answer(self, uri: str) -> None:
        self.assertEqual(self.registered(uri), self.published(uri), uri)


class HostRuleTests(SynchronousTestCase):
    def test_host_names(self) -> None:
        for host in ("a.example", "A-B.example", "xn--bcher-kva.example", "localhost", "a" * 63 + ".example"):
            self.assertTrue(is_host_name(host), host)
        for host in ("", "a..b", "-a.example", "a-.example", "a_b.example", "a.example.", "1.2.3.4", "a.0x7f",
                     "a" * 64 + ".example", "\u00e4.example", "a.example;x"):
            self.assertFalse(is_host_name(host), host)

    def test_hosts(self) -> None:
        for host in ("a.example", "127.0.0.1", "::1", "[::1]"):
            self.assertTrue(is_host(host), host)
        self.assertFalse(is_host("fe80::1%eth0"))

    def test_loopback(self) -> None:
        for host in ("localhost", "LOCALHOST", "127.0.0.1", "::1", "[::1]"):
            self.assertTrue(is_loopback_host(host), host)
        for host in ("127.0.0.2", "localhost.example", "0.0.0.0", "::ffff:127.0.0.1"):
            self.assertFalse(is_loopback_host(host), host)
