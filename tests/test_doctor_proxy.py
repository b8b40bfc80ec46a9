"""
C{smeldr-oauth-admin doctor} over real sockets against real C{twist
smeldr-oauth} processes: directly, behind a correctly configured HAProxy
terminating TLS with a test CA, and behind deliberately broken proxies
(HAProxy with a short server timeout, with the well-known paths not
forwarded, without X-Forwarded-Proto; nginx buffering responses), each
failure naming its cause.  Also the harness itself (tests/haproxy.py):
round-robin without stickiness, and a proxy that does not outlive a killed
test process.

The doctor runs as an operator runs it, the installed C{smeldr-oauth-admin}
script, with C{--json}; its site token comes from a file, and no output
may contain it.  Servers run with C{--keepalive 2} so a stream check takes
three seconds.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from typing import Any

from twisted.internet import reactor as _globalReactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from tests.e2e import (
    CHECKOUT,
    RunningServer,
    adminCommand,
    createSiteToken,
    freePort,
    runProgram,
    startServer,
    subprocessEnvironment,
)
from tests.haproxy import (
    RunningProxy,
    guardedArgv,
    haproxyConfig,
    httpClient,
    makeTestCA,
    requireHAProxy,
    reserveFrontend,
    startHAProxy,
)
from tests.nginx import startNginx
from tests import postgres

reactor: Any = _globalReactor

KEEPALIVE = "2"

#: What reaches the app when a website sits in front of it and only these
#: paths are routed to the app (no /.well-known/).
APP_PATHS = ("/mcp", "/oauth/", "/authorize", "/token", "/register", "/revoke")


class DoctorRun:
    """
    One doctor run: its JSON report by check, and its raw output.
    """

    def __init__(self, out: str, err: str, code: int) -> None:
        self.out = out
        self.err = err
        self.code = code
        self.report = json.loads(out) if out.strip().startswith("{") else None
        self.checks = {c["check"]: c for c in (self.report or {}).get("checks", [])}

    def status(self, check: str) -> str:
        return str(self.checks.get(check, {}).get("status"))

    def failed(self) -> list[str]:
        return [name for name, c in self.checks.items() if c["status"] == "fail"]

    def explain(self) -> str:
        return f"exit {self.code}\nstdout:\n{self.out}\nstderr:\n{self.err}"


class DoctorTestsMixin:
    """
    Start servers, make a site token, run the doctor.
    """

    async def server(self, *extra: str, issuer: str | None = None, sharing: RunningServer | None = None) -> RunningServer:
        """
        A server with C{--keepalive 2}; behind a proxy (C{issuer}) trusting
        it for X-Forwarded-For; on the databases of C{sharing} if given.
        """
        arguments = ["--keepalive", KEEPALIVE, *extra]
        if issuer is not None:
            arguments += ["--issuer", issuer, "--trust-forwarded-from", "127.0.0.1"]
        if sharing is not None:
            arguments += ["--oauth-db", sharing.oauthDB, "--site-db", sharing.siteDB]
        return await startServer(self, reactor, arguments)  # type: ignore[arg-type]

    async def siteTokenFile(self, server: RunningServer, database: str | None = None) -> tuple[str, str]:
        token = await createSiteToken(reactor, server, "doctor", database)
        path = os.path.join(server.directory, "site-token")
        with open(path, "w") as f:
            f.write(token + "\n")
        return token, path

    async def doctor(self, url: str, *extra: str, secret: str | None = None, proxy: RunningProxy | None = None) -> DoctorRun:
        command = [*adminCommand(), "doctor", url, "--json", "--keepalive", KEEPALIVE, "--timeout", "5", *extra]
        out, err, code = await runProgram(reactor, command, timeout=60)
        run = DoctorRun(out, err, code)
        if secret is not None:
            self.assertNotIn(secret, out + err, "the doctor printed a secret")  # type: ignore[attr-defined]
        if run.report is None:
            message = run.explain()
            if proxy is not None:
                message = proxy.annotate(message)
            self.fail(message)  # type: ignore[attr-defined]
        return run


class DoctorDirectTests(DoctorTestsMixin, TestCase):
    """
    The doctor against the server itself.
    """

    async def test_allGood(self) -> None:
        """
        Against a server on loopback http: every check passes (TLS is not
        run on http), including a real flow, a session and the stream; the
        flow's grant is revoked at the end; neither output shows the site
        token.
        """
        server = await self.server()
        token, path = await self.siteTokenFile(server)
        run = await self.doctor(server.mcpURL, "--site-token-file", path, secret=token)
        self.assertEqual((run.failed(), run.code), ([], 0), server.annotate(run.explain()))
        self.assertEqual(run.status("tls"), "skip")
        for check in ("prm-path", "prm-root", "resource", "issuer", "as-fields", "challenge", "flow", "session", "stream"):
            self.assertEqual(run.status(check), "ok", check)
        self.assertIn("revoked", run.checks["flow"]["summary"])
        out, err, code = await runProgram(
            reactor, [*adminCommand(), "grants", "list", "--oauth-db", server.oauthDB]
        )
        self.assertIn("No live grants", out, "the doctor's grant outlived the run")
        text = await runProgram(
            reactor,
            [*adminCommand(), "doctor", server.mcpURL, "--keepalive", KEEPALIVE, "--site-token-file", path],
            timeout=60,
        )
        self.assertNotIn(token, text[0] + text[1])
        self.assertEqual(text[2], 0, text[0] + text[1])
        self.assertIn("✓ stream:", text[0])
        self.assertTrue(text[0].rstrip().endswith("all checks passed"), text[0])

    async def test_noCredentials(self) -> None:
        """
        Without a token the flow, session and stream checks are reported as
        not run, which is not a failure.
        """
        server = await self.server()
        env = subprocessEnvironment()
        env.pop("SMELDR_SITE_TOKEN", None)
        env.pop("SMELDR_ACCESS_TOKEN", None)
        out, err, code = await runProgram(
            reactor, [*adminCommand(), "doctor", server.mcpURL, "--json"], env=env, timeout=60
        )
        run = DoctorRun(out, err, code)
        self.assertEqual(run.code, 0, run.explain())
        self.assertEqual([run.status(c) for c in ("flow", "session", "stream")], ["skip"] * 3)

    async def test_noRegistration(self) -> None:
        """
        A server without dynamic registration: the doctor cannot run a flow
        with a site token, and says so without failing.
        """
        server = await self.server("--no-registration")
        token, path = await self.siteTokenFile(server)
        run = await self.doctor(server.mcpURL, "--site-token-file", path, secret=token)
        self.assertEqual(run.code, 0, run.explain())
        self.assertEqual([run.status(c) for c in ("flow", "session", "stream")], ["skip"] * 3)
        self.assertIn("--access-token-file", run.checks["flow"]["summary"])

    async def test_accessToken(self) -> None:
        """
        An access token given with --access-token-file is used as it is:
        no flow, and the session and stream checks run.
        """
        server = await self.server()
        token, path = await self.siteTokenFile(server)
        # A real access token, from the doctor's own flow run in-process.
        from smeldr_oauth.doctor.fetch import guarded_fetcher
        from smeldr_oauth.doctor.guard import guard_around
        from smeldr_oauth.doctor.flow import Flow

        fetcher = guarded_fetcher(reactor, None, 5, guard_around(["127.0.0.1"]))
        metadata = json.loads(
            (await fetcher.get(server.issuer + "/.well-known/oauth-authorization-server")).body
        )
        flow = Flow(fetcher, server.mcpURL, server.mcpURL, metadata)
        credentials = await flow.run(token)
        accessFile = os.path.join(server.directory, "access-token")
        with open(accessFile, "w") as f:
            f.write(credentials.access_token)
        run = await self.doctor(server.mcpURL, "--access-token-file", accessFile, secret=credentials.access_token)
        self.assertEqual(run.failed(), [], run.explain())
        self.assertNotIn("flow", run.checks)
        self.assertEqual((run.status("session"), run.status("stream")), ("ok", "ok"))
        await flow.revoke(credentials)


class DoctorBehindHAProxyTests(DoctorTestsMixin, TestCase):
    """
    The doctor against servers behind a real HAProxy.
    """

    def setUp(self) -> None:
        requireHAProxy()

    async def behind(
        self, *, servers: int = 1, tls: bool = True, database: str | None = None, **proxyOptions: Any
    ) -> tuple[RunningProxy, list[RunningServer], str]:
        """
        C{servers} processes (on the first one's SQLite files, or on the
        PostgreSQL C{database}) behind HAProxy, their issuer the proxy's
        public URL; and a site token file.
        """
        frontend = reserveFrontend(self)
        ca = makeTestCA(self) if tls else None
        issuer = frontend.url("https" if tls else "http")
        extra = ("--database", database) if database else ()
        first = await self.server(*extra, issuer=issuer)
        running = [first]
        for _ in range(servers - 1):
            running.append(await self.server(*extra, issuer=issuer, sharing=None if database else first))
        proxy = await startHAProxy(
            self,
            reactor,
            [s.port for s in running],
            frontend=frontend,
            tls=ca.serverPEM if ca else None,
            caFile=ca.caFile if ca else None,
            **proxyOptions,
        )
        _, path = await self.siteTokenFile(first, database)
        return proxy, running, path

    def caArguments(self, proxy: RunningProxy) -> list[str]:
        return ["--ca-file", proxy.caFile] if proxy.caFile else []

    async def test_tlsTerminated(self) -> None:
        """
        Behind HAProxy terminating TLS with the test CA given to the doctor:
        every check passes, the certificate's included.
        """
        proxy, servers, path = await self.behind()
        run = await self.doctor(proxy.url + "/mcp", "--site-token-file", path, *self.caArguments(proxy), proxy=proxy)
        self.assertEqual((run.failed(), run.code), ([], 0), proxy.annotate(servers[0].annotate(run.explain())))
        self.assertEqual(run.status("tls"), "ok")
        self.assertIn("smeldr test CA", run.checks["tls"]["summary"])
        self.assertEqual(run.status("stream"), "ok")

    async def test_untrustedCertificate(self) -> None:
        """
        Without the test CA, the certificate is not trusted: the TLS check
        fails and says so (the rest cannot be fetched either).
        """
        proxy, _, _ = await self.behind()
        run = await self.doctor(proxy.url + "/mcp", proxy=proxy)
        self.assertEqual(run.status("tls"), "fail")
        self.assertIn("TLS", run.checks["tls"]["summary"])
        self.assertEqual(run.code, 1)

    async def test_expiringCertificate(self) -> None:
        """
        A certificate that expires within --cert-days fails the TLS check,
        naming the date.
        """
        frontend = reserveFrontend(self)
        ca = makeTestCA(self, validFor=datetime.timedelta(days=3))
        server = await self.server(issuer=frontend.url("https"))
        proxy = await startHAProxy(
            self, reactor, [server.port], frontend=frontend, tls=ca.serverPEM, caFile=ca.caFile
        )
        run = await self.doctor(proxy.url + "/mcp", "--ca-file", ca.caFile, proxy=proxy)
        self.assertEqual(run.status("tls"), "fail", run.explain())
        self.assertIn("expires in 3.0 days", run.checks["tls"]["summary"])
        self.assertEqual(run.code, 1)

    async def test_shortServerTimeout(self) -> None:
        """
        HAProxy's timeout server under the keepalive interval cuts every
        stream before its first keepalive: the stream check fails naming an
        idle timeout in front of the server, and only it fails.
        """
        proxy, servers, path = await self.behind(timeoutServer=1.0)
        run = await self.doctor(proxy.url + "/mcp", "--site-token-file", path, *self.caArguments(proxy), proxy=proxy)
        self.assertEqual(run.failed(), ["stream"], proxy.annotate(run.explain()))
        summary = run.checks["stream"]["summary"]
        self.assertIn("closed after 1.", summary)
        self.assertIn("before the first keepalive", summary)
        self.assertIn("timeout server", run.checks["stream"]["fix"])
        self.assertEqual(run.code, 1)

    async def test_wellKnownNotForwarded(self) -> None:
        """
        A proxy that routes only the app's paths to it and answers the rest
        itself: both resource metadata URLs fail, saying the MCP URL reaches
        the server but the well-known path does not; the challenge names
        metadata that does not answer.
        """
        proxy, _, path = await self.behind(routedPaths=APP_PATHS)
        run = await self.doctor(proxy.url + "/mcp", "--site-token-file", path, *self.caArguments(proxy), proxy=proxy)
        for check in ("prm-path", "prm-root"):
            self.assertEqual(run.status(check), "fail", run.explain())
            self.assertIn("404 text/html", run.checks[check]["summary"])
            self.assertIn("reaches the server but this path does not", run.checks[check]["fix"])
        self.assertEqual(run.status("challenge"), "fail")
        self.assertEqual(run.code, 1)

    async def test_forwardedProtoMissing(self) -> None:
        """
        Without X-Forwarded-Proto (and with whatever a client sends passed
        through), smeldr-oauth is unaffected: it takes every public URL
        from --issuer, so the forwarded check, which also sends spoofed
        forwarding headers, passes.  The servers that do build URLs from
        the request are covered by L{test_forwardedProtoMissingNaiveServer}.
        """
        proxy, _, path = await self.behind(forwardedProto=False)
        run = await self.doctor(proxy.url + "/mcp", "--site-token-file", path, *self.caArguments(proxy), proxy=proxy)
        self.assertEqual(run.failed(), [], proxy.annotate(run.explain()))
        self.assertEqual(run.status("forwarded"), "ok")

    async def test_forwardedProtoMissingNaiveServer(self) -> None:
        """
        A server that builds its URLs from the request (X-Forwarded-Proto,
        else the connection's scheme; the Host header), as many frameworks
        do behind a proxy they trust, publishes http:// URLs behind an
        HAProxy that terminates TLS without setting X-Forwarded-Proto: the
        forwarded check fails naming X-Forwarded-Proto.  With the header set
        by HAProxy, it passes.
        """
        frontend = reserveFrontend(self)
        ca = makeTestCA(self)
        naive = await serveNaiveMetadata(self)
        proxy = await startHAProxy(
            self, reactor, [naive], frontend=frontend, tls=ca.serverPEM, caFile=ca.caFile, forwardedProto=False
        )
        run = await self.doctor(proxy.url + "/mcp", "--ca-file", ca.caFile, proxy=proxy)
        self.assertEqual(run.status("forwarded"), "fail", run.explain())
        self.assertIn("http:// URLs behind TLS termination", run.checks["forwarded"]["summary"])
        self.assertIn("X-Forwarded-Proto", run.checks["forwarded"]["fix"])

        frontend = reserveFrontend(self)
        proxy = await startHAProxy(
            self, reactor, [naive], frontend=frontend, tls=ca.serverPEM, caFile=ca.caFile
        )
        run = await self.doctor(proxy.url + "/mcp", "--ca-file", ca.caFile, proxy=proxy)
        self.assertEqual(run.status("forwarded"), "ok", run.explain())

    async def test_sessionsNotShared(self) -> None:
        """
        Two processes behind round-robin that do not share MCP sessions
        (each on SQLite, which keeps sessions in the process): requests on
        one session land on the other process and get 404, which the
        session check names.
        """
        proxy, servers, path = await self.behind(servers=2)
        run = await self.doctor(proxy.url + "/mcp", "--site-token-file", path, *self.caArguments(proxy), proxy=proxy)
        self.assertEqual(run.status("session"), "fail", proxy.annotate(run.explain()))
        self.assertIn("session not found", run.checks["session"]["summary"])
        self.assertIn("sticky", run.checks["session"]["fix"])
        self.assertEqual(run.status("flow"), "ok", run.explain())

    async def test_sessionsShared(self) -> None:
        """
        Two processes on one PostgreSQL database behind round-robin share
        the MCP sessions: every check passes, the session check included.
        """
        proxy, servers, path = await self.behind(servers=2, database=postgres.database_url(self))
        run = await self.doctor(proxy.url + "/mcp", "--site-token-file", path, *self.caArguments(proxy), proxy=proxy)
        self.assertEqual(run.status("session"), "ok", proxy.annotate(servers[1].annotate(servers[0].annotate(run.explain()))))
        self.assertEqual((run.failed(), run.code), ([], 0), proxy.annotate(run.explain()))


class DoctorBehindNginxTests(DoctorTestsMixin, TestCase):
    """
    The doctor against a server behind a real nginx.
    """

    async def behindNginx(self, **options: Any) -> tuple[RunningProxy, str]:
        port = freePort()
        server = await self.server(issuer=f"http://127.0.0.1:{port}")
        _, path = await self.siteTokenFile(server)
        proxy = await startNginx(self, reactor, [server.port], port=port, **options)
        return proxy, path

    async def test_bufferingIgnoringServer(self) -> None:
        """
        nginx buffering responses and ignoring the server's
        X-Accel-Buffering: no: the stream check sees no event on an open
        stream and names buffering; only it fails.
        """
        proxy, path = await self.behindNginx(buffering=True, ignoreAccelBuffering=True)
        run = await self.doctor(proxy.url + "/mcp", "--site-token-file", path, proxy=proxy)
        self.assertEqual(run.failed(), ["stream"], proxy.annotate(run.explain()))
        self.assertIn("buffer", run.checks["stream"]["summary"])
        self.assertIn("proxy_buffering off", run.checks["stream"]["fix"])

    async def test_bufferingHonouringServer(self) -> None:
        """
        nginx with buffering on but honouring the server's
        X-Accel-Buffering: no delivers the stream: all checks pass.
        """
        proxy, path = await self.behindNginx(buffering=True)
        run = await self.doctor(proxy.url + "/mcp", "--site-token-file", path, proxy=proxy)
        self.assertEqual(run.failed(), [], proxy.annotate(run.explain()))


# -- the harness ----------------------------------------------------------------------------


class NameResource(Resource):
    isLeaf = True

    def __init__(self, name: bytes) -> None:
        super().__init__()
        self.name = name

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"text/plain")
        return self.name


class NaiveMetadata(Resource):
    """
    A protected resource whose public URLs come from the request:
    C{X-Forwarded-Proto} (else the connection's scheme) and C{Host}.
    """

    isLeaf = True

    def base(self, request: Any) -> str:
        scheme = request.getHeader(b"x-forwarded-proto") or (b"https" if request.isSecure() else b"http")
        return f"{scheme.decode()}://{request.getHeader(b'host').decode()}"

    def resource_metadata(self, base: str) -> dict[str, Any]:
        return {"resource": base + "/mcp", "authorization_servers": [base]}

    def server_metadata(self, base: str) -> dict[str, Any]:
        return {
            "issuer": base,
            "authorization_endpoint": base + "/authorize",
            "token_endpoint": base + "/token",
            "registration_endpoint": base + "/register",
            "response_types_supported": ["code"],
            "code_challenge_methods_supported": ["S256"],
        }

    def render_GET(self, request: Any) -> bytes:
        base = self.base(request)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"access-control-allow-origin", b"*")
        if request.path.startswith(b"/.well-known/oauth-protected-resource"):
            return json.dumps(self.resource_metadata(base)).encode()
        if request.path == b"/.well-known/oauth-authorization-server":
            return json.dumps(self.server_metadata(base)).encode()
        request.setResponseCode(404)
        return b"{}"

    def render_POST(self, request: Any) -> bytes:
        request.setResponseCode(401)
        request.setHeader(
            b"www-authenticate",
            f'Bearer resource_metadata="{self.base(request)}/.well-known/oauth-protected-resource/mcp"'.encode(),
        )
        return b""


async def serveNaiveMetadata(testCase: TestCase) -> int:
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(NaiveMetadata()))
    testCase.addCleanup(port.stopListening)
    return int(port.getHost().port)


class HarnessTests(TestCase):
    """
    tests/haproxy.py itself.
    """

    def setUp(self) -> None:
        requireHAProxy()

    async def test_roundRobinNoStickiness(self) -> None:
        """
        Consecutive requests go to the backends in turn.
        """
        ports = []
        for name in (b"a", b"b", b"c"):
            port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(NameResource(name)))
            self.addCleanup(port.stopListening)
            ports.append(port.getHost().port)
        proxy = await startHAProxy(self, reactor, ports)
        client = httpClient(reactor)
        seen = []
        for _ in range(6):
            response = await client.get(proxy.url + "/x")
            seen.append(await response.content())
        self.assertEqual(seen, [b"a", b"b", b"c", b"a", b"b", b"c"])

    async def test_deadBackendRedispatched(self) -> None:
        """
        A backend that stops listening (a killed process): requests that
        cannot connect to it are served by the other, and the health check
        takes it out of the rotation.
        """
        ports = []
        listening = []
        for name in (b"a", b"b"):
            port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(NameResource(name)))
            listening.append(port)
            ports.append(port.getHost().port)
        self.addCleanup(listening[1].stopListening)
        proxy = await startHAProxy(self, reactor, ports, healthCheck="/", checkInterval=0.1)
        await listening[0].stopListening()
        client = httpClient(reactor)
        seen = []
        for _ in range(4):
            response = await client.get(proxy.url + "/x")
            seen.append((response.code, await response.content()))
        self.assertEqual(seen, [(200, b"b")] * 4, proxy.annotate("answers"))

    async def test_configRefused(self) -> None:
        """
        A configuration haproxy refuses fails the start with its message.
        """
        from tests.e2e import ServerFailed

        with self.assertRaises(ServerFailed) as caught:
            await startHAProxy(self, reactor, [1], extraFrontend=["no-such-keyword"])
        self.assertIn("no-such-keyword", str(caught.exception))

    async def test_diesWithTestProcess(self) -> None:
        """
        A proxy started under the guard dies when the process that started
        it is killed with SIGKILL (no cleanup runs in it).
        """
        program = requireHAProxy()
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        config = os.path.join(directory, "haproxy.cfg")
        with open(config, "w") as f:
            f.write(haproxyConfig([1]).replace("bind fd@3", f"bind 127.0.0.1:{freePort()}"))
        script = (
            "import os, subprocess, sys, time\n"
            f"sys.path.insert(0, {CHECKOUT!r})\n"
            "from tests.haproxy import guardedArgv\n"
            f"child = subprocess.Popen(guardedArgv([{program!r}, '-db', '-f', {config!r}]),"
            " stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
            "print(child.pid, flush=True)\n"
            "sys.stdin.read()\n"
        )
        from tests.e2e import _OutputCollector

        collector = _OutputCollector()
        parent = reactor.spawnProcess(
            collector, sys.executable, [sys.executable, "-c", script], env=subprocessEnvironment()
        )
        while not b"".join(collector.out).strip():
            self.assertIsNone(collector.reason, collector.output())
            await deferLater(reactor, 0.05, lambda: None)
        guarded = int(b"".join(collector.out).split()[0])
        self.assertTrue(_alive(guarded))
        parent.signalProcess("KILL")
        await collector.ended.addTimeout(10, reactor)
        deadline = reactor.seconds() + 10
        while _alive(guarded) and reactor.seconds() < deadline:
            await deferLater(reactor, 0.05, lambda: None)
        if _alive(guarded):
            os.kill(guarded, 9)
            self.fail("haproxy outlived the process that started it")

    def test_guardedArgv(self) -> None:
        """
        The guard runs the program with this process's id to check.
        """
        argv = guardedArgv(["/bin/true", "x"])
        self.assertEqual(argv[0], sys.executable)
        self.assertEqual(argv[3:], [str(os.getpid()), "/bin/true", "x"])


def _alive(pid: int) -> bool:
    """
    Whether C{pid} runs (a zombie, dead but not yet reaped, counts as gone).
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
