"""
Tests for L{smeldr_oauth.web.oauth} and L{smeldr_oauth.web.authorize}
(with the consent page): every endpoint through Klein with
L{treq.testing.StubTreq}, on a L{MemoryStore} and a L{Clock}.

Each bad request checks its status and error, that no 500 happened, and
that the store is exactly as it was before.
"""

from __future__ import annotations


import base64
import json
import re
from html import unescape
from typing import Any, Optional, Union
from urllib.parse import quote, urlencode

from klein import Klein
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.web.resource import Resource

from smeldr_oauth.oauth.config import Config
from smeldr_oauth.web.authorize import AuthorizeRoutes
from smeldr_oauth.web.oauth import OAuthRoutes
from smeldr_oauth.web.routes import direct_answers, mount_routes
from smeldr_oauth.oauth.model import Approval
from smeldr_oauth.oauth.server import OAuthServer
from smeldr_oauth.store.memory import MemoryStore
from tests.test_oauth_server import (
    StoreUnchanged,
    exchange_fields,
    authorize_fields,
    CHALLENGE,
    SlowResolver,
    CIMD_CLIENT,
    CIMD_ID,
    ISSUER,
    RESOURCE,
    SITE_TOKEN,
    T0,
    VERIFIER,
    FakeResolver,
    query_of,
    snapshot,
    verify_bearer,
)

FORM = {"Content-Type": "application/x-www-form-urlencoded"}
JSON = {"Content-Type": "application/json"}
Body = Union[bytes, dict[str, str], list[tuple[str, str]], None]

SECURITY_HEADERS = {
    "x-frame-options": "DENY",
    "cache-control": "no-store",
    "referrer-policy": "no-referrer",
}


class Response:
    """
    What a test needs of a response, read at once.
    """

    def __init__(self, status: int, headers: Any, body: bytes) -> None:
        self.status = status
        self._headers = headers
        self.body = body

    def header(self, name: str) -> Optional[str]:
        values = self._headers.getRawHeaders(name)
        return None if values is None else values[0]

    def headers(self, name: str) -> list[str]:
        return self._headers.getRawHeaders(name) or []

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")


class DirectFirst(Resource):
    """
    What L{smeldr_oauth.web.site.SmeldrSite.getResourceFor} does with its
    C{direct} routes, as a root resource for L{StubTreq} (which makes its
    own C{Site}): an exact path found there is answered by its
    L{DirectRoute}, anything else by Klein.
    """

    def __init__(self, direct: dict[bytes, Any], klein: Any) -> None:
        super().__init__()
        self.direct = direct
        self.klein = klein

    def getChildWithDefault(self, name: bytes, request: Any) -> Any:
        found = self.direct.get(request.path)
        if found is not None and request.method not in found.skip:
            return found
        # Klein reads the whole path: give back the segment just taken.
        request.postpath.insert(0, request.prepath.pop())
        return self.klein


