"""
The authorization flow as a client does it over a real socket: dynamic
registration, the consent page (GET, then the form POSTed with a site
token), the code exchange.  For tests that need a real token of a real
server in-process (the gateway's front, token introspection).
"""

from __future__ import annotations

import json
import re
from html import unescape
from typing import Any
from urllib.parse import urlencode

import treq
from treq.client import HTTPClient
from twisted.trial.unittest import TestCase

from smeldr_oauth.oauth import pkce
from tests.test_oauth_server import query_of

VERIFIER = "socket-flow-verifier-" + "x" * 40
FORM = {"Content-Type": ["application/x-www-form-urlencoded"]}
REDIRECT = "http://127.0.0.1:6276/callback"


class OAuthSocketMixin:
    """
    For a L{TestCase} with C{self.http} (a treq L{HTTPClient}) and
    C{self.issuer}.

    @ivar page: the last consent page seen.
    """

    http: HTTPClient
    issuer: str
    page: str

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
        action = unescape(re.search(r'<form method="post" action="([^"]+)"', page).group(1))  # type: ignore[union-attr]
        fields = [
            (unescape(k), unescape(v))
            for k, v in re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)" ?/?>', page)
        ]
        fields += [("decision", "approve"), ("site_token", site_token)]
        response, body = await self.call("POST", action, data=urlencode(fields).encode(), headers=FORM)
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
