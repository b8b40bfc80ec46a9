"""
Tests for L{smeldr_oauth.oauth.cimd}: the client_id URL rules, document
validation, cache freshness, the resolver's fetch discipline (timeout, size
cap, no redirects, single flight, caching) and, over real sockets on
127.0.0.1, TLS with a throwaway CA and the address guard.
"""

from __future__ import annotations

import gzip
import json
from typing import Any

import attr
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import given, settings
from hypothesis import strategies as st
from OpenSSL import SSL
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.error import DNSLookupError
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.internet.ssl import (
    Certificate,
    PrivateCertificate,
    trustRootFromCertificates,
)
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.protocols.policies import WrappingFactory
from twisted.python.components import proxyForInterface
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import ResponseDone, ResponseNeverReceived
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IResponse
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface import implementer

from smeldr_oauth.oauth.cimd import (
    CIMDError,
    CIMDResolver,
    host_key,
    check_client_id_url,
    freshness,
    is_cimd_client_id,
    parse_document,
)
from smeldr_oauth.oauth.model import Client
from smeldr_oauth.oauth.netguard import AddressPolicy, ForbiddenAddress, make_vetted_agent

from tests import certificates

from .test_oauth_netguard import FakeResolver

URL = "https://client.example.com/oauth/client.json"


def document(**overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "client_id": URL,
        "client_name": "Example Client",
        "redirect_uris": ["https://client.example.com/callback"],
    }
    for key, value in overrides.items():
        if value is _DELETE:
            doc.pop(key, None)
        else:
            doc[key] = value
    return doc


_DELETE = object()


def body_of(doc: object) -> bytes:
    return json.dumps(doc).encode("utf-8")


# --- The client_id URL ---------------------------------------------------


class IsCIMDClientIdTests(SynchronousTestCase):
    def test_https_with_path(self) -> None:
        self.assertTrue(is_cimd_client_id(URL))
        self.assertTrue(is_cimd_client_id("https://chatgpt.com/oauth/abc/client.json"))

    def test_not_cimd(self) -> None:
        for value in (
            "https://client.example.com",
            "https://client.example.com/",
            "3f2a9c0e6b",
            "",
            "client.example.com/x",
            "https:///x",
            None,
            42,
            "https://" + "a" * 3000 + ".com/x",
        ):
            self.assertFalse(is_cimd_client_id(value), value)

    def test_http_only_when_insecure(self) -> None:
        self.assertFalse(is_cimd_client_id("http://localhost:8000/client.json"))
        self.assertTrue(is_cimd_client_id("http://localhost:8000/client.json", allow_insecure=True))

    def test_malformed_still_classified(self) -> None:
        """
        A malformed https URL is classified as a CIMD id, so that the
        resolver explains what is wrong with it.
        """
        self.assertTrue(is_cimd_client_id("https://user@client.example.com/x#f"))


class CheckClientIdURLTests(SynchronousTestCase):
    def assertRefused(self, url: object, **kw: Any) -> CIMDError:
        with self.assertRaises(CIMDError) as ctx:
            check_client_id_url(url, **kw)
        return ctx.exception

    def test_accepted(self) -> None:
        for url, host in (
            (URL, "client.example.com"),
            ("https://client.example.com:8443/c.json", "client.example.com"),
            ("https://client.example.com/c?v=1&x=%2F", "client.example.com"),
            ("https://xn--bcher-kva.example/c", "xn--bcher-kva.example"),
            ("https://8.8.8.8/client", "8.8.8.8"),
            ("https://[2606:4700:4700::1111]/client", "2606:4700:4700::1111"),
            ("https://a.example/a/b/~c_d-e.json", "a.example"),
        ):
            self.assertEqual(check_client_id_url(url), host, url)

    def test_refused(self) -> None:
        for url in (
            "http://client.example.com/c",
            "HTTPS://client.example.com/c",
            "https://Client.Example.com/c",
            "https://client.example.com",
            "https://client.example.com/",
            "https://client.example.com/c#frag",
            "https://client.example.com/c#",
            "https://user@client.example.com/c",
            "https://user:pw@client.example.com/c",
            "https://client.example.com/a/../b",
            "https://client.example.com/./b",
            "https://client.example.com/a/%2e%2E/b",
            "https://client.example.com/a/%2e",
            "https://client.example.com/..",
            "https://client.example.com:0/c",
            "https://client.example.com:99999/c",
            "https://client.example.com:0443/c",
            "https://client.example.com:/c",
            "https://client.example.com:https/c",
            "https://client.example.com./c",
            "https://client..example.com/c",
            "https://-client.example.com/c",
            "https://client.example.com/c d",
            "https://client.example.com/c\\d",
            "https://client.example.com/c\n",
            "https://bücher.example/c",
            "https://client.example.com/%zz",
            "https://127.0.0.1/c",
            "https://10.1.2.3/c",
            "https://169.254.169.254/latest/meta-data",
            "https://127.1/c",
            "https://0x7f.0.0.1/c",
            "https://1.0x7f/c",
            "https://2130706433/c",
            "https://0177.0.0.1/c",
            "https://127.000.0.1/c",
            "https://[::1]/c",
            "https://[::ffff:127.0.0.1]/c",
            "https://[fe80::1]/c",
            "https://[::1%25eth0]/c",
            "https://[zz::1]/c",
            "https://localhost/c",
            "https://api.localhost/c",
            "https://intranet/c",
            "https://" + "a" * 64 + ".example/c",
            "https://client.example.com/" + "a" * 3000,
            "",
            None,
            b"https://client.example.com/c",
        ):
            self.assertRefused(url)

    def test_reasons_are_short_and_specific(self) -> None:
        self.assertEqual(
            self.assertRefused("http://client.example.com/c").reason,
            "client_id URL must use https",
        )
        self.assertEqual(
            self.assertRefused("https://127.0.0.1/c").reason,
            "client_id URL points at a special-use address",
        )
        self.assertEqual(
            self.assertRefused("https://client.example.com/").reason,
            "client_id URL must have a path",
        )

    def test_insecure(self) -> None:
        """
        The development switch allows http, loopback literals, localhost
        and single-label names, but not malformed URLs.
        """
        for url in (
            "http://localhost:8000/client.json",
            "http://127.0.0.1:8000/client.json",
            "https://[::1]/c",
            "https://intranet/c",
        ):
            check_client_id_url(url, allow_insecure=True)
        for url in (
            "http://localhost:8000/",
            "http://user@localhost/c",
            "http://localhost/c#f",
            "http://127.1/c",
        ):
            self.assertRefused(url, allow_insecure=True)

    def test_allowed_networks(self) -> None:
        policy = AddressPolicy(allowed_networks=["127.0.0.1/32"])
        self.assertEqual(check_client_id_url("https://127.0.0.1:4443/c", policy=policy), "127.0.0.1")
        self.assertRefused("https://127.0.0.2/c", policy=policy)
        self.assertRefused("http://127.0.0.1/c", policy=policy)

    @given(st.text(max_size=200))
    def test_never_crashes(self, text: str) -> None:
        try:
            check_client_id_url(text)
        except CIMDError:
            pass
        try:
            check_client_id_url("https://client.example.com/" + text)
        except CIMDError:
            pass


# --- The document --------------------------------------------------------


