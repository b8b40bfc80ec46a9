"""
End to end with the official MCP Python SDK: a real C{twist smeldr-oauth}
process, and C{tests/clients/python_sdk_client.py} driving it with
C{mcp.Client} + C{OAuthClientProvider} over both transports, through dynamic
registration, the consent form, the code exchange, a refresh and a revocation.

The driver runs in its own interpreter (it is asyncio, this is Twisted); it
prints one JSON line, which these tests judge. A failure shows the driver's
error, its HTTP trace and stderr, and the server's log.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from tests.e2e import (
    CHECKOUT,
    RunningServer,
    createSiteToken,
    checkDriver,
    explainReport,
    recordMatrix,
    runDriverReport,
    serveClientMetadata,
    startServer,
)
from tests.prerequisites import require

DRIVER = os.path.join(CHECKOUT, "tests", "clients", "python_sdk_client.py")

#: Where the driver says it wants the code; nothing listens there, the
#: driver reads the redirect itself (see its C{--callback-port}).
CALLBACK = "http://127.0.0.1:33418/callback"


def _sdkVersion() -> str:
    from importlib.metadata import version

    return version("mcp")


def _matrixCell(arguments: tuple[str, ...]) -> tuple[str, str, str, str]:
    """
    The matrix row (transport, identity, case, status) of a successful
    driver run with C{arguments}.
    """
    def value(flag: str, default: str) -> str:
        return arguments[arguments.index(flag) + 1] if flag in arguments else default

    transport = "sse" if value("--transport", "streamable") == "sse" else "streamable-http"
    identity = value("--identity", "dcr")
    if "--refresh" in arguments:
        case = "refresh"
    elif "--revoke" in arguments:
        case = "revoke-recover"
    elif value("--decision", "approve") == "deny":
        case = "deny"
    elif value("--mode", "auto") == "legacy":
        case = "connect-initialize"
    else:
        case = "connect"
    return transport, identity, case, "pass"


def _requireSDK() -> None:
    """
    Fail under the README's test command, skip elsewhere, when the SDK (and
    its HTTP client) is not in this interpreter: see L{tests.prerequisites}.
    """
    missing = [name for name in ("mcp", "httpx2") if importlib.util.find_spec(name) is None]
    require(
        f"the MCP Python SDK 2.x is not installed (missing: {', '.join(missing)})" if missing else None,
        ".venv/bin/pip install -r requirements-test.txt",
    )


class PythonSDKTests(TestCase):
    """
    The Python SDK's whole OAuth + MCP flow against a live server.
    """

    timeout = 60

    def setUp(self) -> None:
        _requireSDK()

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
                sys.executable,
                DRIVER,
                "--url",
                server.mcpURL,
                "--site-token",
                siteToken,
                "--tool",
                "list_posts",
                "--args",
                "{}",
                "--timeout",
                "20",
                *arguments,
            ],
            timeout=30,
        )

    async def drive(
        self, server: RunningServer, siteToken: str, *arguments: str
    ) -> dict[str, Any]:
        """
        Run the driver against C{server}; fail with everything known unless
        it reports success.
        """
        report, out, err, code = await self.runDriver(server, siteToken, *arguments)
        report = checkDriver(self, server, arguments, report, out, err, code)
        recordMatrix(self, "mcp (Python SDK 2.x)", _sdkVersion(), *_matrixCell(arguments))
        return report

    explain = staticmethod(explainReport)

    def assertToolWorked(self, result: dict[str, Any]) -> None:
        self.assertFalse(result.get("isError", False), result)
        self.assertIn("content", result)

    def assertFirstContact(self, report: dict[str, Any]) -> None:
        """
        What any successful first connection shows: one consent, one code
        exchange, a public client, the tool listed and working.
        """
        why = self.explain(report)
        self.assertTrue(report["protocol_version"], why)
        self.assertIn("list_posts", report["tools"], why)
        self.assertToolWorked(report["tool_result"])
        self.assertEqual(report["authorizations_before_followup"], 1, why)
        self.assertEqual(report["code_grants_before_followup"], 1, why)
        self.assertEqual(report["registered"]["has_secret"], False, why)
        first = report["tokens"][0]
        self.assertEqual(first["token_type"], "Bearer", why)
        self.assertIsNotNone(first["refresh"], "no refresh token was issued" + why)
        # The first MCP request went out without a token, and the 401 that
        # answered it named the resource metadata, which is what starts it all.
        unauthorized = [e for e in report["http"] if e.get("status") == 401]
        self.assertTrue(unauthorized, why)
        self.assertIn(
            "resource_metadata=", unauthorized[0]["www_authenticate"] or "", why
        )
        # Nothing the server answered was a server error.
        self.assertEqual(
            [e for e in report["http"] if e.get("status", 0) >= 500], [], why
        )

    async def test_streamableHTTPWithDynamicRegistration(self) -> None:
        """
        Streamable HTTP: discover, register, consent, exchange, initialize,
        list and call a tool.
        """
        server, siteToken = await self.serve()
        report = await self.drive(server, siteToken, "--transport", "streamable")
        self.assertFirstContact(report)
        self.assertEqual(report["authorizations"], 1)
        posts = [
            e for e in report["http"] if e["method"] == "POST" and e["path"] == "/mcp"
        ]
        self.assertTrue(all(e.get("status") != 500 for e in posts), posts)

    async def test_legacySSEWithDynamicRegistration(self) -> None:
        """
        Legacy SSE: the same flow, with the token on the GET stream and on
        every POST to the message endpoint.
        """
        server, siteToken = await self.serve()
        report = await self.drive(server, siteToken, "--transport", "sse")
        self.assertFirstContact(report)
        self.assertEqual(report["authorizations"], 1)
        self.assertTrue(
            any(
                e["method"] == "POST" and e["path"] == "/mcp/message"
                for e in report["http"]
            ),
            report["http"],
        )

    async def test_refresh(self) -> None:
        """
        When the access token runs out, the SDK uses the refresh grant
        (without asking the person again) and the next call works with the new
        token. The server's TTL is lowered so that the token really expires.
        """
        server, siteToken = await self.serve("--access-token-ttl", "2")
        report = await self.drive(
            server, siteToken, "--transport", "streamable", "--refresh"
        )
        self.assertFirstContact(report)
        self.assertEqual(report["tokens"][0]["expires_in"], 2)
        self.assertEqual(report["refresh_method"], "waited")
        self.assertEqual(report["refresh_grants"], 1)
        self.assertTrue(report["refreshed"])
        self.assertEqual(report["authorizations"], 1)
        self.assertToolWorked(report["after_refresh_result"])
        accessTokens = {t["access"] for t in report["tokens"]}
        self.assertEqual(len(accessTokens), 2)

    async def test_revokeThenRecover(self) -> None:
        """
        After the access token is revoked, the MCP endpoint answers 401; the
        SDK authorizes again and the call goes through on the same session.
        """
        server, siteToken = await self.serve()
        report = await self.drive(
            server, siteToken, "--transport", "streamable", "--revoke"
        )
        self.assertFirstContact(report)
        self.assertEqual(report["revoke"]["status"], 200)
        self.assertEqual(report["revoke"]["probe_status"], 401)
        self.assertEqual(report["authorizations"], 2)
        self.assertEqual(report["code_grants"], 2)
        self.assertToolWorked(report["after_revoke_result"])

    async def test_revokeThenRecoverOverSSE(self) -> None:
        """
        The same recovery on a legacy SSE session: the stream stays up and the
        message endpoint accepts the new token.
        """
        server, siteToken = await self.serve()
        report = await self.drive(server, siteToken, "--transport", "sse", "--revoke")
        self.assertFirstContact(report)
        self.assertEqual(report["revoke"]["probe_status"], 401)
        self.assertEqual(report["authorizations"], 2)
        self.assertToolWorked(report["after_revoke_result"])

    async def test_streamableHTTPWithClientMetadataDocument(self) -> None:
        """
        With a Client ID Metadata Document (the server advertises
        C{client_id_metadata_document_supported}), the SDK uses the document's
        https URL as its client_id and registers nothing; the server fetches
        the document, trusting the test's CA.
        """
        host = await serveClientMetadata(self, reactor, [CALLBACK])
        server, siteToken = await self.serve("--cimd-ca-file", host.caFile)
        report = await self.drive(
            server,
            siteToken,
            "--transport",
            "streamable",
            "--identity",
            "cimd",
            "--client-metadata-url",
            host.url,
        )
        self.assertFirstContact(report)
        self.assertTrue(report["registered"]["client_id_is_url"], report["registered"])
        registrations = [e for e in report["http"] if e["path"].endswith("/register")]
        self.assertEqual(registrations, [])

    async def test_legacySSEWithClientMetadataDocument(self) -> None:
        """
        The legacy HTTP+SSE transport with a Client ID Metadata Document.
        """
        host = await serveClientMetadata(self, reactor, [CALLBACK])
        server, siteToken = await self.serve("--cimd-ca-file", host.caFile)
        report = await self.drive(
            server,
            siteToken,
            "--transport",
            "sse",
            "--identity",
            "cimd",
            "--client-metadata-url",
            host.url,
        )
        self.assertFirstContact(report)
        self.assertTrue(report["registered"]["client_id_is_url"], report["registered"])
        self.assertEqual([e for e in report["http"] if e["path"].endswith("/register")], [])

    async def test_streamableHTTPLegacyHandshake(self) -> None:
        """
        With C{mode="legacy"} (what 2025-era SDKs do) the SDK runs the
        C{initialize} handshake, opens the C{GET /mcp} stream with its session
        and ends the session with C{DELETE /mcp}, all with the token.
        """
        server, siteToken = await self.serve()
        report = await self.drive(
            server, siteToken, "--transport", "streamable", "--mode", "legacy"
        )
        self.assertFirstContact(report)
        why = self.explain(report)
        self.assertTrue(report["protocol_version"].startswith("2025-"), why)
        statuses = {
            (e["method"], e.get("rpc")): e.get("status")
            for e in report["http"]
            if e["path"] == "/mcp" and e["auth"]
        }
        self.assertEqual(statuses[("POST", "initialize")], 200, why)
        self.assertEqual(statuses[("POST", "notifications/initialized")], 202, why)
        self.assertIn(statuses[("GET", None)], (200, 405), why)
        self.assertIn(statuses[("DELETE", None)], (200, 204), why)

    async def test_legacySSELegacyHandshake(self) -> None:
        """
        The C{initialize} handshake over legacy SSE: every message POSTed to
        the message endpoint is accepted with 202 and answered on the stream.
        """
        server, siteToken = await self.serve()
        report = await self.drive(
            server, siteToken, "--transport", "sse", "--mode", "legacy"
        )
        self.assertFirstContact(report)
        why = self.explain(report)
        self.assertTrue(report["protocol_version"].startswith("2025-"), why)
        messages = [
            (e.get("rpc"), e.get("status"))
            for e in report["http"]
            if e["path"] == "/mcp/message"
        ]
        self.assertEqual(
            messages,
            [
                ("initialize", 202),
                ("notifications/initialized", 202),
                ("tools/list", 202),
                ("tools/call", 202),
            ],
            why,
        )

    async def test_denyReachesTheApplication(self) -> None:
        """
        When the person presses Deny, the consent POST answers 303 to the
        application's redirect URI with C{error=access_denied}, and no code.
        """
        server, siteToken = await self.serve()
        report, out, err, code = await self.runDriver(
            server, siteToken, "--decision", "deny"
        )
        self.assertEqual(code, 1, server.annotate(out + err))
        assert report is not None
        self.assertIn("error='access_denied'", report["error"], self.explain(report))
        self.assertEqual(report["code_grants"], 0)
        self.assertEqual(report["tokens"], [])