class HTTPTestCase(StoreUnchanged):
    config_overrides: dict[str, Any] = {}
    #: answer through L{DirectRoute}s where the site would (the consent
    #: page and form, the token, revocation and registration endpoints).
    direct = False

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        self.store = MemoryStore(self.clock)
        self.resolver = FakeResolver({CIMD_ID: CIMD_CLIENT})
        kw: dict[str, Any] = dict(issuer=ISSUER, verify_bearer=verify_bearer)
        kw.update(self.config_overrides)
        self.config = Config(**kw)
        self.server = OAuthServer(self.config, self.store, self.clock, self.resolver)
        self.app = Klein()
        routes = OAuthRoutes(self.server).routes() + AuthorizeRoutes(self.server).routes()
        mount_routes(self.app, routes)
        root = self.app.resource()
        if self.direct:
            root = DirectFirst(direct_answers(routes), root)
        self.treq = StubTreq(root)
        if self.config.dynamic_registration:
            self.client_id = self.register(
                {"redirect_uris": ["https://client.example/cb"], "client_name": "Registered"}
            ).json["client_id"]

    # Requests

    def request(
        self,
        method: str,
        path: str,
        body: Body = None,
        headers: Optional[dict[str, str]] = None,
        query: Optional[Union[str, list[tuple[str, str]], dict[str, str]]] = None,
    ) -> Response:
        url = ISSUER + path
        if query is not None:
            url += "?" + (query if isinstance(query, str) else urlencode(query))
        data: Optional[bytes]
        if isinstance(body, (dict, list)):
            data = urlencode(body).encode("utf-8")
        else:
            data = body
        d: Deferred[Any] = self.treq.request(
            method, url, data=data, headers=headers or {}, allow_redirects=False
        )
        response = self.successResultOf(d)
        content = self.successResultOf(response.content())
        self.assertNotEqual(response.code, 500, content[:500])
        return Response(response.code, response.headers, content)

    def post(self, path: str, body: Body, headers: Optional[dict[str, str]] = None) -> Response:
        return self.request("POST", path, body, FORM if headers is None else headers)

    def register(self, metadata: Any, headers: Optional[dict[str, str]] = None) -> Response:
        body = metadata if isinstance(metadata, bytes) else json.dumps(metadata).encode()
        return self.request("POST", "/oauth/register", body, JSON if headers is None else headers)

    def authorize_params(self, **overrides: Optional[str]) -> dict[str, str]:
        return authorize_fields(self.client_id, **overrides)

    def consent(self, path: str = "/oauth/authorize", **overrides: Optional[str]) -> Response:
        return self.request("GET", path, query=self.authorize_params(**overrides))

    def decide(
        self,
        decision: str = "approve",
        token: Optional[str] = SITE_TOKEN,
        path: str = "/oauth/authorize",
        **overrides: Optional[str],
    ) -> Response:
        fields = list(self.authorize_params(**overrides).items()) + [("decision", decision)]
        if token is not None:
            fields.append(("site_token", token))
        return self.post(path, fields)

    def code(self, **overrides: Optional[str]) -> str:
        response = self.decide(**overrides)
        self.assertEqual(response.status, 303)
        return query_of(response.header("location") or "")["code"][0]

    def exchange(self, code: str, path: str = "/oauth/token", **overrides: Optional[str]) -> Response:
        return self.post(path, exchange_fields(self.client_id, code, **overrides))

    def tokens(self) -> dict[str, Any]:
        response = self.exchange(self.code())
        self.assertEqual(response.status, 200, response.body)
        return response.json

    # Checks

    def assertOAuthError(self, response: Response, error: str, status: int = 400) -> None:
        self.assertEqual(
            (response.status, response.header("content-type")), (status, "application/json"), response.body
        )
        body = response.json
        self.assertEqual(body["error"], error, body)
        self.assertIsInstance(body["error_description"], str)
        self.assertEqual(response.header("cache-control"), "no-store")
        self.assertEqual(response.header("access-control-allow-origin"), "*")

    def assertPage(self, response: Response, status: int) -> None:
        """
        An HTML page with every security header of the spec.
        """
        self.assertEqual(response.status, status, response.body[:300])
        self.assertEqual(response.header("content-type"), "text/html; charset=utf-8")
        for name, value in SECURITY_HEADERS.items():
            self.assertEqual(response.header(name), value, name)
        csp = response.header("content-security-policy") or ""
        self.assertIn("frame-ancestors 'none'", csp)
        self.assertIn("default-src 'none'", csp)
        self.assertNotRegex(csp, r"https?://(?!client\.example|app\.example|localhost|127\.0\.0\.1)")
        self.assertIsNone(response.header("access-control-allow-origin"))
        self.assertIsNone(response.header("location"))
        self.assertNotRegex(
            response.text, r"<script|https?://(?!client\.example|app\.example|as\.example|localhost)"
        )

    def assertRedirect(self, response: Response, prefix: str) -> dict[str, list[str]]:
        """
        A 303 (never a 307) to C{prefix}, with C{iss}.
        """
        self.assertEqual(response.status, 303)
        location = response.header("location") or ""
        self.assertTrue(location.startswith(prefix + "?"), location)
        for name, value in SECURITY_HEADERS.items():
            self.assertEqual(response.header(name), value, name)
        self.assertIsNone(response.header("access-control-allow-origin"))
        q = query_of(location)
        self.assertEqual(q["iss"], [ISSUER])
        return q

    def assertErrorRedirect(self, response: Response, error: str, state: Optional[str] = "xyz") -> None:
        q = self.assertRedirect(response, "https://client.example/cb")
        self.assertEqual(q["error"], [error], q)
        self.assertEqual(q.get("state"), None if state is None else [state])
        self.assertNotIn("code", q)


