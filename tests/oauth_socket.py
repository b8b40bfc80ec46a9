"""
The authorization flow as a client does it over a real socket: dynamic
registration, the consent page (GET, then the form POSTed with a site
token), the code exchange.  For tests that need a real token of a real
server in-process (the gateway's front, token introspection, the flow
tests), with the server's setup they share: a site listening on
127.0.0.1, a SQLite store in the test's directory, a client that keeps
no connection open.
"""

from __future__ import annotations

import json
import os
import re
from html import unescape
from typing import Any
from urllib.parse import urlencode

import treq
from klein import Klein
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from smeldr_oauth.oauth import pkce
from smeldr_oauth.store.sqlite import SQLiteStore
from smeldr_oauth.web.site import SmeldrSite
from tests.test_oauth_server import query_of

VERIFIER = "socket-flow-verifier-" + "x" * 40
FORM = {"Content-Type": ["application/x-www-form-urlencoded"]}
REDIRECT = "http://127.0.0.1:6276/callback"


def approval_form(page: str, site_token: str) -> tuple[str, bytes]:
    """
    The consent C{page}'s form: where it posts, and its fields filled in to
    approve with C{site_token}, form-encoded.
    """
    action = unescape(re.search(r'<form method="post" action="([^"]+)"', page).group(1))  # type: ignore[union-attr]
    fields = [
        (unescape(k), unescape(v))
        for k, v in re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)" ?/?>', page)
    ]
    fields += [("decision", "approve"), ("site_token", site_token)]
    return action, urlencode(fields).encode()


class OAuthSocketMixin:
    """
    For a L{TestCase} with C{self.http} (a treq L{HTTPClient}) and
    C{self.issuer}; L{serve} and L{open_store} make them and a store.

    @ivar page: the last consent page seen.
    """

    http: HTTPClient
    issuer: str
    page: str

    async def serve(self, path: str = "") -> Klein:
        """
        A Klein app behind L{SmeldrSite} on a fresh 127.0.0.1 port, until
        the test ends: C{self.origin}, C{self.issuer} (the origin and
        C{path}), and C{self.http}.  The routes are the test's to mount.
        """
        test: TestCase = self  # type: ignore[assignment]
        app = Klein()
        port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(SmeldrSite(app.resource()))
        test.addCleanup(port.stopListening)
        self.origin = f"http://127.0.0.1:{port.getHost().port}"
        self.issuer = self.origin + path
        self.http = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))
        return app

    async def open_store(self) -> SQLiteStore:
        """A SQLite store in a new directory of the test's, ready, closed at the end."""
        test: TestCase = self  # type: ignore[assignment]
        directory = os.path.abspath(test.mktemp())
        os.makedirs(directory)
        store = SQLiteStore(os.path.join(directory, "oauth.db"), reactor)
        test.addCleanup(store.close)
        await store.ready
        return store

    async def call(self, method: str, url: str, **kwargs: Any) -> tuple[Any, bytes]:
        response = await self.http.request(method, url, allow_redirects=False, **kwargs)
        return response, await treq.content(response)

    async def register(self) -> str:
        """A public client, registered dynamically: its id."""
        _, body = await self.call(
            "POST",
            self.issuer + "/oauth/register",
            data=json.dumps({"redirect_uris": [REDIRECT], "client_name": "Socket flow"}).encode(),
            headers={"Content-Type": ["application/json"]},
        )
        return str(json.loads(body)["client_id"])

    async def token(self, resource: str, scope: str, site_token: str) -> dict[str, Any]:
        """Register, consent with C{site_token}, exchange: the token response."""
        test: TestCase = self  # type: ignore[assignment]
        client_id = await self.register()
        query = {
            "response_type": "code",
            "client_id": client_id,
            "redirect_uri": REDIRECT,
            "state": "s",
            "code_challenge": pkce.s256(VERIFIER),
            "code_challenge_method": "S256",
            "scope": scope,
            "resource": resource,
        }
        response, body = await self.call("GET", self.issuer + "/oauth/authorize?" + urlencode(query))
        test.assertEqual(response.code, 200, body)
        self.page = page = body.decode()
        action, form = approval_form(page, site_token)
        response, body = await self.call("POST", action, data=form, headers=FORM)
        test.assertEqual(response.code, 303, body)
        code = query_of(response.headers.getRawHeaders("location")[0])["code"][0]
        exchange = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT,
            "client_id": client_id,
            "code_verifier": VERIFIER,
            "resource": resource,
        }
        response, body = await self.call(
            "POST", self.issuer + "/oauth/token", data=urlencode(exchange).encode(), headers=FORM
        )
        test.assertEqual(response.code, 200, body)
        return dict(json.loads(body))