class ParseDocumentTests(SynchronousTestCase):
    def parse(self, doc: object) -> Client:
        raw = doc if isinstance(doc, bytes) else body_of(doc)
        return parse_document(URL, raw, created_at=1234.0)

    def refused(self, doc: object) -> str:
        with self.assertRaises(CIMDError) as ctx:
            self.parse(doc)
        return ctx.exception.reason

    def test_minimal(self) -> None:
        client = self.parse(document())
        self.assertEqual(
            client,
            Client(
                client_id=URL,
                client_name="Example Client",
                redirect_uris=("https://client.example.com/callback",),
                token_endpoint_auth_method="none",
                grant_types=("authorization_code",),
                kind="cimd",
                created_at=1234.0,
            ),
        )

    def test_chatgpt_style(self) -> None:
        """
        ChatGPT declares private_key_jwt and lists none next to it: the
        client is accepted as a public client.
        """
        client = self.parse(
            document(
                token_endpoint_auth_method="private_key_jwt",
                token_endpoint_auth_methods_supported=["none", "private_key_jwt"],
                grant_types=["authorization_code", "refresh_token"],
                response_types=["code"],
                client_uri="https://chatgpt.com/",
                logo_uri="https://chatgpt.com/logo.png",
                scope="mcp  read",
                jwks_uri="https://chatgpt.com/jwks.json",
            )
        )
        self.assertEqual(client.token_endpoint_auth_method, "none")
        self.assertEqual(client.grant_types, ("authorization_code", "refresh_token"))
        self.assertEqual(client.client_uri, "https://chatgpt.com/")
        self.assertEqual(client.logo_uri, "https://chatgpt.com/logo.png")
        self.assertEqual(client.scope, "mcp read")

    def test_claude_code_loopback(self) -> None:
        client = self.parse(
            document(
                redirect_uris=[
                    "http://localhost/callback",
                    "http://127.0.0.1/callback",
                    "http://[::1]:8080/callback",
                    "https://claude.ai/api/mcp/auth_callback",
                    "http://localhost/callback",
                ]
            )
        )
        self.assertEqual(len(client.redirect_uris), 4)

    def test_client_id_must_match_exactly(self) -> None:
        for other in (URL + "/", URL.upper(), URL + "?", None, 1, [URL]):
            self.assertIn("client_id", self.refused(document(client_id=other)))
        self.refused(document(client_id=_DELETE))

    def test_not_json(self) -> None:
        for raw in (
            b"",
            b"{",
            b"\xef\xbb\xbf" + body_of(document()),
            b"\xff\xfe{}",
            body_of(document())[:-1],
            b'{"client_id": NaN}',
            b'{"a": Infinity}',
            b"[" * 5000 + b"]" * 5000,
            b'{"a":' * 3000 + b"1" + b"}" * 3000,
            b'{"n": 1' + b"0" * 5000 + b"}",
        ):
            self.assertEqual(self.refused(raw), "client metadata document is not valid JSON")

    def test_duplicate_keys(self) -> None:
        raw = (
            b'{"client_id": "https://evil.example/x", "client_id": "'
            + URL.encode()
            + b'", "redirect_uris": ["https://a.example/cb"]}'
        )
        self.assertEqual(self.refused(raw), "client metadata document is not valid JSON")

    def test_not_an_object(self) -> None:
        for doc in ([document()], "x", 1, None):
            self.assertIn("JSON object", self.refused(doc))

    def test_redirect_uris(self) -> None:
        for value in (
            _DELETE,
            None,
            [],
            "https://client.example.com/cb",
            [1],
            [None],
            ["/relative"],
            ["client.example.com/cb"],
            ["https:/cb"],
            ["https:cb"],
            ["https://client.example.com/cb#frag"],
            ["https://client.example.com/cb#"],
            ["http://client.example.com/cb"],
            ["http://127.0.0.2/cb"],
            ["http://localhost.evil.example/cb"],
            ["https://user@client.example.com/cb"],
            ["https://client.example.com/c b"],
            ["https://client.example.com/\u00e9"],
            ["https://client.example.com:99999/cb"],
            ["https://client.example.com:0/cb"],
            ["https://client.example.com:x/cb"],
            ["javascript:alert(1)"],
            ["data:text/html,hi"],
            ["com.example.app:/cb"],
            ["HTTPS://client.example.com/cb"],
            [""],
            ["https://client.example.com/" + "a" * 3000],
            ["https://client.example.com/cb"] * 33,
            ["https://ok.example/cb", "ftp://x.example/cb"],
        ):
            self.refused(document(redirect_uris=value))

    def test_client_secret(self) -> None:
        self.assertIn("client_secret", self.refused(document(client_secret="s3cret")))
        self.refused(document(client_secret=None))

    def test_client_secret_expires_at(self) -> None:
        """
        A shared-secret member is refused even without the secret itself:
        the draft says a document must not carry either.
        """
        for value in (0, 1893456000, None):
            self.assertIn("client_secret_expires_at", self.refused(document(client_secret_expires_at=value)))

    def test_shared_secret_method(self) -> None:
        for method in (
            "client_secret_post",
            "client_secret_basic",
            "client_secret_jwt",
        ):
            reason = self.refused(document(token_endpoint_auth_method=method))
            self.assertIn("shared secret", reason)
            reason = self.refused(
                document(
                    token_endpoint_auth_method=method,
                    token_endpoint_auth_methods_supported=["none", method],
                )
            )

    def test_only_shared_secret_methods_supported(self) -> None:
        self.refused(
            document(
                token_endpoint_auth_methods_supported=[
                    "client_secret_basic",
                    "client_secret_post",
                ]
            )
        )

    def test_mixed_methods_supported(self) -> None:
        """
        A list that offers something usable next to shared-secret methods
        is fine: the declared method is what the client will use.
        """
        for supported in (
            ["none", "client_secret_basic"],
            ["private_key_jwt", "client_secret_post"],
            [],
        ):
            client = self.parse(document(token_endpoint_auth_methods_supported=supported))
            self.assertEqual(client.token_endpoint_auth_method, "none")

    def test_other_methods(self) -> None:
        for method in ("none", "private_key_jwt", "tls_client_auth"):
            client = self.parse(document(token_endpoint_auth_method=method))
            self.assertEqual(client.token_endpoint_auth_method, "none")

    def test_method_types(self) -> None:
        self.refused(document(token_endpoint_auth_method=["none"]))
        self.refused(document(token_endpoint_auth_method=1))
        self.refused(document(token_endpoint_auth_methods_supported="none"))
        self.refused(document(token_endpoint_auth_methods_supported=["none", 1]))

    def test_grant_types(self) -> None:
        self.assertEqual(self.parse(document()).grant_types, ("authorization_code",))
        self.assertEqual(
            self.parse(
                document(
                    grant_types=[
                        "refresh_token",
                        "authorization_code",
                        "urn:ietf:params:oauth:grant-type:device_code",
                        "refresh_token",
                    ]
                )
            ).grant_types,
            ("refresh_token", "authorization_code"),
        )
        for value in (
            ["refresh_token"],
            [],
            "authorization_code",
            [1],
            ["client_credentials"],
        ):
            self.refused(document(grant_types=value))

    def test_response_types(self) -> None:
        self.parse(document(response_types=["code"]))
        for value in (["token"], [], "code", [None]):
            self.refused(document(response_types=value))

    def test_client_name(self) -> None:
        self.assertIsNone(self.parse(document(client_name=_DELETE)).client_name)
        self.assertIsNone(self.parse(document(client_name=None)).client_name)
        self.assertIsNone(self.parse(document(client_name="  \u200b ")).client_name)
        self.assertEqual(
            self.parse(document(client_name="Evil\u202e gnp.exe\n\tCorp\x00")).client_name,
            "Evil gnp.exe Corp",
        )
        self.assertEqual(len(self.parse(document(client_name="x" * 5000)).client_name), 200)
        self.assertEqual(self.parse(document(client_name="Zoë 日本")).client_name, "Zoë 日本")
        for value in (1, ["a"], {"a": 1}, True):
            self.refused(document(client_name=value))

    def test_display_urls(self) -> None:
        for bad in (
            "javascript:alert(1)",
            "http://client.example.com/",
            "https://user@client.example.com/",
            "data:image/png;base64,AAAA",
            "//client.example.com/",
            "https://client.example.com/\u00e9",
            "not a url",
            "HTTPS://client.example.com/",
        ):
            client = self.parse(document(client_uri=bad, logo_uri=bad))
            self.assertIsNone(client.client_uri, bad)
            self.assertIsNone(client.logo_uri, bad)
        for key in ("client_uri", "logo_uri"):
            self.refused(document(**{key: 1}))
            self.refused(document(**{key: ["https://x.example/"]}))

    def test_scope(self) -> None:
        self.assertIsNone(self.parse(document(scope="")).scope)
        self.refused(document(scope=["mcp"]))
        self.refused(document(scope="x" * 1001))

    @given(st.binary(max_size=300))
    def test_arbitrary_bytes(self, raw: bytes) -> None:
        try:
            parse_document(URL, raw)
        except CIMDError:
            pass

    @settings(max_examples=200)
    @given(
        st.dictionaries(
            st.sampled_from(
                [
                    "client_id",
                    "redirect_uris",
                    "client_name",
                    "grant_types",
                    "response_types",
                    "token_endpoint_auth_method",
                    "token_endpoint_auth_methods_supported",
                    "client_uri",
                    "logo_uri",
                    "scope",
                    "client_secret",
                ]
            ),
            st.recursive(
                st.none()
                | st.booleans()
                | st.integers()
                | st.text(max_size=20)
                | st.sampled_from([URL, "https://a.example/cb", "none", "code"]),
                lambda children: (
                    st.lists(children, max_size=3)
                    | st.dictionaries(st.text(max_size=5), children, max_size=3)
                ),
                max_leaves=10,
            ),
        )
    )
    def test_arbitrary_documents(self, doc: dict[str, Any]) -> None:
        """
        Any JSON document is either refused with a L{CIMDError} or gives a
        client that satisfies the rules.
        """
        try:
            client = parse_document(URL, body_of(doc))
        except CIMDError:
            return
        self.assertEqual(client.client_id, URL)
        self.assertEqual(client.token_endpoint_auth_method, "none")
        self.assertNotIn("client_secret", doc)
        self.assertTrue(client.redirect_uris)
        for uri in client.redirect_uris:
            self.assertTrue(uri.startswith(("https://", "http://")))


