"""
Tests for L{smeldr_oauth.service.tap}: the options of C{twist smeldr-oauth}
and the service they build, over real sockets (plain TCP and TLS), and the
C{Procfile}'s command as a real process.
"""

from __future__ import annotations

import io
import json
import os
import sys
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import serverFromString
from twisted.trial.unittest import SynchronousTestCase, TestCase

from smeldr_oauth.service import tap
from smeldr_oauth.service.standalone import StandaloneService
from tests import certificates, e2e
from tests.test_conformance import httpClient


def parse(*argv: str) -> tap.Options:
    options = tap.Options()
    options.parseOptions(list(argv))
    return options


def local_options(test: TestCase, *argv: str) -> tap.Options:
    """
    Options for a server at C{http://127.0.0.1:1} whose two SQLite files
    are in a new directory of C{test}'s, and C{argv}.
    """
    tmp = test.mktemp()
    os.makedirs(tmp)
    return parse(
        "--issuer", "http://127.0.0.1:1",
        "--oauth-db", os.path.join(tmp, "oauth.db"),
        "--site-db", os.path.join(tmp, "site.db"),
        *argv,
    )


class OptionsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.stderr = io.StringIO()
        self.patch(sys, "stderr", self.stderr)

    def assertExit2(self, *argv: str) -> str:
        with self.assertRaises(SystemExit) as raised:
            parse(*argv)
        self.assertEqual(raised.exception.code, 2)
        text = self.stderr.getvalue()
        self.assertEqual(text.count("\n"), 1, text)
        self.assertTrue(text.startswith("smeldr-oauth: error: "), text)
        return text

    def test_defaults(self) -> None:
        options = parse("--issuer", "https://cms.example.com/")
        self.assertEqual(options["listen"], ["tcp:8080"])
        self.assertEqual(options["oauth-db"], "./oauth.db")
        self.assertEqual(options["site-db"], "./site.db")
        config = options["config"]
        self.assertEqual(config.issuer, "https://cms.example.com")
        self.assertEqual(config.resource, "https://cms.example.com/mcp")
        self.assertEqual(config.access_token_ttl, 3600)
        self.assertEqual(config.auth_code_ttl, 300)
        self.assertTrue(config.dynamic_registration)
        self.assertFalse(config.allow_insecure_client_ids)

    def test_switches(self) -> None:
        options = parse(
            "--issuer", "http://127.0.0.1:9",
            "--listen", "tcp:1:interface=127.0.0.1",
            "--listen", "tcp:2:interface=127.0.0.1",
            "--no-registration", "--dev", "--access-token-ttl", "60",
            "--resource", "http://127.0.0.1:9/tools",
        )
        self.assertEqual(len(options["listen"]), 2)
        config = options["config"]
        self.assertFalse(config.dynamic_registration)
        self.assertTrue(config.allow_insecure_client_ids)
        self.assertEqual(config.access_token_ttl, 60)
        self.assertEqual(config.resource, "http://127.0.0.1:9/tools")

    def test_limits(self) -> None:
        """
        Every rate limit is an option, with the defaults the docs give.
        """

        def limits(*argv: str) -> tuple[int, ...]:
            config = parse("--issuer", "https://a.example", *argv)["config"]
            return (
                config.paste_failures_per_minute,
                config.registrations_per_minute,
                config.cimd_fetches_per_minute,
                config.token_requests_per_minute_per_address,
                config.token_requests_per_minute_per_client,
                config.rate_limit_keys,
            )

        self.assertEqual(limits(), (30, 20, 30, 600, 600, 10000))
        self.assertEqual(
            limits(
                "--paste-limit", "5", "--registration-limit", "6", "--cimd-fetch-limit", "7",
                "--token-limit-per-address", "8", "--token-limit-per-client", "9", "--rate-limit-keys", "10",
            ),
            (5, 6, 7, 8, 9, 10),
        )
        for option in ("--paste-limit", "--token-limit-per-client", "--rate-limit-keys"):
            self.stderr.truncate(0)
            self.stderr.seek(0)
            self.assertIn(option, self.assertExit2("--issuer", "https://a.example", option, "0"))

    def test_issuer_required(self) -> None:
        self.assertIn("--issuer is required", self.assertExit2())

    def test_http_issuer_refused(self) -> None:
        self.assertIn("https", self.assertExit2("--issuer", "http://cms.example.com"))

    def test_bad_numbers(self) -> None:
        self.assertExit2("--issuer", "https://a.example", "--access-token-ttl", "soon")
        self.stderr.truncate(0)
        self.stderr.seek(0)
        self.assertExit2("--issuer", "https://a.example", "--refresh-grace", "-1")

    def test_huge_numbers(self) -> None:
        """
        A whole number beyond any sensible setting is a usage error: one of
        hundreds of digits was taken, and then failed the start-up with an
        OverflowError (C{--keepalive}, the rate limits) or every token
        request with a 500 (the lifetimes, C{--refresh-grace}).
        """
        for option in (
            "--access-token-ttl", "--auth-code-ttl", "--refresh-token-ttl", "--refresh-grace", "--keepalive",
            "--max-body", "--max-sessions", "--paste-limit", "--token-limit-per-address", "--rate-limit-keys",
        ):
            self.stderr.truncate(0)
            self.stderr.seek(0)
            self.assertIn("at most", self.assertExit2("--issuer", "https://a.example", option, str(10**400)))
        self.assertEqual(
            parse("--issuer", "https://a.example", "--access-token-ttl", str(tap.MAX_WHOLE))["config"].access_token_ttl,
            tap.MAX_WHOLE,
        )

    def test_bad_listen(self) -> None:
        self.assertIn("--listen", self.assertExit2("--issuer", "https://a.example", "--listen", "nope:1"))

    def test_bad_app(self) -> None:
        self.assertIn("--app", self.assertExit2("--issuer", "https://a.example", "--app", "no_such_module:x"))
        self.stderr.truncate(0)
        self.stderr.seek(0)
        self.assertIn("--app", self.assertExit2("--issuer", "https://a.example", "--app", "json"))

    def test_bad_ca(self) -> None:
        self.assertIn("--cimd-ca-file", self.assertExit2("--issuer", "https://a.example", "--cimd-ca-file", __file__))


