"""
End to end with npm C{mcp-remote} (pinned in C{tests/node/package.json}), the
stdio-to-remote proxy that desktop MCP hosts use to reach an OAuth-protected
server: a real C{twist smeldr-oauth} process, and mcp-remote talking to it,
driven over stdio with newline-delimited JSON-RPC as a desktop host would.
Hosts run C{npx mcp-remote}; here Node runs the script npx would (the
package's C{mcp-remote} bin) directly, because npx forks it and a child of a
child would outlive an interrupted test run (L{tests.lifetime}).

mcp-remote signs in at startup: it discovers the server, registers (or uses
its C{--client-metadata-url} as the client_id when the server supports
CIMD), starts a loopback callback server and opens the authorization URL
with the C{open} package. With no desktop session, that runs C{$BROWSER},
here C{tests/node/mcp_remote_browser.mjs}, which consents over HTTP with a
site token and follows the server's 303 to mcp-remote's callback; mcp-remote
then exchanges the code and serves stdio.

Every run gets its own C{HOME} and C{MCP_REMOTE_CONFIG_DIR}, so no token
survives between tests or leaks from the machine's own C{~/.mcp-auth}.
"""

from __future__ import annotations

import glob
import json
import os
import stat
from typing import Any

import treq
from twisted.internet import error
from twisted.internet import reactor as _globalReactor
from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.web.client import HTTPConnectionPool
from twisted.trial.unittest import TestCase

from tests.e2e import (
    RunningServer,
    createSiteToken,
    freePort,
    recordMatrix,
    serveClientMetadata,
    startServer,
    subprocessEnvironment,
)
from tests.lifetime import spawnBound
from tests.test_e2e_typescript_sdk import (
    NODE_DIRECTORY,
    packageVersion,
    requireNodeClient,
)

#: The reactor these tests run on; C{Any} because its interfaces are only
#: known at run time.
reactor: Any = _globalReactor

PACKAGE = os.path.join(NODE_DIRECTORY, "node_modules", "mcp-remote", "package.json")
BROWSER = os.path.join(NODE_DIRECTORY, "mcp_remote_browser.mjs")
CLIENT = "mcp-remote"

#: Variables that would make xdg-open use a desktop's handler instead of
#: C{$BROWSER} (or hand the URL to a real browser).
DESKTOP_VARIABLES = (
    "DISPLAY",
    "WAYLAND_DISPLAY",
    "XDG_CURRENT_DESKTOP",
    "XDG_SESSION_DESKTOP",
    "DESKTOP_SESSION",
    "KDE_FULL_SESSION",
    "GNOME_DESKTOP_SESSION_ID",
    "MATE_DESKTOP_SESSION_ID",
    "DBUS_SESSION_BUS_ADDRESS",
)


def mcpRemoteScript() -> str:
    """
    The script of mcp-remote's C{mcp-remote} command, as its package.json
    names it (what C{npx mcp-remote} runs).
    """
    with open(PACKAGE) as f:
        bins = json.load(f)["bin"]
    relative = bins["mcp-remote"] if isinstance(bins, dict) else bins
    return os.path.join(os.path.dirname(PACKAGE), relative)