class FreshnessTests(SynchronousTestCase):
    def ttl(self, *cache_control: str, age: str | None = None) -> float | None:
        headers = Headers()
        if cache_control:
            headers.setRawHeaders(b"cache-control", [v.encode() for v in cache_control])
        if age is not None:
            headers.setRawHeaders(b"age", [age.encode()])
        return freshness(headers)

    def test_default(self) -> None:
        self.assertEqual(self.ttl(), 300.0)
        self.assertEqual(self.ttl("public"), 300.0)

    def test_max_age(self) -> None:
        self.assertEqual(self.ttl("max-age=60"), 60.0)
        self.assertEqual(self.ttl('public, Max-Age="90"'), 90.0)
        self.assertEqual(self.ttl("public", "max-age=60"), 60.0)
        self.assertEqual(self.ttl("max-age=60, max-age=60"), 60.0)

    def test_clamped(self) -> None:
        self.assertEqual(self.ttl("max-age=31536000"), 86400.0)
        self.assertEqual(self.ttl("max-age=9999999999"), 86400.0)

    def test_not_cached(self) -> None:
        for values in (
            ("no-store",),
            ("no-cache",),
            ('no-cache="set-cookie", max-age=60',),
            ("max-age=60", "no-store"),
            ("max-age=0",),
            ("max-age=-1",),
            ("max-age=abc",),
            ("max-age",),
            ("max-age=1e3",),
            ("max-age=60, max-age=120",),
            ("max-age=99999999999",),
        ):
            self.assertIsNone(self.ttl(*values), values)

    def test_age(self) -> None:
        self.assertEqual(self.ttl("max-age=60", age="20"), 40.0)
        self.assertIsNone(self.ttl("max-age=60", age="60"))
        self.assertEqual(self.ttl("max-age=60", age="junk"), 60.0)


# --- The resolver with a fake agent -------------------------------------


class FakeBodyTransport:
    def __init__(self) -> None:
        self.stopped = False

    def stopProducing(self) -> None:
        self.stopped = True

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass


@implementer(IResponse)
@attr.s(auto_attribs=True, eq=False)
class FakeResponse:
    code: int = 200
    headers: Headers = attr.ib(factory=Headers)
    length: Any = UNKNOWN_LENGTH
    version: tuple = (b"HTTP", 1, 1)
    phrase: bytes = b"OK"
    request: Any = None
    previousResponse: Any = None
    transport: FakeBodyTransport = attr.ib(factory=FakeBodyTransport)
    protocol: Protocol | None = None

    def deliverBody(self, protocol: Protocol) -> None:
        self.protocol = protocol
        protocol.makeConnection(self.transport)

    def setPreviousResponse(self, response: Any) -> None:
        self.previousResponse = response

    def write(self, data: bytes) -> None:
        assert self.protocol is not None
        self.protocol.dataReceived(data)

    def finish(self) -> None:
        assert self.protocol is not None
        self.protocol.connectionLost(Failure(ResponseDone()))


@attr.s(auto_attribs=True)
class FakeRequest:
    method: bytes
    uri: bytes
    headers: Headers
    deferred: Deferred
    cancelled: list

    def respond(
        self,
        body: bytes | None = None,
        *,
        code: int = 200,
        headers: dict[str, str] | None = None,
        length: Any = UNKNOWN_LENGTH,
        finish: bool = True,
    ) -> FakeResponse:
        h = Headers()
        for k, v in (headers or {}).items():
            h.setRawHeaders(k.encode(), [v.encode()])
        response = FakeResponse(code=code, headers=h, length=length)
        self.deferred.callback(response)
        if body is not None and response.protocol is not None:
            response.write(body)
            if finish:
                response.finish()
        return response


@implementer(IAgent)
class FakeAgent:
    def __init__(self) -> None:
        self.requests: list[FakeRequest] = []

    def request(self, method, uri, headers=None, bodyProducer=None):
        cancelled: list = []
        d: Deferred = Deferred(lambda d: cancelled.append(True))
        self.requests.append(FakeRequest(method, uri, headers or Headers(), d, cancelled))
        return d


class ResolverTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.agent = FakeAgent()
        self.resolver = CIMDResolver(self.clock, agent=self.agent)

    def make(self, **kw: Any) -> CIMDResolver:
        self.resolver = CIMDResolver(self.clock, agent=self.agent, **kw)
        return self.resolver

    def refusal(self, d: Deferred) -> str:
        return self.failureResultOf(d, CIMDError).value.reason

    def test_fetch(self) -> None:
        """
        The document is fetched with a GET that asks for JSON, carries no
        cookies and does not invite a compressed body.
        """
        with capturedLogs() as events:
            d = self.resolver.resolve(URL)
            self.assertNoResult(d)
            [req] = self.agent.requests
            self.assertEqual((req.method, req.uri), (b"GET", URL.encode()))
            self.assertEqual(req.headers.getRawHeaders(b"accept"), [b"application/json"])
            self.assertFalse(req.headers.hasHeader(b"accept-encoding"))
            self.assertFalse(req.headers.hasHeader(b"cookie"))
            self.assertFalse(req.headers.hasHeader(b"if-none-match"))
            req.respond(body_of(document()))
            client = self.successResultOf(d)
        self.assertEqual(client.kind, "cimd")
        self.assertEqual(client.client_name, "Example Client")
        self.assertTrue(any(e.get("host") == "client.example.com" for e in events))

    def test_cookies_ignored(self) -> None:
        """
        A Set-Cookie from one fetch is not sent back on the next.
        """
        self.resolver.resolve(URL)
        self.agent.requests[0].respond(
            body_of(document()),
            headers={"set-cookie": "s=1; Path=/", "cache-control": "no-store"},
        )
        self.resolver.resolve(URL)
        self.assertFalse(self.agent.requests[1].headers.hasHeader(b"cookie"))

    def test_invalid_url_not_fetched(self) -> None:
        with capturedLogs() as events:
            d = self.resolver.resolve("https://169.254.169.254/latest?token=abc")
        self.assertEqual(self.refusal(d), "client_id URL points at a special-use address")
        self.assertEqual(self.agent.requests, [])
        [event] = [e for e in events if "reason" in e]
        self.assertEqual(event["host"], "169.254.169.254")
        self.assertNotIn("token", repr(event))

    def test_timeout_waiting_for_response(self) -> None:
        d = self.resolver.resolve(URL)
        self.clock.advance(4.9)
        self.assertNoResult(d)
        self.clock.advance(0.2)
        self.assertIn("timed out", self.refusal(d))
        self.assertEqual(self.agent.requests[0].cancelled, [True])

    def test_timeout_reading_body(self) -> None:
        """
        A server that sends headers and then trickles the body is cut off
        at the same deadline, and its connection is stopped.
        """
        d = self.resolver.resolve(URL)
        response = self.agent.requests[0].respond(b"{", finish=False)
        self.clock.advance(5)
        self.assertIn("timed out", self.refusal(d))
        self.assertTrue(response.transport.stopped)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_no_timer_left_on_success(self) -> None:
        d = self.resolver.resolve(URL)
        self.agent.requests[0].respond(body_of(document()))
        self.successResultOf(d)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_size_cap(self) -> None:
        """
        The body is read incrementally and the connection is stopped as
        soon as it passes the cap.
        """
        d = self.resolver.resolve(URL)
        response = self.agent.requests[0].respond()
        response.write(b" " * 5000)
        self.assertFalse(response.transport.stopped)
        response.write(b" " * 200)
        self.assertTrue(response.transport.stopped)
        self.assertIn("larger than 5120 bytes", self.refusal(d))
        response.write(b"more")
        response.finish()

    def test_exactly_at_cap(self) -> None:
        raw = body_of(document())
        raw = raw[:-1] + b" " * (5 * 1024 - len(raw)) + b"}"
        self.assertEqual(len(raw), 5 * 1024)
        d = self.resolver.resolve(URL)
        self.agent.requests[0].respond(raw)
        self.successResultOf(d)

    def test_content_length_over_cap(self) -> None:
        d = self.resolver.resolve(URL)
        response = self.agent.requests[0].respond(length=10_000_000)
        self.assertIn("larger than", self.refusal(d))
        self.assertTrue(response.transport.stopped)

    def test_custom_cap(self) -> None:
        self.make(max_bytes=10)
        d = self.resolver.resolve(URL)
        self.agent.requests[0].respond(body_of(document()))
        self.assertIn("larger than 10 bytes", self.refusal(d))

    def test_gzip_bomb(self) -> None:
        """
        A compressed body is capped after decompression too.
        """
        bomb = gzip.compress(b" " * 1_000_000)
        self.assertLess(len(bomb), 5 * 1024)
        d = self.resolver.resolve(URL)
        self.agent.requests[0].respond(bomb, headers={"content-encoding": "gzip"})
        self.assertIn("larger than", self.refusal(d))

    def test_gzip_raw_cap(self) -> None:
        """
        The compressed bytes themselves are capped before decompression.
        """
        import os

        noise = gzip.compress(os.urandom(20_000))
        d = self.resolver.resolve(URL)
        response = self.agent.requests[0].respond(noise, headers={"content-encoding": "gzip"}, finish=False)
        self.assertIn("larger than", self.refusal(d))
        self.assertTrue(response.transport.stopped)

    def test_gzip_document(self) -> None:
        d = self.resolver.resolve(URL)
        self.agent.requests[0].respond(
            gzip.compress(body_of(document())), headers={"content-encoding": "gzip"}
        )
        self.assertEqual(self.successResultOf(d).client_id, URL)

    def test_redirect_not_followed(self) -> None:
        for code in (301, 302, 303, 307, 308):
            self.agent.requests.clear()
            d = self.resolver.resolve(URL)
            response = self.agent.requests[0].respond(code=code, headers={"location": "https://127.0.0.1/x"})
            self.assertIn("redirects are not followed", self.refusal(d))
            self.assertEqual(len(self.agent.requests), 1)
            self.assertTrue(response.transport.stopped)

    def test_non_200(self) -> None:
        for code in (201, 204, 304, 400, 404, 500, 503):
            self.agent.requests.clear()
            d = self.resolver.resolve(URL)
            response = self.agent.requests[0].respond(b"{}", code=code)
            self.assertEqual(self.refusal(d), f"client metadata URL answered HTTP {code}, not 200")
            self.assertTrue(response.transport.stopped)

    def test_bad_document(self) -> None:
        d = self.resolver.resolve(URL)
        self.agent.requests[0].respond(b"<html>")
        self.assertEqual(self.refusal(d), "client metadata document is not valid JSON")
        d = self.resolver.resolve(URL)
        self.agent.requests[1].respond(body_of(document(client_id=URL + "x")))
        self.assertIn("client_id", self.refusal(d))

    def test_connection_failures(self) -> None:
        for exc, expected in (
            (ForbiddenAddress("client.example.com", "10.0.0.1"), "special-use address"),
            (DNSLookupError("x"), "could not be resolved"),
            (
                ResponseNeverReceived([Failure(SSL.Error("bad cert"))]),
                "TLS verification",
            ),
            (ResponseNeverReceived([Failure(ValueError())]), "could not fetch"),
        ):
            self.agent.requests.clear()
            d = self.resolver.resolve(URL)
            self.agent.requests[0].deferred.errback(exc)
            self.assertIn(expected, self.refusal(d))
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_body_connection_lost(self) -> None:
        from twisted.web.client import ResponseFailed

        d = self.resolver.resolve(URL)
        response = self.agent.requests[0].respond(b"{", finish=False)
        assert response.protocol is not None
        response.protocol.connectionLost(Failure(ResponseFailed([Failure(Exception())])))
        self.assertEqual(self.refusal(d), "could not fetch the client metadata document")

    def test_unexpected_error(self) -> None:
        """
        A bug below us gives a generic reason and a logged traceback.
        """

        @implementer(IAgent)
        class Broken:
            def request(self, *a: Any, **kw: Any) -> Deferred:
                raise RuntimeError("boom")

        resolver = CIMDResolver(self.clock, agent=Broken())
        d = resolver.resolve(URL)
        self.assertEqual(
            self.failureResultOf(d, CIMDError).value.reason,
            "could not fetch the client metadata document",
        )
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_cache_hit_and_expiry(self) -> None:
        d = self.resolver.resolve(URL)
        self.agent.requests[0].respond(body_of(document()), headers={"cache-control": "max-age=60"})
        first = self.successResultOf(d)
        self.clock.advance(59)
        self.assertIs(self.successResultOf(self.resolver.resolve(URL)), first)
        self.assertEqual(len(self.agent.requests), 1)
        self.clock.advance(1)
        d = self.resolver.resolve(URL)
        self.assertEqual(len(self.agent.requests), 2)
        self.agent.requests[1].respond(body_of(document(client_name="New")))
        self.assertEqual(self.successResultOf(d).client_name, "New")

    def test_default_ttl(self) -> None:
        self.resolver.resolve(URL)
        self.agent.requests[0].respond(body_of(document()))
        self.clock.advance(299)
        self.successResultOf(self.resolver.resolve(URL))
        self.clock.advance(1)
        self.resolver.resolve(URL)
        self.assertEqual(len(self.agent.requests), 2)

    def test_max_ttl(self) -> None:
        self.resolver.resolve(URL)
        self.agent.requests[0].respond(body_of(document()), headers={"cache-control": "max-age=999999"})
        self.clock.advance(86399)
        self.successResultOf(self.resolver.resolve(URL))
        self.clock.advance(1)
        self.resolver.resolve(URL)
        self.assertEqual(len(self.agent.requests), 2)

    def test_no_store(self) -> None:
        for value in ("no-store", "no-cache", "max-age=0"):
            self.agent.requests.clear()
            self.resolver.resolve(URL)
            self.agent.requests[0].respond(body_of(document()), headers={"cache-control": value})
            d = self.resolver.resolve(URL)
            self.assertEqual(len(self.agent.requests), 2, value)
            self.agent.requests[1].deferred.cancel()
            self.failureResultOf(d, CIMDError)

    def test_failures_not_cached(self) -> None:
        d = self.resolver.resolve(URL)
        self.agent.requests[0].respond(b"{}", code=500)
        self.failureResultOf(d, CIMDError)
        d = self.resolver.resolve(URL)
        self.assertEqual(len(self.agent.requests), 2)
        self.agent.requests[1].respond(body_of(document()))
        self.successResultOf(d)

    def test_invalid_refetch_drops_cached(self) -> None:
        """
        When a stale document is refetched and is now invalid, the old
        client is not served.
        """
        self.resolver.resolve(URL)
        self.agent.requests[0].respond(body_of(document()), headers={"etag": '"v1"'})
        self.clock.advance(301)
        d = self.resolver.resolve(URL)
        self.agent.requests[1].respond(b"{}", code=404)
        self.failureResultOf(d, CIMDError)
        self.resolver.resolve(URL)
        self.assertFalse(self.agent.requests[2].headers.hasHeader(b"if-none-match"))

    def test_single_flight(self) -> None:
        first = self.resolver.resolve(URL)
        second = self.resolver.resolve(URL)
        self.assertEqual(len(self.agent.requests), 1)
        self.agent.requests[0].respond(body_of(document()))
        self.assertIs(self.successResultOf(first), self.successResultOf(second))

    def test_single_flight_failure(self) -> None:
        first = self.resolver.resolve(URL)
        second = self.resolver.resolve(URL)
        self.agent.requests[0].respond(b"nope")
        self.failureResultOf(first, CIMDError)
        self.failureResultOf(second, CIMDError)
        self.resolver.resolve(URL)
        self.assertEqual(len(self.agent.requests), 2)

    def test_cancel_one_waiter(self) -> None:
        """
        A caller that gives up does not cancel the fetch the others share.
        """
        first = self.resolver.resolve(URL)
        second = self.resolver.resolve(URL)
        first.cancel()
        self.failureResultOf(first)
        self.assertEqual(self.agent.requests[0].cancelled, [])
        self.agent.requests[0].respond(body_of(document()))
        self.successResultOf(second)

    def test_different_urls_fetch_separately(self) -> None:
        other = "https://other.example.com/c.json"
        self.resolver.resolve(URL)
        self.resolver.resolve(other)
        self.assertEqual([r.uri for r in self.agent.requests], [URL.encode(), other.encode()])

    def test_in_flight_limit(self) -> None:
        self.make(max_in_flight=2)
        self.resolver.resolve("https://a.example/c")
        self.resolver.resolve("https://b.example/c")
        d = self.resolver.resolve("https://c.example/c")
        self.assertIn("too many", self.refusal(d))
        self.resolver.resolve("https://a.example/c")
        self.assertEqual(len(self.agent.requests), 2)

    def test_lru_bound(self) -> None:
        self.make(max_cache_entries=2)
        urls = [f"https://{name}.example/c" for name in "abc"]
        for i, url in enumerate(urls[:2]):
            self.resolver.resolve(url)
            self.agent.requests[i].respond(body_of(document(client_id=url)))
        self.successResultOf(self.resolver.resolve(urls[0]))  # a is now recent
        self.resolver.resolve(urls[2])
        self.agent.requests[2].respond(body_of(document(client_id=urls[2])))
        self.successResultOf(self.resolver.resolve(urls[0]))
        self.successResultOf(self.resolver.resolve(urls[2]))
        self.resolver.resolve(urls[1])
        self.assertEqual(len(self.agent.requests), 4)

    def test_etag_revalidation(self) -> None:
        d = self.resolver.resolve(URL)
        self.agent.requests[0].respond(
            body_of(document()), headers={"cache-control": "max-age=60", "etag": '"v1"'}
        )
        first = self.successResultOf(d)
        self.clock.advance(61)
        d = self.resolver.resolve(URL)
        req = self.agent.requests[1]
        self.assertEqual(req.headers.getRawHeaders(b"if-none-match"), [b'"v1"'])
        response = req.respond(code=304, headers={"cache-control": "max-age=120"})
        self.assertIs(self.successResultOf(d), first)
        self.assertTrue(response.transport.stopped)
        self.clock.advance(119)
        self.successResultOf(self.resolver.resolve(URL))
        self.assertEqual(len(self.agent.requests), 2)

    def test_etag_changed(self) -> None:
        self.resolver.resolve(URL)
        self.agent.requests[0].respond(body_of(document()), headers={"etag": 'W/"v1"'})
        self.clock.advance(301)
        d = self.resolver.resolve(URL)
        self.assertEqual(self.agent.requests[1].headers.getRawHeaders(b"if-none-match"), [b'W/"v1"'])
        self.agent.requests[1].respond(body_of(document(client_name="v2")))
        self.assertEqual(self.successResultOf(d).client_name, "v2")

    def test_304_no_store(self) -> None:
        self.resolver.resolve(URL)
        self.agent.requests[0].respond(body_of(document()), headers={"etag": '"v1"'})
        self.clock.advance(301)
        d = self.resolver.resolve(URL)
        self.agent.requests[1].respond(code=304, headers={"cache-control": "no-store"})
        self.successResultOf(d)
        self.resolver.resolve(URL)
        self.assertEqual(len(self.agent.requests), 3)

    def test_bad_etag_ignored(self) -> None:
        self.resolver.resolve(URL)
        self.agent.requests[0].respond(body_of(document()), headers={"etag": "v1\x01"})
        self.clock.advance(301)
        self.resolver.resolve(URL)
        self.assertFalse(self.agent.requests[1].headers.hasHeader(b"if-none-match"))

    def test_insecure_http(self) -> None:
        self.make(allow_insecure=True)
        d = self.resolver.resolve("http://localhost:8000/client.json")
        self.agent.requests[0].respond(body_of(document(client_id="http://localhost:8000/client.json")))
        self.successResultOf(d)


