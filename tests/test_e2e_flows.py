"""
The flow timeline end to end: a real C{twist smeldr-oauth} process, real
clients (the official MCP Python SDK client; the doctor's OAuth flow as a
client that stops after the token exchange), and the timeline read back
with the real C{smeldr-oauth-admin flows}.  The raw rows are then scanned
for every secret the flows handled.
"""

from __future__ import annotations

import json
import re
import sqlite3
import sys
from typing import Any

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from smeldr_oauth.doctor.fetch import Fetcher, http_client
from smeldr_oauth.doctor.guard import guard_around
from smeldr_oauth.doctor.flow import Flow
import treq
from twisted.web.client import ResponseFailed
from twisted.internet.defer import Deferred, gatherResults

from smeldr_oauth.flows import model, patterns
from tests.e2e import RunningServer, adminCommand, checkDriver, createSiteToken, runDriverReport, runProgram, startServer
from tests.haproxy import reserveFrontend, startHAProxy
from tests.test_e2e_python_sdk import DRIVER, _requireSDK

#: A secret's shape: 256 bits in URL-safe base64 (43 characters) or more.
SECRET_SHAPE = re.compile(r"[A-Za-z0-9_-]{40,}")


def raw_rows(path: str) -> str:
    """Every stored step, every column, as one text."""
    with sqlite3.connect(path) as db:
        return "\n".join(repr(row) for row in db.execute("SELECT * FROM flow_steps"))


