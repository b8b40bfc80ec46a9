"""
The entry points on PostgreSQL (C{--database URL}): the options of C{twist
smeldr-oauth}, the service over a real socket (a full OAuth flow, and a
revocation made by another process reaching its token cache, pushed), and
the C{smeldr-oauth-stdio} process over its pipes.
"""

from __future__ import annotations

import hashlib
import base64
import json
import os
import sys
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SynchronousTestCase, TestCase

from smeldr_oauth.service.tap import Options
from smeldr_oauth.service.standalone import StandaloneService
from smeldr_oauth.site.stores import open_site
from tests import postgres
from tests.test_db_notify import Inbox

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
URL = "postgresql://smeldr@db.example/smeldr"


def parse(*argv: str) -> Options:
    options = Options()
    options.parseOptions(list(argv))
    return options


def child_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=CHECKOUT + os.pathsep + os.environ.get("PYTHONPATH", ""))


class OptionTests(SynchronousTestCase):
    def test_database(self) -> None:
        options = parse("--issuer", "http://127.0.0.1:1", "--database", URL)
        self.assertEqual((options["database"], options["db-threads"]), (URL, None))
        options = parse("--issuer", "http://127.0.0.1:1", "--database", URL, "--db-threads", "8")
        self.assertEqual(options["db-threads"], 8)

    def test_refused(self) -> None:
        """
        A database that is not a PostgreSQL URL, or more than one SQLite
        thread: one line on stderr, exit status 2.
        """
        import io

        for argv in (
            ["--database", "./oauth.db"],
            ["--db-threads", "2"],
            ["--database", URL, "--db-threads", "many"],
        ):
            err = io.StringIO()
            self.patch(sys, "stderr", err)
            with self.assertRaises(SystemExit) as caught:
                parse("--issuer", "http://127.0.0.1:1", *argv)
            self.assertEqual(caught.exception.code, 2)
            self.assertEqual(err.getvalue().count("\n"), 1, argv)


def pkce_pair() -> tuple[str, str]:
    verifier = base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode()
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