def self_signed(tmp: str) -> tuple[str, str]:
    """
    A throwaway key and certificate for 127.0.0.1, as PEM files.
    """
    key, cert = certificates.self_signed(("127.0.0.1",))
    key_path = os.path.join(tmp, "key.pem")
    cert_path = os.path.join(tmp, "cert.pem")
    with open(key_path, "wb") as f:
        f.write(certificates.key_pem(key))
    with open(cert_path, "wb") as f:
        f.write(certificates.cert_pem(cert))
    return key_path, cert_path


class ServiceOverSocketTests(TestCase):
    """
    The service C{twist smeldr-oauth} runs, on real sockets and real SQLite
    files.
    """

    @inlineCallbacks
    def serve(self, endpoint: str, scheme: str, agent: Any = None) -> Any:
        options = local_options(self)
        service = StandaloneService(options, reactor)
        service.startService()
        self.addCleanup(service.stopService)
        port = yield serverFromString(reactor, endpoint).listen(service.site)
        self.addCleanup(port.stopListening)
        url = f"{scheme}://127.0.0.1:{port.getHost().port}/.well-known/oauth-authorization-server"
        if agent is None:
            from twisted.web.client import Agent, HTTPConnectionPool

            agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
        client = treq.client.HTTPClient(agent)
        response = yield client.get(url)
        body = yield response.content()
        return response, json.loads(body)

    @inlineCallbacks
    def test_tcp(self) -> Any:
        response, body = yield self.serve("tcp:0:interface=127.0.0.1", "http")
        self.assertEqual(response.code, 200)
        self.assertEqual(body["issuer"], "http://127.0.0.1:1")

    @inlineCallbacks
    def test_ssl(self) -> Any:
        """
        C{--listen ssl:...} serves TLS through pyOpenSSL.
        """
        from twisted.internet.ssl import Certificate, optionsForClientTLS
        from twisted.web.client import Agent
        from twisted.web.iweb import IPolicyForHTTPS
        from zope.interface import implementer

        tmp = self.mktemp()
        os.makedirs(tmp)
        key, cert = self_signed(tmp)
        with open(cert, "rb") as f:
            root = Certificate.loadPEM(f.read())

        @implementer(IPolicyForHTTPS)
        class Trust:
            def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
                return optionsForClientTLS("127.0.0.1", trustRoot=root)

        from twisted.web.client import HTTPConnectionPool

        agent = Agent(reactor, contextFactory=Trust(), pool=HTTPConnectionPool(reactor, persistent=False))
        response, body = yield self.serve(
            f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}", "https", agent
        )
        self.assertEqual(response.code, 200)
        self.assertEqual(body["token_endpoint"], "http://127.0.0.1:1/oauth/token")


