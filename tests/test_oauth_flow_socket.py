"""
The whole authorization flow over real sockets: the Klein app served on
127.0.0.1 by the production L{SmeldrSite}, a L{SQLiteStore} on a temporary
file, and treq as the client.  One flow with a dynamically registered
client, one with a Client ID Metadata Document served by a second local
HTTP server and fetched by the real L{CIMDResolver}.
"""

from __future__ import annotations

import json
from typing import Any, Optional
from urllib.parse import urlencode

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import Clock, deferLater
from twisted.internet.endpoints import serverFromString
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.static import Data

from smeldr_oauth.oauth import pkce
from smeldr_oauth.oauth.cimd import CIMDResolver
from smeldr_oauth.oauth.config import Config
from smeldr_oauth.web.authorize import AuthorizeRoutes
from smeldr_oauth.web.oauth import OAuthRoutes
from smeldr_oauth.web.routes import mount_routes
from smeldr_oauth.oauth.model import Approval
from smeldr_oauth.oauth.server import OAuthServer
from tests.oauth_socket import OAuthSocketMixin, approval_form
from tests.test_oauth_server import query_of

SITE_TOKEN = "socket-site-token-0123456789abcdef"
VERIFIER = "socket-verifier-" + "x" * 40
FORM = {"Content-Type": ["application/x-www-form-urlencoded"]}


def verify_bearer(pasted: str) -> Optional[Approval]:
    if pasted == SITE_TOKEN:
        return Approval(subject="alice", site_token_id="st-socket")
    return None