class MetadataTests(HTTPTestCase):
    def test_authorization_server(self) -> None:
        response = self.request(
            "GET", "/.well-known/oauth-authorization-server", headers={"MCP-Protocol-Version": "2026-07-28"}
        )
        self.assertEqual(response.status, 200)
        self.assertEqual(response.header("content-type"), "application/json")
        self.assertEqual(response.header("access-control-allow-origin"), "*")
        self.assertEqual(response.json, self.server.authorization_server_metadata())

    def test_clients_md(self) -> None:
        """
        What CLIENTS.md says clients depend on, as served: the issuer equals
        C{authorization_servers[0]} of both resource metadata documents
        byte for byte, S256, C{none}, CIMD, C{iss}.
        """
        meta = self.request("GET", "/.well-known/oauth-authorization-server").json
        raw = self.request("GET", "/.well-known/oauth-protected-resource/mcp").body
        self.assertIn(b'"authorization_servers":["' + ISSUER.encode() + b'"]', raw)
        for path in ("/.well-known/oauth-protected-resource", "/.well-known/oauth-protected-resource/mcp"):
            pr = self.request("GET", path, headers={"MCP-Protocol-Version": "2025-11-25"})
            self.assertEqual(pr.status, 200)
            self.assertEqual(pr.json["authorization_servers"][0], meta["issuer"])
            self.assertEqual(pr.json["resource"], ISSUER + "/mcp")
        self.assertEqual(meta["issuer"], ISSUER)
        self.assertEqual(meta["code_challenge_methods_supported"], ["S256"])
        self.assertIn("none", meta["token_endpoint_auth_methods_supported"])
        self.assertIs(meta["client_id_metadata_document_supported"], True)
        self.assertIs(meta["authorization_response_iss_parameter_supported"], True)
        self.assertEqual(meta["response_types_supported"], ["code"])
        self.assertIn("offline_access", meta["scopes_supported"])
        self.assertEqual(meta["registration_endpoint"], ISSUER + "/oauth/register")

    def test_head(self) -> None:
        """
        ChatGPT probes with HEAD.
        """
        for path in ("/.well-known/oauth-authorization-server", "/.well-known/oauth-protected-resource/mcp"):
            response = self.request("HEAD", path)
            self.assertEqual(response.status, 200)
            self.assertEqual(response.header("content-type"), "application/json")
            self.assertEqual(response.body, b"")

    def test_no_oidc(self) -> None:
        """
        No OpenID discovery document: a JSON 404, which every client handles.
        """
        for method in ("GET", "HEAD"):
            response = self.request(method, "/.well-known/openid-configuration")
            self.assertEqual(response.status, 404)
            self.assertEqual(response.header("content-type"), "application/json")

    def test_preflight(self) -> None:
        for path, method in (
            ("/.well-known/oauth-authorization-server", "GET"),
            ("/.well-known/oauth-protected-resource", "GET"),
            ("/oauth/token", "POST"),
            ("/token", "POST"),
            ("/oauth/revoke", "POST"),
            ("/revoke", "POST"),
            ("/oauth/register", "POST"),
            ("/register", "POST"),
        ):
            response = self.request(
                "OPTIONS",
                path,
                headers={
                    "Origin": "https://inspector.example",
                    "Access-Control-Request-Method": method,
                    "Access-Control-Request-Headers": "content-type, mcp-protocol-version",
                },
            )
            self.assertEqual(response.status, 204, path)
            self.assertEqual(response.header("access-control-allow-origin"), "*")
            self.assertIn(method, response.header("access-control-allow-methods") or "")
            allowed = (response.header("access-control-allow-headers") or "").lower()
            self.assertIn("content-type", allowed)
            self.assertIn("mcp-protocol-version", allowed)

    def test_cors_everywhere_but_authorize(self) -> None:
        self.assertEqual(self.post("/oauth/token", b"").header("access-control-allow-origin"), "*")
        self.assertEqual(self.post("/oauth/revoke", b"").header("access-control-allow-origin"), "*")
        self.assertEqual(self.register({}).header("access-control-allow-origin"), "*")
        for path in ("/oauth/authorize", "/authorize"):
            self.assertIsNone(self.consent(path).header("access-control-allow-origin"))
            options = self.request("OPTIONS", path, headers={"Origin": "https://evil.example"})
            self.assertEqual(options.status, 405)
            self.assertIsNone(options.header("access-control-allow-origin"))

    def test_wrong_methods(self) -> None:
        """
        A method an endpoint does not answer: 405 in the endpoint's own
        format, with a sorted Allow.
        """
        for path, allow in (
            ("/oauth/token", "OPTIONS, POST"),
            ("/token", "OPTIONS, POST"),
            ("/oauth/revoke", "OPTIONS, POST"),
            ("/oauth/register", "OPTIONS, POST"),
        ):
            for method in ("GET", "PUT", "DELETE"):
                response = self.request(method, path)
                self.assertOAuthError(response, "invalid_request", 405)
                self.assertEqual(response.header("allow"), allow)
        response = self.request("POST", "/.well-known/oauth-authorization-server")
        self.assertEqual((response.status, response.header("allow")), (405, "GET, HEAD, OPTIONS"))
        response = self.request("DELETE", "/oauth/authorize")
        self.assertPage(response, 405)
        self.assertEqual(response.header("allow"), "GET, HEAD, POST")


class ConsentPageTests(HTTPTestCase):
    def test_page(self) -> None:
        response = self.consent()
        self.assertPage(response, 200)
        text = response.text
        self.assertIn("Registered wants to connect", text)
        self.assertIn("client.example", text)
        self.assertIn("Read your site", text)
        self.assertIn("refresh tokens", text)
        self.assertIn(f'action="{ISSUER}/oauth/authorize"', text)
        self.assertIn('name="decision" value="approve"', text)
        self.assertIn('name="decision" value="deny"', text)
        self.assertIn('type="password" id="site_token" name="site_token"', text)
        hidden = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)" ?/?>', text))
        self.assertEqual(unescape(hidden["client_id"]), self.client_id)
        self.assertEqual(unescape(hidden["state"]), "xyz")
        self.assertEqual(hidden["code_challenge"], CHALLENGE)
        csp = response.header("content-security-policy") or ""
        self.assertIn("form-action 'self' https://client.example;", csp)
        nonce = re.search(r"style-src 'nonce-([^']+)'", csp)
        assert nonce is not None
        self.assertIn(f'<style nonce="{nonce.group(1)}">', text)
        self.assertNotEqual(self.consent().header("content-security-policy"), csp)

    def test_root_path_and_head(self) -> None:
        self.assertPage(self.consent("/authorize"), 200)
        head = self.request("HEAD", "/oauth/authorize", query=self.authorize_params())
        self.assertEqual(head.status, 200)
        self.assertEqual(head.header("x-frame-options"), "DENY")

    def test_cimd_client_loopback(self) -> None:
        """
        A CIMD client: the document's host is named; a loopback redirect
        gets a warning.
        """
        response = self.consent(client_id=CIMD_ID, redirect_uri="http://localhost:33418/callback")
        self.assertPage(response, 200)
        self.assertIn("Identity published by <strong>app.example</strong>", response.text)
        self.assertIn("localhost:33418", response.text)
        self.assertIn("runs on this computer", response.text)
        self.assertIn(
            "form-action 'self' http://localhost:33418;", response.header("content-security-policy") or ""
        )

    def test_no_loopback_warning(self) -> None:
        self.assertNotIn("runs on this computer", self.consent().text)

    def test_escaping(self) -> None:
        """
        Everything a client or request supplies is escaped.
        """
        client_id = self.register(
            {"redirect_uris": ["https://client.example/cb"], "client_name": '<script>alert("x")</script>'}
        ).json["client_id"]
        response = self.consent(client_id=client_id, state='"><script>alert(1)</script>')
        self.assertPage(response, 200)
        self.assertIn('&lt;script&gt;alert("x")&lt;/script&gt;', response.text)
        self.assertNotIn("<script", response.text)
        self.assertIn("&quot;&gt;&lt;script&gt;", response.text)

    def test_untrusted_gets_page(self) -> None:
        """
        Unknown client, unregistered redirect URI, missing client_id: a
        page, never a redirect, and nothing stored.
        """
        for overrides in (
            {"client_id": "nobody"},
            {"client_id": None},
            {"redirect_uri": "https://evil.example/cb"},
            {"client_id": "https://app.example/missing.json"},
            {"client_id": CIMD_ID, "redirect_uri": None},
        ):
            with self.unchanged():
                response = self.consent(**overrides)
            self.assertPage(response, 400)
            self.assertNotIn("evil.example", response.header("content-security-policy") or "")
            self.assertNotIn("<form", response.text)

    def test_error_redirects(self) -> None:
        for path in ("/oauth/authorize", "/authorize"):
            for overrides, error in (
                ({"scope": "admin"}, "invalid_scope"),
                ({"resource": "https://other.example/mcp"}, "invalid_target"),
                ({"code_challenge": None}, "invalid_request"),
                ({"code_challenge_method": "plain"}, "invalid_request"),
                ({"response_type": "token"}, "unsupported_response_type"),
                ({"prompt": "none"}, "login_required"),
            ):
                with self.unchanged():
                    response = self.consent(path, **overrides)
                self.assertErrorRedirect(response, error)

    def test_error_redirect_without_state(self) -> None:
        response = self.consent(scope="admin", state=None)
        self.assertErrorRedirect(response, "invalid_scope", state=None)

    def test_bad_queries(self) -> None:
        """
        Malformed query strings: a page or an error redirect, never a 500,
        and nothing stored.
        """
        base = urlencode(self.authorize_params())
        cases = [
            (base + "&state=%ff%fe", 400),
            ("client_id=%C0%AF&" + base, 400),
            (base + "&x=1" * 150, 400),
            (base.replace("state=xyz", "state=" + "s" * 3000), 400),
            (base.replace("state=xyz", "state=a&state=b"), 400),
            (base + "&redirect_uri=https%3A%2F%2Fclient.example%2Fcb", 400),
            ("", 400),
            ("%%%%&&&===", 400),
            (base + "&response_type=code", 303),
            (base + "&scope=read", 303),
            (base + "&resource=" + quote(RESOURCE, safe=""), 303),
        ]
        for query, status in cases:
            with self.unchanged():
                response = self.request("GET", "/oauth/authorize", query=query)
            if status == 303:
                q = self.assertRedirect(response, "https://client.example/cb")
                self.assertIn(q["error"][0], ("invalid_request", "invalid_target"))
            else:
                self.assertPage(response, status)


