"""
RFC 7662 token introspection (L{smeldr_oauth.oauth.introspection}) over a
real socket, on a real SQLite store: who may ask, what they learn, and that
a revocation is seen by the very next question.
"""

from __future__ import annotations

import base64
import io
import json
import os
import sys
from typing import Any, Optional
from urllib.parse import urlencode

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from smeldr_oauth.oauth.config import Config, ProtectedResource
from smeldr_oauth.oauth.introspection import RESOURCE_SERVER, new_resource_server
from smeldr_oauth.oauth.model import Approval
from smeldr_oauth.oauth.secrets import hash_secret
from smeldr_oauth.oauth.server import OAuthServer
from smeldr_oauth.site import admin
from smeldr_oauth.store.sqlite import SQLiteStore
from smeldr_oauth.web.authorize import AuthorizeRoutes
from smeldr_oauth.web.oauth import OAuthRoutes
from smeldr_oauth.web.routes import mount_routes
from tests.e2e import (
    CHECKOUT,
    adminCommand,
    checkDriver,
    createSiteToken,
    freePort,
    runDriverReport,
    runProgram,
    startServer,
    subprocessEnvironment,
)
from tests.gateway_real import UpstreamProcess, until
from tests.oauth_socket import FORM, OAuthSocketMixin
from tests.test_e2e_python_sdk import DRIVER, _requireSDK

SITE_TOKEN = "introspection-site-token-0123456789"


def verify_bearer(pasted: str) -> Optional[Approval]:
    return Approval(subject="alice", site_token_id="st-intro") if pasted == SITE_TOKEN else None