class FlowOverSocketTests(OAuthSocketMixin, TestCase):
    async def start(self, cimd: bool, path: str = "", clock: Any = reactor, **overrides: Any) -> None:
        """
        Listen, then build the server: its issuer needs the port.

        @param path: the issuer's path (RFC 8414 section 3.1).
        @param clock: the OAuth server's clock (HTTP is always served by
            the real reactor).
        """
        self.app = await self.serve(path)
        # Where RFC 8414 section 3.1 puts the metadata of an issuer with a path.
        self.metadata_url = self.origin + "/.well-known/oauth-authorization-server" + path
        self.store = await self.open_store()
        resolver = CIMDResolver(reactor, allow_insecure=True) if cimd else None
        kw: dict[str, Any] = dict(
            issuer=self.issuer, verify_bearer=verify_bearer, allow_insecure_client_ids=cimd
        )
        kw.update(overrides)
        config = Config(**kw)
        self.server = OAuthServer(config, self.store, clock, resolver)
        mount_routes(self.app, OAuthRoutes(self.server).routes() + AuthorizeRoutes(self.server).routes())

    async def serve_document(self) -> str:
        """
        Serve a client metadata document on a second local server; return
        its URL, which is the client_id.
        """
        root = Resource()
        port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(Site(root))
        self.addCleanup(port.stopListening)
        client_id = f"http://127.0.0.1:{port.getHost().port}/oauth/client.json"
        document = {
            "client_id": client_id,
            "client_name": "Socket CIMD App",
            "redirect_uris": ["http://127.0.0.1/callback"],
            "grant_types": ["authorization_code", "refresh_token"],
            "token_endpoint_auth_method": "none",
        }
        oauth = Resource()
        root.putChild(b"oauth", oauth)
        oauth.putChild(b"client.json", Data(json.dumps(document).encode(), "application/json"))
        return client_id

    async def flow(self, client_id: str, redirect_uri: str) -> list[str]:
        """
        Discovery, consent (GET then POST), code exchange, refresh and
        revocation, as a client does them.  Returns every secret seen.
        """
        response, body = await self.call("HEAD", self.metadata_url)
        self.assertEqual((response.code, body), (200, b""))
        response, body = await self.call("GET", self.metadata_url)
        meta = json.loads(body)
        self.assertEqual(meta["issuer"], self.issuer)
        resource_path = self.issuer[len(self.origin) :] + "/mcp"
        response, body = await self.call("GET", self.origin + "/.well-known/oauth-protected-resource" + resource_path)
        self.assertEqual(json.loads(body)["authorization_servers"], [self.issuer])

        state = "state-" + client_id[-8:]
        query = {
            "response_type": "code",
            "client_id": client_id,
            "redirect_uri": redirect_uri,
            "state": state,
            "code_challenge": pkce.s256(VERIFIER),
            "code_challenge_method": "S256",
            "scope": "read offline_access",
            "resource": self.issuer + "/mcp",
        }
        response, body = await self.call("GET", meta["authorization_endpoint"] + "?" + urlencode(query))
        self.assertEqual(response.code, 200, body)
        self.assertEqual(response.headers.getRawHeaders("x-frame-options"), ["DENY"])
        page = body.decode("utf-8")
        action, form = approval_form(page, SITE_TOKEN)
        response, body = await self.call("POST", action, data=form, headers=FORM)
        self.assertEqual(response.code, 303, body)
        [location] = response.headers.getRawHeaders("location")
        self.assertTrue(location.startswith(redirect_uri + "?"), location)
        q = query_of(location)
        self.assertEqual((q["state"], q["iss"]), ([state], [self.issuer]))
        code = q["code"][0]

        exchange = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": redirect_uri,
            "client_id": client_id,
            "code_verifier": VERIFIER,
            "resource": self.issuer + "/mcp",
        }
        response, body = await self.call(
            "POST", meta["token_endpoint"], data=urlencode(exchange).encode(), headers=FORM
        )
        self.assertEqual(response.code, 200, body)
        self.assertEqual(response.headers.getRawHeaders("cache-control"), ["no-store"])
        first = json.loads(body)
        info = await self.server.verify_access_token(first["access_token"])
        assert info is not None
        self.assertEqual((info.subject, info.client_id), ("alice", client_id))

        refresh = {
            "grant_type": "refresh_token",
            "refresh_token": first["refresh_token"],
            "client_id": client_id,
        }
        response, body = await self.call(
            "POST", meta["token_endpoint"], data=urlencode(refresh).encode(), headers=FORM
        )
        self.assertEqual(response.code, 200, body)
        second = json.loads(body)
        self.assertNotEqual(second["refresh_token"], first["refresh_token"])

        revoke = {"token": second["refresh_token"], "client_id": client_id}
        response, body = await self.call(
            "POST", meta["revocation_endpoint"], data=urlencode(revoke).encode(), headers=FORM
        )
        self.assertEqual(response.code, 200, body)
        self.assertIsNone(await self.server.verify_access_token(second["access_token"]))
        self.assertIsNone(await self.server.verify_access_token(first["access_token"]))
        refresh["refresh_token"] = second["refresh_token"]
        response, body = await self.call(
            "POST", meta["token_endpoint"], data=urlencode(refresh).encode(), headers=FORM
        )
        self.assertEqual((response.code, json.loads(body)["error"]), (400, "invalid_grant"))
        return [
            code,
            first["access_token"],
            first["refresh_token"],
            second["access_token"],
            second["refresh_token"],
        ]

    def assertNoSecrets(self, events: Any, secrets: list[str]) -> None:
        texts = [formatEvent(e) + repr(e) for e in events]
        for secret in secrets + [SITE_TOKEN]:
            for text in texts:
                self.assertNotIn(secret, text)

    async def registered(self, path: str = "") -> None:
        await self.start(cimd=False, path=path)
        with capturedLogs() as events:
            meta = json.loads((await self.call("GET", self.metadata_url))[1])
            response, body = await self.call(
                "POST",
                meta["registration_endpoint"],
                data=json.dumps(
                    {"redirect_uris": ["http://127.0.0.1:6276/oauth/callback"], "client_name": "Socket App"}
                ).encode(),
                headers={"Content-Type": ["application/json"]},
            )
            self.assertEqual(response.code, 201, body)
            client_id = json.loads(body)["client_id"]
            secrets = await self.flow(client_id, "http://127.0.0.1:6276/oauth/callback")
        self.assertNoSecrets(events, secrets)
        self.assertIsNotNone(await self.store.get_client(client_id))

    def test_registered_client(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self.registered())

    async def issuer_with_path(self) -> None:
        await self.registered("/auth")
        # The endpoints live under the issuer's path...
        meta = json.loads((await self.call("GET", self.metadata_url))[1])
        self.assertEqual(meta["token_endpoint"], self.origin + "/auth/oauth/token")
        self.assertEqual(meta["service_documentation"], self.origin + "/auth/")
        # ... and the root metadata URL, where clients that drop the path
        # look, answers the same document.
        response, body = await self.call("GET", self.origin + "/.well-known/oauth-authorization-server")
        self.assertEqual((response.code, json.loads(body)), (200, meta))
        response, _ = await self.call("GET", self.origin + "/.well-known/oauth-protected-resource/auth/mcp")
        self.assertEqual(response.code, 200)

    def test_issuer_with_path(self) -> Deferred[None]:
        """
        An issuer with a path (C{http://host/auth}) is served at the
        path-inserted well-known URL of RFC 8414 section 3.1, with its
        endpoints under the path, and a whole flow works.
        """
        return Deferred.fromCoroutine(self.issuer_with_path())

    async def cimd(self) -> None:
        await self.start(cimd=True)
        client_id = await self.serve_document()
        meta = json.loads((await self.call("GET", self.metadata_url))[1])
        self.assertIs(meta["client_id_metadata_document_supported"], True)
        with capturedLogs() as events:
            secrets = await self.flow(client_id, "http://127.0.0.1:50123/callback")
        self.assertNoSecrets(events, secrets)
        # A CIMD client is never stored as a registration.
        self.assertIsNone(await self.store.get_client(client_id))

    def test_cimd_client(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self.cimd())