class ServiceOnPostgresTests(TestCase):
    """
    C{twist smeldr-oauth --database URL}'s service on a real socket.
    """

    @inlineCallbacks
    def setUp(self) -> Any:
        self.url = postgres.database_url(self)
        options = parse("--issuer", "http://127.0.0.1:1", "--database", self.url, "--dev")
        self.service = StandaloneService(options, reactor)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        port = yield serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(self.service.site)
        self.addCleanup(port.stopListening)
        self.base = f"http://127.0.0.1:{port.getHost().port}"
        from twisted.web.client import Agent, HTTPConnectionPool

        self.http = treq.client.HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))

    @inlineCallbacks
    def post(self, path: str, form: dict[str, str]) -> Any:
        response = yield self.http.post(
            self.base + path,
            data=urlencode(form).encode(),
            headers={"Content-Type": ["application/x-www-form-urlencoded"]},
            allow_redirects=False,
        )
        body = yield response.content()
        return response, body

    @inlineCallbacks
    def tokens(self) -> Any:
        """
        A site token, a registration, consent and a code exchange, all
        stored in PostgreSQL: the access token and the client id.
        """
        _, site_token = yield self.service.site_stores.tokens.create("alice")
        redirect = "http://127.0.0.1:33418/callback"
        response = yield self.http.post(
            self.base + "/oauth/register",
            json={"redirect_uris": [redirect], "token_endpoint_auth_method": "none", "client_name": "test"},
        )
        self.assertEqual(response.code, 201)
        client_id = (yield response.json())["client_id"]
        verifier, challenge = pkce_pair()
        response, body = yield self.post(
            "/oauth/authorize",
            dict(
                response_type="code",
                client_id=client_id,
                redirect_uri=redirect,
                scope="read write offline_access",
                code_challenge=challenge,
                code_challenge_method="S256",
                resource="http://127.0.0.1:1/mcp",
                decision="approve",
                site_token=site_token,
            ),
        )
        self.assertEqual(response.code, 303, body)
        location = response.headers.getRawHeaders("location")[0]
        code = parse_qs(urlsplit(location).query)["code"][0]
        response, body = yield self.post(
            "/oauth/token",
            dict(
                grant_type="authorization_code",
                code=code,
                code_verifier=verifier,
                client_id=client_id,
                redirect_uri=redirect,
            ),
        )
        self.assertEqual(response.code, 200, body)
        issued = json.loads(body)
        response, body = yield self.post(
            "/oauth/token",
            dict(grant_type="refresh_token", refresh_token=issued["refresh_token"], client_id=client_id),
        )
        self.assertEqual(response.code, 200, body)
        return json.loads(body)["access_token"], client_id

    @inlineCallbacks
    def mcp(self, token: str) -> Any:
        response = yield self.http.post(
            self.base + "/mcp",
            json={
                "jsonrpc": "2.0",
                "id": 1,
                "method": "initialize",
                "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
            },
            headers={"Authorization": [f"Bearer {token}"], "Accept": ["application/json, text/event-stream"]},
        )
        yield response.content()
        return response.code

    @inlineCallbacks
    def test_flow_and_revocation_push(self) -> Any:
        """
        The whole flow works on PostgreSQL; the health check says so; and
        when another process (the admin command, a real process) revokes
        the client's grants, the service stops accepting the token it had
        cached, told by the database rather than by a timer.
        """
        response = yield self.http.get(self.base + "/healthz")
        self.assertEqual((response.code, (yield response.json())), (200, {"status": "ok"}))
        token, client_id = yield self.tokens()
        self.assertEqual((yield self.mcp(token)), 200)
        forgotten = Inbox()
        oauth = self.service.oauth
        original = oauth.forget_cached_tokens

        def forget() -> None:
            original()
            forgotten()

        oauth.forget_cached_tokens = forget  # type: ignore[method-assign]
        out, err, code = yield getProcessOutputAndValue(
            sys.executable,
            ["-c", "from smeldr_oauth.site.admin import main; main()", "grants", "revoke-client", client_id,
             "--database", self.url],
            env=child_env(),
        )
        self.assertEqual(code, 0, err)
        self.assertIn(b"Revoked 1 grant(s)", out)
        yield forgotten.until(1)
        self.assertEqual((yield self.mcp(token)), 401)


class _Pipes(ProcessProtocol):
    def __init__(self, lines: list[bytes]) -> None:
        self.lines = lines
        self.out = b""
        self.err = b""
        self.ended: Deferred[Any] = Deferred()

    def connectionMade(self) -> None:
        for line in self.lines:
            self.transport.write(line + b"\n")  # type: ignore[union-attr]
        self.transport.closeStdin()  # type: ignore[union-attr]

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(reason.value.exitCode)


class StdioOnPostgresTests(TestCase):
    @inlineCallbacks
    def test_stdio(self) -> Any:
        """
        C{smeldr-oauth-stdio --database URL}, a real process talking over
        its pipes, writes its posts to PostgreSQL.
        """
        url = postgres.database_url(self)
        requests = [
            {"jsonrpc": "2.0", "id": 0, "method": "initialize",
             "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}},
            {"jsonrpc": "2.0", "method": "notifications/initialized"},
            {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
             "params": {"name": "create_post", "arguments": {"title": "From stdio", "body": "on postgres"}}},
        ]
        protocol = _Pipes([json.dumps(r).encode() for r in requests])
        reactor.spawnProcess(
            protocol,
            sys.executable,
            [sys.executable, "-c", "from smeldr_oauth.mcp.stdio import main; main()", "--database", url],
            env=child_env(),
        )
        code = yield protocol.ended
        self.assertEqual(code, 0, protocol.err)
        answers = {a["id"]: a for a in map(json.loads, protocol.out.splitlines())}
        self.assertNotIn("error", answers[1], answers[1])
        self.assertFalse(answers[1]["result"].get("isError"), answers[1])
        site = open_site(url, reactor)
        self.addCleanup(site.close)
        post = yield site.posts.get("from-stdio")
        self.assertEqual(post.body, "on postgres")