class MetricsOverSocketTests(TestCase):
    """
    C{--metrics-listen}: metrics on their own listener, fed by the site.
    """

    @inlineCallbacks
    def test_metrics_and_health(self) -> Any:
        from twisted.web.client import Agent, HTTPConnectionPool
        from twisted.web.server import Site

        options = local_options(self, "--metrics-listen", "tcp:0:interface=127.0.0.1")
        service = StandaloneService(options, reactor)
        service.startService()
        self.addCleanup(service.stopService)
        port = yield serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(service.site)
        self.addCleanup(port.stopListening)
        metrics_port = yield serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(
            Site(service.metrics.resource())
        )
        self.addCleanup(metrics_port.stopListening)
        client = treq.client.HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))
        base = f"http://127.0.0.1:{port.getHost().port}"
        response = yield client.get(base + "/healthz")
        self.assertEqual(response.code, 200)
        self.assertEqual(json.loads((yield response.content())), {"status": "ok"})
        response = yield client.get(base + "/favicon.ico")
        self.assertEqual(response.code, 204)
        yield response.content()
        response = yield client.get(base + "/metrics")
        self.assertEqual(response.code, 404, "metrics must not be on the public site")
        yield response.content()
        response = yield client.get(f"http://127.0.0.1:{metrics_port.getHost().port}/")
        text = (yield response.content()).decode()
        self.assertIn('smeldr_http_request_duration_seconds_count{method="GET",route="/healthz",status="2xx"} 1.0', text)
        self.assertIn('route="other"', text)
        self.assertIn("smeldr_mcp_open_streams", text)



def admin_app():  # type: ignore[no-untyped-def]
    from smeldr_oauth.mcp import MCPApp

    app = MCPApp(name="admin-test")

    @app.tool(scopes=("admin",))
    def wipe() -> str:
        return "wiped"

    return app


class CustomAppScopesTests(TestCase):
    def test_app_scopes_are_granted(self) -> None:
        """
        C{--app}: the scopes the app's tools name are the server's scopes,
        so a token can carry them.
        """
        options = local_options(self, "--app", "tests.test_service_tap:admin_app")
        service = StandaloneService(options, reactor)
        self.addCleanup(lambda: (service.store.close(), service.site_stores.close()))
        self.assertEqual(service.oauth.config.all_scopes, ("admin", "offline_access"))
        self.assertIn("admin", service.oauth.protected_resource_metadata()["scopes_supported"])


