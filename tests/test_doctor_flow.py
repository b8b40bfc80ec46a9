"""
Tests for L{smeldr_oauth.doctor.flow}: the consent form as a browser reads
it, and the flow against a scripted authorization server over StubTreq,
including the ways a server can get a step wrong and where the site token
may go.  The flow against the real server is in
C{tests/test_doctor_proxy.py}.
"""

from __future__ import annotations

import json
from typing import Any, Optional
from urllib.parse import parse_qs, urlencode

from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from smeldr_oauth.doctor.fetch import Fetcher
from smeldr_oauth.doctor.flow import REDIRECT_URI, Credentials, Flow, FlowError, consent_form
from smeldr_oauth.web.authorize import consent_page

ISSUER = "https://example.com"
MCP = ISSUER + "/mcp"
SITE_TOKEN = "site-token-0123456789abcdef"


def metadata(**changes: Any) -> dict[str, Any]:
    base = {
        "issuer": ISSUER,
        "authorization_endpoint": ISSUER + "/oauth/authorize",
        "token_endpoint": ISSUER + "/oauth/token",
        "registration_endpoint": ISSUER + "/oauth/register",
        "revocation_endpoint": ISSUER + "/oauth/revoke",
        "authorization_response_iss_parameter_supported": True,
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


class ConsentFormTests(SynchronousTestCase):
    def test_realPage(self) -> None:
        """
        The server's own consent page: its hidden fields, in order, and
        its action; never the site token field or the buttons.
        """
        page = consent_page(
            action=ISSUER + "/oauth/authorize",
            site_name="smeldr",
            client_name="App <b>",
            client_id="c1",
            client_is_url=False,
            redirect_uri=REDIRECT_URI,
            scopes=[("read", "Read")],
            fields=[("client_id", "c1"), ("state", "s&t"), ("resource", MCP)],
        ).render("n").decode()
        form = consent_form(page, ISSUER + "/oauth/authorize?x=1")
        assert form is not None
        self.assertEqual(form.action, ISSUER + "/oauth/authorize")
        self.assertEqual(form.fields, (("client_id", "c1"), ("state", "s&t"), ("resource", MCP)))

    def test_relativeAction(self) -> None:
        page = (
            '<form method="get" action="/search"><input name="site_token"><button name="decision"></button></form>'
            '<form method="POST" action="approve"><input type="hidden" name="a" value="1">'
            '<input type="password" name="site_token"><button name="decision" value="approve"></button></form>'
        )
        form = consent_form(page, ISSUER + "/oauth/authorize?q")
        assert form is not None
        self.assertEqual((form.action, form.fields), (ISSUER + "/oauth/approve", (("a", "1"),)))

    def test_none(self) -> None:
        self.assertIsNone(consent_form("<html><form method=post><input name=q></form>", ISSUER))
        self.assertIsNone(consent_form("not html at all <<<", ISSUER))


class ScriptedServer(Resource):
    """
    An authorization server whose answers the test chooses; it keeps every
    request body it was sent.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[tuple[bytes, bytes, bytes]] = []
        self.registration: dict[str, Any] = {"client_id": "c1"}
        self.consentStatus = 303
        self.redirectParams: Optional[dict[str, str]] = None
        self.tokenAnswer: tuple[int, dict[str, Any]] = (
            200,
            {"access_token": "access-abc", "token_type": "Bearer", "refresh_token": "refresh-abc", "expires_in": 60},
        )
        self.state = ""
        self.iss = ISSUER

    def render_GET(self, request: Any) -> bytes:
        self.bodies.append((b"GET", request.uri, b""))
        query = parse_qs(request.uri.split(b"?", 1)[1].decode())
        self.state = query["state"][0]
        request.setHeader(b"content-type", b"text/html")
        return (
            f'<form method="post" action="/oauth/authorize"><input type="hidden" name="state" value="{self.state}">'
            '<input name="site_token" type="password"><button name="decision" value="approve">Approve</button>'
            "</form>"
        ).encode()

    def render_POST(self, request: Any) -> bytes:
        body = request.content.read()
        self.bodies.append((b"POST", request.path, body))
        request.setHeader(b"content-type", b"application/json")
        if request.path == b"/oauth/register":
            request.setResponseCode(201)
            return json.dumps(self.registration).encode()
        if request.path == b"/oauth/authorize":
            params = self.redirectParams or {"code": "code-1", "state": self.state, "iss": self.iss}
            request.setResponseCode(self.consentStatus)
            request.setHeader(b"location", (REDIRECT_URI + "?" + urlencode(params)).encode())
            return b""
        if request.path == b"/oauth/token":
            status, answer = self.tokenAnswer
            request.setResponseCode(status)
            return json.dumps(answer).encode()
        return b"{}"


class FlowTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.server = ScriptedServer()
        self.stub = StubTreq(self.server)
        self.fetcher = Fetcher(Clock(), self.stub, timeout=5)

    def run_flow(self, meta: Optional[dict[str, Any]] = None) -> tuple[Flow, "Deferred[Credentials]"]:
        flow = Flow(self.fetcher, MCP, MCP, meta or metadata())
        d = Deferred.fromCoroutine(flow.run(SITE_TOKEN))
        for _ in range(10):
            self.stub.flush()
        return flow, d

    def sentTo(self, secret: str) -> list[bytes]:
        return [path for method, path, body in self.server.bodies if secret.encode() in body or secret.encode() in path]

    def test_success(self) -> None:
        flow, d = self.run_flow()
        credentials = self.successResultOf(d)
        self.assertEqual(credentials.access_token, "access-abc")
        self.assertEqual(credentials.client_id, "c1")
        self.assertNotIn("access-abc", repr(credentials))
        self.assertNotIn("refresh-abc", repr(credentials))
        self.assertEqual([s for s, _, _ in flow.steps], ["registered", "consent page", "approved", "token issued"])
        self.assertEqual(self.sentTo(SITE_TOKEN), [b"/oauth/authorize"])
        token = parse_qs(self.server.bodies[-1][2].decode())
        self.assertEqual(token["grant_type"], ["authorization_code"])
        self.assertEqual(token["resource"], [MCP])
        self.assertEqual(token["redirect_uri"], [REDIRECT_URI])
        self.assertEqual(len(token["code_verifier"][0]), 64)

        d2 = Deferred.fromCoroutine(flow.revoke(credentials))
        for _ in range(5):
            self.stub.flush()
        self.successResultOf(d2)
        revoked = [parse_qs(b.decode())["token"] for m, p, b in self.server.bodies if p == b"/oauth/revoke"]
        self.assertEqual(revoked, [["refresh-abc"], ["access-abc"]])
        self.assertEqual(flow.steps[-1][:2], ("revoked", True))

    def assertStepFails(self, step: str, words: str, meta: Optional[dict[str, Any]] = None) -> Flow:
        flow, d = self.run_flow(meta)
        failure = self.failureResultOf(d, FlowError)
        self.assertEqual(failure.value.step, step)
        self.assertIn(words, failure.value.seen)
        self.assertEqual(flow.steps[-1], (step, False, failure.value.seen))
        return flow

    def test_offOriginAuthorization(self) -> None:
        """
        An authorization endpoint on another origin never gets the site
        token; nothing at all is sent.
        """
        self.assertStepFails("consent", "not on the MCP URL's origin", metadata(authorization_endpoint="https://login.example.net/authorize"))
        self.assertEqual(self.server.bodies, [])

    def test_noRegistration(self) -> None:
        self.assertStepFails("registered", "no dynamic registration", metadata(registration_endpoint=None))

    def test_unaskedSecret(self) -> None:
        self.server.registration = {"client_id": "c1", "client_secret": "x"}
        self.assertStepFails("registered", "client secret")

    def test_consent307(self) -> None:
        self.server.consentStatus = 307
        self.assertStepFails("approved", "307")

    def test_errorRedirect(self) -> None:
        self.server.redirectParams = {"error": "access_denied", "error_description": "no"}
        self.assertStepFails("approved", "error=access_denied")

    def test_stateMismatch(self) -> None:
        self.server.redirectParams = {"code": "c", "state": "other", "iss": ISSUER}
        self.assertStepFails("approved", "state")

    def test_wrongIss(self) -> None:
        """
        RFC 9207: with C{authorization_response_iss_parameter_supported},
        the redirect's C{iss} must be the issuer (the Python SDK checks).
        """
        self.server.iss = "https://evil.example"
        self.assertStepFails("approved", "RFC 9207")

    def test_tokenRefused(self) -> None:
        self.server.tokenAnswer = (400, {"error": "invalid_grant", "error_description": "code already used"})
        self.assertStepFails("token", "400 invalid_grant: code already used")

    def test_tokenTypeNotBearer(self) -> None:
        self.server.tokenAnswer = (200, {"access_token": "a", "token_type": "DPoP"})
        self.assertStepFails("token", "not Bearer")

    def test_revokeWithoutEndpoint(self) -> None:
        flow = Flow(self.fetcher, MCP, MCP, metadata())
        self.successResultOf(Deferred.fromCoroutine(flow.revoke(Credentials(access_token="a"))))
        self.assertEqual(flow.steps[-1][:2], ("revoked", False))