# --- Sharing fetch slots under attack ----------------------------------


def doc_for(url: str, **overrides: Any) -> bytes:
    return body_of(document(client_id=url, **overrides))


CLAUDE = "https://claude.ai/oauth/mcp-oauth-client-metadata"
CHATGPT = "https://chatgpt.com/oauth/client.json"


class SlotTests(SynchronousTestCase):
    """
    A stranger who points client ids at slow hosts cannot take every fetch
    slot: slots are capped per host, a deadline frees them, and documents
    fetched successfully before have slots of their own.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.agent = FakeAgent()

    def make(self, **kw: Any) -> CIMDResolver:
        self.resolver = CIMDResolver(self.clock, agent=self.agent, **kw)
        return self.resolver

    def refusal(self, d: Deferred) -> CIMDError:
        return self.failureResultOf(d, CIMDError).value

    def know(self, url: str) -> None:
        """
        Fetch C{url} successfully once, without caching it.
        """
        d = self.resolver.resolve(url)
        self.agent.requests[-1].respond(doc_for(url), headers={"cache-control": "no-store"})
        self.successResultOf(d)

    def test_finding_scenario(self) -> None:
        """
        The review finding: 70 lookups whose documents sit on one host that
        never answers take 4 slots, not all of them; a fresh client on
        another host is fetched at once; the deadline frees the 4.
        """
        self.make()
        with capturedLogs() as events:
            slow = [self.resolver.resolve(f"https://drip.example/{i}") for i in range(70)]
        self.assertEqual(len(self.agent.requests), 4)
        for d in slow[4:]:
            self.assertEqual(
                self.refusal(d).reason,
                "too many client metadata documents are being fetched from this host; try again",
            )
        self.assertTrue(all(e["host"] == "drip.example" for e in events if "reason" in e))
        d = self.resolver.resolve(CLAUDE)
        self.agent.requests[4].respond(doc_for(CLAUDE))
        self.assertEqual(self.successResultOf(d).client_id, CLAUDE)
        self.clock.advance(5)
        for d in slow[:4]:
            self.assertIn("timed out", self.refusal(d).reason)
        self.resolver.resolve("https://drip.example/again")
        self.assertEqual(len(self.agent.requests), 6)

    def test_per_host_limit(self) -> None:
        """
        Ports and paths do not make a host count twice; other hosts and
        joining a fetch already under way are not affected.
        """
        self.make(max_in_flight_per_host=2)
        first = self.resolver.resolve("https://slow.example/a")
        self.resolver.resolve("https://slow.example:8443/b")
        for url in ("https://slow.example/c", "https://slow.example:9443/a"):
            self.assertIn("from this host", self.refusal(self.resolver.resolve(url)).reason)
        joined = self.resolver.resolve("https://slow.example/a")
        self.assertNoResult(joined)
        self.assertNoResult(self.resolver.resolve("https://sub.slow.example/a"))
        self.assertEqual(len(self.agent.requests), 3)
        self.agent.requests[0].respond(b"{}", code=404)
        self.failureResultOf(first, CIMDError)
        self.failureResultOf(joined, CIMDError)
        self.resolver.resolve("https://slow.example/c")
        self.assertEqual(len(self.agent.requests), 4)

    def test_ipv6_literal_refused_plainly(self) -> None:
        """
        An IPv6-literal client_id is refused with a reason, without a fetch
        and without a traceback (treq cannot fetch such URLs).
        """
        self.make()
        before = len(self.agent.requests)
        f = self.failureResultOf(self.resolver.resolve("https://[2606:4700:4700::1111]/client"), CIMDError)
        self.assertIn("IPv6", f.value.reason)
        self.assertEqual(len(self.agent.requests), before)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_ipv6_literals_share_their_64(self) -> None:
        """
        One machine holds a whole /64: its addresses count as one host.
        """
        self.assertEqual(host_key("2a00:1450:4001:1::1"), "2a00:1450:4001:1::/64")
        self.assertEqual(host_key("2a00:1450:4001:1:ffff::2"), "2a00:1450:4001:1::/64")
        self.assertEqual(host_key("2a00:1450:4001:2::1"), "2a00:1450:4001:2::/64")
        self.assertEqual(host_key("93.184.215.14"), "93.184.215.14")
        self.assertEqual(host_key("claude.ai"), "claude.ai")

    def test_reserved_for_known(self) -> None:
        """
        Unknown documents may not use the reserved slots; a document
        fetched successfully before may, up to the overall cap.
        """
        self.make(max_in_flight=4, reserved_for_known=2, max_in_flight_per_host=10)
        self.know(CHATGPT)
        self.know(CLAUDE)
        base = len(self.agent.requests)
        self.resolver.resolve("https://a.example/c")
        self.resolver.resolve("https://b.example/c")
        d = self.resolver.resolve("https://c.example/c")
        self.assertIn("too many client metadata documents are being fetched;", self.refusal(d).reason)
        self.assertNoResult(self.resolver.resolve(CHATGPT))
        self.assertNoResult(self.resolver.resolve(CLAUDE))
        self.assertEqual(len(self.agent.requests), base + 4)
        self.agent.requests[-1].respond(doc_for(CLAUDE))
        self.failureResultOf(self.resolver.resolve("https://c.example/c"), CIMDError)

    def test_default_reserve(self) -> None:
        """
        By default a quarter of the 64 slots are kept for known documents.
        """
        self.make(max_in_flight_per_host=1)
        self.know(CHATGPT)
        for i in range(48):
            self.assertNoResult(self.resolver.resolve(f"https://h{i}.example/c"))
        self.failureResultOf(self.resolver.resolve("https://h48.example/c"), CIMDError)
        self.assertNoResult(self.resolver.resolve(CHATGPT))

    def test_known_forgotten_after_failure(self) -> None:
        """
        A known document whose refetch fails is unknown again, so that a
        stranger's own documents cannot hold the reserved slots by
        loading once and dripping ever after.
        """
        self.make(max_in_flight=2, reserved_for_known=1)
        self.know("https://mine.example/c")
        d = self.resolver.resolve("https://mine.example/c")
        self.clock.advance(5)
        self.failureResultOf(d, CIMDError)
        self.resolver.resolve("https://a.example/c")
        d = self.resolver.resolve("https://mine.example/c")
        self.assertIn("too many", self.refusal(d).reason)

    def test_capacity_refusal_keeps_known(self) -> None:
        """
        Being refused a slot is not the document's fault: it stays known.
        """
        self.make(max_in_flight=2, reserved_for_known=1)
        self.know(CHATGPT)
        self.know(CLAUDE)
        a = self.resolver.resolve("https://a.example/c")
        self.resolver.resolve(CLAUDE)
        self.failureResultOf(self.resolver.resolve(CHATGPT), CIMDError)
        self.agent.requests[-2].respond(b"{}", code=404)  # a.example
        self.agent.requests[-1].respond(doc_for(CLAUDE))
        self.failureResultOf(a, CIMDError)
        self.resolver.resolve("https://b.example/c")
        self.assertNoResult(self.resolver.resolve(CHATGPT))

    def test_known_lru_bounded(self) -> None:
        self.make(max_in_flight=2, reserved_for_known=1, max_known_documents=1)
        self.know(CHATGPT)
        self.know(CLAUDE)
        self.resolver.resolve("https://a.example/c")
        self.failureResultOf(self.resolver.resolve(CHATGPT), CIMDError)
        self.assertNoResult(self.resolver.resolve(CLAUDE))

    def test_revalidation_makes_known(self) -> None:
        """
        A 304 answering our If-None-Match is a success too.
        """
        self.make(max_in_flight=2, reserved_for_known=1, max_known_documents=1)
        self.resolver.resolve(CHATGPT)
        self.agent.requests[0].respond(doc_for(CHATGPT), headers={"etag": '"1"'})
        self.know(CLAUDE)  # pushes CHATGPT out of the known list
        self.clock.advance(301)
        self.resolver.resolve(CHATGPT)
        self.agent.requests[-1].respond(code=304, headers={"cache-control": "no-store"})
        self.resolver.resolve("https://a.example/c")
        self.assertNoResult(self.resolver.resolve(CHATGPT))

    def test_limits_checked(self) -> None:
        for kw in (
            {"max_in_flight": 0},
            {"max_in_flight_per_host": 0},
            {"max_in_flight": 4, "reserved_for_known": 4},
            {"reserved_for_known": -1},
            {"stale_if_error": -1},
            {"max_known_documents": -1},
        ):
            self.assertRaises(ValueError, CIMDResolver, self.clock, agent=self.agent, **kw)
        self.make(max_in_flight=1)  # no reserve: the one slot is for anyone
        self.assertNoResult(self.resolver.resolve("https://a.example/c"))


class StaleIfErrorTests(SynchronousTestCase):
    """
    A cached document up to an hour past expiry stands in for a refetch
    that could not get a slot or failed for a reason that says nothing
    about the document.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.agent = FakeAgent()
        self.resolver = CIMDResolver(self.clock, agent=self.agent)

    def cached(self, **kw: Any) -> Client:
        if kw:
            self.resolver = CIMDResolver(self.clock, agent=self.agent, **kw)
        d = self.resolver.resolve(CLAUDE)
        self.agent.requests[-1].respond(
            doc_for(CLAUDE), headers={"cache-control": "max-age=60", "etag": '"v1"'}
        )
        client = self.successResultOf(d)
        self.clock.advance(61)
        return client

    def test_no_slot(self) -> None:
        """
        Refused a slot, the stale copy is served at once with a warning,
        and not refreshed: the next lookup tries the host again.
        """
        client = self.cached(max_in_flight=1)
        a = self.resolver.resolve("https://a.example/c")
        with capturedLogs() as events:
            self.assertIs(self.successResultOf(self.resolver.resolve(CLAUDE)), client)
        self.assertEqual(len(self.agent.requests), 2)
        [event] = events
        self.assertEqual(event["host"], "claude.ai")
        self.assertIn("stale", event["log_format"])
        self.assertIn("too many", event["reason"])
        self.agent.requests[1].respond(b"{}", code=404)
        self.failureResultOf(a, CIMDError)
        self.resolver.resolve(CLAUDE)
        self.assertEqual(len(self.agent.requests), 3)

    def test_timeout(self) -> None:
        """
        Every waiter of a refetch that times out gets the stale copy.
        """
        client = self.cached()
        first = self.resolver.resolve(CLAUDE)
        second = self.resolver.resolve(CLAUDE)
        self.clock.advance(5)
        self.assertIs(self.successResultOf(first), client)
        self.assertIs(self.successResultOf(second), client)
        self.resolver.resolve(CLAUDE)
        self.assertEqual(len(self.agent.requests), 3)
        self.assertEqual(self.agent.requests[2].headers.getRawHeaders(b"if-none-match"), [b'"v1"'])

    def test_transient_failures(self) -> None:
        from twisted.internet.error import ConnectionLost, ConnectionRefusedError

        client = self.cached()
        for failing in (
            lambda r: r.deferred.errback(DNSLookupError("x")),
            lambda r: r.deferred.errback(ConnectionRefusedError()),
            lambda r: r.deferred.errback(ResponseNeverReceived([Failure(ConnectionLost())])),
            lambda r: r.respond(b"{}", code=503),
            lambda r: r.respond(b"{}", code=500),
            lambda r: r.respond(b"{", finish=False).protocol.connectionLost(  # type: ignore[union-attr]
                Failure(ConnectionLost())
            ),
        ):
            d = self.resolver.resolve(CLAUDE)
            failing(self.agent.requests[-1])
            self.assertIs(self.successResultOf(d), client)

    def test_window(self) -> None:
        """
        Past the stale window the failure is reported (and marked
        transient); the copy is kept for revalidation.
        """
        self.cached()
        self.clock.advance(3600 - 2)
        d = self.resolver.resolve(CLAUDE)
        self.clock.advance(5)  # 61 - 60 + 3598 + 5 > 3600 past expiry
        error = self.failureResultOf(d, CIMDError).value
        self.assertIn("timed out", error.reason)
        self.assertTrue(error.transient)
        self.resolver.resolve(CLAUDE)
        self.assertEqual(self.agent.requests[-1].headers.getRawHeaders(b"if-none-match"), [b'"v1"'])

    def test_window_configurable(self) -> None:
        self.cached(stale_if_error=0)
        d = self.resolver.resolve(CLAUDE)
        self.clock.advance(5)
        self.failureResultOf(d, CIMDError)

    def test_definitive_failures(self) -> None:
        """
        A failure that tells us about the document or host now is
        reported, and the cached copy dropped.
        """
        for failing in (
            lambda r: r.respond(b"{}", code=404),
            lambda r: r.respond(b"{}", code=410),
            lambda r: r.respond(code=302, headers={"location": "https://x.example/"}),
            lambda r: r.respond(b"<html>"),
            lambda r: r.respond(b" " * 6000),
            lambda r: r.deferred.errback(ForbiddenAddress("claude.ai", "10.0.0.1")),
            lambda r: r.deferred.errback(ResponseNeverReceived([Failure(SSL.Error("bad"))])),
        ):
            self.agent.requests.clear()
            self.cached()
            d = self.resolver.resolve(CLAUDE)
            failing(self.agent.requests[-1])
            self.assertFalse(self.failureResultOf(d, CIMDError).value.transient)
            d = self.resolver.resolve(CLAUDE)
            self.assertFalse(self.agent.requests[-1].headers.hasHeader(b"if-none-match"))
            self.agent.requests[-1].deferred.cancel()
            self.failureResultOf(d)

    def test_bug_not_masked(self) -> None:
        """
        Our own bug is reported, not papered over with a stale copy.
        """
        self.cached()
        d = self.resolver.resolve(CLAUDE)
        self.agent.requests[-1].deferred.errback(RuntimeError("boom"))
        self.failureResultOf(d, CIMDError)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_failures_still_not_cached(self) -> None:
        """
        With nothing cached, a transient failure is reported and the next
        lookup fetches again.
        """
        d = self.resolver.resolve(CLAUDE)
        self.agent.requests[0].respond(b"{}", code=503)
        self.assertTrue(self.failureResultOf(d, CIMDError).value.transient)
        self.resolver.resolve(CLAUDE)
        self.assertEqual(len(self.agent.requests), 2)