class FlowTimelineTests(TestCase):
    timeout = 90

    async def flows(self, server: RunningServer, *arguments: str) -> str:
        out, err, code = await runProgram(
            reactor, [*adminCommand(), "flows", "--oauth-db", server.oauthDB, *arguments]
        )
        self.assertEqual(code, 0, err)
        return out

    async def waitForSteps(self, server: RunningServer, kind: str, count: int, timeout: float = 10.0) -> None:
        """
        Poll the server's SQLite file (the recorder writes every second)
        until it holds C{count} steps of C{kind}.
        """
        from twisted.internet.task import deferLater

        deadline = reactor.seconds() + timeout
        while True:
            with sqlite3.connect(server.oauthDB) as db:
                try:
                    found = db.execute("SELECT COUNT(*) FROM flow_steps WHERE kind = ?", (kind,)).fetchone()[0]
                except sqlite3.OperationalError:
                    found = 0  # not created yet
            if found >= count:
                return
            self.assertLess(reactor.seconds(), deadline, server.annotate(f"{found} {kind} steps, not {count}"))
            await deferLater(reactor, 0.1, lambda: None)

    def assertNoSecrets(self, server: RunningServer, secrets: list[str], ids: set[str]) -> None:
        rows = raw_rows(server.oauthDB)
        self.assertTrue(rows)
        for secret in secrets:
            self.assertNotIn(secret, rows)
        # Nor anything shaped like one (a code, a verifier), ids apart.
        self.assertEqual([s for s in SECRET_SHAPE.findall(rows) if s not in ids], [])

    async def test_python_sdk_client_makes_a_complete_timeline(self) -> None:
        """
        Discovery to refresh, as the official Python SDK client takes the
        steps; no pattern is found in it.
        """
        _requireSDK()
        server = await startServer(self, reactor, [])
        site_token = await createSiteToken(reactor, server)
        arguments = ("--transport", "streamable", "--refresh")
        report, out, err, code = await runDriverReport(
            reactor,
            [sys.executable, DRIVER, "--url", server.mcpURL, "--site-token", site_token,
             "--tool", "list_posts", "--args", "{}", "--timeout", "20", *arguments],
            timeout=30,
        )
        checkDriver(self, server, arguments, report, out, err, code)
        timeline = await self.assertCompleteTimeline(server, site_token, refreshed=True)
        # The SDK speaks the stateless protocol (no initialize): each
        # call carries its protocol version.
        call = next(s for s in timeline["steps"] if s["kind"] == model.MCP_CALL)
        self.assertTrue(call["detail"]["version"], call)

    async def test_typescript_sdk_client_makes_a_complete_timeline(self) -> None:
        """
        The official TypeScript SDK client's steps, initialize included.
        """
        from tests.test_e2e_typescript_sdk import CALLBACK_PORT, NODE_DIRECTORY, SDK_PACKAGE, requireNodeClient
        from tests.test_e2e_typescript_sdk import DRIVER as TS_DRIVER

        node = requireNodeClient(SDK_PACKAGE)
        server = await startServer(self, reactor, [])
        site_token = await createSiteToken(reactor, server)
        arguments: tuple[str, ...] = ()
        report, out, err, code = await runDriverReport(
            reactor,
            [node, TS_DRIVER, "--url", server.mcpURL, "--site-token", site_token,
             "--callback-port", str(CALLBACK_PORT), "--tool", "list_posts", "--args", "{}", "--timeout", "20"],
            timeout=30,
            path=NODE_DIRECTORY,
        )
        checkDriver(self, server, arguments, report, out, err, code)
        timeline = await self.assertCompleteTimeline(server, site_token, refreshed=False)
        initialize = next(s for s in timeline["steps"] if s["kind"] == model.MCP_INITIALIZE)
        self.assertTrue(initialize["detail"]["version"], initialize)
        session = next(s for s in timeline["steps"] if s["kind"] == model.MCP_SESSION)
        self.assertEqual(session["detail"]["transport"], "streamable", timeline)

    async def assertCompleteTimeline(self, server: RunningServer, site_token: str, refreshed: bool) -> Any:
        """
        Stop C{server}, read its one client's timeline with the admin
        command, check every step of a successful first connection is
        there in order with no pattern found, and scan the raw rows.
        """
        await server.stop()  # the recorder writes what waits on the way out
        document = json.loads(await self.flows(server, "--json", "--resource", server.mcpURL))
        clients = {s["client_id"] for s in document["steps"] if s["kind"] == model.CODE_EXCHANGED}
        self.assertEqual(len(clients), 1, document)
        [client_id] = clients
        timeline = json.loads(
            await self.flows(server, "--json", "--client", client_id, "--resource", server.mcpURL)
        )
        kinds = [s["kind"] for s in timeline["steps"]]
        for kind in (
            model.MCP_REFUSED,  # the first request, without a token
            model.DISCOVERY,
            model.REGISTERED,
            model.AUTHORIZE,
            model.APPROVED,
            model.CODE_EXCHANGED,
            model.MCP_CALL,
        ) + ((model.REFRESHED,) if refreshed else ()):
            self.assertIn(kind, kinds, timeline)
        self.assertLess(kinds.index(model.DISCOVERY), kinds.index(model.REGISTERED))
        self.assertLess(kinds.index(model.CODE_EXCHANGED), kinds.index(model.MCP_CALL))
        refused = next(s for s in timeline["steps"] if s["kind"] == model.MCP_REFUSED)
        self.assertEqual((refused["outcome"], refused["detail"]["challenge"]), ("401", "yes"))
        self.assertEqual(timeline["findings"], [])
        ids = {client_id} | {s["grant_id"] for s in timeline["steps"] if s["grant_id"]}
        self.assertNoSecrets(server, [site_token], ids)
        return timeline

    async def doctor_flow(self, server: RunningServer, site_token: str) -> Any:
        """
        A client that stops after the token exchange: the doctor's flow,
        over the real socket.
        """
        fetcher = Fetcher(reactor, http_client(reactor, None, 10, guard_around(["127.0.0.1"])), 10)
        fetched = await fetcher.request("GET", server.issuer + "/.well-known/oauth-authorization-server")
        metadata = json.loads(fetched.body)
        flow = Flow(fetcher, server.mcpURL, server.mcpURL, metadata)
        return fetcher, await flow.run(site_token)

    async def test_client_stopping_after_the_token_exchange(self) -> None:
        """
        The "never used" pattern, with the missing step marked in the table.
        """
        server = await startServer(self, reactor, [])
        site_token = await createSiteToken(reactor, server)
        _, credentials = await self.doctor_flow(server, site_token)
        await server.stop()
        table = await self.flows(server, "--client", credentials.client_id, "--grace", "0")
        self.assertIn("code exchanged", table)
        self.assertRegex(table, r"✗ token issued \d\d:\d\d:\d\d; no MCP request with this grant's token since")
        self.assertIn(f"see docs/troubleshooting.md#{patterns.NEVER_USED}", table)
        secrets = [site_token, credentials.access_token, credentials.refresh_token or "-"]
        self.assertNoSecrets(server, secrets, set(SECRET_SHAPE.findall(table)))

    async def test_token_used_then_expired_without_refresh(self) -> None:
        """
        The "no refresh" pattern: the client initializes an MCP session with
        its token, and never refreshes; read with the expiry forced
        (C{--access-ttl 0}: the token counts as expired at once).
        """
        server = await startServer(self, reactor, [])
        site_token = await createSiteToken(reactor, server)
        fetcher, credentials = await self.doctor_flow(server, site_token)
        body = {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "initialize",
            "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
        }
        answer = await fetcher.request(
            "POST",
            server.mcpURL,
            {
                "Authorization": f"Bearer {credentials.access_token}",
                "Content-Type": "application/json",
                "Accept": "application/json, text/event-stream",
            },
            json.dumps(body).encode(),
        )
        self.assertEqual(answer.status, 200)
        await server.stop()
        table = await self.flows(server, "--client", credentials.client_id, "--access-ttl", "0")
        self.assertIn("MCP initialize", table)
        self.assertRegex(table, r"✗ access token expired \d\d:\d\d:\d\d; no refresh attempted since")
        self.assertIn(f"see docs/troubleshooting.md#{patterns.NO_REFRESH}", table)
        self.assertNotIn(patterns.NEVER_USED, table)

    async def test_streams_cut_by_a_proxy_timeout(self) -> None:
        """
        Behind HAProxy with C{timeout server} of 2.5 seconds (under the
        server's 15-second keepalive interval), every event stream of a
        client ends after 2.5 seconds: the "stream cut after N seconds"
        pattern, with N.
        """
        frontend = reserveFrontend(self)
        issuer = frontend.url("http")
        server = await startServer(self, reactor, ["--issuer", issuer, "--trust-forwarded-from", "127.0.0.1"])
        proxy = await startHAProxy(self, reactor, [server.port], frontend=frontend, timeoutServer=2.5)
        site_token = await createSiteToken(reactor, server)
        fetcher = Fetcher(reactor, http_client(reactor, None, 10, guard_around(["127.0.0.1"])), 10)
        fetched = await fetcher.request("GET", issuer + "/.well-known/oauth-authorization-server")
        mcp = issuer + "/mcp"
        credentials = await Flow(fetcher, mcp, mcp, json.loads(fetched.body)).run(site_token)
        bearer = f"Bearer {credentials.access_token}"

        async def stream() -> None:
            body = {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "initialize",
                "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
            }
            headers = {"Authorization": bearer, "Accept": "application/json, text/event-stream"}
            answer = await treq.post(
                mcp, json.dumps(body).encode(), headers=dict(headers, **{"Content-Type": "application/json"}), persistent=False
            )
            await answer.text()
            self.assertEqual(answer.code, 200, proxy.annotate("initialize"))
            session = answer.headers.getRawHeaders("mcp-session-id")[0]
            opened = await treq.get(
                mcp,
                headers={"Authorization": bearer, "Accept": "text/event-stream", "Mcp-Session-Id": session,
                         "MCP-Protocol-Version": "2025-06-18"},
                unbuffered=True,
                persistent=False,
            )
            self.assertEqual(opened.code, 200, proxy.annotate("stream"))
            # Fires when the proxy cuts the stream (mid-chunk: a failure).
            await treq.collect(opened, lambda data: None).addErrback(lambda f: f.trap(ResponseFailed))

        await gatherResults([Deferred.fromCoroutine(stream()), Deferred.fromCoroutine(stream())])
        # The proxy closed the client's side; the server learns of its own
        # side a moment later: wait (on the reactor) until it has written both.
        await self.waitForSteps(server, model.STREAM_CLOSED, 2)
        await server.stop()
        table = await self.flows(server, "--client", credentials.client_id)
        self.assertEqual(table.count("stream closed"), 2, table)
        self.assertRegex(table, r"✗ 2 event streams closed after about [23] seconds each")
        self.assertIn(f"see docs/troubleshooting.md#{patterns.STREAM_CUT}", table)

    async def test_challenge_dropped_by_a_proxy(self) -> None:
        """
        HAProxy removing C{WWW-Authenticate} from the answers: a client
        that keeps calling C{/mcp} without a token never learns where the
        resource metadata is, and the timeline (by the client's address:
        no token, no client id) names it, with the header noted as sent.
        """
        frontend = reserveFrontend(self)
        issuer = frontend.url("http")
        server = await startServer(self, reactor, ["--issuer", issuer, "--trust-forwarded-from", "127.0.0.1"])
        proxy = await startHAProxy(
            self, reactor, [server.port], frontend=frontend, extraBackend=["    http-response del-header WWW-Authenticate"]
        )
        for _ in range(3):
            answer = await treq.post(
                issuer + "/mcp",
                b"{}",
                headers={"Content-Type": "application/json", "Accept": "application/json, text/event-stream"},
                persistent=False,
            )
            await answer.text()
            self.assertEqual(answer.code, 401, proxy.annotate("unauthenticated POST"))
            self.assertIsNone(answer.headers.getRawHeaders("www-authenticate"), proxy.annotate("header kept"))
        await server.stop()
        table = await self.flows(server)
        self.assertIn(
            "✗ 3 requests answered 401 (each with WWW-Authenticate when it left this server);"
            " the protected resource metadata was never fetched after",
            table,
        )
        self.assertIn(f"see docs/troubleshooting.md#{patterns.CHALLENGE_LOST}", table)