class ProcfileTests(TestCase):
    """
    The C{Procfile}'s C{web:} command, exactly as written, run the way a
    Procfile platform runs it: by a shell, with C{$PORT} and C{$ISSUER} set,
    in a directory of its own.
    """

    timeout = 60

    def webCommand(self) -> str:
        with open(os.path.join(e2e.CHECKOUT, "Procfile")) as f:
            commands = [line.split(":", 1)[1].strip() for line in f if line.startswith("web:")]
        self.assertEqual(len(commands), 1, "the Procfile must have one web: line")
        return commands[0]

    async def test_webCommandServes(self) -> None:
        """
        It starts, listens on C{$PORT}, answers C{/healthz}, publishes
        C{$ISSUER} as its issuer and keeps its database in its working
        directory.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        port = e2e.freePort()
        issuer = "https://smeldr.example.com"
        env = e2e.subprocessEnvironment()
        # The platform's PATH has the installed console scripts (twist).
        env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
        env.update(PORT=str(port), ISSUER=issuer)
        # "exec": the server replaces the shell, so it is the process bound
        # to this one (tests.lifetime) and the one that gets SIGTERM.
        argv = ["/bin/sh", "-c", "exec " + self.webCommand()]
        server = await e2e.launchServer(self, reactor, argv, port, issuer, directory, env=env)

        http = httpClient(self)
        base = f"http://127.0.0.1:{port}"
        response = await http.get(base + "/healthz")
        body = await response.content()
        self.assertEqual((response.code, json.loads(body)), (200, {"status": "ok"}), server.annotate("/healthz"))
        response = await http.get(base + "/.well-known/oauth-authorization-server")
        metadata = json.loads(await response.content())
        self.assertEqual(metadata["issuer"], issuer, server.annotate("metadata"))
        self.assertEqual(metadata["token_endpoint"], issuer + "/oauth/token")
        self.assertTrue(os.path.exists(server.oauthDB), os.listdir(directory))

        await server.stop()
        self.assertIn(server._collector.status(), (0, -15), server.annotate("exit status after SIGTERM"))
        self.assertNotIn("Traceback", server.log(), server.annotate("traceback"))


class CannotStartTests(TestCase):
    """
    C{twist smeldr-oauth} (one process) with a database it cannot reach.
    """

    async def start(self, *database: str) -> tuple[str, int]:
        """
        Run the command with C{database}'s options until it exits (or for
        a minute, when it serves on): its output and exit status.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        port = e2e.freePort()
        out, err, code = await e2e.runProgram(
            reactor,
            [
                sys.executable, "-m", "twisted", "--log-format=text", "smeldr-oauth",
                "--issuer", f"http://127.0.0.1:{port}",
                "--listen", f"tcp:{port}:interface=127.0.0.1",
                *database,
            ],
            timeout=60,
            path=directory,
        )
        return out + err, code

    async def test_exit_status(self) -> None:
        """
        Exit status 1 and the reason in one critical line, no traceback:
        it exited 0 after three tracebacks, so a service manager's restart
        on failure never saw a failure.
        """
        from tests import postgres

        server = postgres.cluster()
        log, code = await self.start("--database", server.url("no_such_database"))
        self.assertEqual(code, 1, log)
        self.assertIn("the OAuth database could not be opened: ", log)
        self.assertIn("no_such_database", log)
        self.assertNotIn("Traceback", log)

    async def test_sqlite_exit_status(self) -> None:
        """
        The same for a SQLite file that cannot be opened: on SQLite (with
        the default C{--db-threads 0}) the store fails before the reactor
        runs, and the server, its stop lost, served on, every answer that
        needs the store a 503 or a 500.
        """
        log, code = await self.start("--oauth-db", os.path.abspath(self.mktemp()) + "/no/such/oauth.db")
        self.assertEqual(code, 1, log)
        self.assertIn("the OAuth database could not be opened: ", log)
        self.assertIn("unable to open database file", log)
        self.assertNotIn("Traceback", log)

    async def test_sqlite_not_a_database(self) -> None:
        """
        A SQLite file that is not a database (or a damaged one): the same
        exit status and one line naming the file and why, without the two
        tracebacks it logged (and with the default C{--db-threads 0}, the
        server then served on).
        """
        junk = os.path.abspath(self.mktemp())
        with open(junk, "wb") as f:
            f.write(b"not a database " * 500)
        log, code = await self.start("--oauth-db", junk)
        self.assertEqual(code, 1, log)
        self.assertIn(f"the OAuth database could not be opened: cannot connect to {junk}: file is not a database", log)
        self.assertNotIn("Traceback", log)