class FindingsOverSocketTests(OAuthSocketMixin, TestCase):
    """
    The security review's reproductions, against the production site and
    SQLite store over real sockets.
    """

    start = FlowOverSocketTests.start

    REDIRECT = "http://127.0.0.1:6276/oauth/callback"

    async def register_client(self) -> str:
        response, body = await self.call(
            "POST",
            self.issuer + "/oauth/register",
            data=json.dumps({"redirect_uris": [self.REDIRECT]}).encode(),
            headers={"Content-Type": ["application/json"]},
        )
        self.assertEqual(response.code, 201, body)
        return str(json.loads(body)["client_id"])

    def consent_fields(self, client_id: str, token: str) -> bytes:
        return urlencode(
            {
                "response_type": "code",
                "client_id": client_id,
                "redirect_uri": self.REDIRECT,
                "code_challenge": pkce.s256(VERIFIER),
                "code_challenge_method": "S256",
                "scope": "read offline_access",
                "decision": "approve",
                "site_token": token,
            }
        ).encode()

    async def paste(self, client_id: str, token: str) -> Any:
        response, _ = await self.call(
            "POST", self.issuer + "/oauth/authorize", data=self.consent_fields(client_id, token), headers=FORM
        )
        return response

    async def token_request(self, fields: dict[str, str]) -> tuple[int, Any]:
        response, body = await self.call(
            "POST", self.issuer + "/oauth/token", data=urlencode(fields).encode(), headers=FORM
        )
        return response.code, json.loads(body)

    async def parallel_pastes(self) -> None:
        def slow(pasted: str) -> Deferred[Optional[Approval]]:
            return deferLater(reactor, 0.05, verify_bearer, pasted)

        await self.start(cimd=False, verify_bearer=slow, paste_failures_per_minute=5)
        client_id = await self.register_client()
        with capturedLogs():
            responses = await gatherResults([Deferred.fromCoroutine(self.paste(client_id, "wrong")) for _ in range(30)])
        codes = [r.code for r in responses]
        self.assertEqual((codes.count(403), codes.count(429)), (5, 25), codes)

    def test_parallel_wrong_pastes(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self.parallel_pastes())

    async def connected(self) -> tuple[str, dict[str, Any]]:
        """
        Register a client, consent, exchange the code: the client id and
        the token response.
        """
        client_id = await self.register_client()
        response = await self.paste(client_id, SITE_TOKEN)
        self.assertEqual(response.code, 303)
        code = query_of(response.headers.getRawHeaders("location")[0])["code"][0]
        status, tokens = await self.token_request(
            {
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": self.REDIRECT,
                "client_id": client_id,
                "code_verifier": VERIFIER,
            }
        )
        self.assertEqual(status, 200, tokens)
        return client_id, tokens

    async def parallel_refresh(self) -> None:
        await self.start(cimd=False)
        client_id, first = await self.connected()
        refresh = {"grant_type": "refresh_token", "client_id": client_id}
        a, b = await gatherResults(
            [
                Deferred.fromCoroutine(self.token_request(dict(refresh, refresh_token=first["refresh_token"])))
                for _ in range(2)
            ]
        )
        self.assertEqual((a[0], b[0]), (200, 200))
        status, c = await self.token_request(dict(refresh, refresh_token=a[1]["refresh_token"]))
        self.assertEqual(status, 200, c)
        with capturedLogs():
            status, lost = await self.token_request(dict(refresh, refresh_token=b[1]["refresh_token"]))
        self.assertEqual((status, lost["error"]), (400, "invalid_grant"))
        # The user is still connected.
        self.assertIsNotNone(await self.server.verify_access_token(c["access_token"]))
        status, d = await self.token_request(dict(refresh, refresh_token=c["refresh_token"]))
        self.assertEqual(status, 200, d)

        # Revocation by another client changes nothing (RFC 7009 2.1).
        other = await self.register_client()
        response, _ = await self.call(
            "POST",
            self.issuer + "/oauth/revoke",
            data=urlencode({"token": d["refresh_token"], "client_id": other}).encode(),
            headers=FORM,
        )
        self.assertEqual(response.code, 200)
        self.assertIsNotNone(await self.server.verify_access_token(d["access_token"]))

    def test_parallel_refresh_then_loser(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self.parallel_refresh())

    async def refreshes_record_use(self) -> None:
        clock = Clock()
        clock.advance(1_700_000_000)
        await self.start(cimd=False, clock=clock)
        client_id, tokens = await self.connected()
        exchanged = clock.seconds()
        for advance, recorded in ((30, exchanged), (29, exchanged), (1, exchanged + 60), (59, exchanged + 60)):
            clock.advance(advance)
            status, tokens = await self.token_request(
                {"grant_type": "refresh_token", "client_id": client_id, "refresh_token": tokens["refresh_token"]}
            )
            self.assertEqual(status, 200, tokens)
            [grant] = await self.store.list_grants()
            self.assertEqual(grant.last_used_at, recorded, clock.seconds() - exchanged)

    def test_refreshes_record_use_once_a_minute(self) -> Deferred[None]:
        """
        Refreshes over HTTP record the grant's use (what the connected-apps
        page shows as "last used") at most once a minute: the code exchange
        at 0 s, then refreshes at 30, 59, 60 and 119 s.
        """
        return Deferred.fromCoroutine(self.refreshes_record_use())

    async def odd_display_urls(self) -> None:
        await self.start(cimd=False)
        before = await self.store.count_clients()
        # JSON's escapes can carry what UTF-8 cannot: a lone surrogate.
        bodies = [
            b'{"redirect_uris": ["%s"], "logo_uri": "https://logo.example/\\ud800"}' % self.REDIRECT.encode(),
            b'{"redirect_uris": ["%s"], "client_uri": "https://client.example/\\udfff"}' % self.REDIRECT.encode(),
            json.dumps({"redirect_uris": [self.REDIRECT], "logo_uri": "https://logo.example/\u00e9"}).encode(),
        ]
        with capturedLogs() as events:
            for body in bodies:
                response, answer = await self.call(
                    "POST", self.issuer + "/oauth/register", data=body, headers={"Content-Type": ["application/json"]}
                )
                self.assertEqual(response.code, 400, answer)
                self.assertEqual(json.loads(answer)["error"], "invalid_client_metadata")
        self.assertEqual([e for e in events if "log_failure" in e], [])
        self.assertEqual(await self.store.count_clients(), before)

    def test_odd_display_urls(self) -> Deferred[None]:
        """
        A registration whose C{client_uri} or C{logo_uri} is not plain
        ASCII (a lone surrogate, which SQLite cannot store, or any other
        non-ASCII character) is refused as C{invalid_client_metadata}
        rather than failing in the store with a 500, as a metadata
        document's are dropped (L{smeldr_oauth.oauth.cimd.document}).
        """
        return Deferred.fromCoroutine(self.odd_display_urls())