class DecisionTests(HTTPTestCase):
    def test_approve(self) -> None:
        """
        Approving answers 303 (never 307: the browser must not re-post the
        pasted token to the client) with code, state and iss.
        """
        response = self.decide()
        q = self.assertRedirect(response, "https://client.example/cb")
        self.assertEqual(q["state"], ["xyz"])
        self.assertEqual(len(q["code"]), 1)
        self.assertNotIn(SITE_TOKEN, response.header("location") or "")

    def test_root_path(self) -> None:
        response = self.decide(path="/authorize")
        self.assertRedirect(response, "https://client.example/cb")

    def test_deny(self) -> None:
        with self.unchanged():
            response = self.decide("deny", token=None)
        self.assertErrorRedirect(response, "access_denied")

    def test_wrong_token(self) -> None:
        for token in ("wrong", "", None, "raise-x"):
            with capturedLogs():
                with self.unchanged():
                    response = self.decide(token=token)
            self.assertPage(response, 403)
            self.assertIn("not accepted", response.text)
            self.assertIn("<form", response.text)
        self.assertEqual(self.successResultOf(self.store.list_grants()), [])

    def test_repeated_fields(self) -> None:
        fields = list(self.authorize_params().items()) + [
            ("decision", "approve"),
            ("site_token", SITE_TOKEN),
            ("site_token", SITE_TOKEN),
        ]
        with self.unchanged():
            self.assertPage(self.post("/oauth/authorize", fields), 403)
        fields = list(self.authorize_params().items()) + [
            ("decision", "approve"),
            ("decision", "deny"),
            ("site_token", SITE_TOKEN),
        ]
        with self.unchanged():
            self.assertPage(self.post("/oauth/authorize", fields), 400)
        fields = list(self.authorize_params().items()) + [
            ("scope", "read"),
            ("decision", "approve"),
            ("site_token", SITE_TOKEN),
        ]
        with self.unchanged():
            self.assertErrorRedirect(self.post("/oauth/authorize", fields), "invalid_request")

    def test_no_decision(self) -> None:
        for decision in ("", "maybe"):
            with self.unchanged():
                response = self.decide(decision)
            self.assertPage(response, 400)

    def test_revalidated(self) -> None:
        """
        The hidden fields are not trusted: a tampered redirect URI or scope
        is caught on POST.
        """
        with self.unchanged():
            response = self.decide(redirect_uri="https://evil.example/cb")
        self.assertPage(response, 400)
        with self.unchanged():
            response = self.decide(scope="read admin")
        self.assertErrorRedirect(response, "invalid_scope")

    def test_query_ignored_on_post(self) -> None:
        """
        Only the form body counts on POST: parameters in the query string
        cannot add to or override it.
        """
        fields = {k: v for k, v in self.authorize_params().items() if k != "client_id"}
        fields.update(decision="approve", site_token=SITE_TOKEN)
        url = "/oauth/authorize?" + urlencode({"client_id": self.client_id})
        with self.unchanged():
            response = self.post(url, fields)
        self.assertPage(response, 400)

    def test_bad_bodies(self) -> None:
        good = urlencode(
            list(self.authorize_params().items()) + [("decision", "approve"), ("site_token", SITE_TOKEN)]
        ).encode()
        for body, headers, status in (
            (good, {"Content-Type": "text/plain"}, 415),
            (good, {}, 415),
            (json.dumps(self.authorize_params()).encode(), JSON, 415),
            (good, {"Content-Type": "application/x-www-form-urlencoded\xff"}, 400),
            (good + b"&state=%ff", FORM, 400),
            (good + b"\xff", FORM, 400),
            (good + b"&a=" + b"x" * 70000, FORM, 413),
            (good + b"&x=1" * 150, FORM, 400),
        ):
            with self.unchanged():
                response = self.post("/oauth/authorize", body, headers)
            self.assertPage(response, status)
        response = self.post(
            "/oauth/authorize", good, {"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"}
        )
        self.assertEqual(response.status, 303)

    def test_paste_rate_limit(self) -> None:
        """
        C{paste_failures_per_minute} failed pastes a minute per address;
        then even the right token is refused until the bucket refills.
        Successes are not limited.
        """
        for _ in range(3):
            self.assertEqual(self.decide().status, 303)
        with capturedLogs() as events:
            for _ in range(self.config.paste_failures_per_minute):
                self.assertPage(self.decide(token="wrong"), 403)
            before = snapshot(self.store)
            refused = self.decide()
        self.assertPage(refused, 429)
        self.assertEqual(
            [e["endpoint"] for e in events if e.get("smeldr_event") == "rate_limited"], ["authorize"]
        )
        # 30 refusals a minute: the next is allowed in 2 seconds.
        self.assertEqual(refused.header("retry-after"), "2")
        self.assertIn("Too many failed attempts", refused.text)
        self.assertEqual(snapshot(self.store), before)
        self.assertErrorRedirect(self.decide("deny", token=None), "access_denied")
        self.clock.advance(60 / self.config.paste_failures_per_minute)
        self.assertEqual(self.decide().status, 303)