class MCPRemoteTimelineTests(TestCase):
    """
    mcp-remote over the legacy HTTP+SSE transport makes a complete
    timeline.  Its harness is L{tests.test_e2e_mcp_remote}'s, borrowed
    method by method (subclassing would run that module's tests again).
    """

    timeout = 90

    flows = FlowTimelineTests.flows
    assertNoSecrets = FlowTimelineTests.assertNoSecrets
    assertCompleteTimeline = FlowTimelineTests.assertCompleteTimeline

    async def test_mcp_remote_over_legacy_sse(self) -> None:
        from tests.e2e import freePort

        server = await startServer(self, reactor, [])
        site_token = await createSiteToken(reactor, server)
        peer, browserLog, _ = self.start(server, site_token, freePort(), "--transport", "sse-only")
        await self.session(server, peer, browserLog)
        await self.stop(peer, peer.transport)
        timeline = await self.assertCompleteTimeline(server, site_token, refreshed=False)
        kinds = [s["kind"] for s in timeline["steps"]]
        self.assertIn(model.MCP_INITIALIZE, kinds, timeline)
        session = next(s for s in timeline["steps"] if s["kind"] == model.MCP_SESSION)
        self.assertEqual(session["detail"]["transport"], "legacy", timeline)
        paths = {s["detail"].get("path") for s in timeline["steps"] if s["kind"] == model.DISCOVERY}
        self.assertIn("/.well-known/oauth-protected-resource/mcp", paths, timeline)


