"""
Several servers on one PostgreSQL database, over real sockets: the rate
limits hold across them, and a database outage (the real server stopped,
then started again) answers 503 with C{Retry-After} in each endpoint's own
dialect, leaves nothing half-written, and is recovered from without a
restart of the servers.
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from smeldr_oauth.mcp.calls import UNAVAILABLE
from smeldr_oauth.service.standalone import StandaloneService
from smeldr_oauth.store.schema import OAUTH_SCHEMA
from tests import e2e, postgres
from tests.haproxy import READY_PATH as HAPROXY_READY
from tests.haproxy import requireHAProxy, reserveFrontend, spawnProxy, waitForProxy
from tests.nginx import READY_PATH as NGINX_READY
from tests.nginx import requireNginx
from tests import test_service_database
from tests.test_db_notify import Inbox
from tests.test_service_database import parse

REDIRECT = "http://127.0.0.1:33418/callback"
CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Servers(TestCase):
    """
    Starts L{StandaloneService}s (each with its own pool, as separate
    processes have) on one fresh PostgreSQL database.
    """

    @inlineCallbacks
    def start(self, *argv: str) -> Any:
        """
        One more server: its base URL (the service is C{self.services[-1]}).
        """
        if not hasattr(self, "services"):
            self.url = postgres.database_url(self)
            self.services: list[StandaloneService] = []
            self.http = treq.client.HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))
        options = parse("--issuer", "http://127.0.0.1:1", "--database", self.url, "--dev", *argv)
        service = StandaloneService(options, reactor)
        service.startService()
        # (Unless a test stopped it itself.)
        self.addCleanup(lambda: service.stopService() if service.running else None)
        yield service.ready
        port = yield serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(service.site)
        self.addCleanup(port.stopListening)
        self.services.append(service)
        return f"http://127.0.0.1:{port.getHost().port}"

    @inlineCallbacks
    def post(self, path: str, form: dict[str, str]) -> Any:
        return (yield test_service_database.ServiceOnPostgresTests.post(self, path, form))  # type: ignore[arg-type]

    def forgets(self, service: StandaloneService) -> Inbox:
        """
        An inbox that hears each time C{service} empties its token cache
        (a revocation pushed by another process, or a listener's resync).
        """
        forgotten = Inbox()
        oauth = service.oauth
        original = oauth.forget_cached_tokens

        def forget() -> None:
            original()
            forgotten()

        oauth.forget_cached_tokens = forget  # type: ignore[method-assign]
        return forgotten

    @inlineCallbacks
    def admin(self, *argv: str) -> Any:
        """
        Run C{smeldr-oauth-admin argv --database URL}, a process of its own.
        """
        out, err, code = yield getProcessOutputAndValue(
            sys.executable,
            ["-c", "from smeldr_oauth.site.admin import main; main()", *argv, "--database", self.url],
            env=test_service_database.child_env(),
        )
        self.assertEqual(code, 0, err)
        return out.decode()

    @inlineCallbacks
    def register(self, base: str) -> Any:
        response = yield self.http.post(
            base + "/oauth/register",
            json={"redirect_uris": [REDIRECT], "token_endpoint_auth_method": "none", "client_name": "test"},
        )
        body = yield response.content()
        return response, body


class SharedLimitTests(Servers):
    """
    Two servers on one database allow what one would.
    """

    @inlineCallbacks
    def test_registration_limit(self) -> Any:
        a = yield self.start("--registration-limit", "4")
        b = yield self.start("--registration-limit", "4")
        codes = []
        for base in (a, b, a, b):
            response, _ = yield self.register(base)
            codes.append(response.code)
        self.assertEqual(codes, [201] * 4)
        for base in (a, b):
            response, body = yield self.register(base)
            self.assertEqual(response.code, 429, body)
            self.assertEqual(response.headers.getRawHeaders("retry-after"), ["15"])


class MetricsTests(Servers):
    """
    The database figures of a server on PostgreSQL, scraped over a real
    socket.
    """

    @inlineCallbacks
    def test_database_figures(self) -> Any:
        from twisted.web.server import Site

        base = yield self.start()
        service = self.services[0]
        response, _ = yield self.register(base)
        self.assertEqual(response.code, 201)
        port = yield serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(Site(service.metrics.resource()))
        self.addCleanup(port.stopListening)
        yield service.store.database.engine.listener(service.store.database).when_connected()
        response = yield self.http.get(f"http://127.0.0.1:{port.getHost().port}/")
        text = (yield response.content()).decode()
        self.assertIn('smeldr_db_listener_connected{database="main"} 1.0', text)
        self.assertIn('smeldr_db_transactions_total{database="main",name="rate_limits.take"} 1.0', text)
        self.assertIn('smeldr_db_calls_waiting{database="main"} 0.0', text)
        self.assertRegex(text, r'smeldr_db_connections\{database="main"\} [1-9]')
        # The shared MCP sessions' routing figures are exported too.
        self.assertIn("smeldr_mcp_routed_out_total 0.0", text)
        self.assertIn("smeldr_mcp_route_latency_seconds_count 0.0", text)


def documented(intro: str) -> str:
    """
    The example of docs/deployment.md that follows the paragraph starting
    with C{intro}: the first fenced block after it, whatever its language
    tag (the HAProxy block is tagged C{text}, as Pygments has no HAProxy
    lexer).
    """
    with open(os.path.join(CHECKOUT, "docs", "deployment.md")) as f:
        text = f.read()
    after = text.split(f"\n{intro}", 1)[1]
    return after.split("```", 1)[1].split("\n", 1)[1].split("```", 1)[0]


def _serve_on(text: str, ports: list[int]) -> str:
    """
    The example's C{server} lines (HAProxy) or upstream servers (nginx)
    pointed at C{ports}, one each; the example's other servers dropped.
    """
    lines, left = [], list(ports)
    for line in text.splitlines():
        match = re.match(r"(\s*server\s+(?:\w+\s+)?)\d+\.\d+\.\d+\.\d+:\d+(.*)", line)
        if match:
            if not left:
                continue
            line = f"{match.group(1)}127.0.0.1:{left.pop(0)}{match.group(2)}"
        lines.append(line)
    return "\n".join(lines) + "\n"


class _Enough(Exception):
    pass


class DocumentedBalancerTests(Servers):
    """
    The HAProxy and nginx examples of docs/deployment.md, as written but
    for their addresses and TLS, in front of two servers on one database:
    a flow's requests spread over both, and an event stream gets its
    keepalives through the balancer (nothing buffered, nothing cut).
    """

    timeout = 120

    @inlineCallbacks
    def check(self, proxy: Any) -> Any:
        self.base = proxy.url
        self.service = self.services[0]
        token, _ = yield test_service_database.ServiceOnPostgresTests.tokens(self)  # type: ignore[arg-type]
        received: list[bytes] = []

        def chunk(data: bytes) -> None:
            received.append(data)
            if b"".join(received).count(b": keepalive") >= 2:
                raise _Enough()

        response = yield self.http.get(
            proxy.url + "/mcp",
            headers={"Authorization": [f"Bearer {token}"], "Accept": ["text/event-stream"]},
            unbuffered=True,
        )
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("content-type")[0].split(";")[0], "text/event-stream")
        collected = treq.collect(response, chunk)
        collected.addTimeout(20, reactor)
        yield self.assertFailure(collected, _Enough)
        # Round-robin without stickiness: both processes took requests.
        for service in self.services:
            self.assertIn("rate_limits.take", service.store.database.transaction_stats())

    @inlineCallbacks
    def start_servers(self) -> Any:
        ports = []
        for _ in range(2):
            base = yield self.start("--keepalive", "1")
            ports.append(int(base.rsplit(":", 1)[1]))
        return ports

    @inlineCallbacks
    def test_haproxy(self) -> Any:
        frontend = reserveFrontend(self)
        ports = yield self.start_servers()
        config = _serve_on(documented("HAProxy (2.4 or later)"), ports)
        config = re.sub(r"\n\s*bind .*", f"\n    bind fd@3\n    monitor-uri {HAPROXY_READY}", config)
        config = config.replace("set-header X-Forwarded-Proto https", "set-header X-Forwarded-Proto http")
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "haproxy.cfg")
        with open(path, "w") as f:
            f.write("global\n    log stderr format raw local0 info\n" + config.replace("defaults\n", "defaults\n    log global\n", 1))
        proxy = spawnProxy(
            self, reactor, "haproxy", [requireHAProxy(), "-db", "-f", path], path, frontend.url("http"),
            frontend.port, None, inherit=frontend.socket,
        )
        frontend.close()
        yield Deferred.fromCoroutine(waitForProxy(reactor, proxy, HAPROXY_READY))
        yield self.check(proxy)

    @inlineCallbacks
    def test_nginx(self) -> Any:
        port = e2e.freePort()
        issuer = f"http://127.0.0.1:{port}"
        ports = yield self.start_servers()
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        config = _serve_on(documented("nginx (open source"), ports)
        config = re.sub(r"listen 443 ssl;", f"listen 127.0.0.1:{port};", config)
        config = re.sub(r"\n\s*ssl_certificate.*", "", config)
        config = config.replace(
            "    location / {", f'    location = {NGINX_READY} {{ return 200 "ready"; }}\n    location / {{', 1
        )
        temp = "".join(f"    {kind}_temp_path {directory}/{kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        path = os.path.join(directory, "nginx.conf")
        with open(path, "w") as f:
            f.write(
                f"daemon off;\nmaster_process off;\nworker_processes 1;\npid {directory}/nginx.pid;\n"
                "error_log stderr notice;\nevents { worker_connections 256; }\n"
                f"http {{\n    access_log /dev/stderr;\n{temp}{config}}}\n"
            )
        proxy = spawnProxy(
            self, reactor, "nginx", [requireNginx(), "-c", path, "-p", directory], path, issuer, port, None
        )
        yield Deferred.fromCoroutine(waitForProxy(reactor, proxy, NGINX_READY))
        yield self.check(proxy)


def _grant_of(txn: Any, client_id: str) -> tuple[str, str]:
    return tuple(txn.execute("SELECT grant_id, site_token_id FROM grants WHERE client_id = ?", (client_id,)).fetchone())  # type: ignore[return-value]


class RevocationPushTests(Servers):
    """
    Each kind of revocation made by another real process (the admin
    command, or another server) reaches this server's token cache as it
    commits: the token it had verified and cached is refused at once, told
    by the database (C{LISTEN}/C{NOTIFY}), not by the cache's expiry.
    """

    @inlineCallbacks
    def setUp(self) -> Any:
        self.base = yield self.start()
        self.service = self.services[0]
        self.token, self.client_id = yield test_service_database.ServiceOnPostgresTests.tokens(self)  # type: ignore[arg-type]
        # Verified once: cached from now on.
        self.assertEqual((yield self.mcp()), 200)
        self.grant_id, self.site_token_id = yield self.service.store.database.read(
            OAUTH_SCHEMA, _grant_of, self.client_id
        )
        self.forgotten = self.forgets(self.service)

    def mcp(self) -> Any:
        return test_service_database.ServiceOnPostgresTests.mcp(self, self.token)  # type: ignore[arg-type]

    @inlineCallbacks
    def refused(self) -> Any:
        yield self.forgotten.until(1).addTimeout(10, reactor)
        self.assertEqual((yield self.mcp()), 401)

    @inlineCallbacks
    def test_grant(self) -> Any:
        yield self.admin("grants", "revoke", self.grant_id)
        yield self.refused()

    @inlineCallbacks
    def test_client(self) -> Any:
        yield self.admin("grants", "revoke-client", self.client_id)
        yield self.refused()

    @inlineCallbacks
    def test_site_token(self) -> Any:
        yield self.admin("token", "revoke", self.site_token_id)
        yield self.refused()

    @inlineCallbacks
    def test_token(self) -> Any:
        """
        An access token revoked (RFC 7009) at another server process.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        port = e2e.freePort()
        argv = [
            sys.executable, "-m", "twisted", "--log-format=text", "smeldr-oauth",
            "--issuer", "http://127.0.0.1:1", "--listen", f"tcp:{port}:interface=127.0.0.1",
            "--database", self.url, "--dev",
        ]
        other = yield Deferred.fromCoroutine(
            e2e.launchServer(self, reactor, argv, port, "http://127.0.0.1:1", directory)
        )
        response = yield self.http.post(
            f"http://127.0.0.1:{other.port}/oauth/revoke",
            data={"token": self.token, "token_type_hint": "access_token", "client_id": self.client_id},
        )
        self.assertEqual(response.code, 200, other.annotate("revoke"))
        yield self.refused()


class OutageTests(Servers):
    """
    PostgreSQL stopped under a running server, then started again.
    """

    @inlineCallbacks
    def setUp(self) -> Any:
        self.base = yield self.start()
        self.service = self.services[0]
        cluster = postgres.cluster()
        # Whatever happens, the next tests find the server running.
        self.addCleanup(cluster.start)
        self.cluster = cluster

    @inlineCallbacks
    def health(self, code: int, timeout: float = 10.0) -> Any:
        """
        The first C{/healthz} answer with C{code}: the standalone server
        answers from a check made once a second, so a change shows within
        about a second (a balancer polls the same way).
        """
        deadline = reactor.seconds() + timeout  # type: ignore[attr-defined]
        while True:
            response = yield self.http.get(self.base + "/healthz")
            if response.code == code or reactor.seconds() > deadline:  # type: ignore[attr-defined]
                self.assertEqual(response.code, code)
                return response
            yield response.content()
            yield deferLater(reactor, 0.1, lambda: None)  # type: ignore[arg-type]

    @inlineCallbacks
    def unavailable(self, response: Any, content_type: str) -> Any:
        body = yield response.content()
        self.assertEqual(response.code, 503, body)
        self.assertEqual(response.headers.getRawHeaders("retry-after"), ["1"], body)
        self.assertTrue(response.headers.getRawHeaders("content-type")[0].startswith(content_type), body)
        self.assertNotIn(b"Traceback", body)
        self.assertNotIn(self.url.encode(), body)
        return body

    @inlineCallbacks
    def test_stopped_in_an_outage(self) -> Any:
        """
        A server stopped while its database is out of reach says so in one
        warning line (its MCP sessions could not be handed back), as the
        endpoints do, not a critical traceback that reads as a crash.
        """
        self.cluster.stop()
        with capturedLogs() as events:
            yield self.service.stopService()
        said = [formatEvent(e) for e in events if "MCP sessions not left cleanly" in formatEvent(e)]
        self.assertEqual(len(said), 1, said)
        self.assertIn("database", said[0])
        self.assertFalse([e for e in events if "log_failure" in e])

    @inlineCallbacks
    def test_outage(self) -> Any:
        """
        During the outage every endpoint answers 503 with C{Retry-After}:
        JSON on the OAuth API, the error page on pages, a JSON-RPC error
        on C{/mcp}; C{/healthz} says why.  The token obtained before still
        works afterwards, the failed requests left nothing behind, and new
        flows work again without restarting the server.
        """
        token, client_id = yield test_service_database.ServiceOnPostgresTests.tokens(self)  # type: ignore[arg-type]
        clients = yield self.service.store.count_clients()
        # An MCP session whose token this process has verified: its calls
        # get past the token check during the outage.
        mcp = {"Authorization": [f"Bearer {token}"], "Accept": ["application/json, text/event-stream"]}
        response = yield self.http.post(
            self.base + "/mcp",
            json={"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
                "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}},
            headers=mcp,
        )
        yield response.content()
        mcp["Mcp-Session-Id"] = response.headers.getRawHeaders("mcp-session-id")
        mcp["MCP-Protocol-Version"] = ["2025-06-18"]
        response = yield self.http.post(
            self.base + "/mcp", json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=mcp
        )
        yield response.content()
        forgotten = self.forgets(self.service)
        self.cluster.stop()

        # /healthz answers from a check made once a second: the next one
        # sees the outage.
        response = yield self.health(503)
        body = yield self.unavailable(response, "application/json")
        self.assertEqual(json.loads(body), {"status": "unavailable", "reason": "database unreachable"})
        response, _ = yield self.register(self.base)
        body = yield self.unavailable(response, "application/json")
        self.assertEqual(json.loads(body)["error"], "temporarily_unavailable")
        response, _ = yield self.post(
            "/oauth/token", dict(grant_type="refresh_token", refresh_token="x" * 43, client_id=client_id)
        )
        yield self.unavailable(response, "application/json")
        # A client this process has not cached must be looked up.
        response = yield self.http.get(
            self.base + "/oauth/authorize",
            params={"response_type": "code", "client_id": "0" * 32, "redirect_uri": REDIRECT},
            allow_redirects=False,
        )
        yield self.unavailable(response, "text/html")
        # A token never seen by this process must be looked up: 503, not 401.
        response = yield self.http.post(
            self.base + "/mcp",
            json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
            headers={"Authorization": ["Bearer " + "y" * 43], "Accept": ["application/json, text/event-stream"]},
        )
        body = yield self.unavailable(response, "application/json")
        self.assertIn("error", json.loads(body))
        # The session's tool calls and methods that need the database say
        # it is unavailable, and log one warning line each (no traceback,
        # which would fail this test), as the endpoints do.
        response = yield self.http.post(
            self.base + "/mcp",
            json={"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "list_posts", "arguments": {}}},
            headers=mcp,
        )
        result = (yield response.json())["result"]
        self.assertEqual(result["content"][0]["text"], UNAVAILABLE)
        self.assertTrue(result["isError"])
        response = yield self.http.post(
            self.base + "/mcp", json={"jsonrpc": "2.0", "id": 3, "method": "resources/list"}, headers=mcp
        )
        self.assertEqual((yield response.json())["error"]["message"], UNAVAILABLE)
        response = yield self.http.delete(self.base + "/mcp", headers=mcp)
        yield response.content()
        # The MCP sessions' lease is renewed every 5 s, so a beat falls in
        # an outage now and then (under load, once in a few runs): one
        # here, every time.  It says the outage in one warning line, as
        # the endpoints do; a logged traceback would fail this test.
        with capturedLogs() as events:
            yield self.service.sessions.delivery._beat()
        said = [formatEvent(e) for e in events if "MCP heartbeat" in formatEvent(e)]
        self.assertEqual(len(said), 1, said)
        self.assertIn("database", said[0])
        self.assertFalse([e for e in events if "log_failure" in e])

        self.cluster.start()
        # Revocations pushed while the listener was away are lost: on
        # reconnecting it has the token cache emptied.
        yield forgotten.until(1)
        response = yield self.health(200)
        self.assertEqual((yield response.json()), {"status": "ok"})
        self.assertEqual((yield self.service.store.count_clients()), clients)
        self.assertEqual((yield test_service_database.ServiceOnPostgresTests.mcp(self, token)), 200)  # type: ignore[arg-type]
        yield test_service_database.ServiceOnPostgresTests.tokens(self)  # type: ignore[arg-type]
        # And pushes arrive again: a revocation by another process.
        yield self.admin("grants", "revoke-client", client_id)
        yield forgotten.until(2)
        self.assertEqual((yield test_service_database.ServiceOnPostgresTests.mcp(self, token)), 401)  # type: ignore[arg-type]
