"""
End to end with the shapes of the big hosted clients, which cannot run here:
ChatGPT, Claude.ai and Claude Code. Their Client ID Metadata Documents are
published locally over HTTPS with the same fields (only the C{client_id}
differs: it must be the URL the document is served at, so it is the local
one), and their habits are replayed over HTTP with treq against a real
C{twist smeldr-oauth} process: discovery (with ChatGPT's C{HEAD}s), the
consent page, the approval's 303, the code exchange as a public client, an
MCP call, re-authorization without C{scope}, C{resource} with a trailing
slash, dynamic registration when CIMD is off, re-registration after
C{invalid_client}, and parallel refreshes of one refresh token.

Where the real clients' behaviour comes from: C{/work/shared/CLIENTS.md}.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
from collections.abc import Awaitable, Callable, Sequence
from html.parser import HTMLParser
from typing import Any
from urllib.parse import parse_qs, urlencode, urljoin, urlsplit

import attr
import treq
from twisted.internet import reactor, ssl
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import Site

from tests import e2e
from tests.e2e import RunningServer, createSiteToken, matrixOutcome, startServer

#: The matrix's version column for these rows: the documents' shapes as
#: observed in late 2026, not a client build.
SHAPE_VERSION = "shape 2026-11"

#: ChatGPT's connector callback id, as in its real redirect URIs.
CHATGPT_CALLBACK = "https://chatgpt.com/connector/oauth/cb_7d1f0c2a9e"
CLAUDE_CALLBACK = "https://claude.ai/api/mcp/auth_callback"


def chatGPTDocument(url: str, jwks: str) -> dict[str, Any]:
    """
    ChatGPT's published document: it claims C{private_key_jwt} but lists
    C{none} among the methods it supports, which is what a server without
    JWT client authentication must pick.
    """
    return {
        "client_id": url,
        "client_name": "ChatGPT",
        "client_uri": "https://chatgpt.com",
        "logo_uri": "https://chatgpt.com/favicon.ico",
        "redirect_uris": [CHATGPT_CALLBACK],
        "grant_types": ["authorization_code", "refresh_token"],
        "response_types": ["code"],
        "token_endpoint_auth_method": "private_key_jwt",
        "token_endpoint_auth_methods_supported": ["none", "private_key_jwt"],
        "token_endpoint_auth_signing_alg": "RS256",
        "jwks_uri": jwks,
        "application_type": "web",
    }


def claudeAIDocument(url: str, jwks: str) -> dict[str, Any]:
    """
    Claude.ai's document: a public client with one https callback.
    """
    return {
        "client_id": url,
        "client_name": "Claude",
        "client_uri": "https://claude.ai",
        "redirect_uris": [CLAUDE_CALLBACK],
        "grant_types": ["authorization_code", "refresh_token"],
        "response_types": ["code"],
        "token_endpoint_auth_method": "none",
    }


def claudeCodeDocument(url: str, jwks: str) -> dict[str, Any]:
    """
    Claude Code's document: loopback callbacks without a port; it listens
    on an ephemeral one and says so only in the authorize request.
    """
    return {
        "client_id": url,
        "client_name": "Claude Code",
        "client_uri": "https://claude.com/claude-code",
        "redirect_uris": ["http://localhost/callback", "http://127.0.0.1/callback"],
        "grant_types": ["authorization_code", "refresh_token"],
        "response_types": ["code"],
        "token_endpoint_auth_method": "none",
    }


class _Counted(Resource):
    """
    A JSON document that remembers which methods fetched it.
    """

    isLeaf = True

    def __init__(self, body: bytes, hits: list[str]) -> None:
        super().__init__()
        self.body = body
        self.hits = hits

    def render_GET(self, request: Any) -> bytes:
        self.hits.append(request.method.decode("ascii"))
        request.setHeader(b"content-type", b"application/json")
        return self.body


@attr.s(auto_attribs=True, frozen=True)
class PublishedDocument:
    """
    A client metadata document served over HTTPS on 127.0.0.1.

    @ivar url: Its URL, which is its C{client_id}.
    @ivar caFile: The certificate the server must trust (C{--cimd-ca-file}).
    @ivar document: What it says.
    @ivar hits: The methods of every request for it, in order.
    """

    url: str
    caFile: str
    document: dict[str, Any]
    hits: list[str]


async def publishDocument(
    testCase: TestCase,
    build: Callable[[str, str], dict[str, Any]],
    path: str = "oauth/client.json",
) -> PublishedDocument:
    """
    Serve C{build(url, jwksURL)} at C{https://127.0.0.1:PORT/<path>}, and an
    empty JWKS beside it, for the lifetime of the test.

    (L{tests.e2e.serveClientMetadata} serves only its own fixed document;
    these shapes need every field of the real ones.)
    """
    directory = os.path.abspath(testCase.mktemp())
    os.makedirs(directory)
    caFile, pem = e2e._selfSignedCertificate(directory)
    options = ssl.PrivateCertificate.loadPEM(pem.decode("ascii")).options()
    hits: list[str] = []
    document = _Counted(b"", hits)
    root = Resource()
    parent = root
    *folders, leaf = path.split("/")
    for folder in folders:
        child = Resource()
        parent.putChild(folder.encode("ascii"), child)
        parent = child
    parent.putChild(leaf.encode("ascii"), document)
    root.putChild(b"jwks.json", _Counted(json.dumps({"keys": []}).encode(), []))
    endpoint = SSL4ServerEndpoint(reactor, 0, options, interface="127.0.0.1")
    port = await endpoint.listen(Site(root))
    testCase.addCleanup(port.stopListening)
    origin = f"https://127.0.0.1:{port.getHost().port}"
    url = f"{origin}/{path}"
    content = build(url, f"{origin}/jwks.json")
    document.body = json.dumps(content).encode("utf-8")
    return PublishedDocument(url=url, caFile=caFile, document=content, hits=hits)


class _FormParser(HTMLParser):
    """
    The consent page's forms as a browser sees them: action, method, named
    inputs and submit buttons.
    """

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.forms: list[dict[str, Any]] = []
        self._form: dict[str, Any] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form":
            self._form = {
                "action": a.get("action", ""),
                "method": a.get("method", "get").lower(),
                "inputs": [],
                "buttons": [],
            }
            self.forms.append(self._form)
        elif self._form is not None and tag == "input" and "name" in a:
            self._form["inputs"].append((a["name"], a.get("value", "")))
        elif self._form is not None and tag == "button" and "name" in a:
            self._form["buttons"].append((a["name"], a.get("value", "")))

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._form = None


def pkce() -> tuple[str, str]:
    """
    A PKCE verifier and its S256 challenge.
    """
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


@attr.s(auto_attribs=True)
class Response:
    """
    What came back: status, headers (lower-case names, first value) and body.
    """

    method: str
    url: str
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def describe(self) -> str:
        return (
            f"{self.method} {urlsplit(self.url).path} answered {self.status} "
            f"{self.headers.get('content-type')!r} "
            f"Location={self.headers.get('location')!r} body={self.body[:400]!r}"
        )


@attr.s(auto_attribs=True)
class Authorized:
    """
    The outcome of one authorization: the redirect and the token response.
    """

    location: str
    redirect: dict[str, str]
    tokens: dict[str, Any]


class HostedClient:
    """
    One hosted client's HTTP behaviour against a live server, over treq: the
    browser's part (consent page, approval) and the client's (discovery,
    token endpoint, MCP).
    """

    def __init__(self, testCase: TestCase, server: RunningServer, siteToken: str) -> None:
        self.testCase = testCase
        self.server = server
        self.siteToken = siteToken
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.http = treq.client.HTTPClient(Agent(reactor, pool=pool))
        self.metadata: dict[str, Any] = {}
        self.resourceMetadata: dict[str, Any] = {}

    def fail(self, message: str) -> None:
        self.testCase.fail(self.server.annotate(message))

    async def request(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        form: Sequence[tuple[str, str]] | None = None,
        body: bytes | None = None,
    ) -> Response:
        headers = dict(headers or {})
        data = body
        if form is not None:
            data = urlencode(list(form)).encode("ascii")
            headers.setdefault("Content-Type", "application/x-www-form-urlencoded")
        response = await self.http.request(
            method,
            url,
            headers=Headers({k: [v] for k, v in headers.items()}),
            data=data,
            allow_redirects=False,
        )
        content = await response.content()
        return Response(
            method=method,
            url=url,
            status=response.code,
            headers={
                k.decode("latin-1").lower(): v[0].decode("latin-1")
                for k, v in response.headers.getAllRawHeaders()
            },
            body=content,
        )

    async def discover(self) -> dict[str, Any]:
        """
        What every client does first: the unauthenticated MCP request, the
        resource metadata its 401 names, then the authorization server's.
        """
        first = await self.request(
            "POST",
            self.server.mcpURL,
            headers={"Content-Type": "application/json", "Accept": "application/json"},
            body=json.dumps({"jsonrpc": "2.0", "id": 0, "method": "ping"}).encode("ascii"),
        )
        challenge = first.headers.get("www-authenticate", "")
        if first.status != 401 or "resource_metadata=" not in challenge:
            self.fail("unauthenticated MCP request: " + first.describe())
        prmURL = challenge.split('resource_metadata="', 1)[1].split('"', 1)[0]
        prm = await self.request("GET", prmURL)
        self.testCase.assertEqual(prm.status, 200, prm.describe())
        self.resourceMetadata = prm.json()
        issuer = self.resourceMetadata["authorization_servers"][0]
        asm = await self.request("GET", issuer + "/.well-known/oauth-authorization-server")
        self.testCase.assertEqual(asm.status, 200, asm.describe())
        self.metadata = asm.json()
        return self.metadata

    def authorizeURL(self, **parameters: str | None) -> str:
        query = [(k, v) for k, v in parameters.items() if v is not None]
        return self.metadata["authorization_endpoint"] + "?" + urlencode(query)

    async def consentPage(self, url: str) -> Response:
        """
        GET the authorization URL as a browser; it must be the consent page.
        """
        page = await self.request("GET", url, headers={"Accept": "text/html"})
        if page.status != 200 or not page.headers.get("content-type", "").startswith("text/html"):
            self.fail("GET authorize, expected the consent page: " + page.describe())
        return page

    async def approve(self, page: Response) -> Response:
        """
        Paste the site token and press Approve, as a person would; give back
        the answer (which must be a 303, checked by the caller).
        """
        parser = _FormParser()
        parser.feed(page.text())
        forms = [f for f in parser.forms if ("decision", "approve") in f["buttons"]]
        if len(forms) != 1 or forms[0]["method"] != "post":
            self.fail(f"consent page without one approve form: {page.text()[:1000]}")
        form = forms[0]
        fields = [(n, v) for n, v in form["inputs"] if n != "site_token"]
        fields += [("site_token", self.siteToken), ("decision", "approve")]
        action = urljoin(page.url, form["action"]) if form["action"] else page.url
        origin = "{0.scheme}://{0.netloc}".format(urlsplit(page.url))
        return await self.request("POST", action, headers={"Origin": origin}, form=fields)

    async def token(self, form: Sequence[tuple[str, str]]) -> Response:
        """
        POST the token endpoint as a public client (no client authentication).
        """
        return await self.request(
            "POST",
            self.metadata["token_endpoint"],
            headers={"Accept": "application/json"},
            form=form,
        )

    async def authorize(
        self,
        clientID: str,
        redirectURI: str,
        *,
        scope: str | None = "read write",
        resource: str | None = None,
        tokenResource: str | None = None,
        expectOnPage: Sequence[str] = (),
    ) -> Authorized:
        """
        The whole authorization code flow for C{clientID}: consent page,
        approval, 303 back to C{redirectURI} with C{code}, C{state} and
        C{iss}, and the code exchange without client authentication.

        @param resource: The C{resource} sent on authorize (default: the
            resource metadata's, verbatim, as Claude.ai does).
        @param tokenResource: The C{resource} sent at the token endpoint
            (default: the same).
        @param expectOnPage: Text the consent page must show.
        """
        if resource is None:
            resource = self.resourceMetadata["resource"]
        if tokenResource is None:
            tokenResource = resource
        verifier, challenge = pkce()
        state = secrets.token_urlsafe(16)
        url = self.authorizeURL(
            response_type="code",
            client_id=clientID,
            redirect_uri=redirectURI,
            state=state,
            code_challenge=challenge,
            code_challenge_method="S256",
            scope=scope,
            resource=resource,
        )
        page = await self.consentPage(url)
        for text in expectOnPage:
            self.testCase.assertIn(text, page.text())
        answer = await self.approve(page)
        location = answer.headers.get("location", "")
        if answer.status != 303 or not location:
            self.fail("POST authorize (approve), expected 303: " + answer.describe())
        base, _, query = location.partition("?")
        self.testCase.assertEqual(base, redirectURI, location)
        values = parse_qs(query)
        self.testCase.assertNotIn("error", values, location)
        redirect = {k: v[0] for k, v in values.items()}
        self.testCase.assertEqual(
            {k: len(v) for k, v in values.items()},
            {"code": 1, "state": 1, "iss": 1},
            location,
        )
        self.testCase.assertEqual(redirect["state"], state)
        self.testCase.assertEqual(redirect["iss"], self.metadata["issuer"])
        exchange = await self.token(
            [
                ("grant_type", "authorization_code"),
                ("code", redirect["code"]),
                ("redirect_uri", redirectURI),
                ("client_id", clientID),
                ("code_verifier", verifier),
                ("resource", tokenResource),
            ]
        )
        if exchange.status != 200:
            self.fail("code exchange: " + exchange.describe())
        tokens = exchange.json()
        self.testCase.assertEqual(tokens["token_type"], "Bearer")
        self.testCase.assertIn("no-store", exchange.headers.get("cache-control", ""))
        return Authorized(location=location, redirect=redirect, tokens=tokens)

    async def refresh(self, clientID: str, refreshToken: str) -> Response:
        return await self.token(
            [
                ("grant_type", "refresh_token"),
                ("refresh_token", refreshToken),
                ("client_id", clientID),
                ("resource", self.resourceMetadata["resource"]),
            ]
        )

    async def rpc(self, accessToken: str, message: dict[str, Any], session: str | None = None) -> Response:
        headers = {
            "Authorization": f"Bearer {accessToken}",
            "Content-Type": "application/json",
            "Accept": "application/json",
        }
        if session is not None:
            headers["Mcp-Session-Id"] = session
            headers["MCP-Protocol-Version"] = "2025-06-18"
        return await self.request(
            "POST",
            self.server.mcpURL,
            headers=headers,
            body=json.dumps(message).encode("utf-8"),
        )

    async def callTool(self, accessToken: str) -> dict[str, Any]:
        """
        An MCP session with C{accessToken}: initialize, initialized, and a
        C{list_posts} call, whose result is returned.
        """
        init = await self.rpc(
            accessToken,
            {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "initialize",
                "params": {
                    "protocolVersion": "2025-06-18",
                    "capabilities": {},
                    "clientInfo": {"name": "shape test", "version": "1"},
                },
            },
        )
        if init.status != 200:
            self.fail("MCP initialize: " + init.describe())
        session = init.headers.get("mcp-session-id")
        initialized = await self.rpc(
            accessToken,
            {"jsonrpc": "2.0", "method": "notifications/initialized"},
            session,
        )
        self.testCase.assertEqual(initialized.status, 202, initialized.describe())
        call = await self.rpc(
            accessToken,
            {
                "jsonrpc": "2.0",
                "id": 2,
                "method": "tools/call",
                "params": {"name": "list_posts", "arguments": {}},
            },
            session,
        )
        if call.status != 200:
            self.fail("MCP tools/call: " + call.describe())
        answer = call.json()
        self.testCase.assertNotIn("error", answer, answer)
        self.testCase.assertFalse(answer["result"].get("isError", False), answer)
        return dict(answer["result"])

    async def mcpStatus(self, accessToken: str) -> int:
        """
        The status of one MCP request with C{accessToken} (200, or 401 when
        the token is dead).
        """
        probe = await self.rpc(
            accessToken,
            {
                "jsonrpc": "2.0",
                "id": 9,
                "method": "initialize",
                "params": {
                    "protocolVersion": "2025-06-18",
                    "capabilities": {},
                    "clientInfo": {"name": "probe", "version": "1"},
                },
            },
        )
        return probe.status


class ClientShapeTests(TestCase):
    """
    The hosted clients' documents and habits against a live server.
    """

    timeout = 60

    async def matrix(
        self,
        client: str,
        identity: str,
        case: str,
        body: Callable[[], Awaitable[None]],
    ) -> None:
        """
        Run C{body} and record its outcome as one matrix row.
        """
        await matrixOutcome(self, client, SHAPE_VERSION, "streamable-http", identity, case, body)

    async def serve(self, *extraArguments: str, document: PublishedDocument | None = None) -> HostedClient:
        """
        A server (trusting C{document}'s host, if any), a site token, and a
        client that has run discovery against it.
        """
        if document is not None:
            extraArguments = ("--cimd-ca-file", document.caFile, *extraArguments)
        server = await startServer(self, reactor, extraArguments)
        siteToken = await createSiteToken(reactor, server)
        client = HostedClient(self, server, siteToken)
        await client.discover()
        return client

    def assertCIMDAdvertised(self, metadata: dict[str, Any]) -> None:
        """
        What makes a client choose CIMD: the flag and C{none} among the
        token endpoint's methods.
        """
        self.assertIs(metadata.get("client_id_metadata_document_supported"), True)
        self.assertIn("none", metadata["token_endpoint_auth_methods_supported"])

    async def test_chatGPT(self) -> None:
        """
        ChatGPT's document (C{private_key_jwt} claimed, C{none} supported, a
        C{jwks_uri}): the consent page names ChatGPT, its document's host and
        chatgpt.com; the approval lands on its connector callback with
        C{code}, C{state} and C{iss}; the code is exchanged with no client
        authentication; the MCP call works.
        """

        async def body() -> None:
            document = await publishDocument(self, chatGPTDocument)
            client = await self.serve(document=document)
            self.assertCIMDAdvertised(client.metadata)
            host = urlsplit(document.url).netloc
            result = await client.authorize(
                document.url,
                CHATGPT_CALLBACK,
                expectOnPage=["ChatGPT", host, "chatgpt.com"],
            )
            self.assertEqual(set(result.tokens["scope"].split()), {"read", "write"})
            await client.callTool(result.tokens["access_token"])
            self.assertIn("GET", document.hits)

        await self.matrix("ChatGPT", "cimd", "connect", body)

    async def test_chatGPTDiscoveryWithHEAD(self) -> None:
        """
        ChatGPT sends C{HEAD} then C{GET} for both the OAuth and the OpenID
        metadata on the MCP host: C{HEAD} must answer as C{GET} does, with
        no body, and the OpenID document must be absent (404) rather than
        invalid.
        """

        async def body() -> None:
            client = await self.serve()
            base = client.server.issuer
            for path in (
                "/.well-known/oauth-authorization-server",
                "/.well-known/oauth-protected-resource/mcp",
                "/.well-known/oauth-protected-resource",
            ):
                head = await client.request(
                    "HEAD", base + path, headers={"MCP-Protocol-Version": "2025-11-25"}
                )
                get = await client.request("GET", base + path, headers={"MCP-Protocol-Version": "2025-11-25"})
                self.assertEqual(get.status, 200, get.describe())
                self.assertEqual(head.status, 200, head.describe())
                self.assertEqual(head.body, b"", head.describe())
                self.assertTrue(
                    head.headers.get("content-type", "").startswith("application/json"),
                    head.describe(),
                )
                get.json()
            for method in ("HEAD", "GET"):
                oidc = await client.request(method, base + "/.well-known/openid-configuration")
                self.assertEqual(oidc.status, 404, oidc.describe())

        await self.matrix("ChatGPT", "cimd", "discovery-head", body)

    async def test_chatGPTReconnectsWithoutScope(self) -> None:
        """
        ChatGPT re-authorizes without C{scope} on reconnect: the server
        grants its default scopes, and the new token works.
        """

        async def body() -> None:
            document = await publishDocument(self, chatGPTDocument)
            client = await self.serve(document=document)
            first = await client.authorize(document.url, CHATGPT_CALLBACK)
            again = await client.authorize(document.url, CHATGPT_CALLBACK, scope=None)
            self.assertEqual(set(again.tokens["scope"].split()), {"read", "write"})
            self.assertNotEqual(first.tokens["access_token"], again.tokens["access_token"])
            await client.callTool(again.tokens["access_token"])

        await self.matrix("ChatGPT", "cimd", "reauthorize-without-scope", body)

    async def test_claudeAI(self) -> None:
        """
        Claude.ai's document (one https callback, C{none}), with the
        C{resource} equal to the resource metadata's: consent names Claude
        and claude.ai, the 303 goes to its callback, the exchange and the MCP
        call work.
        """

        async def body() -> None:
            document = await publishDocument(self, claudeAIDocument)
            client = await self.serve(document=document)
            self.assertCIMDAdvertised(client.metadata)
            self.assertEqual(client.resourceMetadata["resource"], client.server.mcpURL)
            result = await client.authorize(
                document.url,
                CLAUDE_CALLBACK,
                resource=client.resourceMetadata["resource"],
                expectOnPage=["Claude", "claude.ai"],
            )
            await client.callTool(result.tokens["access_token"])

        await self.matrix("Claude.ai", "cimd", "connect", body)

    async def test_claudeAITrailingSlash(self) -> None:
        """
        A C{resource} of C{.../mcp/} (trailing slash) names the same
        resource, on authorize and at the token endpoint, and the token
        works at C{/mcp}.
        """

        async def body() -> None:
            document = await publishDocument(self, claudeAIDocument)
            client = await self.serve(document=document)
            slashed = client.resourceMetadata["resource"] + "/"
            result = await client.authorize(document.url, CLAUDE_CALLBACK, resource=slashed)
            await client.callTool(result.tokens["access_token"])

        await self.matrix("Claude.ai", "cimd", "resource-trailing-slash", body)

    async def test_claudeCode(self) -> None:
        """
        Claude Code's document lists loopback callbacks without a port; it
        listens on an ephemeral port and is sent back there, on C{localhost}
        and on C{127.0.0.1}. Another path on loopback is still refused.
        """

        async def body() -> None:
            document = await publishDocument(self, claudeCodeDocument)
            client = await self.serve(document=document)
            self.assertCIMDAdvertised(client.metadata)
            for host in ("localhost", "127.0.0.1"):
                port = e2e.freePort()
                redirect = f"http://{host}:{port}/callback"
                result = await client.authorize(
                    document.url,
                    redirect,
                    expectOnPage=["Claude Code", f"{host}:{port}"],
                )
                await client.callTool(result.tokens["access_token"])
            verifier, challenge = pkce()
            wrong = await client.request(
                "GET",
                client.authorizeURL(
                    response_type="code",
                    client_id=document.url,
                    redirect_uri="http://localhost:4567/elsewhere",
                    state="s",
                    code_challenge=challenge,
                    code_challenge_method="S256",
                ),
                headers={"Accept": "text/html"},
            )
            # An unregistered redirect URI is never redirected to.
            self.assertEqual(wrong.status, 400, wrong.describe())
            self.assertNotIn("location", wrong.headers)

        await self.matrix("Claude Code", "cimd", "connect", body)

    async def test_dynamicRegistrationWhenCIMDIsOff(self) -> None:
        """
        With C{--no-cimd} the metadata does not advertise CIMD, so Claude.ai
        registers (RFC 7591) instead: a public client, no secret, and the
        whole flow works with the registered id.
        """

        async def body() -> None:
            client = await self.serve("--no-cimd")
            self.assertIsNot(client.metadata.get("client_id_metadata_document_supported"), True)
            self.assertIn("registration_endpoint", client.metadata)
            registered = await self.register(client)
            result = await client.authorize(
                registered["client_id"],
                CLAUDE_CALLBACK,
                expectOnPage=["Claude", "claude.ai"],
            )
            await client.callTool(result.tokens["access_token"])

        await self.matrix("Claude.ai", "dcr", "connect", body)

    async def register(self, client: HostedClient) -> dict[str, Any]:
        """
        Register as Claude.ai does, and check it came back a public client.
        """
        answer = await client.request(
            "POST",
            client.metadata["registration_endpoint"],
            headers={"Content-Type": "application/json", "Accept": "application/json"},
            body=json.dumps(
                {
                    "client_name": "Claude",
                    "redirect_uris": [CLAUDE_CALLBACK],
                    "grant_types": ["authorization_code", "refresh_token"],
                    "response_types": ["code"],
                    "token_endpoint_auth_method": "none",
                    "scope": "read write",
                }
            ).encode("utf-8"),
        )
        self.assertEqual(answer.status, 201, answer.describe())
        registered = answer.json()
        self.assertNotIn("client_secret", registered)
        self.assertEqual(registered["token_endpoint_auth_method"], "none")
        return dict(registered)

    async def test_reRegistrationAfterInvalidClient(self) -> None:
        """
        Claude.ai keeps client ids; when the server no longer knows one the
        token endpoint answers 401 C{invalid_client} as JSON, and Claude
        registers again, after which everything works.
        """

        async def body() -> None:
            client = await self.serve()
            verifier, _ = pkce()
            unknown = await client.token(
                [
                    ("grant_type", "authorization_code"),
                    ("code", secrets.token_urlsafe(32)),
                    ("redirect_uri", CLAUDE_CALLBACK),
                    ("client_id", "forgotten-" + secrets.token_hex(8)),
                    ("code_verifier", verifier),
                    ("resource", client.resourceMetadata["resource"]),
                ]
            )
            self.assertEqual(unknown.status, 401, unknown.describe())
            self.assertTrue(
                unknown.headers.get("content-type", "").startswith("application/json"),
                unknown.describe(),
            )
            self.assertEqual(unknown.json()["error"], "invalid_client")
            stale = await client.refresh("forgotten-" + secrets.token_hex(8), secrets.token_urlsafe(32))
            self.assertEqual(stale.status, 401, stale.describe())
            self.assertEqual(stale.json()["error"], "invalid_client")
            registered = await self.register(client)
            result = await client.authorize(registered["client_id"], CLAUDE_CALLBACK)
            await client.callTool(result.tokens["access_token"])

        await self.matrix("Claude.ai", "dcr", "reregister-after-invalid-client", body)

    async def test_parallelRefreshes(self) -> None:
        """
        Claude.ai refreshes one refresh token from several workers at once:
        within the grace window all of them succeed, every access token
        works, and the grant survives (one of the new refresh tokens
        refreshes again).
        """

        async def body() -> None:
            document = await publishDocument(self, claudeAIDocument)
            client = await self.serve(document=document)
            result = await client.authorize(document.url, CLAUDE_CALLBACK, scope="read write offline_access")
            refreshToken = result.tokens["refresh_token"]
            answers = await gatherResults(
                [Deferred.fromCoroutine(client.refresh(document.url, refreshToken)) for _ in range(4)]
            )
            for answer in answers:
                self.assertEqual(answer.status, 200, answer.describe())
            tokens = [a.json() for a in answers]
            self.assertEqual(len({t["access_token"] for t in tokens}), 4)
            for t in tokens:
                self.assertIn("refresh_token", t)
                self.assertEqual(await client.mcpStatus(t["access_token"]), 200)
            later = await client.refresh(document.url, tokens[-1]["refresh_token"])
            self.assertEqual(later.status, 200, later.describe())
            await client.callTool(later.json()["access_token"])

        await self.matrix("Claude.ai", "cimd", "parallel-refresh", body)

    async def test_parallelRefreshesBeyondTheSiblingCap(self) -> None:
        """
        Five workers refreshing one token at once (Claude.ai's burst): the
        server caps the tokens one generation may hold
        (L{smeldr_oauth.oauth.rotation.MAX_SIBLINGS}, 4), so the fifth may be
        refused, with a JSON C{invalid_grant}; but a burst inside the grace
        window is not theft, so the grant must survive it: the four new
        access tokens keep working, and their refresh tokens refresh.
        """

        async def body() -> None:
            document = await publishDocument(self, claudeAIDocument)
            client = await self.serve(document=document)
            result = await client.authorize(document.url, CLAUDE_CALLBACK, scope="read write offline_access")
            refreshToken = result.tokens["refresh_token"]
            answers = await gatherResults(
                [Deferred.fromCoroutine(client.refresh(document.url, refreshToken)) for _ in range(5)]
            )
            granted = [a.json() for a in answers if a.status == 200]
            refused = [a for a in answers if a.status != 200]
            self.assertGreaterEqual(len(granted), 4, [a.describe() for a in answers])
            for answer in refused:
                self.assertEqual(answer.status, 400, answer.describe())
                self.assertEqual(answer.json()["error"], "invalid_grant")
            for t in granted:
                self.assertEqual(
                    await client.mcpStatus(t["access_token"]),
                    200,
                    f"a refused fifth parallel refresh ({refused[0].body!r}) "
                    "ended the grant: its fresh access tokens answer 401"
                    if refused
                    else "",
                )
            later = await client.refresh(document.url, granted[0]["refresh_token"])
            self.assertEqual(later.status, 200, later.describe())

        await self.matrix("Claude.ai", "cimd", "parallel-refresh-5", body)

    async def test_reuseAfterGraceRevokesTheGrant(self) -> None:
        """
        The grace window is short: presenting a rotated refresh token after
        it is the signature of theft, and ends the whole grant (its new
        refresh token and access token stop working).
        """

        async def body() -> None:
            document = await publishDocument(self, claudeAIDocument)
            client = await self.serve("--refresh-grace", "1", document=document)
            result = await client.authorize(document.url, CLAUDE_CALLBACK, scope="read write offline_access")
            old = result.tokens["refresh_token"]
            rotated = await client.refresh(document.url, old)
            self.assertEqual(rotated.status, 200, rotated.describe())
            current = rotated.json()
            await deferLater(reactor, 1.5, lambda: None)
            reused = await client.refresh(document.url, old)
            self.assertEqual(reused.status, 400, reused.describe())
            self.assertEqual(reused.json()["error"], "invalid_grant")
            after = await client.refresh(document.url, current["refresh_token"])
            self.assertEqual(after.status, 400, after.describe())
            self.assertEqual(after.json()["error"], "invalid_grant")
            self.assertEqual(await client.mcpStatus(current["access_token"]), 401)

        await self.matrix("Claude.ai", "cimd", "refresh-reuse-revokes", body)