class IntrospectionTests(OAuthSocketMixin, TestCase):
    timeout = 30

    async def setUp(self) -> None:  # type: ignore[override]
        self.app = await self.serve()
        self.store = await self.open_store()
        self.a, self.b = self.issuer + "/mcp/a", self.issuer + "/mcp/b"
        config = Config(
            issuer=self.issuer,
            verify_bearer=verify_bearer,
            scopes={"read": "Read", "write": "Write"},
            resources=[ProtectedResource(url=self.a, scopes=["read", "write"]), ProtectedResource(url=self.b, scopes=["read"])],
            introspections_per_minute=20,
        )
        self.oauth = OAuthServer(config, self.store, reactor, None)
        mount_routes(self.app, OAuthRoutes(self.oauth).routes() + AuthorizeRoutes(self.oauth).routes())
        self.server, self.secret = await self.resource_server("mcp-a", self.a)

    async def resource_server(self, name: str, resource: Optional[str]) -> tuple[str, str]:
        client, secret = new_resource_server(name, resource, reactor.seconds())  # type: ignore[attr-defined]
        await self.store.save_client(client)
        return client.client_id, secret

    async def introspect(self, token: str, auth: Any = "basic", **extra: str) -> tuple[int, dict[str, Any]]:
        headers = dict(FORM)
        params = {"token": token, **extra}
        if auth == "basic":
            pair = f"{self.server}:{self.secret}".encode()
            headers["Authorization"] = ["Basic " + base64.b64encode(pair).decode()]
        elif auth == "post":
            params.update(client_id=self.server, client_secret=self.secret)
        elif isinstance(auth, tuple):
            params.update(client_id=auth[0], client_secret=auth[1])
        response, body = await self.call(
            "POST", self.issuer + "/oauth/introspect", data=urlencode(params).encode(), headers=headers
        )
        return response.code, json.loads(body)

    async def test_metadata(self) -> None:
        _, body = await self.call("GET", self.issuer + "/.well-known/oauth-authorization-server")
        metadata = json.loads(body)
        self.assertEqual(metadata["introspection_endpoint"], self.issuer + "/oauth/introspect")
        self.assertEqual(
            metadata["introspection_endpoint_auth_methods_supported"], ["client_secret_basic", "client_secret_post"]
        )

    async def test_active_then_revoked(self) -> None:
        """
        A live token: who, what, where, until when, with either method.
        Revoked (RFC 7009), it is C{{"active": false}} and nothing more
        at the very next question.
        """
        issued = await self.token(self.a, "read offline_access", SITE_TOKEN)
        for auth in ("basic", "post"):
            code, answer = await self.introspect(issued["access_token"], auth)
            self.assertEqual(code, 200, answer)
            self.assertEqual(
                {k: answer[k] for k in ("active", "scope", "sub", "aud", "iss", "token_type")},
                {
                    "active": True,
                    "scope": "read offline_access",
                    "sub": "alice",
                    "aud": self.a,
                    "iss": self.issuer,
                    "token_type": "Bearer",
                },
            )
            self.assertTrue(answer["client_id"])
            self.assertGreater(answer["exp"], reactor.seconds())  # type: ignore[attr-defined]
        # A refresh token is not an access token.
        self.assertEqual(await self.introspect(issued["refresh_token"]), (200, {"active": False}))
        response, _ = await self.call(
            "POST",
            self.issuer + "/oauth/revoke",
            data=urlencode({"token": issued["access_token"]}).encode(),
            headers=FORM,
        )
        self.assertEqual(response.code, 200)
        self.assertEqual(await self.introspect(issued["access_token"]), (200, {"active": False}))

    async def test_revoked_elsewhere(self) -> None:
        """
        A revocation made by another process (straight in the store, as
        the admin command does) is honoured at once: no cache answers.
        """
        issued = await self.token(self.a, "read", SITE_TOKEN)
        self.assertTrue((await self.introspect(issued["access_token"]))[1]["active"])
        [grant] = await self.store.list_grants()
        self.assertTrue(await self.store.revoke_grant(grant.grant_id, reactor.seconds()))  # type: ignore[attr-defined]
        self.assertEqual(await self.introspect(issued["access_token"]), (200, {"active": False}))

    async def test_audience(self) -> None:
        """
        A resource server created for one resource learns nothing of a
        token for another; one created for none sees every resource.
        """
        issued = await self.token(self.b, "read", SITE_TOKEN)
        self.assertEqual(await self.introspect(issued["access_token"]), (200, {"active": False}))
        self.server, self.secret = await self.resource_server("any", None)
        code, answer = await self.introspect(issued["access_token"])
        self.assertEqual((code, answer["active"], answer["aud"]), (200, True, self.b))

    async def test_who_may_ask(self) -> None:
        """
        Only an authenticated resource server: no credentials, a wrong
        secret, an ordinary confidential client, are C{invalid_client}.
        """
        issued = await self.token(self.a, "read", SITE_TOKEN)
        token = issued["access_token"]
        code, answer = await self.introspect(token, auth=None)
        self.assertEqual((code, answer["error"]), (401, "invalid_client"))
        code, answer = await self.introspect(token, auth=(self.server, self.secret[:-1] + ("B" if self.secret.endswith("A") else "A")))
        self.assertEqual((code, answer["error"]), (401, "invalid_client"))
        _, body = await self.call(
            "POST",
            self.issuer + "/oauth/register",
            data=json.dumps(
                {"redirect_uris": ["http://127.0.0.1:1/cb"], "token_endpoint_auth_method": "client_secret_post"}
            ).encode(),
            headers={"Content-Type": ["application/json"]},
        )
        registered = json.loads(body)
        code, answer = await self.introspect(token, auth=(registered["client_id"], registered["client_secret"]))
        self.assertEqual((code, answer["error"]), (401, "invalid_client"))
        stored = await self.store.get_client(self.server)
        self.assertEqual(stored.kind, RESOURCE_SERVER)
        self.assertEqual(stored.client_secret_hash, hash_secret(self.secret))
        self.assertNotIn(self.secret, repr(stored))

    async def test_bad_requests(self) -> None:
        """No token, a repeated or oversized one: C{invalid_request}; an unknown one: inactive."""
        response, body = await self.call(
            "POST",
            self.issuer + "/oauth/introspect",
            data=f"token=a&token=b&client_id={self.server}&client_secret={self.secret}".encode(),
            headers=FORM,
        )
        self.assertEqual((response.code, json.loads(body)["error"]), (400, "invalid_request"))
        code, answer = await self.introspect("")
        self.assertEqual((code, answer["error"]), (400, "invalid_request"))
        code, answer = await self.introspect("x" * 5000)
        self.assertEqual((code, answer["error"]), (400, "invalid_request"))
        self.assertEqual(await self.introspect("not-a-token", token_type_hint="whatever"), (200, {"active": False}))

    async def test_rate_limited(self) -> None:
        for _ in range(20):
            await self.introspect("unknown")
        response, body = await self.call(
            "POST", self.issuer + "/oauth/introspect", data=b"token=x", headers=FORM
        )
        self.assertEqual(response.code, 429, body)
        self.assertTrue(response.headers.getRawHeaders("retry-after"))


