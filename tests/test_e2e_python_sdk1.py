"""
End to end with the official MCP Python SDK 1.x (C{mcp} 1.30.0): a real
C{twist smeldr-oauth} process, and C{tests/clients/python_sdk1_client.py}
driving it with C{ClientSession} + C{OAuthClientProvider} over both
transports, through dynamic registration and a Client ID Metadata Document,
the consent form, the code exchange, a refresh and a revocation.

1.x and 2.x cannot share an environment, so 1.x lives in its own venv,
C{.tooling/mcp1}, made by C{scripts/setup-python-sdk1.sh}; the driver runs in
that venv's interpreter and prints one JSON line, which these tests judge. A
failure shows the driver's error, its HTTP trace and stderr, and the server's
log.

1.x's habits worth proving against: it sends C{resource} as the protected
resource metadata's value I{as pydantic renders it} (a bare origin gains a
trailing slash), it does not check C{iss} (the driver does), and on a 401
after a revocation it re-authorizes from scratch.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from tests import e2e
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

DRIVER = os.path.join(CHECKOUT, "tests", "clients", "python_sdk1_client.py")

#: The 1.x venv's interpreter (see C{scripts/setup-python-sdk1.sh}).
PYTHON1 = os.path.join(CHECKOUT, ".tooling", "mcp1", "bin", "python")

#: Where the driver says it wants the code; nothing listens there, the
#: driver reads the redirect itself (see its C{--callback-port}).
CALLBACK = "http://127.0.0.1:33418/callback"

#: The pinned requirements of the 1.x venv; the SDK's version is read there.
REQUIREMENTS = os.path.join(CHECKOUT, "tests", "clients", "requirements-mcp1.txt")

CLIENT = "mcp (Python SDK 1.x)"


def pinnedVersion() -> str:
    """
    The C{mcp} version C{requirements-mcp1.txt} pins (what the setup script
    installed), for the matrix.
    """
    with open(REQUIREMENTS) as f:
        for line in f:
            if line.strip().lower().startswith("mcp=="):
                return line.strip().split("==", 1)[1]
    return "unknown"


def _requireSDK() -> None:
    """
    Fail under the README's test command, skip elsewhere, when the 1.x venv
    is missing: see L{tests.prerequisites}.
    """
    require(
        None if os.path.exists(PYTHON1) else f"the MCP Python SDK 1.x venv is missing ({PYTHON1})",
        "bash scripts/setup-python-sdk1.sh",
    )


class PythonSDK1Tests(TestCase):
    """
    The Python SDK 1.x's whole OAuth + MCP flow against a live server.
    """

    timeout = 60

    def setUp(self) -> None:
        _requireSDK()
        self.version = pinnedVersion()

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
        self, server: RunningServer, siteToken: str, *arguments: str, url: str = ""
    ) -> tuple[dict[str, Any] | None, str, str, int]:
        """
        Run the driver against C{server}; give back its report (C{None} if
        it printed none), stdout, stderr and exit status.
        """
        return await runDriverReport(
            reactor,
            [
                PYTHON1,
                DRIVER,
                "--url",
                url or server.mcpURL,
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
        self,
        server: RunningServer,
        siteToken: str,
        *arguments: str,
        url: str = "",
    ) -> dict[str, Any]:
        """
        Run the driver against C{server}; fail with everything known unless
        it reports success.
        """
        report, out, err, code = await self.runDriver(server, siteToken, *arguments, url=url)
        return checkDriver(self, server, arguments, report, out, err, code)

    explain = staticmethod(explainReport)

    def assertToolWorked(self, result: dict[str, Any]) -> None:
        self.assertFalse(result.get("isError", False), result)
        self.assertIn("content", result)

    def assertFirstContact(
        self,
        report: dict[str, Any],
        server: RunningServer,
        resource: str = "",
    ) -> None:
        """
        What any successful first connection shows: the 1.x SDK, one consent
        redirecting with C{iss}, one code exchange giving a refresh token, a
        public client, the tool listed and working, and C{resource} sent on
        every OAuth request.

        1.x asks for the scope the 401 named and never for
        C{offline_access}; it gets a refresh token all the same, because by
        default the server issues one to every client registered for the
        C{refresh_token} grant, as 1.x registers.
        """
        why = self.explain(report)
        self.assertTrue(report["sdk_version"].startswith("1."), why)
        self.assertTrue(report["protocol_version"], why)
        self.assertIn("list_posts", report["tools"], why)
        self.assertToolWorked(report["tool_result"])
        self.assertEqual(report["authorizations_before_followup"], 1, why)
        self.assertEqual(report["code_grants_before_followup"], 1, why)
        self.assertEqual(report["registered"]["has_secret"], False, why)
        self.assertEqual(
            report["redirects"][0],
            {"redirect_uri": CALLBACK, "iss": server.issuer, "has_state": True},
            why,
        )
        first = report["tokens"][0]
        self.assertEqual(first["token_type"], "Bearer", why)
        self.assertIsNotNone(first["refresh"], "no refresh token was issued" + why)
        unauthorized = [e for e in report["http"] if e.get("status") == 401]
        self.assertTrue(unauthorized, why)
        self.assertIn("resource_metadata=", unauthorized[0]["www_authenticate"] or "", why)
        # 1.x names the resource on the authorize request and at the token
        # endpoint, as the metadata's value.
        resource = resource or server.mcpURL
        oauth = [
            e
            for e in report["http"]
            if e["path"].endswith("/authorize")
            and e["method"] == "GET"
            or e.get("grant_type") in ("authorization_code", "refresh_token")
        ]
        self.assertTrue(oauth, why)
        for e in oauth:
            self.assertEqual(e.get("resource"), [resource], why)
        self.assertEqual([e for e in report["http"] if e.get("status", 0) >= 500], [], why)

    async def dynamicRegistration(self, transport: str) -> dict[str, Any]:
        """
        Discover, register, consent, exchange, initialize, list and call a
        tool over C{transport}; one registration, one consent.
        """
        server, siteToken = await self.serve()
        report = await self.drive(server, siteToken, "--transport", transport)
        self.assertFirstContact(report, server)
        self.assertEqual(report["authorizations"], 1)
        registrations = [e for e in report["http"] if e["path"].endswith("/register")]
        self.assertEqual([e["status"] for e in registrations], [201])
        return report

    async def test_streamableHTTPWithDynamicRegistration(self) -> None:
        """
        Streamable HTTP (C{streamablehttp_client}): the whole flow, through
        dynamic registration; the session is opened and closed with the token.
        """

        async def body() -> None:
            report = await self.dynamicRegistration("streamable")
            statuses = {
                (e["method"], e.get("rpc")): e.get("status")
                for e in report["http"]
                if e["path"] == "/mcp" and e["auth"]
            }
            why = self.explain(report)
            self.assertEqual(statuses[("POST", "initialize")], 200, why)
            self.assertEqual(statuses[("POST", "notifications/initialized")], 202, why)
            self.assertIn(statuses[("GET", None)], (200, 405), why)
            self.assertIn(statuses[("DELETE", None)], (200, 204), why)

        await self.matrix("streamable-http", "dcr", "connect", body)

    async def test_legacySSEWithDynamicRegistration(self) -> None:
        """
        Legacy SSE (C{sse_client}): the same flow, with the token on the GET
        stream and on every POST to the message endpoint.
        """

        async def body() -> None:
            report = await self.dynamicRegistration("sse")
            messages = [
                (e.get("rpc"), e.get("status"), e["auth"])
                for e in report["http"]
                if e["path"] == "/mcp/message"
            ]
            self.assertEqual(
                messages,
                [
                    ("initialize", 202, True),
                    ("notifications/initialized", 202, True),
                    ("tools/list", 202, True),
                    ("tools/call", 202, True),
                ],
                self.explain(report),
            )

        await self.matrix("sse", "dcr", "connect", body)

    async def clientMetadataDocument(self, transport: str) -> None:
        """
        The whole flow over C{transport} with a Client ID Metadata Document:
        the document's URL is the client_id and nothing is registered.
        """
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
        self.assertTrue(report["registered"]["client_id_is_url"], report["registered"])
        registrations = [e for e in report["http"] if e["path"].endswith("/register")]
        self.assertEqual(registrations, [])

    async def test_streamableHTTPWithClientMetadataDocument(self) -> None:
        """
        With a Client ID Metadata Document (the server advertises
        C{client_id_metadata_document_supported}), 1.x uses the document's
        https URL as its client_id and registers nothing; the server fetches
        the document, trusting the test's CA.
        """
        await self.matrix(
            "streamable-http",
            "cimd",
            "connect",
            lambda: self.clientMetadataDocument("streamable"),
        )

    async def test_legacySSEWithClientMetadataDocument(self) -> None:
        """
        The same over legacy SSE.
        """
        await self.matrix("sse", "cimd", "connect", lambda: self.clientMetadataDocument("sse"))

    async def test_refresh(self) -> None:
        """
        When the access token runs out, 1.x uses the refresh grant (without
        asking the person again), naming the resource, and the next call
        works with the new token.

        1.x never asks for C{offline_access} (it takes the 401's C{scope}
        verbatim); the server's defaults give it a refresh token anyway, as a
        client registered for the C{refresh_token} grant.
        """

        async def body() -> None:
            server, siteToken = await self.serve("--access-token-ttl", "2")
            report = await self.drive(server, siteToken, "--transport", "streamable", "--refresh")
            why = self.explain(report)
            self.assertFirstContact(report, server)
            self.assertEqual(report["tokens"][0]["expires_in"], 2, why)
            self.assertEqual(report["refresh_method"], "waited", why)
            self.assertEqual(report["refresh_grants"], 1, why)
            self.assertTrue(report["refreshed"], why)
            self.assertEqual(report["authorizations"], 1, why)
            self.assertToolWorked(report["after_refresh_result"])
            self.assertEqual(len({t["access"] for t in report["tokens"]}), 2, why)

        await self.matrix("streamable-http", "dcr", "refresh", body)

    async def revokeThenRecover(self, transport: str) -> None:
        """
        Revoke the access token mid-session: the MCP endpoint answers 401 to
        it, 1.x authorizes again (same client, no new registration) and the
        next call goes through on the same session.
        """
        server, siteToken = await self.serve()
        report = await self.drive(server, siteToken, "--transport", transport, "--revoke")
        self.assertFirstContact(report, server)
        why = self.explain(report)
        self.assertEqual(report["revoke"]["status"], 200, why)
        self.assertEqual(report["revoke"]["probe_status"], 401, why)
        self.assertEqual(report["authorizations"], 2, why)
        self.assertEqual(report["code_grants"], 2, why)
        self.assertToolWorked(report["after_revoke_result"])
        registrations = [e for e in report["http"] if e["path"].endswith("/register")]
        self.assertEqual(len(registrations), 1, why)

    async def test_revokeThenRecover(self) -> None:
        """
        Revocation and recovery over Streamable HTTP.
        """
        await self.matrix(
            "streamable-http",
            "dcr",
            "revoke-recover",
            lambda: self.revokeThenRecover("streamable"),
        )

    async def test_revokeThenRecoverOverSSE(self) -> None:
        """
        The same recovery on a legacy SSE session: the stream stays up and the
        message endpoint accepts the new token.
        """
        await self.matrix("sse", "dcr", "revoke-recover", lambda: self.revokeThenRecover("sse"))

    async def test_bareOriginResource(self) -> None:
        """
        A server whose resource is a bare origin (C{--resource
        http://127.0.0.1:PORT}; the MCP endpoint stays at C{/mcp}, which the
        origin is a prefix of): 1.x renders the metadata's C{resource}
        through pydantic and so sends it with a trailing slash on authorize
        and at the token endpoint; the server must take
        C{http://127.0.0.1:PORT/} as its own resource.
        """

        async def body() -> None:
            # The resource names the port, which startServer picks: pick it
            # first and make startServer use it.
            port = e2e.freePort()
            self.patch(e2e, "freePort", lambda: port)
            origin = f"http://127.0.0.1:{port}"
            server, siteToken = await self.serve("--resource", origin)
            report = await self.drive(server, siteToken, "--transport", "streamable", url=origin + "/mcp")
            self.assertFirstContact(report, server, resource=origin + "/")

        await self.matrix("streamable-http", "dcr", "bare-origin-resource", body)