class TokenEndpointTests(HTTPTestCase):
    def test_exchange(self) -> None:
        for path in ("/oauth/token", "/token"):
            response = self.exchange(self.code(), path)
            self.assertEqual(response.status, 200)
            self.assertEqual(response.header("content-type"), "application/json")
            self.assertEqual(response.header("cache-control"), "no-store")
            self.assertEqual(response.header("pragma"), "no-cache")
            self.assertEqual(response.header("access-control-allow-origin"), "*")
            body = response.json
            self.assertEqual(body["token_type"], "Bearer")
            self.assertEqual(body["scope"], "read offline_access")
            self.assertIsNotNone(self.successResultOf(self.server.verify_access_token(body["access_token"])))

    def test_refresh(self) -> None:
        first = self.tokens()
        narrowed = self.post(
            "/oauth/token",
            {
                "grant_type": "refresh_token",
                "refresh_token": first["refresh_token"],
                "client_id": self.client_id,
                "scope": "read",
            },
        )
        self.assertEqual(narrowed.status, 200)
        self.assertEqual(narrowed.json["scope"], "read")
        with self.unchanged():
            widened = self.post(
                "/oauth/token",
                {
                    "grant_type": "refresh_token",
                    "refresh_token": narrowed.json["refresh_token"],
                    "client_id": self.client_id,
                    "scope": "read write",
                },
            )
        self.assertOAuthError(widened, "invalid_scope")

    def test_replay(self) -> None:
        code = self.code()
        first = self.exchange(code).json
        with capturedLogs():
            self.assertOAuthError(self.exchange(code), "invalid_grant")
        self.assertIsNone(self.successResultOf(self.server.verify_access_token(first["access_token"])))

    def test_bad_requests(self) -> None:
        code = self.code()
        good = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": "https://client.example/cb",
            "client_id": self.client_id,
            "code_verifier": VERIFIER,
        }
        encoded = urlencode(good).encode()
        cases: list[tuple[bytes, dict[str, str], str, int]] = [
            (encoded, {}, "invalid_request", 400),
            (encoded, {"Content-Type": "text/plain"}, "invalid_request", 400),
            (json.dumps(good).encode(), JSON, "invalid_request", 400),
            (encoded + b"&grant_type=authorization_code", FORM, "invalid_request", 400),
            (encoded + b"&code=" + code.encode(), FORM, "invalid_request", 400),
            (encoded + b"&x=%ff", FORM, "invalid_request", 400),
            (encoded + b"\xff\xfe", FORM, "invalid_request", 400),
            (encoded + b"&pad=" + b"x" * 70000, FORM, "invalid_request", 413),
            (encoded + b"&x=1" * 150, FORM, "invalid_request", 400),
            (b"", FORM, "invalid_request", 400),
            (b"grant_type=", FORM, "invalid_request", 400),
            (b"grant_type=password&username=a&password=b", FORM, "unsupported_grant_type", 400),
            (urlencode({**good, "client_id": "nobody"}).encode(), FORM, "invalid_client", 401),
            (urlencode({**good, "code_verifier": "!"}).encode(), FORM, "invalid_grant", 400),
            (urlencode({**good, "code": "c" * 5000}).encode(), FORM, "invalid_request", 400),
            (urlencode({**good, "resource": "https://other.example/"}).encode(), FORM, "invalid_target", 400),
        ]
        for body, headers, error, status in cases:
            with self.unchanged():
                response = self.post("/oauth/token", body, headers)
            self.assertOAuthError(response, error, status)
        self.assertEqual(self.exchange(code).status, 200)

    def test_bad_basic_headers(self) -> None:
        code = self.code()
        for value in (
            "Basic !!!",
            "Basic " + base64.b64encode(b"no-colon").decode(),
            "Bearer abc",
            "Basic " + base64.b64encode(b"\xff:\xfe").decode(),
        ):
            with self.unchanged():
                response = self.request(
                    "POST",
                    "/oauth/token",
                    urlencode(
                        {"grant_type": "authorization_code", "code": code, "code_verifier": VERIFIER}
                    ).encode(),
                    {**FORM, "Authorization": value},
                )
            self.assertOAuthError(response, "invalid_client", 401)
            self.assertEqual(response.header("www-authenticate"), 'Basic realm="oauth"')
        self.assertEqual(self.exchange(code).status, 200)

    def test_body_type_before_credentials(self) -> None:
        """
        At every endpoint a client authenticates at, a body of the wrong
        type is answered as such (400 C{invalid_request}) even when the
        Authorization header is malformed too: the form is read first
        (L{smeldr_oauth.web.oauth.client_request}).
        """
        for path in ("/oauth/token", "/oauth/revoke", "/oauth/introspect"):
            with self.unchanged():
                response = self.request(
                    "POST", path, b"token=a", {"Content-Type": "text/plain", "Authorization": "Basic !!!"}
                )
            self.assertOAuthError(response, "invalid_request", 400)


