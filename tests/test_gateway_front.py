"""
The gateway's front: where upstreams are served, what a token for each may
carry, and the whole of it over a real socket (our OAuth flow with the
consent page, then MCP through L{smeldr_oauth.service.wiring.mount} to a
gateway whose upstream is an in-process MCP app).
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional
from urllib.parse import urlencode

from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from smeldr_oauth.gateway import configfile as gateway_config
from smeldr_oauth.gateway.front import BASE_SCOPE, authorization_settings, plan
from smeldr_oauth.gateway.proxy import Gateway
from smeldr_oauth.oauth import pkce
from smeldr_oauth.oauth.config import Config
from smeldr_oauth.oauth.model import Approval
from smeldr_oauth.oauth.server import OAuthServer
from smeldr_oauth.service import tap
from smeldr_oauth.service.wiring import mount
from tests.gateway_fakes import LoopbackChannel, build_upstream_app
from tests.oauth_socket import REDIRECT, VERIFIER, OAuthSocketMixin
from tests.test_oauth_server import query_of

SITE_TOKEN = "gateway-front-site-token-0123456789"
JSON = {"Content-Type": ["application/json"], "Accept": ["application/json, text/event-stream"]}

TOML = """
[upstreams.notes]
command = "/bin/true"
[upstreams.notes.scopes]
required = ["notes"]
tools = { "write_*" = ["notes:write"] }

[upstreams.other]
command = "/bin/true"
"""


def which(program: str, path: Optional[str]) -> Optional[str]:
    return program


def verify_bearer(pasted: str) -> Optional[Approval]:
    return Approval(subject="alice", site_token_id="st-front") if pasted == SITE_TOKEN else None


class PlanTests(SynchronousTestCase):
    """L{plan} and L{authorization_settings}: pure values."""

    def test_paths_and_resources(self) -> None:
        """
        Several upstreams each get C{/mcp/NAME} and a resource of their
        own with the scopes their mapping names (required first); one that
        maps none gets L{BASE_SCOPE}.
        """
        mounted = plan(gateway_config.load((), TOML, which=which), "https://gw.example")
        self.assertEqual([m.path for m in mounted], ["/mcp/notes", "/mcp/other"])
        self.assertEqual([m.resource.url for m in mounted], ["https://gw.example/mcp/notes", "https://gw.example/mcp/other"])
        self.assertEqual(mounted[0].resource.scopes, ("notes", "notes:write"))
        self.assertEqual(mounted[1].resource.scopes, (BASE_SCOPE,))
        self.assertIn("write_*", mounted[0].resource.scope_words["notes:write"])
        settings = authorization_settings(mounted)
        self.assertEqual(set(settings["scopes"]), {"notes", "notes:write", BASE_SCOPE})
        config = Config(issuer="https://gw.example", verify_bearer=verify_bearer, **settings)
        self.assertEqual(config.resource, "https://gw.example/mcp/notes")
        self.assertIsNotNone(config.protected_resource("https://gw.example/mcp/other"))

    def test_single(self) -> None:
        """One upstream stays at C{/mcp}; C{--resource} may move its public URL."""
        single = gateway_config.load(["stdio:/bin/true"], which=which)
        [m] = plan(single, "https://gw.example")
        self.assertEqual((m.path, m.resource.url), ("/mcp", "https://gw.example/mcp"))
        [m] = plan(single, "https://gw.example", "https://edge.example/tools/mcp")
        self.assertEqual((m.path, m.resource.url), ("/mcp", "https://edge.example/tools/mcp"))
        several = gateway_config.load((), TOML, which=which)
        self.assertRaises(ValueError, plan, several, "https://gw.example", "https://edge.example/mcp")


class OptionTests(SynchronousTestCase):
    """C{--upstream*} on C{twist smeldr-oauth}."""

    def parse(self, *argv: str) -> tap.Options:
        options = tap.Options()
        options.parseOptions(["--issuer", "https://gw.example", *argv])
        return options

    def refused(self, *argv: str) -> str:
        import io
        import sys

        err = io.StringIO()
        self.patch(sys, "stderr", err)
        with self.assertRaises(SystemExit) as caught:
            self.parse(*argv)
        self.assertEqual(caught.exception.code, 2)
        return err.getvalue()

    def test_upstreams(self) -> None:
        """Each C{--upstream} becomes a resource of the authorization server."""
        options = self.parse("--upstream", "a=stdio:/bin/true", "--upstream", "b=http://127.0.0.1:9/mcp")
        self.assertEqual([m.path for m in options["upstreams"]], ["/mcp/a", "/mcp/b"])
        config = options["config"]
        self.assertEqual([r.url for r in config.resources], ["https://gw.example/mcp/a", "https://gw.example/mcp/b"])
        self.assertEqual(options["gateway"].upstreams[0].isolation, "user")

    def test_config_file_and_isolation(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(TOML)
        options = self.parse("--upstream-config", path, "--upstream-isolation", "shared")
        self.assertEqual([u.isolation for u in options["gateway"].upstreams], ["shared", "shared"])
        self.assertIn("notes:write", options["config"].scopes)

    def test_credential(self) -> None:
        """The gateway's own credential for HTTP upstreams, from a variable: never on the command line."""
        self.patch(os, "environ", {**os.environ, "GW_UPSTREAM_KEY": "Bearer s3cret"})
        options = self.parse("--upstream", "http://127.0.0.1:9/mcp", "--upstream-credential-env", "GW_UPSTREAM_KEY")
        credential = options["gateway"].upstreams[0].credential
        self.assertEqual((credential.header, credential.value), ("Authorization", "Bearer s3cret"))
        self.assertNotIn("s3cret", repr(options["gateway"]))
        self.assertIn("GW_NOT_SET is not set", self.refused("--upstream", "http://127.0.0.1:9/mcp", "--upstream-credential-env", "GW_NOT_SET"))

    def test_mistakes(self) -> None:
        """Each mistake is one usage line, exit status 2."""
        self.assertIn("--app and --upstream", self.refused("--upstream", "stdio:/bin/true", "--app", "x:y"))
        self.assertIn("several upstreams each need a name", self.refused("--upstream", "stdio:/bin/true", "--upstream", "http://127.0.0.1:9/"))
        self.assertIn("cannot read", self.refused("--upstream-config", "/nonexistent/up.toml"))
        self.assertIn("needs --upstream", self.refused("--upstream-isolation", "shared"))
        self.assertIn("isolation", self.refused("--upstream", "stdio:/bin/true", "--upstream-isolation", "nobody"))
        self.assertIn("--resource", self.refused("--upstream", "a=stdio:/bin/true", "--upstream", "b=stdio:/bin/true", "--resource", "https://gw.example/x"))