class StdioPeer(ProcessProtocol):
    """
    The host's end of an MCP stdio connection: send JSON-RPC messages one a
    line, match answers to requests by id, and keep everything the child
    wrote to stderr (its log) for failure messages.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._waiting: dict[Any, Deferred[dict[str, Any]]] = {}
        self.received: list[dict[str, Any]] = []
        self.stderr: list[bytes] = []
        self.ended: Deferred[None] = Deferred()
        self.reason: Failure | None = None
        self._next = 0

    def _send(self, message: dict[str, Any]) -> None:
        transport: Any = self.transport
        transport.write(json.dumps(message).encode("utf-8") + b"\n")

    def outReceived(self, data: bytes) -> None:
        self._buffer += data
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            if not line.strip():
                continue
            try:
                message = json.loads(line)
            except ValueError:
                self.stderr.append(b"[stdout, not JSON] " + line + b"\n")
                continue
            self.received.append(message)
            waiting = self._waiting.pop(message.get("id"), None)
            if waiting is not None and ("result" in message or "error" in message):
                waiting.callback(message)

    def errReceived(self, data: bytes) -> None:
        self.stderr.append(data)

    def processEnded(self, reason: Failure) -> None:
        self.reason = reason
        for waiting in self._waiting.values():
            waiting.errback(RuntimeError(f"mcp-remote exited: {reason.value}"))
        self._waiting.clear()
        self.ended.callback(None)

    def log(self) -> str:
        return b"".join(self.stderr).decode("utf-8", "replace")

    def notify(self, method: str, params: dict[str, Any] | None = None) -> None:
        message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            message["params"] = params
        self._send(message)

    async def request(
        self, method: str, params: dict[str, Any] | None = None, timeout: float = 25.0
    ) -> dict[str, Any]:
        """
        Send a request and wait for its answer (a result or an error).
        """
        if self.reason is not None:
            raise RuntimeError(f"mcp-remote has exited: {self.reason.value}")
        self._next += 1
        identifier = self._next
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": identifier, "method": method}
        if params is not None:
            message["params"] = params
        answer: Deferred[dict[str, Any]] = Deferred()
        self._waiting[identifier] = answer
        answer.addTimeout(timeout, reactor)
        self._send(message)
        return await answer


class MCPRemoteTests(TestCase):
    """
    mcp-remote's sign-in and proxying against a live server.
    """

    timeout = 60

    def setUp(self) -> None:
        self.node = requireNodeClient(PACKAGE)
        self.version = packageVersion(PACKAGE)

    async def matrix(self, transport: str, identity: str, case: str, body: Any) -> None:
        try:
            await body()
        except BaseException:
            recordMatrix(self, CLIENT, self.version, transport, identity, case, "fail")
            raise
        recordMatrix(self, CLIENT, self.version, transport, identity, case, "pass")

    def browserScript(self, directory: str) -> str:
        """
        An executable that runs the browser script with this Node: C{$BROWSER}
        is split on spaces by xdg-open, so it must be one path.
        """
        path = os.path.join(directory, "browser")
        with open(path, "w") as f:
            f.write(f'#!/bin/sh\nexec "{self.node}" "{BROWSER}" "$@"\n')
        os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)
        return path

    def start(
        self,
        server: RunningServer,
        siteToken: str,
        callbackPort: int,
        *arguments: str,
        caFile: str | None = None,
    ) -> tuple[StdioPeer, str, str]:
        """
        Start C{mcp-remote <mcp url> <callback port> ...} in its own home;
        give back its stdio peer, the browser's log file and the config
        directory. It is stopped at cleanup.
        """
        home = os.path.abspath(self.mktemp())
        os.makedirs(home)
        configDirectory = os.path.join(home, "mcp-auth")
        browserLog = os.path.join(home, "browser.jsonl")
        env = subprocessEnvironment()
        for name in DESKTOP_VARIABLES:
            env.pop(name, None)
        env.update(
            HOME=home,
            MCP_REMOTE_CONFIG_DIR=configDirectory,
            BROWSER=self.browserScript(home),
            SMELDR_SITE_TOKEN=siteToken,
            SMELDR_BROWSER_LOG=browserLog,
        )
        if caFile is not None:
            # mcp-remote does not fetch its own metadata document, but a
            # client that checks it would need to trust the test CA.
            env["NODE_EXTRA_CA_CERTS"] = caFile
        argv = [
            self.node,
            mcpRemoteScript(),
            server.mcpURL,
            str(callbackPort),
            "--auth-timeout",
            "20",
            *arguments,
        ]
        peer = StdioPeer()
        process = spawnBound(reactor, peer, argv, env=env, path=NODE_DIRECTORY)
        self.addCleanup(self.stop, peer, process)
        return peer, browserLog, configDirectory

    async def stop(self, peer: StdioPeer, process: Any) -> None:
        if peer.reason is not None:
            return
        # A host ends a stdio server by closing its stdin, then signals.
        process.closeStdin()
        killer = reactor.callLater(3, self._signal, process, "TERM")
        killer2 = reactor.callLater(6, self._signal, process, "KILL")
        await peer.ended
        for call in (killer, killer2):
            if call.active():
                call.cancel()

    @staticmethod
    def _signal(process: Any, name: str) -> None:
        try:
            process.signalProcess(name)
        except error.ProcessExitedAlready:
            pass

    def explain(self, server: RunningServer, peer: StdioPeer, browserLog: str, message: str) -> str:
        return server.annotate(
            f"{message}\n--- browser log ---\n{self.readText(browserLog)}"
            f"--- mcp-remote stderr ---\n{peer.log()}--- stdio received ---\n"
            + "\n".join(json.dumps(m)[:500] for m in peer.received)
        )

    @staticmethod
    def readText(path: str) -> str:
        try:
            with open(path) as f:
                return f.read()
        except OSError:
            return "(none)\n"

    @staticmethod
    def browserRuns(path: str) -> list[dict[str, Any]]:
        try:
            with open(path) as f:
                return [json.loads(line) for line in f if line.strip()]
        except OSError:
            return []

    async def session(self, server: RunningServer, peer: StdioPeer, browserLog: str) -> dict[str, Any]:
        """
        What a desktop host does first: initialize, list tools, call
        C{list_posts}. Fail with everything known if any of it fails.
        """
        results: dict[str, Any] = {}
        try:
            initialized = await peer.request(
                "initialize",
                {
                    "protocolVersion": "2025-06-18",
                    "capabilities": {},
                    "clientInfo": {"name": "smeldr-e2e-host", "version": "0.0.0"},
                },
            )
            results["initialize"] = initialized
            peer.notify("notifications/initialized")
            results["tools/list"] = await peer.request("tools/list", {})
            results["tools/call"] = await peer.request("tools/call", {"name": "list_posts", "arguments": {}})
        except (TimeoutError, RuntimeError) as e:
            self.fail(self.explain(server, peer, browserLog, f"{e!r}; so far: {results}"))
        why = self.explain(server, peer, browserLog, json.dumps(results)[:2000])
        self.assertIn("result", results["initialize"], why)
        self.assertIn(
            "list_posts",
            [t["name"] for t in results["tools/list"]["result"]["tools"]],
            why,
        )
        call = results["tools/call"]
        self.assertIn("result", call, why)
        self.assertFalse(call["result"].get("isError", False), why)
        return results

    async def waitForBrowserRuns(self, path: str, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        """
        The browser's runs, once there are C{count} (or C{timeout} passed):
        it writes its log after mcp-remote's callback page has answered, so
        mcp-remote may already be serving the host by then.
        """
        deadline = reactor.seconds() + timeout
        while True:
            runs = self.browserRuns(path)
            if len(runs) >= count or reactor.seconds() > deadline:
                return runs
            await deferLater(reactor, 0.1, lambda: None)

    async def assertSignedInOnce(
        self, server: RunningServer, peer: StdioPeer, browserLog: str
    ) -> dict[str, Any]:
        """
        The browser ran once, consented, and mcp-remote's callback accepted
        the code; give back what the browser saw.
        """
        runs = await self.waitForBrowserRuns(browserLog, 1)
        why = self.explain(server, peer, browserLog, f"browser runs: {runs}")
        self.assertEqual(len(runs), 1, why)
        run = runs[0]
        self.assertTrue(run["ok"], why)
        self.assertEqual(run["callback_status"], 200, why)
        self.assertEqual(run["authorize_query"].get("resource"), server.mcpURL, why)
        self.assertEqual(run["iss"], server.issuer, why)
        self.assertTrue(run["state_returned"], why)
        return run

    async def serve(self, *extra: str) -> tuple[RunningServer, str]:
        server = await startServer(self, reactor, extra)
        return server, await createSiteToken(reactor, server)

    async def dcrCase(self, transport: str) -> None:
        server, siteToken = await self.serve()
        callbackPort = freePort()
        peer, browserLog, _ = self.start(server, siteToken, callbackPort, "--transport", transport)
        await self.session(server, peer, browserLog)
        run = await self.assertSignedInOnce(server, peer, browserLog)
        why = self.explain(server, peer, browserLog, json.dumps(run))
        self.assertFalse(run["authorize_query"]["client_id"].startswith("https://"), why)
        self.assertEqual(
            run["authorize_query"]["redirect_uri"],
            f"http://localhost:{callbackPort}/oauth/callback",
            why,
        )

    async def test_streamableHTTPWithDynamicRegistration(self) -> None:
        """
        C{--transport http-only}: mcp-remote registers dynamically, the
        browser consents, and the host's initialize, tools/list and
        tools/call go through over Streamable HTTP.
        """

        async def body() -> None:
            await self.dcrCase("http-only")

        await self.matrix("streamable-http", "dcr", "connect", body)

    async def test_legacySSEWithDynamicRegistration(self) -> None:
        """
        C{--transport sse-only}: the same over the legacy HTTP+SSE transport.
        """

        async def body() -> None:
            await self.dcrCase("sse-only")

        await self.matrix("sse", "dcr", "connect", body)

    async def cimdCase(self, transport: str) -> None:
        callbackPort = freePort()
        host = await serveClientMetadata(self, reactor, [f"http://localhost:{callbackPort}/oauth/callback"])
        server, siteToken = await self.serve("--cimd-ca-file", host.caFile)
        peer, browserLog, configDirectory = self.start(
            server,
            siteToken,
            callbackPort,
            "--transport",
            transport,
            "--client-metadata-url",
            host.url,
            caFile=host.caFile,
        )
        await self.session(server, peer, browserLog)
        run = await self.assertSignedInOnce(server, peer, browserLog)
        why = self.explain(server, peer, browserLog, json.dumps(run))
        self.assertEqual(run["authorize_query"]["client_id"], host.url, why)
        self.assertNotIn("POST /oauth/register", server.log(), why)

    async def test_streamableHTTPWithClientMetadataDocument(self) -> None:
        """
        C{--client-metadata-url}: the https document URL is the client_id,
        nothing is registered, and the server fetches the document (trusting
        the test CA) to check the redirect URI on mcp-remote's fixed port.
        """

        async def body() -> None:
            await self.cimdCase("http-only")

        await self.matrix("streamable-http", "cimd", "connect", body)

    async def test_legacySSEWithClientMetadataDocument(self) -> None:
        """
        The same CIMD sign-in over the legacy HTTP+SSE transport.
        """

        async def body() -> None:
            await self.cimdCase("sse-only")

        await self.matrix("sse", "cimd", "connect", body)

    async def test_revokeThenRecover(self) -> None:
        """
        Mid-session, the access token mcp-remote stored is revoked (as an
        operator or the person would); the next tools/call is answered 401
        by the server and mcp-remote recovers (refresh grant, or a new
        sign-in through the browser) without the host noticing.
        """

        async def body() -> None:
            server, siteToken = await self.serve()
            peer, browserLog, configDirectory = self.start(
                server, siteToken, freePort(), "--transport", "http-only"
            )
            await self.session(server, peer, browserLog)
            await self.assertSignedInOnce(server, peer, browserLog)
            files = glob.glob(os.path.join(configDirectory, "**", "*tokens.json"), recursive=True)
            why = self.explain(server, peer, browserLog, f"token files: {files}")
            self.assertEqual(len(files), 1, why)
            with open(files[0]) as f:
                tokens = json.load(f)
            self.assertTrue(tokens.get("refresh_token"), why)
            await self.revoke(server, tokens["access_token"])
            again = await peer.request("tools/call", {"name": "list_posts", "arguments": {}})
            why = self.explain(server, peer, browserLog, json.dumps(again))
            self.assertIn("result", again, why)
            self.assertFalse(again["result"].get("isError", False), why)
            log = server.log()
            self.assertIn('"POST /mcp HTTP/1.1" 401', log, why)
            # It held a refresh token (issued by default to a client
            # registered for the refresh grant), so it refreshed instead of
            # asking the person again.
            self.assertEqual(log.count('"POST /oauth/authorize HTTP/1.1" 303'), 1, why)
            self.assertEqual(log.count('"POST /oauth/token HTTP/1.1" 200'), 2, why)

        await self.matrix("streamable-http", "dcr", "revoke-recover", body)

    async def test_refresh(self) -> None:
        """
        The server's access tokens live 2 s; after waiting that out (on the
        reactor), the next tools/call still works: mcp-remote refreshed,
        before or after the server's 401, without a new sign-in.
        """

        async def body() -> None:
            server, siteToken = await self.serve("--access-token-ttl", "2")
            peer, browserLog, configDirectory = self.start(
                server, siteToken, freePort(), "--transport", "http-only"
            )
            await self.session(server, peer, browserLog)
            await self.assertSignedInOnce(server, peer, browserLog)
            await deferLater(reactor, 3.0, lambda: None)
            again = await peer.request("tools/call", {"name": "list_posts", "arguments": {}})
            why = self.explain(server, peer, browserLog, json.dumps(again))
            self.assertIn("result", again, why)
            self.assertFalse(again["result"].get("isError", False), why)
            self.assertEqual(server.log().count('"POST /oauth/authorize HTTP/1.1" 303'), 1, why)
            # The code exchange, then at least one refresh (it refreshes
            # ahead of expiry, so with a 2 s TTL before most requests).
            self.assertGreaterEqual(server.log().count('"POST /oauth/token HTTP/1.1" 200'), 2, why)
            self.assertNotIn('"POST /oauth/token HTTP/1.1" 4', server.log(), why)

        await self.matrix("streamable-http", "dcr", "refresh", body)

    async def revoke(self, server: RunningServer, accessToken: str) -> None:
        """
        Revoke C{accessToken} at the server's RFC 7009 endpoint.
        """
        response = await treq.post(
            f"{server.issuer}/oauth/revoke",
            data={"token": accessToken, "token_type_hint": "access_token"},
            pool=HTTPConnectionPool(reactor, persistent=False),
        )
        body = await response.text()
        self.assertEqual(response.code, 200, server.annotate(body))