class AdminCommandTests(TestCase):
    async def test_create(self) -> None:
        """C{resource-server create} stores the hash and shows the secret once."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "oauth.db")
        store = SQLiteStore(path, reactor)
        await store.ready
        store.close()
        out, err = io.StringIO(), io.StringIO()
        options = admin.parse(["resource-server", "create", "notes", "--resource", "https://x.example/mcp/", "--oauth-db", path])
        self.assertEqual(await admin.run(reactor, options, out, err), 0, err.getvalue())
        lines = dict(line.split(":", 1) for line in out.getvalue().splitlines() if line.startswith("client_"))
        client_id, secret = lines["client_id"].strip(), lines["client_secret"].strip()
        self.assertGreaterEqual(len(secret), 43)
        store = SQLiteStore(path, reactor)
        self.addCleanup(store.close)
        await store.ready
        client = await store.get_client(client_id)
        self.assertEqual((client.kind, client.client_uri), (RESOURCE_SERVER, "https://x.example/mcp"))
        self.assertEqual(client.client_secret_hash, hash_secret(secret))
        options = admin.parse(["resource-server", "create", "bad", "--resource", "ftp://x", "--oauth-db", path])
        self.assertEqual(await admin.run(reactor, options, out, err), 1)
        self.assertIn("absolute http(s) URL", err.getvalue())


class SDKVerifierExampleTests(TestCase):
    """
    C{examples/introspection_server.py}: an MCP server built with the
    official Python SDK validates our tokens by introspection.  The SDK
    client finds our OAuth server from its metadata, goes through our
    consent page, calls its tool; its token revoked, the example answers
    401 at once, and the client authorizes again.
    """

    timeout = 120

    async def test_sdk_client_through_example(self) -> None:
        _requireSDK()
        port = freePort()
        resource = f"http://127.0.0.1:{port}/mcp"
        server = await startServer(self, reactor, ["--resource", resource])
        out, err, code = await runProgram(
            reactor, [*adminCommand(), "resource-server", "create", "example", "--resource", resource, "--oauth-db", server.oauthDB]
        )
        self.assertEqual(code, 0, err)
        credentials = dict(line.split(":", 1) for line in out.splitlines() if line.startswith("client_"))
        env = subprocessEnvironment()
        env.update(
            SMELDR_ISSUER=server.issuer,
            SMELDR_CLIENT_ID=credentials["client_id"].strip(),
            SMELDR_CLIENT_SECRET=credentials["client_secret"].strip(),
        )
        example = UpstreamProcess(
            [sys.executable, os.path.join(CHECKOUT, "examples", "introspection_server.py"), "--port", str(port)], env
        )
        self.addCleanup(lambda: Deferred.fromCoroutine(example.stop()))
        await until(lambda: b"PORT " in b"".join(example.collector.out) or not example.alive(), 60, "the example's port")
        self.assertTrue(example.alive(), example.collector.output())
        siteToken = await createSiteToken(reactor, server)
        arguments = ("--tool", "whoami", "--args", "{}", "--revoke")
        report, out, err, code = await runDriverReport(
            reactor,
            [sys.executable, DRIVER, "--url", resource, "--site-token", siteToken, "--timeout", "40", *arguments],
            timeout=60,
        )
        report = checkDriver(self, server, arguments, report, out, err, code)
        first = "".join(c.get("text", "") for c in report["tool_result"]["content"])
        self.assertIn("e2e via ", first)
        self.assertEqual(report["revoke"]["probe_status"], 401)
        self.assertEqual(report["authorizations"], 2)
        again = "".join(c.get("text", "") for c in report["after_revoke_result"]["content"])
        self.assertIn("e2e via ", again)