def _borrowHarness() -> None:
    from tests.test_e2e_mcp_remote import MCPRemoteTests

    for name, value in vars(MCPRemoteTests).items():
        if not name.startswith(("test", "__")) and name not in vars(MCPRemoteTimelineTests):
            setattr(MCPRemoteTimelineTests, name, value)


_borrowHarness()


class PostgresWorkersTimelineTests(TestCase):
    """
    C{--workers 2} on PostgreSQL: each worker records its own steps and
    writes them to the one database; the admin command reads one timeline.
    """

    timeout = 120

    async def test_two_workers_one_timeline(self) -> None:
        import os
        import secrets as _secrets

        from tests import e2e, postgres
        from tests.test_service_workers import MARK, killMarked, readyPids, waitFor

        url = postgres.database_url(self)
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        port = e2e.freePort()
        issuer = f"http://127.0.0.1:{port}"
        mark = _secrets.token_hex(8)
        self.addCleanup(killMarked, mark)
        env = e2e.subprocessEnvironment()
        env[MARK] = mark
        argv = [
            sys.executable, "-m", "twisted", "--log-format=text", "smeldr-oauth",
            "--issuer", issuer, "--listen", f"tcp:{port}:interface=127.0.0.1",
            "--database", url, "--workers", "2", "--dev",
        ]
        server = await e2e.launchServer(self, reactor, argv, port, issuer, directory, env=env)
        self.addCleanup(killMarked, mark)
        await waitFor(lambda: len(readyPids(server.log())) == 2 or not server.isRunning(), "two workers ready")
        out, err, code = await runProgram(reactor, [*adminCommand(), "token", "create", "e2e", "--database", url])
        self.assertEqual(code, 0, err)
        site_token = out.strip().split()[-1]
        fetcher = Fetcher(reactor, http_client(reactor, None, 10, guard_around(["127.0.0.1"])), 10)
        fetched = await fetcher.request("GET", issuer + "/.well-known/oauth-authorization-server")
        credentials = await Flow(fetcher, server.mcpURL, server.mcpURL, json.loads(fetched.body)).run(site_token)
        for _ in range(6):
            answer = await treq.post(
                server.mcpURL,
                json.dumps(
                    {"jsonrpc": "2.0", "id": 1, "method": "initialize",
                     "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}
                ).encode(),
                headers={"Authorization": f"Bearer {credentials.access_token}", "Content-Type": "application/json",
                         "Accept": "application/json, text/event-stream"},
                persistent=False,
            )
            await answer.text()
            self.assertEqual(answer.code, 200, server.annotate("initialize"))
        await server.stop()
        out, err, code = await runProgram(
            reactor, [*adminCommand(), "flows", "--database", url, "--client", str(credentials.client_id), "--json"]
        )
        self.assertEqual(code, 0, err)
        kinds = [s["kind"] for s in json.loads(out)["steps"]]
        self.assertEqual(kinds.count(model.MCP_INITIALIZE), 6, kinds)
        for kind in (model.REGISTERED, model.AUTHORIZE, model.APPROVED, model.CODE_EXCHANGED):
            self.assertIn(kind, kinds)


class ResourceMismatchTimelineTests(TestCase):
    timeout = 60

    async def test_resource_of_another_scheme(self) -> None:
        """
        A client asking for the resource with https where the server is
        http (the mirror of metadata served on http behind TLS
        termination): the authorization step records the value asked for,
        and the admin command names the mismatch with both values.
        """
        from urllib.parse import urlencode

        from smeldr_oauth.oauth.pkce import s256

        server = await startServer(self, reactor, [])
        registered = await treq.post(
            server.issuer + "/oauth/register",
            json.dumps(
                {"client_name": "slash", "redirect_uris": ["http://127.0.0.1/cb"], "token_endpoint_auth_method": "none"}
            ).encode(),
            headers={"Content-Type": "application/json"},
            persistent=False,
        )
        client_id = json.loads(await registered.text())["client_id"]
        query = urlencode(
            {
                "response_type": "code",
                "client_id": client_id,
                "redirect_uri": "http://127.0.0.1/cb",
                "code_challenge": s256("v" * 43),
                "code_challenge_method": "S256",
                "state": "s",
                "resource": server.mcpURL.replace("http:", "https:"),
            }
        )
        answer = await treq.get(server.issuer + "/oauth/authorize?" + query, allow_redirects=False, persistent=False)
        await answer.text()
        self.assertIn(answer.code, (302, 303, 400), server.annotate(f"authorize answered {answer.code}"))
        await server.stop()
        out, err, code = await runProgram(
            reactor,
            [*adminCommand(), "flows", "--oauth-db", server.oauthDB, "--client", client_id, "--resource", server.mcpURL],
        )
        self.assertEqual(code, 0, err)
        self.assertIn("invalid_target", out)
        self.assertIn(
            f"✗ client asked for resource {server.mcpURL.replace('http:', 'https:')!r};"
            f" this server's resource is {server.mcpURL!r}",
            out,
        )
        self.assertIn(f"see docs/troubleshooting.md#{patterns.RESOURCE_MISMATCH}", out)
