"""
End to end with the official MCP TypeScript SDK (npm
C{@modelcontextprotocol/sdk}, pinned in C{tests/node/package.json}): a real
C{twist smeldr-oauth} process, and C{tests/node/ts_sdk_client.mjs} driving it
with the SDK's C{Client} and its own C{OAuthClientProvider} over both
transports, through dynamic registration or a Client ID Metadata Document,
the consent form, the code exchange, a refresh and revocations.

The driver runs under Node (installed by C{scripts/setup-node-clients.sh});
it prints one JSON line, which these tests judge. A failure shows the
driver's error, its HTTP trace and stderr, and the server's log. Each test
adds a row to the client matrix (L{tests.e2e.recordMatrix}).

What the SDK does, and these tests therefore expect (see
C{/work/shared/CLIENTS.md}): it asks for the resource metadata's scopes
(C{read write}, without C{offline_access}); it ignores C{expires_in} and
refreshes only when the server answers 401; on a 401 it tries the refresh
grant first and re-authorizes only if that fails; it leaves a session the
server ended (404) to the application, which starts a new one.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from tests.e2e import (
    CHECKOUT,
    RunningServer,
    createSiteToken,
    checkDriver,
    explainReport,
    matrixOutcome,
    runDriverReport,
    serveClientMetadata,
    startServer,
)
from tests.prerequisites import require

NODE_DIRECTORY = os.path.join(CHECKOUT, "tests", "node")
DRIVER = os.path.join(NODE_DIRECTORY, "ts_sdk_client.mjs")
SDK_PACKAGE = os.path.join(NODE_DIRECTORY, "node_modules", "@modelcontextprotocol", "sdk", "package.json")
CLIENT = "@modelcontextprotocol/sdk (TypeScript)"

#: Where the driver says it wants the code; nothing listens there, the driver
#: reads the redirect itself.
CALLBACK_PORT = 33419
CALLBACK = f"http://127.0.0.1:{CALLBACK_PORT}/callback"


def requireNodeClient(package: str) -> str:
    """
    The C{node} executable, if it and C{package} (a C{package.json} under
    C{tests/node/node_modules}) are installed.

    @raise AssertionError: Either is missing, under the README's test
        command (L{tests.prerequisites}).
    @raise SkipTest: Either is missing, in a bare trial run.
    """
    node = shutil.which("node")
    if node is None:
        require("node is not on PATH", "apt-get install nodejs npm (Node >= 20), then bash scripts/setup-node-clients.sh")
    elif not os.path.exists(package):
        require(f"{os.path.relpath(package, CHECKOUT)} is missing", "bash scripts/setup-node-clients.sh")
    assert node is not None
    return node


def packageVersion(package: str) -> str:
    with open(package) as f:
        return str(json.load(f)["version"])


class TypeScriptSDKTests(TestCase):
    """
    The TypeScript SDK's whole OAuth + MCP flow against a live server.
    """

    timeout = 60

    def setUp(self) -> None:
        self.node = requireNodeClient(SDK_PACKAGE)
        self.version = packageVersion(SDK_PACKAGE)

    async def matrix(
        self,
        transport: str,
        identity: str,
        case: str,
        body: Callable[[], Awaitable[None]],
    ) -> None:
        """
        Run C{body} and record its outcome as one matrix row.
        """
        await matrixOutcome(self, CLIENT, self.version, transport, identity, case, body)

    async def serve(self, *extraArguments: str) -> tuple[RunningServer, str]:
        server = await startServer(self, reactor, extraArguments)
        siteToken = await createSiteToken(reactor, server)
        return server, siteToken

    async def runDriver(
        self, server: RunningServer, siteToken: str, *arguments: str
    ) -> tuple[dict[str, Any] | None, str, str, int]:
        """
        Run the driver against C{server}; give back its report (C{None} if
        it printed none), stdout, stderr and exit status.
        """
        return await runDriverReport(
            reactor,
            [
                self.node,
                DRIVER,
                "--url",
                server.mcpURL,
                "--site-token",
                siteToken,
                "--callback-port",
                str(CALLBACK_PORT),
                "--tool",
                "list_posts",
                "--args",
                "{}",
                "--timeout",
                "20",
                *arguments,
            ],
            timeout=30,
            path=NODE_DIRECTORY,
        )

    async def drive(self, server: RunningServer, siteToken: str, *arguments: str) -> dict[str, Any]:
        """
        Run the driver; fail with everything known unless it reports
        success.
        """
        report, out, err, code = await self.runDriver(server, siteToken, *arguments)
        return checkDriver(self, server, arguments, report, out, err, code)

    explain = staticmethod(explainReport)

    def assertToolWorked(self, result: dict[str, Any], why: str = "") -> None:
        self.assertFalse(result.get("isError", False), f"{result}{why}")
        self.assertIn("content", result, why)

    def assertFirstContact(
        self, report: dict[str, Any], server: RunningServer, refreshToken: bool = True
    ) -> None:
        """
        What any successful first connection shows: the 401 that names the
        resource metadata, one consent, one code exchange, a public client,
        the tool listed and working, and no server error.

        @param refreshToken: Whether the code exchange gave a refresh token.
            By default the server issues one to a client registered for the
            C{refresh_token} grant, as the SDK's client is, though it never
            asks for C{offline_access}; only C{--offline-access-only} keeps
            it to clients that ask.
        """
        why = self.explain(report)
        if refreshToken:
            self.assertIsNotNone(report["tokens"][0]["refresh"], "no refresh token was issued" + why)
        else:
            self.assertIsNone(report["tokens"][0]["refresh"], why)
        self.assertTrue(report.get("protocol_version"), why)
        self.assertIn("list_posts", report["tools"], why)
        self.assertToolWorked(report["tool_result"], why)
        self.assertEqual(report["authorizations_before_followup"], 1, why)
        self.assertEqual(report["code_grants_before_followup"], 1, why)
        self.assertEqual(report["registered"]["has_secret"], False, why)
        self.assertEqual(report["tokens"][0]["token_type"].lower(), "bearer", why)
        unauthorized = [e for e in report["http"] if e.get("status") == 401]
        self.assertTrue(unauthorized, why)
        self.assertIn("resource_metadata=", unauthorized[0].get("www_authenticate") or "", why)
        # The SDK sends the resource metadata's resource verbatim on
        # authorize, code exchange and refresh.
        for e in report["http"]:
            if "query" in e:
                self.assertEqual(e["query"].get("resource"), server.mcpURL, why)
            if "grant_type" in e:
                self.assertEqual(e.get("resource"), server.mcpURL, why)
        self.assertEqual([e for e in report["http"] if e.get("status", 0) >= 500], [], why)

    async def connectCase(self, transport: str) -> None:
        server, siteToken = await self.serve()
        report = await self.drive(server, siteToken, "--transport", transport)
        self.assertFirstContact(report, server)
        why = self.explain(report)
        self.assertEqual(report["authorizations"], 1, why)
        self.assertFalse(report["registered"]["client_id_is_url"], why)
        self.assertEqual(
            [e["status"] for e in report["http"] if e["path"] == "/oauth/register"],
            [201],
            why,
        )

    async def test_streamableHTTPWithDynamicRegistration(self) -> None:
        """
        Streamable HTTP: 401, discovery, dynamic registration, consent, code
        exchange, initialize, list and call a tool.
        """

        async def body() -> None:
            await self.connectCase("streamable")

        await self.matrix("streamable-http", "dcr", "connect", body)

    async def test_legacySSEWithDynamicRegistration(self) -> None:
        """
        Legacy SSE: the same flow, the token on the GET stream and on every
        POST to the message endpoint.
        """

        async def body() -> None:
            await self.connectCase("sse")

        await self.matrix("sse", "dcr", "connect", body)

    async def cimdCase(self, transport: str) -> None:
        host = await serveClientMetadata(self, reactor, [CALLBACK])
        server, siteToken = await self.serve("--cimd-ca-file", host.caFile)
        report = await self.drive(
            server,
            siteToken,
            "--transport",
            transport,
            "--identity",
            "cimd",
            "--client-metadata-url",
            host.url,
        )
        self.assertFirstContact(report, server)
        why = self.explain(report)
        self.assertTrue(report["registered"]["client_id_is_url"], why)
        self.assertEqual([e for e in report["http"] if e["path"].endswith("/register")], [], why)
        authorizes = [e for e in report["http"] if e["path"].endswith("/authorize") and "query" in e]
        self.assertEqual([e["query"]["client_id"] for e in authorizes], [host.url], why)

    async def test_streamableHTTPWithClientMetadataDocument(self) -> None:
        """
        With a Client ID Metadata Document (the server advertises
        C{client_id_metadata_document_supported}), the SDK uses the
        provider's C{clientMetadataUrl} as its client_id and registers
        nothing; the server fetches the document, trusting the test's CA.
        """

        async def body() -> None:
            await self.cimdCase("streamable")

        await self.matrix("streamable-http", "cimd", "connect", body)

    async def test_legacySSEWithClientMetadataDocument(self) -> None:
        """
        The same CIMD identity over legacy SSE.
        """

        async def body() -> None:
            await self.cimdCase("sse")

        await self.matrix("sse", "cimd", "connect", body)

    async def refreshCase(self, transport: str) -> None:
        server, siteToken = await self.serve("--access-token-ttl", "2")
        report = await self.drive(server, siteToken, "--transport", transport, "--refresh")
        self.assertFirstContact(report, server)
        why = self.explain(report)
        self.assertEqual(report["tokens"][0]["expires_in"], 2, why)
        self.assertEqual(report["refresh_method"], "waited", why)
        # The expired token was refused with 401 and refreshed, and nobody
        # was asked again.  The 401 comes on whichever use of the expired
        # token reaches the server first: the waited tools/call, or (Streamable
        # HTTP) the GET stream the SDK reopens after the server closed it at
        # the token's expiry (stream deadlines are rounded up to the second,
        # so the two race by milliseconds).  When both arrive together the SDK
        # refreshes for each, in parallel, which the grace window allows.
        # The second of those refreshes belongs to the GET stream's reconnect,
        # which runs in the background: the driver may end and write its
        # report before it is sent or answered (seen once behind HAProxy: its
        # request in the trace without a status), so what is counted is every
        # refresh that was answered, not every one that was started.
        expired = [
            e
            for e in report["http"]
            if e.get("status") == 401
            and e["auth"]
            and (e.get("rpc") == "tools/call" or (e["method"] == "GET" and e["path"].endswith("/mcp")))
        ]
        self.assertIn(len(expired), (1, 2), why)
        for refused in expired:
            self.assertIn('error="invalid_token"', refused["www_authenticate"], why)
        refreshes = [e for e in report["http"] if e.get("grant_type") == "refresh_token"]
        self.assertIn(len(refreshes), range(1, len(expired) + 1), why)
        answered = [e["status"] for e in refreshes if "status" in e]
        self.assertTrue(answered, why)
        self.assertEqual(answered, [200] * len(answered), why)
        self.assertEqual(report["refresh_grants"], len(answered), why)
        self.assertEqual(report["authorizations"], 1, why)
        self.assertTrue(report["refreshed"], why)
        self.assertToolWorked(report["after_refresh_result"], why)
        self.assertGreaterEqual(len({t["access"] for t in report["tokens"]}), 2, why)
        # Rotation: the refresh token changed too.
        self.assertGreaterEqual(len({t["refresh"] for t in report["tokens"]}), 2, why)

    async def test_refreshStreamableHTTP(self) -> None:
        """
        When the access token runs out (the server's TTL is lowered to 2 s
        and really waited out), the next call is answered 401, the SDK uses
        the refresh grant without asking the person again, and the call
        goes through on the same session.
        """

        async def body() -> None:
            await self.refreshCase("streamable")

        await self.matrix("streamable-http", "dcr", "refresh", body)

    async def test_refreshLegacySSE(self) -> None:
        """
        The same refresh on a legacy SSE session: the message endpoint
        accepts the new token.
        """

        async def body() -> None:
            await self.refreshCase("sse")

        await self.matrix("sse", "dcr", "refresh", body)

    async def revokeAccessTokenCase(self, transport: str, identity: str) -> None:
        arguments = ["--transport", transport, "--revoke", "access"]
        serverArguments: list[str] = []
        if identity == "cimd":
            host = await serveClientMetadata(self, reactor, [CALLBACK])
            serverArguments += ["--cimd-ca-file", host.caFile]
            arguments += ["--identity", "cimd", "--client-metadata-url", host.url]
        server, siteToken = await self.serve(*serverArguments)
        report = await self.drive(server, siteToken, *arguments)
        self.assertFirstContact(report, server)
        why = self.explain(report)
        self.assertEqual(report["revoke"]["status"], 200, why)
        self.assertEqual(report["revoke"]["probe_status"], 401, why)
        # Revoking an access token leaves its refresh token alone (RFC 7009
        # 2.1 leaves it to the server; this one does): the SDK refreshes.
        self.assertEqual(report["refresh_grants"], 1, why)
        self.assertEqual(report["authorizations"], 1, why)
        self.assertNotIn("session_restarts", report, why)
        self.assertToolWorked(report["after_revoke_result"], why)

    async def test_revokeAccessTokenThenRefreshStreamableHTTP(self) -> None:
        """
        After the access token is revoked the MCP endpoint answers 401; the
        SDK tries the refresh grant first, which works, and the call goes
        through on the same session.
        """

        async def body() -> None:
            await self.revokeAccessTokenCase("streamable", "dcr")

        await self.matrix("streamable-http", "dcr", "revoke-recover", body)

    async def test_revokeAccessTokenThenRefreshLegacySSE(self) -> None:
        """
        The same recovery on a legacy SSE session.
        """

        async def body() -> None:
            await self.revokeAccessTokenCase("sse", "dcr")

        await self.matrix("sse", "dcr", "revoke-recover", body)

    async def test_revokeAccessTokenThenRefreshWithClientMetadataDocument(
        self,
    ) -> None:
        """
        A CIMD client refreshes after a revocation too: the refresh grant is
        authenticated by its URL client_id alone.
        """

        async def body() -> None:
            await self.revokeAccessTokenCase("streamable", "cimd")

        await self.matrix("streamable-http", "cimd", "revoke-recover", body)

    async def revokeGrantCase(self, transport: str) -> None:
        server, siteToken = await self.serve()
        report = await self.drive(server, siteToken, "--transport", transport, "--revoke", "grant")
        self.assertFirstContact(report, server)
        why = self.explain(report)
        self.assertEqual(report["revoke"]["status"], 200, why)
        self.assertEqual(report["revoke"]["probe_status"], 401, why)
        # The refresh grant is tried first and refused with invalid_grant (a
        # JSON 400, not a 5xx), so the SDK drops its tokens and asks the
        # person again.
        refreshes = [e for e in report["http"] if e.get("grant_type") == "refresh_token"]
        self.assertEqual([e["status"] for e in refreshes], [400], why)
        self.assertEqual(report["invalidations"], ["tokens"], why)
        self.assertEqual(report["authorizations"], 2, why)
        self.assertEqual(report["code_grants"], 2, why)
        self.assertEqual(report["call_unauthorized"], 1, why)
        # Ending the grant ended its session; the new grant's call is made on
        # a new one (the server answers 404 for the old session id).
        self.assertEqual(report.get("session_restarts"), 1, why)
        self.assertToolWorked(report["after_revoke_result"], why)

    async def test_revokeGrantThenReauthorizeStreamableHTTP(self) -> None:
        """
        After the refresh token is revoked (which ends the whole grant), the
        SDK's refresh fails and it re-authorizes; the application then starts
        a new session, which works with the new token.
        """

        async def body() -> None:
            await self.revokeGrantCase("streamable")

        await self.matrix("streamable-http", "dcr", "revoke-reauthorize", body)

    async def test_revokeGrantThenReauthorizeLegacySSE(self) -> None:
        """
        The same re-authorization over legacy SSE.
        """

        async def body() -> None:
            await self.revokeGrantCase("sse")

        await self.matrix("sse", "dcr", "revoke-reauthorize", body)

    async def test_revokeWithOfflineAccessOnlyReauthorizes(self) -> None:
        """
        With C{--offline-access-only} the SDK gets no refresh token (it never
        asks for C{offline_access}); a revoked access token then sends it
        straight back to the consent page, and the call goes through on the
        same session. (By default it holds one and refreshes instead: see
        L{test_revokeAccessTokenThenRefreshStreamableHTTP}.)
        """

        async def body() -> None:
            server, siteToken = await self.serve("--offline-access-only")
            report = await self.drive(server, siteToken, "--transport", "streamable", "--revoke", "access")
            self.assertFirstContact(report, server, refreshToken=False)
            why = self.explain(report)
            self.assertEqual(report["revoke"]["probe_status"], 401, why)
            self.assertEqual(report["authorizations"], 2, why)
            self.assertEqual(report["refresh_grants"], 0, why)
            self.assertToolWorked(report["after_revoke_result"], why)

        await self.matrix("streamable-http", "dcr", "revoke-reauthorize-offline-access-only", body)

    async def test_denyReachesTheApplication(self) -> None:
        """
        When the person presses Deny, the consent POST answers 303 to the
        redirect URI with C{error=access_denied}, and no token is issued.
        """
        server, siteToken = await self.serve()
        report, out, err, code = await self.runDriver(server, siteToken, "--decision", "deny")
        self.assertEqual(code, 1, server.annotate(out + err))
        assert report is not None
        self.assertIn("error=access_denied", report["error"], self.explain(report))
        self.assertEqual(report["code_grants"], 0)
        self.assertEqual(report["tokens"], [])