class ConfidentialClientTests(HTTPTestCase):
    def setUp(self) -> None:
        super().setUp()
        body = self.register(
            {
                "redirect_uris": ["https://client.example/cb"],
                "token_endpoint_auth_method": "client_secret_basic",
            }
        ).json
        self.client_id, self.secret = body["client_id"], body["client_secret"]

    def basic(self, client_id: str, secret: str) -> dict[str, str]:
        raw = f"{quote(client_id, safe='')}:{quote(secret, safe='')}".encode()
        return {**FORM, "Authorization": "Basic " + base64.b64encode(raw).decode()}

    def fields(self, code: str, **extra: str) -> dict[str, str]:
        return {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": "https://client.example/cb",
            "code_verifier": VERIFIER,
            **extra,
        }

    def test_client_secret_basic(self) -> None:
        code = self.code()
        with self.unchanged():
            wrong = self.post("/oauth/token", self.fields(code), self.basic(self.client_id, "wrong"))
        self.assertOAuthError(wrong, "invalid_client", 401)
        self.assertEqual(wrong.header("www-authenticate"), 'Basic realm="oauth"')
        response = self.post("/oauth/token", self.fields(code), self.basic(self.client_id, self.secret))
        self.assertEqual(response.status, 200, response.body)

    def test_client_secret_post(self) -> None:
        code = self.code()
        with self.unchanged():
            missing = self.post("/oauth/token", self.fields(code, client_id=self.client_id))
        self.assertOAuthError(missing, "invalid_client", 401)
        self.assertIsNone(missing.header("www-authenticate"))
        response = self.post(
            "/oauth/token", self.fields(code, client_id=self.client_id, client_secret=self.secret)
        )
        self.assertEqual(response.status, 200, response.body)


class RevokeEndpointTests(HTTPTestCase):
    def test_always_200(self) -> None:
        for path in ("/oauth/revoke", "/revoke"):
            for fields in (
                {"token": "unknown"},
                {"token": "unknown", "token_type_hint": "refresh_token"},
                {"token": "x" * 5000},
                {"token": "y", "token_type_hint": "id_token"},
            ):
                with self.unchanged():
                    response = self.post(path, fields)
                self.assertEqual(response.status, 200)
                self.assertEqual(response.header("content-type"), "application/json")
                self.assertEqual(response.header("access-control-allow-origin"), "*")

    def test_malformed(self) -> None:
        for body, headers in (
            (b"", FORM),
            (b"token=a&token=b", FORM),
            (b"token=a", {"Content-Type": "text/plain"}),
            (b"token=%ff", FORM),
        ):
            with self.unchanged():
                response = self.post("/oauth/revoke", body, headers)
            self.assertOAuthError(response, "invalid_request")

    def test_cache_honours_revocation(self) -> None:
        """
        A cached access token is dead the moment it is revoked.
        """
        body = self.tokens()
        self.assertIsNotNone(self.successResultOf(self.server.verify_access_token(body["access_token"])))
        self.assertEqual(self.post("/oauth/revoke", {"token": body["access_token"]}).status, 200)
        self.assertIsNone(self.successResultOf(self.server.verify_access_token(body["access_token"])))

    def test_refresh_token_ends_grant(self) -> None:
        body = self.tokens()
        self.assertEqual(self.post("/oauth/revoke", {"token": body["refresh_token"]}).status, 200)
        self.assertIsNone(self.successResultOf(self.server.verify_access_token(body["access_token"])))
        self.assertEqual(self.successResultOf(self.store.list_grants()), [])


