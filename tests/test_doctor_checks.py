"""
Tests for L{smeldr_oauth.doctor.checks} and L{smeldr_oauth.doctor.model}:
every check with crafted inputs, no network.
"""

from __future__ import annotations

import email.utils
import json
import os
from typing import Any, Optional

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from smeldr_oauth.doctor import checks
from smeldr_oauth.doctor.checks import Certificate, SessionProbe
from smeldr_oauth.doctor.model import FAIL, OK, SECTIONS, SKIP, Fetched, anchor, describe_body, section_link
from tests.e2e import CHECKOUT

MCP = "https://example.com/mcp"
PRM_PATH = "https://example.com/.well-known/oauth-protected-resource/mcp"
PRM_ROOT = "https://example.com/.well-known/oauth-protected-resource"
NOW = 1_800_000_000.0
DAY = 86400.0


def fetched(
    url: str = PRM_PATH,
    status: Optional[int] = 200,
    body: Any = None,
    headers: Optional[dict[str, Any]] = None,
    error: Optional[str] = None,
    received_at: Optional[float] = None,
) -> Fetched:
    if isinstance(body, (dict, list)):
        raw = json.dumps(body).encode()
        headers = {"content-type": "application/json", **(headers or {})}
    else:
        raw = body or b""
    return Fetched(
        url=url,
        status=status,
        headers={k.lower(): (v if isinstance(v, tuple) else (v,)) for k, v in (headers or {}).items()},
        body=raw,
        error=error,
        received_at=received_at,
    )


def prm(resource: str = MCP, servers: Any = ("https://example.com",)) -> dict[str, Any]:
    return {"resource": resource, "authorization_servers": list(servers)}