class FrontOverSocketTests(OAuthSocketMixin, TestCase):
    """Two upstreams behind our OAuth, over a real socket."""

    timeout = 30

    async def setUp(self) -> None:  # type: ignore[override]
        self.app = await self.serve()
        self.store = await self.open_store()
        mounted = plan(gateway_config.load((), TOML, which=which), self.issuer)
        config = Config(issuer=self.issuer, verify_bearer=verify_bearer, **authorization_settings(mounted))
        self.oauth = OAuthServer(config, self.store, reactor, None)
        clock = Clock()
        self.upstream_app = build_upstream_app(clock)
        self.channels: list[LoopbackChannel] = []

        def connect(owner: Any) -> LoopbackChannel:
            channel = LoopbackChannel(self.upstream_app, clock, owner)
            self.channels.append(channel)
            return channel

        gateways = [(m, Gateway(m.config, clock=reactor, connector=connect)) for m in mounted]
        self.mounted = mount(self.app, self.oauth, None, reactor=reactor, whole_site=True, upstreams=gateways)
        self.addCleanup(self.mounted.shutdown)

    async def mcp(self, path: str, token: str, message: dict[str, Any], session: Optional[str] = None) -> tuple[Any, bytes]:
        headers = dict(JSON, Authorization=["Bearer " + token])
        if session is not None:
            headers["Mcp-Session-Id"] = [session]
        return await self.call("POST", self.issuer + path, data=json.dumps(message).encode(), headers=headers)

    async def initialize(self, path: str, token: str) -> str:
        response, body = await self.mcp(
            path,
            token,
            {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t"}}},
        )
        self.assertEqual(response.code, 200, body)
        [session] = response.headers.getRawHeaders("mcp-session-id")
        await self.mcp(path, token, {"jsonrpc": "2.0", "method": "notifications/initialized"}, session)
        return session

    async def test_metadata_per_upstream(self) -> None:
        """RFC 9728 documents at the path-inserted URLs, each with its own scopes."""
        for name, scopes in (("notes", ["notes", "notes:write"]), ("other", [BASE_SCOPE])):
            response, body = await self.call("GET", f"{self.issuer}/.well-known/oauth-protected-resource/mcp/{name}")
            self.assertEqual(response.code, 200, body)
            document = json.loads(body)
            self.assertEqual((document["resource"], document["scopes_supported"]), (f"{self.issuer}/mcp/{name}", scopes))
        response, _ = await self.mcp("/mcp/notes", "nothing", {"jsonrpc": "2.0", "id": 1, "method": "ping"})
        self.assertEqual(response.code, 401)
        [challenge] = response.headers.getRawHeaders("www-authenticate")
        self.assertIn(f'resource_metadata="{self.issuer}/.well-known/oauth-protected-resource/mcp/notes"', challenge)

    async def test_audience_scopes_and_consent(self) -> None:
        """
        The consent page names the resource and its scopes only; the token
        works at its own upstream, is refused (401) at the other, and a
        tool whose mapped scope it lacks is a 403 C{insufficient_scope}
        step-up before anything reaches the upstream.
        """
        notes = self.issuer + "/mcp/notes"
        token = (await self.token(notes, "notes", SITE_TOKEN))["access_token"]
        self.assertIn(notes, self.page)
        self.assertIn("Use notes", self.page)
        self.assertNotIn("write_*", self.page)
        session = await self.initialize("/mcp/notes", token)
        response, body = await self.mcp(
            "/mcp/notes", token, {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "echo", "arguments": {"text": "hi"}}}, session
        )
        self.assertEqual(response.code, 200, body)
        self.assertIn(b'"hi"', body)
        response, body = await self.mcp(
            "/mcp/notes", token, {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "write_note", "arguments": {"name": "x"}}}, session
        )
        self.assertEqual(response.code, 403, body)
        [challenge] = response.headers.getRawHeaders("www-authenticate")
        self.assertIn('error="insufficient_scope"', challenge)
        self.assertIn('scope="notes notes:write"', challenge)
        self.assertNotIn("write_note", [m.get("params", {}).get("name") for c in self.channels for m, _ in c.sent])
        response, body = await self.mcp("/mcp/other", token, {"jsonrpc": "2.0", "id": 1, "method": "ping"})
        self.assertEqual(response.code, 401, body)
        self.assertIn('error="invalid_token"', response.headers.getRawHeaders("www-authenticate")[0])

    async def test_scope_of_another_resource(self) -> None:
        """Asking, for one upstream, a scope only another maps is C{invalid_scope}."""
        query = {
            "response_type": "code",
            "client_id": await self.register(),
            "redirect_uri": REDIRECT,
            "code_challenge": pkce.s256(VERIFIER),
            "code_challenge_method": "S256",
            "scope": "notes",
            "resource": self.issuer + "/mcp/other",
        }
        response, _ = await self.call("GET", self.issuer + "/oauth/authorize?" + urlencode(query))
        self.assertEqual(response.code, 303)
        location = query_of(response.headers.getRawHeaders("location")[0])
        self.assertEqual(location["error"], ["invalid_scope"])

    async def test_health_and_metrics(self) -> None:
        """
        C{/healthz} shows each upstream's instances and counters; the
        Prometheus figures export the same counters per upstream.
        """
        from prometheus_client import CollectorRegistry, generate_latest

        from smeldr_oauth.gateway.metrics import PrometheusFigures

        token = (await self.token(self.issuer + "/mcp/notes", "notes", SITE_TOKEN))["access_token"]
        session = await self.initialize("/mcp/notes", token)
        await self.mcp(
            "/mcp/notes", token, {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "echo", "arguments": {"text": "hi"}}}, session
        )
        response, body = await self.call("GET", self.issuer + "/healthz")
        self.assertEqual(response.code, 200, body)
        health = json.loads(body)
        self.assertEqual(health["status"], "ok")
        notes = health["upstreams"]["notes"]
        self.assertEqual((notes["live"], notes["metrics"]["by_method"]["tools/call"]), (1, 1))
        self.assertEqual(health["upstreams"]["other"]["live"], 0)
        self.assertNotIn("alice", body.decode())
        registry = CollectorRegistry()
        gateways = [g for _, g in self.mounted.fronts]
        figures = PrometheusFigures(registry, lambda: [g.metrics for g in gateways])
        figures.refresh()
        text = generate_latest(registry).decode()
        self.assertIn('smeldr_gateway_calls_total{method="tools/call",upstream="notes"} 1.0', text)
        self.assertIn('smeldr_gateway_live_instances{upstream="notes"} 1.0', text)
        self.assertIn('smeldr_gateway_request_duration_seconds_count{upstream="notes"}', text)

    async def test_revoked_grant_ends_gateway_sessions(self) -> None:
        """
        Revoking a grant ends the gateway sessions it opened at once: the
        next request on the session is a 401 (the token is dead) and the
        session is gone from the front.
        """
        token = (await self.token(self.issuer + "/mcp/notes", "notes", SITE_TOKEN))["access_token"]
        await self.initialize("/mcp/notes", token)
        front = self.mounted.fronts[0][0]
        self.assertEqual(front.session_count, 1)
        [grant] = await self.store.list_grants()
        self.assertTrue(await self.oauth.revoke_grant(grant.grant_id))
        self.assertEqual(front.session_count, 0)
        response, _ = await self.mcp("/mcp/notes", token, {"jsonrpc": "2.0", "id": 9, "method": "ping"})
        self.assertEqual(response.code, 401)