class RegisterEndpointTests(HTTPTestCase):
    def test_register(self) -> None:
        for path in ("/oauth/register", "/register"):
            response = self.request(
                "POST",
                path,
                json.dumps(
                    {"redirect_uris": ["http://127.0.0.1:6276/oauth/callback"], "client_name": "Inspector"}
                ).encode(),
                {"Content-Type": "application/json; charset=utf-8"},
            )
            self.assertEqual(response.status, 201)
            self.assertEqual(response.header("content-type"), "application/json")
            self.assertEqual(response.header("cache-control"), "no-store")
            self.assertEqual(response.header("access-control-allow-origin"), "*")
            self.assertEqual(response.json["token_endpoint_auth_method"], "none")

    def test_bad_bodies(self) -> None:
        ok = {"redirect_uris": ["https://client.example/cb"]}
        cases: list[tuple[bytes, dict[str, str], str]] = [
            (json.dumps(ok).encode(), FORM, "invalid_client_metadata"),
            (json.dumps(ok).encode(), {}, "invalid_client_metadata"),
            (b"{", JSON, "invalid_client_metadata"),
            (b"[]", JSON, "invalid_client_metadata"),
            (b"null", JSON, "invalid_client_metadata"),
            (b"\xff\xfe{}", JSON, "invalid_client_metadata"),
            (b"[" * 30000 + b"]" * 30000, JSON, "invalid_client_metadata"),
            (
                b'{"redirect_uris": ["https://client.example/cb"], "x": ' + b"9" * 5000 + b"}",
                JSON,
                "invalid_client_metadata",
            ),
            (
                json.dumps({"redirect_uris": ["http://client.example/cb"]}).encode(),
                JSON,
                "invalid_redirect_uri",
            ),
            (
                json.dumps({"redirect_uris": ["https://client.example/cb\u0000"]}).encode(),
                JSON,
                "invalid_redirect_uri",
            ),
        ]
        for body, headers, error in cases:
            with self.unchanged():
                response = self.register(body, headers)
            self.assertOAuthError(response, error)
        # Too large is too large, whatever the endpoint.
        with self.unchanged():
            response = self.register(json.dumps({**ok, "pad": "x" * 70000}).encode(), JSON)
        self.assertOAuthError(response, "invalid_request", 413)


class TokenLimitTests(HTTPTestCase):
    config_overrides = {"token_requests_per_minute_per_address": 2}

    def test_rate_limit(self) -> None:
        """
        The token endpoint's own limit: a JSON 429 with C{Retry-After}, at
        the root path too (the same bucket).
        """
        body = {"grant_type": "refresh_token", "refresh_token": "x", "client_id": self.client_id}
        self.assertOAuthError(self.post("/oauth/token", body), "invalid_grant")
        self.assertOAuthError(self.post("/token", body), "invalid_grant")
        with capturedLogs():
            response = self.post("/oauth/token", body)
        self.assertOAuthError(response, "temporarily_unavailable", 429)
        self.assertEqual(response.header("retry-after"), "30")
        self.assertEqual(response.header("access-control-allow-origin"), "*")


class RegistrationLimitTests(HTTPTestCase):
    config_overrides = {"max_registered_clients": 3, "registrations_per_minute": 4}

    def test_cap(self) -> None:
        self.assertEqual(self.register({"redirect_uris": ["https://client.example/cb"]}).status, 201)
        self.assertEqual(self.register({"redirect_uris": ["https://client.example/cb"]}).status, 201)
        with capturedLogs():
            with self.unchanged():
                response = self.register({"redirect_uris": ["https://client.example/cb"]})
        self.assertOAuthError(response, "temporarily_unavailable", 503)

    def test_rate_limit(self) -> None:
        """
        Every attempt counts, failed ones too; the bucket refills with time.
        """
        for _ in range(3):
            self.register({})
        with capturedLogs() as events:
            with self.unchanged():
                response = self.register({"redirect_uris": ["https://client.example/cb"]})
        # RFC 6749's "try again later", not the device flow's slow_down.
        self.assertOAuthError(response, "temporarily_unavailable", 429)
        # 4 a minute: the next is allowed in 15 seconds.
        self.assertEqual(response.header("retry-after"), "15")
        [limited] = [e for e in events if e.get("smeldr_event") == "rate_limited"]
        self.assertEqual(limited["endpoint"], "register")
        self.assertEqual(response.header("access-control-allow-origin"), "*")
        self.clock.advance(15)
        self.assertEqual(self.register({"redirect_uris": ["https://client.example/cb"]}).status, 201)


class RegistrationOffTests(HTTPTestCase):
    config_overrides = {"dynamic_registration": False}

    def test_off(self) -> None:
        for path in ("/oauth/register", "/register"):
            response = self.request("POST", path, b"{}", JSON)
            self.assertEqual(response.status, 404)
            self.assertEqual(response.header("content-type"), "application/json")
        self.assertNotIn(
            "registration_endpoint", self.request("GET", "/.well-known/oauth-authorization-server").json
        )


class LogTests(HTTPTestCase):
    def test_no_secret_in_logs(self) -> None:
        """
        A whole flow, failures included: no pasted token, code, access or
        refresh token, or client secret reaches any log event.
        """
        secrets: list[str] = [SITE_TOKEN, "raise-pasted-secret"]
        with capturedLogs() as events:
            registered = self.register(
                {
                    "redirect_uris": ["https://client.example/cb"],
                    "token_endpoint_auth_method": "client_secret_post",
                }
            ).json
            self.client_id = registered["client_id"]
            secrets.append(registered["client_secret"])
            self.decide(token="raise-pasted-secret")
            self.decide(token="wrong-" + SITE_TOKEN)
            code = self.code()
            secrets.append(code)
            first = self.exchange(code, client_secret=registered["client_secret"]).json
            secrets += [first["access_token"], first["refresh_token"]]
            replayed = self.code()
            secrets.append(replayed)
            secrets.append(
                self.exchange(replayed, client_secret=registered["client_secret"]).json["access_token"]
            )
            self.exchange(replayed, client_secret=registered["client_secret"])
            second = self.post(
                "/oauth/token",
                {
                    "grant_type": "refresh_token",
                    "refresh_token": first["refresh_token"],
                    "client_id": self.client_id,
                    "client_secret": registered["client_secret"],
                },
            ).json
            secrets += [v for k, v in second.items() if k.endswith("token")]
            self.clock.advance(120)
            self.post(
                "/oauth/token",
                {
                    "grant_type": "refresh_token",
                    "refresh_token": first["refresh_token"],
                    "client_id": self.client_id,
                    "client_secret": registered["client_secret"],
                },
            )
            self.post("/oauth/revoke", {"token": second.get("access_token", "")})
        self.assertTrue(events)
        texts = [formatEvent(e) + " " + repr(e) for e in events]
        for secret in secrets:
            self.assertTrue(secret)
            for text in texts:
                self.assertNotIn(secret, text)
        # The security events themselves were logged.
        joined = "\n".join(texts)
        self.assertIn("refused site token paste", joined)
        # The events the metrics count (smeldr_oauth.service.metrics).
        kinds = {e.get("smeldr_event") for e in events}
        for kind in (
            "grant_approved",
            "token_issued",
            "token_refused",
            "code_replay",
            "refresh_reuse",
            "paste_refused",
        ):
            self.assertIn(kind, kinds)
        self.assertIn("replayed", joined)
        self.assertIn("reused", joined)