def as_metadata(**changes: Any) -> dict[str, Any]:
    base = {
        "issuer": "https://example.com",
        "authorization_endpoint": "https://example.com/oauth/authorize",
        "token_endpoint": "https://example.com/oauth/token",
        "registration_endpoint": "https://example.com/oauth/register",
        "response_types_supported": ["code"],
        "grant_types_supported": ["authorization_code", "refresh_token"],
        "code_challenge_methods_supported": ["S256"],
        "token_endpoint_auth_methods_supported": ["none"],
        "client_id_metadata_document_supported": True,
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


class ModelTests(SynchronousTestCase):
    def test_anchor(self) -> None:
        self.assertEqual(anchor("The 401 challenge"), "the-401-challenge")
        self.assertEqual(anchor("CORS on discovery"), "cors-on-discovery")

    def test_everySectionInTheGuide(self) -> None:
        """
        Every check links to a heading that exists in the troubleshooting
        guide.
        """
        with open(os.path.join(CHECKOUT, "docs", "troubleshooting.md"), encoding="utf-8") as f:
            headings = {anchor(line.lstrip("#")) for line in f if line.startswith("#")}
        for check, title in SECTIONS.items():
            self.assertIn(anchor(title), headings, check)
            self.assertEqual(section_link(check), f"docs/troubleshooting.md#{anchor(title)}")

    def test_json(self) -> None:
        self.assertEqual(fetched(body={"a": 1}).json_object(), ({"a": 1}, None))
        body, problem = fetched(body=b"<html>hello</html>").json_object()
        self.assertIsNone(body)
        assert problem is not None
        self.assertIn("<html>hello</html>", problem)
        self.assertEqual(fetched(body=b"[1]").json_object(), (None, "the body is JSON but not an object"))
        self.assertIsNone(fetched(body=b"\xff\xfe").json_object()[0])

    def test_describeBodyPrintable(self) -> None:
        text = describe_body(fetched(body=b"\x1b[2Jgotcha\n\n  " + b"x" * 200))
        self.assertNotIn("\x1b", text)
        self.assertTrue(text.endswith("…'"))
        self.assertEqual(describe_body(fetched(body=b"")), "empty")

    def test_answered(self) -> None:
        self.assertEqual(fetched(status=404, headers={"content-type": "text/html; charset=utf-8"}).answered(), "404 text/html")
        self.assertEqual(fetched(status=None, error="connection refused").answered(), "connection refused")


class URLAndTLSTests(SynchronousTestCase):
    def test_url(self) -> None:
        self.assertEqual(checks.check_url(None, MCP).status, OK)
        verdict = checks.check_url("'x' is plain http", "x")
        self.assertEqual(verdict.status, FAIL)
        self.assertIn("https://<your host>/mcp", verdict.fix)

    def certificate(self, **changes: Any) -> Certificate:
        values: dict[str, Any] = {"not_before": NOW - DAY, "not_after": NOW + 60 * DAY, "issuer": "CN=R11"}
        values.update(changes)
        return Certificate(**values)

    def test_good(self) -> None:
        verdict = checks.check_tls(self.certificate(), NOW, 14)
        self.assertEqual(verdict.status, OK)
        self.assertIn("60 more days", verdict.summary)

    def test_http(self) -> None:
        self.assertEqual(checks.check_tls(None, NOW, 14).status, SKIP)

    def test_expiringSoon(self) -> None:
        verdict = checks.check_tls(self.certificate(not_after=NOW + 3 * DAY), NOW, 14)
        self.assertEqual(verdict.status, FAIL)
        self.assertIn("expires in 3.0 days", verdict.summary)

    def test_expired(self) -> None:
        verdict = checks.check_tls(self.certificate(not_after=NOW - DAY), NOW, 14)
        self.assertEqual(verdict.status, FAIL)
        self.assertIn("expired on", verdict.summary)

    def test_notYetValid(self) -> None:
        verdict = checks.check_tls(self.certificate(not_before=NOW + DAY), NOW, 14)
        self.assertIn("not valid yet", verdict.summary)

    def test_untrusted(self) -> None:
        verdict = checks.check_tls(Certificate(error="TLS: certificate verify failed"), NOW, 14)
        self.assertEqual(verdict.status, FAIL)
        self.assertIn("certificate verify failed", verdict.summary)
        self.assertIn("self-signed", verdict.fix)

    def test_untrustedAndExpired(self) -> None:
        """
        When verification failed but the certificate could be read, an
        expiry is named: it is the likelier cause.
        """
        verdict = checks.check_tls(
            self.certificate(error="TLS: certificate verify failed", not_after=NOW - DAY), NOW, 14
        )
        self.assertIn("expired on", verdict.summary)


class DocumentTests(SynchronousTestCase):
    def test_resourceMetadata(self) -> None:
        verdict, body = checks.check_protected_resource_metadata("prm-path", fetched(body=prm()), True)
        self.assertEqual((verdict.status, body), (OK, prm()))

    def test_notForwarded(self) -> None:
        """
        A 404 page on the well-known path while the MCP URL reaches the
        server: the fix names the path not being forwarded.
        """
        page = fetched(status=404, body=b"<h1>Not found</h1>", headers={"content-type": "text/html"})
        verdict, body = checks.check_protected_resource_metadata("prm-root", page, True)
        self.assertIsNone(body)
        self.assertEqual(verdict.status, FAIL)
        self.assertIn("404 text/html", verdict.summary)
        self.assertIn("reaches the server but this path does not", verdict.fix)
        verdict, _ = checks.check_protected_resource_metadata("prm-root", page, False)
        self.assertNotIn("reaches the server", verdict.fix)

    def test_noAnswer(self) -> None:
        verdict, _ = checks.check_protected_resource_metadata(
            "prm-path", fetched(status=None, error="connection refused"), False
        )
        self.assertIn("connection refused", verdict.summary)

    def test_htmlWith200(self) -> None:
        verdict, _ = checks.check_protected_resource_metadata(
            "prm-path", fetched(body=b"<!doctype html>", headers={"content-type": "text/html"}), True
        )
        self.assertEqual(verdict.status, FAIL)
        self.assertIn("not JSON", verdict.summary)

    def test_wrongContentType(self) -> None:
        verdict, _ = checks.check_protected_resource_metadata(
            "prm-path", fetched(body=json.dumps(prm()).encode(), headers={"content-type": "text/plain"}), True
        )
        self.assertIn("served as 'text/plain'", verdict.summary)

    def test_missingFields(self) -> None:
        verdict, _ = checks.check_protected_resource_metadata("prm-path", fetched(body={"resource": MCP}), True)
        self.assertIn("no authorization_servers", verdict.summary)
        verdict, _ = checks.check_protected_resource_metadata(
            "prm-path", fetched(body={"authorization_servers": ["x"]}), True
        )
        self.assertIn('no "resource"', verdict.summary)
        verdict, _ = checks.check_protected_resource_metadata("prm-path", fetched(body=prm(servers=[])), True)
        self.assertEqual(verdict.status, FAIL)

    def test_asMetadataHead(self) -> None:
        """
        ChatGPT sends HEAD first: one refused fails the check, the document
        is still used.
        """
        get = fetched(body=as_metadata())
        verdict, body = checks.check_authorization_server_metadata(get, "https://example.com", True, fetched(status=405))
        self.assertEqual(verdict.status, FAIL)
        self.assertIn("HEAD", verdict.summary)
        self.assertEqual(body, as_metadata())
        verdict, _ = checks.check_authorization_server_metadata(get, "https://example.com", True, fetched(status=200))
        self.assertEqual(verdict.status, OK)

    def test_asMetadataSkippedWithoutServer(self) -> None:
        verdict, body = checks.check_authorization_server_metadata(None, None, True)
        self.assertEqual((verdict.status, body), (SKIP, None))


class ResourceTests(SynchronousTestCase):
    def test_match(self) -> None:
        verdict = checks.check_resource(MCP, {PRM_PATH: prm(), PRM_ROOT: prm()})
        self.assertEqual(verdict.status, OK)
        self.assertIn("matches", verdict.summary)

    def test_prefix(self) -> None:
        verdict = checks.check_resource(MCP, {PRM_ROOT: prm("https://example.com")})
        self.assertEqual(verdict.status, OK)
        self.assertIn("a prefix", verdict.summary)

    def test_trailingSlash(self) -> None:
        verdict = checks.check_resource(MCP, {PRM_PATH: prm(MCP + "/")})
        self.assertEqual(verdict.status, FAIL)
        self.assertIn(repr(MCP + "/"), verdict.summary)
        self.assertIn(repr(MCP), verdict.summary)
        self.assertIn("trailing slash", verdict.fix)

    def test_otherOrigin(self) -> None:
        verdict = checks.check_resource(MCP, {PRM_PATH: prm("http://internal:8080/mcp")})
        self.assertEqual(verdict.status, FAIL)
        self.assertIn("http://internal:8080", verdict.summary)
        self.assertIn("https://example.com", verdict.summary)

    def test_disagreement(self) -> None:
        verdict = checks.check_resource(MCP, {PRM_PATH: prm(), PRM_ROOT: prm("https://example.com/other")})
        self.assertEqual(verdict.status, FAIL)
        self.assertIn("disagree", verdict.summary)

    def test_nothing(self) -> None:
        self.assertEqual(checks.check_resource(MCP, {}).status, SKIP)


class IssuerAndFieldsTests(SynchronousTestCase):
    def test_issuer(self) -> None:
        self.assertEqual(checks.check_issuer(as_metadata(), "https://example.com").status, OK)

    def test_issuerTrailingSlash(self) -> None:
        verdict = checks.check_issuer(as_metadata(issuer="https://example.com/"), "https://example.com")
        self.assertEqual(verdict.status, FAIL)
        self.assertIn("trailing slash apart", verdict.summary)
        self.assertIn("'https://example.com/'", verdict.summary)

    def test_issuerCase(self) -> None:
        verdict = checks.check_issuer(as_metadata(issuer="https://Example.com"), "https://example.com")
        self.assertIn("letter case", verdict.summary)

    def test_issuerHttp(self) -> None:
        verdict = checks.check_issuer(as_metadata(issuer="http://example.com"), "http://example.com")
        self.assertEqual(verdict.status, FAIL)
        self.assertIn("not https", verdict.summary)
        self.assertEqual(checks.check_issuer(as_metadata(issuer="http://127.0.0.1:8"), "http://127.0.0.1:8").status, OK)

    def test_issuerMissing(self) -> None:
        self.assertEqual(checks.check_issuer(as_metadata(issuer=None), "https://example.com").status, FAIL)

    def test_fieldsGood(self) -> None:
        verdict = checks.check_metadata_fields(as_metadata())
        self.assertEqual(verdict.status, OK)
        self.assertIn("dynamic registration and client metadata documents", verdict.summary)

    def assertProblem(self, metadata: dict[str, Any], words: str) -> None:
        verdict = checks.check_metadata_fields(metadata)
        self.assertEqual(verdict.status, FAIL, metadata)
        self.assertIn(words, verdict.summary)

    def test_fieldsMissing(self) -> None:
        self.assertProblem(as_metadata(code_challenge_methods_supported=["plain"]), "lacks S256")
        self.assertProblem(as_metadata(code_challenge_methods_supported=None), "lacks S256")
        self.assertProblem(as_metadata(response_types_supported=None), 'lacks "code"')
        self.assertProblem(as_metadata(token_endpoint=None), "no token_endpoint")
        self.assertProblem(as_metadata(grant_types_supported=["implicit"]), "lacks authorization_code")
        self.assertProblem(as_metadata(token_endpoint="http://example.com/token"), "not an https URL")

    def test_cimdWithoutNone(self) -> None:
        """
        Metadata documents offered without C{none}: the clients ignore
        them, and with no registration either nothing is left.
        """
        self.assertProblem(
            as_metadata(token_endpoint_auth_methods_supported=["client_secret_post"]), 'lacks "none"'
        )
        self.assertProblem(
            as_metadata(token_endpoint_auth_methods_supported=["private_key_jwt"], registration_endpoint=None),
            "clients cannot get a client id",
        )

    def test_noWayIn(self) -> None:
        self.assertProblem(
            as_metadata(client_id_metadata_document_supported=False, registration_endpoint=None),
            "clients cannot get a client id",
        )
        verdict = checks.check_metadata_fields(as_metadata(client_id_metadata_document_supported=None))
        self.assertEqual(verdict.status, OK)
        self.assertIn("dynamic registration", verdict.summary)


class OpenIDTests(SynchronousTestCase):
    URL = "https://example.com/.well-known/openid-configuration"

    def test_404(self) -> None:
        self.assertEqual(checks.check_openid_configuration(fetched(self.URL, 404), None).status, OK)

    def test_catchAllPage(self) -> None:
        verdict = checks.check_openid_configuration(
            fetched(self.URL, 200, b"<!doctype html><div id=app>", {"content-type": "text/html"}),
            "https://example.com",
        )
        self.assertEqual(verdict.status, FAIL)
        self.assertIn("catch-all", verdict.fix)

    def test_validDocument(self) -> None:
        good = fetched(self.URL, 200, {"issuer": "https://example.com"})
        self.assertEqual(checks.check_openid_configuration(good, "https://example.com").status, OK)
        other = fetched(self.URL, 200, {"issuer": "https://login.example.net"})
        self.assertEqual(checks.check_openid_configuration(other, "https://example.com").status, FAIL)

    def test_otherStatus(self) -> None:
        self.assertEqual(checks.check_openid_configuration(fetched(self.URL, 500), None).status, FAIL)
        self.assertEqual(
            checks.check_openid_configuration(fetched(self.URL, None, error="timed out"), None).status, FAIL
        )


class ChallengeTests(SynchronousTestCase):
    def challenge(self, header: Optional[str], status: int = 401) -> Fetched:
        return fetched(MCP, status, b"{}", {"www-authenticate": header} if header else {})

    def test_parse(self) -> None:
        self.assertEqual(
            checks.parse_bearer_challenge(
                'Bearer error="invalid_token", resource_metadata="https://e/x", scope="read write"'
            ),
            {"error": "invalid_token", "resource_metadata": "https://e/x", "scope": "read write"},
        )
        self.assertEqual(
            checks.parse_bearer_challenge('Basic realm="a, b", Bearer resource_metadata=https://e/x'),
            {"resource_metadata": "https://e/x"},
        )
        self.assertEqual(checks.parse_bearer_challenge("Bearer"), {})
        self.assertEqual(checks.parse_bearer_challenge('bearer realm="a\\"b"'), {"realm": 'a"b'})
        self.assertIsNone(checks.parse_bearer_challenge('Basic realm="x"'))
        self.assertIsNone(checks.parse_bearer_challenge("Basic dXNlcg==, Negotiate"))

    @given(st.text(max_size=200))
    def test_parseNeverRaises(self, header: str) -> None:
        checks.parse_challenges(header)

    def test_good(self) -> None:
        verdict = checks.check_challenge(self.challenge(f'Bearer resource_metadata="{PRM_PATH}"'), {PRM_PATH: MCP})
        self.assertEqual(verdict.status, OK)

    def test_noHeader(self) -> None:
        verdict = checks.check_challenge(self.challenge(None), {PRM_PATH: MCP})
        self.assertEqual(verdict.status, FAIL)
        self.assertIn("no WWW-Authenticate", verdict.summary)
        self.assertIn("drops WWW-Authenticate", verdict.fix)

    def test_notBearer(self) -> None:
        verdict = checks.check_challenge(self.challenge('Basic realm="proxy"'), {PRM_PATH: MCP})
        self.assertIn("no Bearer challenge", verdict.summary)

    def test_noResourceMetadata(self) -> None:
        verdict = checks.check_challenge(self.challenge('Bearer realm="mcp"'), {PRM_PATH: MCP})
        self.assertIn("no resource_metadata", verdict.summary)

    def test_namesBrokenMetadata(self) -> None:
        verdict = checks.check_challenge(self.challenge(f'Bearer resource_metadata="{PRM_PATH}"'), {})
        self.assertIn("not metadata that answered", verdict.summary)

    def test_not401(self) -> None:
        verdict = checks.check_challenge(self.challenge(None, 302), {})
        self.assertIn("not 401", verdict.summary)
        verdict = checks.check_challenge(fetched(MCP, None, error="connection refused"), {})
        self.assertIn("connection refused", verdict.summary)


class CORSTests(SynchronousTestCase):
    ORIGIN = "http://localhost:6274"

    def preflight(self, **headers: str) -> Fetched:
        values = {
            "access-control-allow-origin": "*",
            "access-control-allow-headers": "Authorization, Content-Type, MCP-Protocol-Version",
        }
        values.update(headers)
        return fetched(PRM_PATH, 204, b"", {k: v for k, v in values.items() if v})

    def test_good(self) -> None:
        get = fetched(body=prm(), headers={"access-control-allow-origin": "*"})
        self.assertEqual(checks.check_cors([get], [self.preflight()], self.ORIGIN).status, OK)
        echoed = fetched(body=prm(), headers={"access-control-allow-origin": self.ORIGIN})
        self.assertEqual(checks.check_cors([echoed], [self.preflight(**{"access-control-allow-headers": "*"})], self.ORIGIN).status, OK)

    def test_missing(self) -> None:
        verdict = checks.check_cors([fetched(body=prm())], [self.preflight()], self.ORIGIN)
        self.assertEqual(verdict.status, FAIL)
        self.assertIn("no Access-Control-Allow-Origin", verdict.summary)

    def test_preflightRefused(self) -> None:
        refused = fetched(PRM_PATH, 405, b"")
        self.assertIn("answered 405", checks.check_cors([], [refused], self.ORIGIN).summary)
        narrow = self.preflight(**{"access-control-allow-headers": "Content-Type"})
        self.assertIn("MCP-Protocol-Version", checks.check_cors([], [narrow], self.ORIGIN).summary)
        bare = self.preflight(**{"access-control-allow-origin": ""})
        self.assertIn("no Access-Control-Allow-Origin", checks.check_cors([], [bare], self.ORIGIN).summary)

    def test_nothing(self) -> None:
        self.assertEqual(checks.check_cors([], [], self.ORIGIN).status, SKIP)


class ForwardedTests(SynchronousTestCase):
    def test_good(self) -> None:
        docs = [prm(), as_metadata()]
        verdict = checks.check_forwarded(MCP, docs, PRM_PATH, [(prm(), prm())])
        self.assertEqual(verdict.status, OK)

    def test_httpBehindTLS(self) -> None:
        docs = [prm("http://example.com/mcp", ["http://example.com"])]
        verdict = checks.check_forwarded(MCP, docs, None, [])
        self.assertEqual(verdict.status, FAIL)
        self.assertIn("http:// URLs behind TLS termination", verdict.summary)
        self.assertIn("X-Forwarded-Proto: https", verdict.fix)

    def test_httpChallenge(self) -> None:
        verdict = checks.check_forwarded(MCP, [prm()], "http://example.com/.well-known/x", [])
        self.assertIn("resource_metadata", verdict.summary)

    def test_internalHost(self) -> None:
        docs = [prm("https://app-internal:8080/mcp")]
        verdict = checks.check_forwarded(MCP, docs, None, [])
        self.assertEqual(verdict.status, FAIL)
        self.assertIn("https://app-internal:8080", verdict.summary)
        self.assertIn("Host", verdict.fix)

    def test_spoofable(self) -> None:
        verdict = checks.check_forwarded(MCP, [prm()], None, [(prm(), prm("http://doctor-probe.invalid/mcp"))])
        self.assertEqual(verdict.status, FAIL)
        self.assertIn("anyone can make the server publish other URLs", verdict.summary)
        self.assertIn("resource", verdict.summary)

    def test_httpLoopbackFine(self) -> None:
        url = "http://127.0.0.1:8080/mcp"
        verdict = checks.check_forwarded(url, [prm(url, ["http://127.0.0.1:8080"])], None, [])
        self.assertEqual(verdict.status, OK)

    def test_nothing(self) -> None:
        self.assertEqual(checks.check_forwarded(MCP, [], None, []).status, SKIP)


class ClockTests(SynchronousTestCase):
    def answer(self, server: float, received: float) -> Fetched:
        return fetched(headers={"date": email.utils.formatdate(server, usegmt=True)}, received_at=received)

    def test_inSync(self) -> None:
        verdict = checks.check_clock([self.answer(NOW, NOW + 0.4)])
        self.assertEqual(verdict.status, OK)

    def test_ahead(self) -> None:
        verdict = checks.check_clock([self.answer(NOW + 300, NOW)])
        self.assertEqual(verdict.status, FAIL)
        self.assertIn("300 s ahead of", verdict.summary)

    def test_behind(self) -> None:
        verdict = checks.check_clock([self.answer(NOW - 120, NOW)])
        self.assertIn("120 s behind", verdict.summary)

    def test_smallestCounts(self) -> None:
        """
        A slow answer does not make a clock wrong: the closest one counts.
        """
        verdict = checks.check_clock([self.answer(NOW, NOW + 90), self.answer(NOW, NOW + 0.2)])
        self.assertEqual(verdict.status, OK)

    def test_noDate(self) -> None:
        self.assertEqual(checks.check_clock([fetched(), fetched(headers={"date": "garbage"}, received_at=NOW)]).status, SKIP)


class SessionAndFlowTests(SynchronousTestCase):
    def test_session(self) -> None:
        self.assertEqual(checks.check_session(SessionProbe(statuses=(200,) * 4, session_id_given=True)).status, OK)
        self.assertEqual(checks.check_session(SessionProbe(statuses=(), session_id_given=False)).status, OK)
        lost = checks.check_session(SessionProbe(statuses=(200, 404, 200, 404), session_id_given=True))
        self.assertEqual(lost.status, FAIL)
        self.assertIn("2 of 4", lost.summary)
        self.assertIn("sticky", lost.fix)
        other = checks.check_session(SessionProbe(statuses=(200, 500, 200, 200), session_id_given=True))
        self.assertIn("500", other.summary)
        skipped = checks.check_session(None, "initialize answered 401")
        self.assertEqual((skipped.status, skipped.summary), (SKIP, "initialize answered 401"))

    def test_flow(self) -> None:
        good = checks.check_flow([("registered", True, ""), ("token issued", True, "")])
        self.assertEqual((good.status, good.summary), (OK, "registered, token issued"))
        bad = checks.check_flow([("registered", True, ""), ("approved", False, "answered 403")])
        self.assertEqual(bad.status, FAIL)
        self.assertEqual(bad.summary, "approved: answered 403")
        self.assertEqual(checks.check_flow([]).status, SKIP)