# --- Real sockets -------------------------------------------------------


def make_server_cert(ca_key: certificates.Key, ca: x509.Certificate, names: list[str]) -> PrivateCertificate:
    key, cert = certificates.make_server(ca_key, ca, names)
    return PrivateCertificate.loadPEM(certificates.cert_pem(cert) + certificates.key_pem(key))


class DocumentResource(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.bodies: dict[bytes, bytes] = {}
        self.requests: list[tuple[bytes, bytes | None]] = []

    def render_GET(self, request: Any) -> bytes:
        self.requests.append((request.path, request.getHeader(b"host")))
        body = self.bodies.get(request.path)
        if body is None:
            request.setResponseCode(404)
            return b"{}"
        request.setHeader(b"content-type", b"application/json")
        return body


class TrackingFactory(WrappingFactory):
    """
    Counts the connections a server accepted, and lets a test wait until
    they are all closed (so the reactor is clean).
    """

    def __init__(self, wrapped: Any) -> None:
        super().__init__(wrapped)
        self.accepted = 0
        self._idle: list[Deferred] = []

    def registerProtocol(self, p: Any) -> None:
        self.accepted += 1
        super().registerProtocol(p)

    def unregisterProtocol(self, p: Any) -> None:
        super().unregisterProtocol(p)
        if not self.protocols:
            waiters, self._idle = self._idle, []
            for d in waiters:
                d.callback(None)

    def closed(self) -> Deferred:
        if not self.protocols:
            return Deferred.fromCoroutine(_noop())
        for p in list(self.protocols):
            p.transport.abortConnection()
        d: Deferred = Deferred()
        self._idle.append(d)
        return d


async def _noop() -> None:
    return None


class RealSocketTests(TestCase):
    """
    A real HTTPS server on 127.0.0.1 with a certificate from a CA made for
    the test; the resolver trusts only that CA.
    """

    HOST = "cimd.example"

    def setUp(self) -> None:
        ca_key, ca = certificates.make_ca()
        self.trust_root = trustRootFromCertificates(
            [Certificate.loadPEM(ca.public_bytes(serialization.Encoding.PEM))]
        )
        self.ca_key, self.ca = ca_key, ca
        self.server_names: list[bytes | None] = []
        self.resource = DocumentResource()
        self.listen([self.HOST, "127.0.0.1"])

    def listen(self, names: list[str]) -> None:
        options = make_server_cert(self.ca_key, self.ca, names).options()
        context = options.getContext()
        context.set_tlsext_servername_callback(lambda conn: self.server_names.append(conn.get_servername()))
        self.factory = TrackingFactory(Site(self.resource))
        self.port = global_reactor.listenSSL(0, self.factory, options, interface="127.0.0.1")
        self.addCleanup(self.factory.closed)
        self.addCleanup(self.port.stopListening)
        self.url = f"https://{self.HOST}:{self.port.getHost().port}/client.json"
        self.resource.bodies[b"/client.json"] = body_of(document(client_id=self.url, client_name="Real"))

    def resolver(self, **kw: Any) -> CIMDResolver:
        kw.setdefault("trust_root", self.trust_root)
        kw.setdefault("name_resolver", FakeResolver({self.HOST: ["127.0.0.1"]}))
        return CIMDResolver(global_reactor, **kw)

    @inlineCallbacks
    def test_fetch_over_tls(self):
        """
        The document is fetched over verified TLS: the TCP connection goes
        to the vetted 127.0.0.1 while SNI and the Host header carry the
        name from the URL.
        """
        resolver = self.resolver(allowed_networks=["127.0.0.1/32"])
        client = yield resolver.resolve(self.url)
        self.assertEqual(client.client_id, self.url)
        self.assertEqual(client.client_name, "Real")
        self.assertEqual(self.server_names, [self.HOST.encode()])
        [(path, host)] = self.resource.requests
        self.assertEqual(path, b"/client.json")
        self.assertEqual(host, f"{self.HOST}:{self.port.getHost().port}".encode())
        # Cached: no second request.
        yield resolver.resolve(self.url)
        self.assertEqual(len(self.resource.requests), 1)

    @inlineCallbacks
    def test_ip_literal_with_allowed_network(self):
        resolver = self.resolver(allowed_networks=["127.0.0.1/32"])
        url = f"https://127.0.0.1:{self.port.getHost().port}/ip.json"
        self.resource.bodies[b"/ip.json"] = body_of(document(client_id=url))
        client = yield resolver.resolve(url)
        self.assertEqual(client.client_id, url)

    @inlineCallbacks
    def test_loopback_refused(self):
        """
        Without the test hook, a name that resolves to 127.0.0.1 is refused
        before any connection is made.
        """
        resolver = self.resolver()
        with capturedLogs() as events, self.assertRaises(CIMDError) as ctx:
            yield resolver.resolve(self.url)
        self.assertEqual(
            ctx.exception.reason,
            "client metadata host resolves to a special-use address",
        )
        self.assertEqual(self.factory.accepted, 0)
        self.assertTrue(any(e.get("host") == self.HOST and e.get("address") == "127.0.0.1" for e in events))

    @inlineCallbacks
    def test_loopback_literal_refused(self):
        resolver = self.resolver()
        url = f"https://127.0.0.1:{self.port.getHost().port}/client.json"
        with self.assertRaises(CIMDError):
            yield resolver.resolve(url)
        self.assertEqual(self.factory.accepted, 0)

    @inlineCallbacks
    def test_untrusted_ca(self):
        """
        Without the test CA as trust root, the certificate is refused.
        """
        resolver = self.resolver(trust_root=None, allowed_networks=["127.0.0.1/32"])
        with self.assertRaises(CIMDError) as ctx:
            yield resolver.resolve(self.url)
        self.assertEqual(ctx.exception.reason, "TLS verification of the client metadata host failed")
        self.assertEqual(self.resource.requests, [])

    @inlineCallbacks
    def test_wrong_hostname(self):
        """
        A certificate from the trusted CA for another name is refused: the
        name checked is the one in the URL, not the address connected to.
        """
        resolver = self.resolver(
            allowed_networks=["127.0.0.1/32"],
            name_resolver=FakeResolver({"other.example": ["127.0.0.1"]}),
        )
        url = self.url.replace(self.HOST, "other.example")
        with self.assertRaises(CIMDError) as ctx:
            yield resolver.resolve(url)
        self.assertEqual(ctx.exception.reason, "TLS verification of the client metadata host failed")
        self.assertEqual(self.resource.requests, [])

    @inlineCallbacks
    def test_oversized(self):
        self.resource.bodies[b"/client.json"] = b" " * 200_000
        resolver = self.resolver(allowed_networks=["127.0.0.1/32"])
        with self.assertRaises(CIMDError) as ctx:
            yield resolver.resolve(self.url)
        self.assertIn("larger than", ctx.exception.reason)

    @inlineCallbacks
    def test_insecure_http(self):
        """
        The development switch fetches plain http from loopback.
        """
        site = TrackingFactory(Site(self.resource))
        port = global_reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(site.closed)
        self.addCleanup(port.stopListening)
        url = f"http://127.0.0.1:{port.getHost().port}/dev.json"
        self.resource.bodies[b"/dev.json"] = body_of(document(client_id=url))
        client = yield CIMDResolver(global_reactor, allow_insecure=True).resolve(url)
        self.assertEqual(client.client_id, url)


# --- A host that drips ---------------------------------------------------


class Drip(Protocol):
    """
    Answers a request one byte per tick of C{factory.clock}: the whole
    response (C{mode="headers"}), or complete headers and then the body
    (C{mode="body"}).  It never finishes: only the client can end it.
    """

    factory: DripFactory

    def connectionMade(self) -> None:
        self.factory.connections.append(self)
        self.call: Any = None
        self.request = b""

    def dataReceived(self, data: bytes) -> None:
        self.request += data
        if b"\r\n\r\n" not in self.request or self.call is not None:
            return
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 4000\r\n\r\n"
        body = b" " * 4000
        if self.factory.mode == "headers":
            self.pending = head + body
        else:
            self.transport.write(head)
            self.pending = body
        self.call = self.factory.clock.callLater(1, self.tick)
        self.factory.requested.callback(None)

    def tick(self) -> None:
        self.transport.write(self.pending[:1])
        self.pending = self.pending[1:]
        self.factory.sent += 1
        self.call = self.factory.clock.callLater(1, self.tick)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.call is not None and self.call.active():
            self.call.cancel()
        self.factory.lost.callback(global_reactor.seconds())


class DripFactory(ServerFactory):
    protocol = Drip

    def __init__(self, clock: Any, mode: str) -> None:
        self.clock = clock
        self.mode = mode
        self.connections: list[Drip] = []
        self.requested: Deferred = Deferred()
        self.lost: Deferred = Deferred()
        self.sent = 0


@implementer(IAgent)
class WatchingAgent:
    """
    Passes requests on, and counts the body bytes that reach the client.
    """

    def __init__(self, agent: IAgent) -> None:
        self._agent = agent
        self.responded: Deferred = Deferred()
        self.received = 0
        self.arrivals: list[Deferred] = []

    def request(self, method, uri, headers=None, bodyProducer=None):
        d = self._agent.request(method, uri, headers, bodyProducer)

        def watch(response: IResponse) -> IResponse:
            self.responded.callback(None)
            watcher = self

            class Watched(proxyForInterface(IResponse)):  # type: ignore[misc]
                def deliverBody(self, protocol: Protocol) -> None:
                    inner = protocol.dataReceived

                    def counted(data: bytes) -> None:
                        watcher.received += len(data)
                        waiting, watcher.arrivals = watcher.arrivals, []
                        for w in waiting:
                            w.callback(None)
                        inner(data)

                    protocol.dataReceived = counted  # type: ignore[method-assign]
                    self.original.deliverBody(protocol)

            return Watched(response)

        return d.addCallback(watch)

    def arrival(self) -> Deferred:
        d: Deferred = Deferred()
        self.arrivals.append(d)
        return d


class DripTests(TestCase):
    """
    A real host on 127.0.0.1 that sends one byte a second cannot hold a
    fetch slot past the deadline, whether it drips its headers or its
    body: the fetch fails at the deadline, the slot is free at once and
    the connection is closed.
    """

    def serve(self, clock: Any, mode: str) -> tuple[DripFactory, str]:
        factory = DripFactory(clock, mode)
        port = global_reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return factory, f"http://127.0.0.1:{port.getHost().port}/drip.json"

    @inlineCallbacks
    def drip_against_clock(self, mode: str):
        """
        The deadline and the drip both run on a Clock; the bytes travel
        over a real socket.
        """
        clock = Clock()
        server, url = self.serve(clock, mode)
        agent = WatchingAgent(
            make_vetted_agent(global_reactor, policy=AddressPolicy(allow_all=True), allow_http=True)
        )
        resolver = CIMDResolver(clock, agent=agent, allow_insecure=True, max_in_flight=1)
        d = resolver.resolve(url)
        yield server.requested
        if mode == "body":
            yield agent.responded
        for second in range(1, 5):
            arrived = agent.arrival()
            clock.advance(1)
            if mode == "body":
                yield arrived  # the byte reached the client: it is "active"
                self.assertEqual(agent.received, second)
            self.assertNoResult(d)
            refused = resolver.resolve("http://127.0.0.1:1/other.json")
            self.assertIn("too many", self.failureResultOf(refused, CIMDError).value.reason)
        clock.advance(1)
        error = self.failureResultOf(d, CIMDError).value
        self.assertEqual(error.reason, "fetching the client metadata document timed out")
        self.assertTrue(error.transient)
        # The slot is free at the deadline, not when the socket closes.
        other = resolver.resolve("http://127.0.0.1:1/other.json")
        yield server.lost
        self.assertEqual(server.sent, 5)
        self.assertFalse(agent.responded.called and mode == "headers")
        with self.assertRaises(CIMDError):
            yield other  # port 1: nobody listens

    def test_drip_headers(self):
        return self.drip_against_clock("headers")

    def test_drip_body(self):
        return self.drip_against_clock("body")

    @inlineCallbacks
    def test_drip_real_time(self):
        """
        With the real reactor's clock and a 2 s deadline, a body sent one
        byte a second is cut off at 2 s.
        """
        server, url = self.serve(global_reactor, "body")
        resolver = CIMDResolver(global_reactor, allow_insecure=True, timeout=2.0)
        start = global_reactor.seconds()
        with self.assertRaises(CIMDError) as ctx:
            yield resolver.resolve(url)
        elapsed = global_reactor.seconds() - start
        self.assertIn("timed out", ctx.exception.reason)
        self.assertGreaterEqual(elapsed, 1.9)
        self.assertLess(elapsed, 3.0)
        closed_at = yield server.lost
        self.assertLess(closed_at - start, 3.0)
        self.assertIn(server.sent, (1, 2))