class HSTSTests(HTTPTestCase):
    """
    Every OAuth response of an https issuer carries HSTS, whatever its
    status or format.
    """

    def test_every_endpoint(self) -> None:
        responses = [
            self.request("GET", "/.well-known/oauth-authorization-server"),
            self.request("GET", "/.well-known/oauth-protected-resource"),
            self.request("GET", "/.well-known/openid-configuration"),
            self.consent(),
            self.consent(client_id="unknown"),
            self.decide(),
            self.decide(token="wrong"),
            self.post("/oauth/token", {"grant_type": "password"}),
            self.post("/oauth/revoke", {"token": "x"}),
            self.register({"redirect_uris": ["https://client.example/cb"]}),
            self.request("OPTIONS", "/oauth/token"),
            self.request("DELETE", "/oauth/token"),
            self.request("PUT", "/oauth/authorize"),
            self.request("POST", "/token", b"grant_type=x", FORM),
        ]
        for response in responses:
            self.assertEqual(
                response.header("strict-transport-security"), "max-age=31536000", response.status
            )


class NoHSTSOverHTTPTests(HTTPTestCase):
    config_overrides = {"issuer": "http://127.0.0.1:8080"}

    def test_http_issuer(self) -> None:
        response = self.request("GET", "/.well-known/oauth-authorization-server")
        self.assertEqual(response.status, 200)
        self.assertIsNone(response.header("strict-transport-security"))


#: The Deferreds of a verify_bearer that answers only when the test says.
PENDING: list[Deferred[Any]] = []


def slow_verify(pasted: str) -> "Deferred[Any]":
    d: Deferred[Any] = Deferred()
    PENDING.append(d)
    return d


class PasteRaceTests(HTTPTestCase):
    """
    Finding: the limiter was checked before the (slow) site-token check
    and spent after it, so parallel wrong pastes all passed the check.
    """

    config_overrides = {"verify_bearer": slow_verify, "paste_failures_per_minute": 10}

    def setUp(self) -> None:
        del PENDING[:]
        super().setUp()

    def start(self) -> "Deferred[Any]":
        fields = list(self.authorize_params().items()) + [("decision", "approve"), ("site_token", "wrong")]
        return self.treq.request(
            "POST",
            ISSUER + "/oauth/authorize",
            data=urlencode(fields).encode(),
            headers=FORM,
            allow_redirects=False,
        )

    def test_parallel_wrong_pastes(self) -> None:
        with capturedLogs():
            started = [self.start() for _ in range(60)]
            self.assertEqual(len(PENDING), 10)
            for d in PENDING:
                d.callback(None)
            self.treq.flush()
        codes = [self.successResultOf(d).code for d in started]
        self.assertEqual(codes.count(403), 10)
        self.assertEqual(codes.count(429), 50)

    def test_success_refunded(self) -> None:
        """
        A right paste gives its attempt back: the owner is never counted.
        """
        for _ in range(30):
            d = self.start()
            PENDING.pop().callback(Approval(subject="alice"))
            self.treq.flush()
            self.assertEqual(self.successResultOf(d).code, 303)
        with capturedLogs():
            for _ in range(10):
                d = self.start()
                PENDING.pop().callback(None)
                self.treq.flush()
                self.assertEqual(self.successResultOf(d).code, 403)
            self.assertEqual(self.successResultOf(self.start()).code, 429)


class CIMDFetchLimitHTTPTests(HTTPTestCase):
    config_overrides = {"cimd_fetches_per_minute": 2}

    def test_page_429(self) -> None:
        self.server.clients.cimd = SlowResolver()
        for n in range(2):
            self.treq.request(
                "GET", ISSUER + "/oauth/authorize?" + urlencode(self.authorize_params(client_id=f"https://a{n}.example/c.json"))
            )
        with capturedLogs():
            response = self.consent(client_id="https://a9.example/c.json")
        self.assertPage(response, 429)
        # 2 fetches a minute: the next is allowed in 30 seconds.
        self.assertEqual(response.header("retry-after"), "30")
        self.assertIn("Too many", response.text)


# The consent page and form, answered as the site answers them: without
# Klein (DirectRoute), every test above again.


class DirectConsentPageTests(ConsentPageTests):
    direct = True


class DirectDecisionTests(DecisionTests):
    direct = True


class DirectTokenEndpointTests(TokenEndpointTests):
    direct = True


class DirectLogTests(LogTests):
    direct = True


class DirectHSTSTests(HSTSTests):
    direct = True


class DirectNoHSTSOverHTTPTests(NoHSTSOverHTTPTests):
    direct = True


class DirectPasteRaceTests(PasteRaceTests):
    direct = True


class DirectCIMDFetchLimitHTTPTests(CIMDFetchLimitHTTPTests):
    direct = True
