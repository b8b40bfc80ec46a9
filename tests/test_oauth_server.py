"""
Tests for L{smeldr_oauth.oauth.server}: the authorization server's protocol
logic, with plain values, a L{MemoryStore} and a L{Clock}.

Every failure test also checks that the store is exactly as it was (a
snapshot of the store's dictionaries before and after), so a refused request
cannot leave a grant, a code or a token behind.
"""

from __future__ import annotations

from contextlib import contextmanager

import json
from typing import Any, Coroutine, Iterator, Optional
from urllib.parse import parse_qs, urlsplit

import attr
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from smeldr_oauth.oauth import errors, pkce
from smeldr_oauth.oauth.cimd import CIMDError
from smeldr_oauth.oauth.config import Config
from smeldr_oauth.oauth.interfaces import IAccessVerifier, IGrantEvents
from smeldr_oauth.oauth.model import AccessInfo, Approval, Client
from smeldr_oauth.oauth.secrets import hash_secret
from smeldr_oauth.oauth.server import AUTHORIZE_PARAMS, AuthorizationRequest, OAuthServer
from smeldr_oauth.store.memory import MemoryStore

ISSUER = "https://as.example"
RESOURCE = ISSUER + "/mcp"
T0 = 1_800_000_000.0

# RFC 7636 Appendix B.
RFC_VERIFIER = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
RFC_CHALLENGE = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"

VERIFIER = "v" * 43 + "-._~0123456789"
CHALLENGE = pkce.s256(VERIFIER)

CIMD_ID = "https://app.example/oauth/client.json"
CIMD_CLIENT = Client(
    client_id=CIMD_ID,
    client_name="Example App",
    redirect_uris=("https://app.example/callback", "http://localhost/callback"),
    kind="cimd",
)
SITE_TOKEN = "site-token-of-alice-0123456789"


def verify_bearer(pasted: str) -> Any:
    """
    The site's C{verify_bearer}: every shape it may answer in.
    """
    if pasted == SITE_TOKEN:
        return Approval(subject="alice", site_token_id="st-1")
    if pasted == "plain-true":
        return True
    if pasted == "subject-bob":
        return "bob"
    if pasted == "deferred-carol":
        return succeed("carol")
    if pasted == "deferred-failing":
        return fail(RuntimeError("database down for deferred-failing"))
    if pasted == "coroutine-dave":

        async def later() -> str:
            return "dave"

        return later()
    if pasted.startswith("raise-"):
        raise ValueError(f"cannot check {pasted}")
    if pasted == "empty-subject":
        return ""
    return False


class FakeResolver:
    """
    Stands in for L{smeldr_oauth.oauth.cimd.CIMDResolver}.
    """

    def __init__(self, clients: dict[str, Client]) -> None:
        self.clients = clients
        self.calls: list[str] = []
        self.broken: Optional[Exception] = None

    def resolve(self, client_id: str) -> "Deferred[Client]":
        self.calls.append(client_id)
        if self.broken is not None:
            return fail(self.broken)
        client = self.clients.get(client_id)
        if client is None:
            return fail(CIMDError("the document could not be fetched"))
        return succeed(client)


def snapshot(store: MemoryStore) -> dict[str, dict[str, Any]]:
    """
    Every dictionary the store keeps, copied: records are frozen, so a
    shallow copy is a faithful picture.
    """
    return {name: dict(value) for name, value in vars(store).items() if isinstance(value, dict)}


def query_of(location: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(location).query, keep_blank_values=True)


def authorize_fields(client_id: str, /, **overrides: Optional[str]) -> dict[str, str]:
    """
    A valid authorization request of C{client_id} (PKCE, state, scopes,
    resource), with C{overrides}; an override of C{None} leaves the field
    out.  The service tests and the HTTP tests start from this one.
    """
    params: dict[str, Optional[str]] = {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": "https://client.example/cb",
        "state": "xyz",
        "code_challenge": CHALLENGE,
        "code_challenge_method": "S256",
        "scope": "read offline_access",
        "resource": RESOURCE,
    }
    params.update(overrides)
    return {k: v for k, v in params.items() if v is not None}


def exchange_fields(client_id: str, code: str, /, **overrides: Optional[str]) -> dict[str, str]:
    """
    A valid code exchange for a code of L{authorize_fields}, with
    C{overrides} (C{None} leaves a field out).
    """
    params: dict[str, Optional[str]] = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": "https://client.example/cb",
        "client_id": client_id,
        "code_verifier": VERIFIER,
        "resource": RESOURCE,
    }
    params.update(overrides)
    return {k: v for k, v in params.items() if v is not None}


class StoreUnchanged(SynchronousTestCase):
    """
    L{unchanged}, for tests of a C{self.store} that a refused request
    must leave as it was.
    """

    store: MemoryStore

    @contextmanager
    def unchanged(self) -> Iterator[None]:
        """
        Check that the block leaves the store exactly as it found it.
        """
        before = snapshot(self.store)
        yield
        self.assertEqual(snapshot(self.store), before)


class ServerTestCase(StoreUnchanged):
    """
    A server on a memory store, a clock, a fake CIMD resolver, and one
    registered public client.
    """

    config_overrides: dict[str, Any] = {}

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        self.store = MemoryStore(self.clock)
        self.resolver = FakeResolver({CIMD_ID: CIMD_CLIENT})
        kw: dict[str, Any] = dict(issuer=ISSUER + "/", verify_bearer=verify_bearer)
        kw.update(self.config_overrides)
        self.config = Config(**kw)
        self.server = OAuthServer(self.config, self.store, self.clock, self.resolver)
        self.revoked: list[str] = []
        self.server.add_revocation_observer(self.revoked.append)
        # Registered as every SDK registers: for both grants.
        registered = self.drive(
            self.server.register(
                {
                    "redirect_uris": ["https://client.example/cb"],
                    "client_name": "Registered",
                    "grant_types": ["authorization_code", "refresh_token"],
                }
            )
        )
        self.client_id = registered["client_id"]

    def reconfigure(self, **overrides: Any) -> None:
        """
        A new server with C{overrides} on the same store, clock and
        resolver (the registered client stays registered).
        """
        kw: dict[str, Any] = dict(issuer=ISSUER + "/", verify_bearer=verify_bearer)
        kw.update(self.config_overrides)
        kw.update(overrides)
        self.config = Config(**kw)
        self.server = OAuthServer(self.config, self.store, self.clock, self.resolver)
        self.server.add_revocation_observer(self.revoked.append)

    # Driving coroutines

    def drive(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return self.successResultOf(Deferred.fromCoroutine(coro))

    def fails(self, coro: Coroutine[Any, Any, Any], *types: type) -> Any:
        return self.failureResultOf(Deferred.fromCoroutine(coro), *types).value

    def oauth_fails(
        self, coro: Coroutine[Any, Any, Any], error: str, status: Optional[int] = None
    ) -> errors.OAuthError:
        e = self.fails(coro, errors.OAuthError)
        self.assertEqual(e.error, error, e.description)
        if status is not None:
            self.assertEqual(e.status, status)
        return e

    # Building requests

    def authorize_params(self, **overrides: Optional[str]) -> dict[str, list[str]]:
        return {k: [v] for k, v in authorize_fields(self.client_id, **overrides).items()}

    def validate(self, params: dict[str, list[str]]) -> AuthorizationRequest:
        return self.drive(self.server.validate_authorization_request(params))

    def redirect_error(self, params: dict[str, list[str]]) -> errors.AuthorizeRedirectError:
        with self.unchanged():
            return self.fails(
                self.server.validate_authorization_request(params), errors.AuthorizeRedirectError
            )

    def untrusted(self, params: dict[str, list[str]]) -> errors.UntrustedRedirect:
        with self.unchanged():
            return self.fails(self.server.validate_authorization_request(params), errors.UntrustedRedirect)

    def code_for(self, approval: Approval = Approval(subject="alice"), **overrides: Optional[str]) -> str:
        request = self.validate(self.authorize_params(**overrides))
        location = self.drive(self.server.approve(request, approval))
        return query_of(location)["code"][0]

    def exchange_params(self, code: str, /, **overrides: Optional[str]) -> dict[str, list[str]]:
        return {k: [v] for k, v in exchange_fields(self.client_id, code, **overrides).items()}

    def tokens(self, **overrides: Optional[str]) -> dict[str, Any]:
        code = self.code_for(**overrides)
        return self.drive(self.server.token(self.exchange_params(code)))

    def refresh(self, refresh_token: str, /, **overrides: Optional[str]) -> dict[str, list[str]]:
        params: dict[str, Optional[str]] = {
            "grant_type": "refresh_token",
            "refresh_token": refresh_token,
            "client_id": self.client_id,
        }
        params.update(overrides)
        return {k: [v] for k, v in params.items() if v is not None}

    def access_info(self, token: str) -> Optional[AccessInfo]:
        return self.successResultOf(self.server.verify_access_token(token))


class MetadataTests(ServerTestCase):
    def test_issuer_byte_identical(self) -> None:
        """
        The issuer has no trailing slash (the configured one had) and is
        byte for byte what the protected resource metadata names: the
        Python SDK compares them.
        """
        as_meta = self.server.authorization_server_metadata()
        pr_meta = self.server.protected_resource_metadata()
        self.assertEqual(as_meta["issuer"], ISSUER)
        self.assertEqual(pr_meta["authorization_servers"], [as_meta["issuer"]])
        self.assertEqual(pr_meta["resource"], RESOURCE)

    def test_fields_clients_depend_on(self) -> None:
        """
        The fields of CLIENTS.md: S256 only, C{none} among the auth
        methods, CIMD on, C{iss} on redirects, response types, and
        C{offline_access} among the scopes (but not the resource's).
        """
        meta = self.server.authorization_server_metadata()
        self.assertEqual(meta["code_challenge_methods_supported"], ["S256"])
        self.assertIn("none", meta["token_endpoint_auth_methods_supported"])
        self.assertIs(meta["client_id_metadata_document_supported"], True)
        self.assertIs(meta["authorization_response_iss_parameter_supported"], True)
        self.assertEqual(meta["response_types_supported"], ["code"])
        self.assertEqual(meta["grant_types_supported"], ["authorization_code", "refresh_token"])
        self.assertIn("offline_access", meta["scopes_supported"])
        self.assertNotIn("offline_access", self.server.protected_resource_metadata()["scopes_supported"])
        for key in (
            "authorization_endpoint",
            "token_endpoint",
            "revocation_endpoint",
            "registration_endpoint",
        ):
            self.assertTrue(meta[key].startswith(ISSUER + "/oauth/"), key)
        json.dumps(meta)

    def test_without_cimd_or_registration(self) -> None:
        config = Config(issuer=ISSUER, verify_bearer=verify_bearer, dynamic_registration=False)
        meta = OAuthServer(config, self.store, self.clock).authorization_server_metadata()
        self.assertIs(meta["client_id_metadata_document_supported"], False)
        self.assertNotIn("registration_endpoint", meta)

    def test_interfaces(self) -> None:
        self.assertTrue(verifyObject(IAccessVerifier, self.server))
        self.assertTrue(verifyObject(IGrantEvents, self.server))


class AuthorizeValidationTests(ServerTestCase):
    def test_valid(self) -> None:
        request = self.validate(self.authorize_params())
        self.assertEqual(request.client.client_id, self.client_id)
        self.assertEqual(request.redirect_uri, "https://client.example/cb")
        self.assertEqual(request.scopes, ("read", "offline_access"))
        self.assertEqual(request.state, "xyz")
        self.assertEqual(request.resource, RESOURCE)

    def test_defaults(self) -> None:
        """
        No scope (ChatGPT reconnecting), no resource, no state (TypeScript):
        the default scopes, our resource, no state.
        """
        request = self.validate(self.authorize_params(scope=None, resource=None, state=None))
        self.assertEqual(request.scopes, ("read", "write"))
        self.assertEqual(request.resource, RESOURCE)
        self.assertIsNone(request.state)
        self.assertNotIn("state", dict(request.form_fields()))

    def test_blank_scope_defaults(self) -> None:
        self.assertEqual(self.validate(self.authorize_params(scope="  ")).scopes, ("read", "write"))

    def test_resource_canonicalised(self) -> None:
        for value in (
            RESOURCE + "/",
            "HTTPS://AS.EXAMPLE/mcp",
            "https://as.example:443/mcp",
            RESOURCE + "?from=chatgpt",
        ):
            self.assertEqual(self.validate(self.authorize_params(resource=value)).resource, RESOURCE, value)

    def test_resource_mismatch(self) -> None:
        for value in ("https://other.example/mcp", RESOURCE + "/other", "not a url", "ftp://as.example/mcp"):
            e = self.redirect_error(self.authorize_params(resource=value))
            self.assertEqual(e.error.error, "invalid_target", value)
            self.assertEqual(e.state, "xyz")

    def test_two_resources(self) -> None:
        params = self.authorize_params()
        params["resource"] = [RESOURCE, RESOURCE]
        self.assertEqual(self.redirect_error(params).error.error, "invalid_target")

    def test_unknown_client(self) -> None:
        e = self.untrusted(self.authorize_params(client_id="nobody"))
        self.assertEqual(e.title, "Unknown application")

    def test_missing_client_id(self) -> None:
        self.untrusted(self.authorize_params(client_id=None))
        self.untrusted(self.authorize_params(client_id=""))

    def test_client_id_oversized(self) -> None:
        self.untrusted(self.authorize_params(client_id="x" * 5000))

    def test_redirect_uri_not_registered(self) -> None:
        for uri in (
            "https://client.example/cb/",
            "https://client.example/cb?x=1",
            "https://evil.example/cb",
            "http://client.example/cb",
            "https://client.example/cb#frag",
        ):
            e = self.untrusted(self.authorize_params(redirect_uri=uri))
            self.assertEqual(e.title, "Unexpected return address", uri)

    def test_repeated_client_id_or_redirect_uri(self) -> None:
        """
        Before the redirect URI is trusted, a repeated parameter gets a
        page, not a redirect.
        """
        for name in ("client_id", "redirect_uri", "state"):
            params = self.authorize_params()
            params[name] = params[name] * 2
            self.untrusted(params)

    def test_repeated_parameters(self) -> None:
        """
        Every other parameter repeated is an invalid_request redirect.
        """
        for name in AUTHORIZE_PARAMS:
            if name in ("client_id", "redirect_uri", "state"):
                continue
            params = self.authorize_params(prompt="consent", response_mode="query")
            params[name] = params[name] * 2
            e = self.redirect_error(params)
            self.assertEqual(e.error.error, "invalid_request", name)
            self.assertIn(name, e.error.description)

    def test_unknown_parameters_ignored(self) -> None:
        params = self.authorize_params()
        params["utm_source"] = ["a", "b"]
        self.validate(params)

    def test_redirect_uri_defaulted(self) -> None:
        """
        A client with one fixed redirect URI may leave it out.
        """
        self.assertEqual(
            self.validate(self.authorize_params(redirect_uri=None)).redirect_uri, "https://client.example/cb"
        )

    def test_redirect_uri_required_when_ambiguous(self) -> None:
        """
        Several redirect URIs, or a loopback one (whose port the client
        chooses), cannot be defaulted.
        """
        self.untrusted(self.authorize_params(client_id=CIMD_ID, redirect_uri=None))
        loopback = self.drive(self.server.register({"redirect_uris": ["http://127.0.0.1/callback"]}))
        self.untrusted(self.authorize_params(client_id=loopback["client_id"], redirect_uri=None))

    def test_loopback_any_port(self) -> None:
        """
        Claude Code registers C{http://localhost/callback} and calls back
        on an ephemeral port (RFC 8252).
        """
        request = self.validate(
            self.authorize_params(client_id=CIMD_ID, redirect_uri="http://localhost:53682/callback")
        )
        self.assertEqual(request.redirect_uri, "http://localhost:53682/callback")
        self.untrusted(self.authorize_params(client_id=CIMD_ID, redirect_uri="http://localhost:53682/other"))
        self.untrusted(
            self.authorize_params(client_id=CIMD_ID, redirect_uri="http://127.0.0.1:53682/callback")
        )

    def test_cimd_client(self) -> None:
        request = self.validate(
            self.authorize_params(client_id=CIMD_ID, redirect_uri="https://app.example/callback")
        )
        self.assertEqual(request.client, CIMD_CLIENT)
        self.assertEqual(self.resolver.calls, [CIMD_ID])

    def test_cimd_refused(self) -> None:
        """
        A document that cannot be used is an unknown client; the reason is
        logged.
        """
        with capturedLogs() as events:
            self.untrusted(self.authorize_params(client_id="https://app.example/missing.json"))
        [event] = [e for e in events if e.get("smeldr_event") == "cimd_refused"]
        self.assertIn("could not be fetched", formatEvent(event))

    def test_cimd_resolver_bug(self) -> None:
        """
        An unexpected exception from the resolver is an unknown client, not
        a crash.
        """
        self.resolver.broken = KeyError("boom")
        with capturedLogs():
            self.untrusted(self.authorize_params(client_id=CIMD_ID))
        self.flushLoggedErrors(KeyError)

    def test_cimd_off(self) -> None:
        """
        Without a resolver a URL client id is looked up among registrations
        (and is not found).
        """
        server = OAuthServer(self.config, self.store, self.clock)
        self.fails(
            server.validate_authorization_request(self.authorize_params(client_id=CIMD_ID)),
            errors.UntrustedRedirect,
        )

    def test_response_type(self) -> None:
        for value, error in (
            ("token", "unsupported_response_type"),
            (None, "invalid_request"),
            ("code token", "unsupported_response_type"),
        ):
            e = self.redirect_error(self.authorize_params(response_type=value))
            self.assertEqual(e.error.error, error, value)
            self.assertEqual(e.state, "xyz")
            self.assertEqual(e.redirect_uri, "https://client.example/cb")

    def test_pkce_required(self) -> None:
        for overrides in (
            {"code_challenge": None},
            {"code_challenge_method": None},
            {"code_challenge_method": "plain"},
            {"code_challenge": "short"},
            {"code_challenge": CHALLENGE + "="},
            {"code_challenge": "+" * 43},
        ):
            e = self.redirect_error(self.authorize_params(**overrides))
            self.assertEqual(e.error.error, "invalid_request", overrides)

    def test_unknown_scope(self) -> None:
        e = self.redirect_error(self.authorize_params(scope='read admin "quoted"'))
        self.assertEqual(e.error.error, "invalid_scope")
        self.assertNotIn('"', e.error.description)

    def test_prompt(self) -> None:
        """
        C{prompt=consent} (the Python SDK with offline_access) is honoured
        by always asking; C{prompt=none} cannot be.
        """
        for value in ("consent", "login", "select_account", "login consent", "unknown-value"):
            self.validate(self.authorize_params(prompt=value))
        self.assertEqual(
            self.redirect_error(self.authorize_params(prompt="none")).error.error, "login_required"
        )
        self.assertEqual(
            self.redirect_error(self.authorize_params(prompt="none consent")).error.error, "invalid_request"
        )

    def test_response_mode(self) -> None:
        self.validate(self.authorize_params(response_mode="query"))
        for value in ("fragment", "form_post"):
            e = self.redirect_error(self.authorize_params(response_mode=value))
            self.assertEqual(e.error.error, "invalid_request")

    def test_state_too_long(self) -> None:
        """
        A state too long to echo is refused without echoing it.
        """
        e = self.redirect_error(self.authorize_params(state="s" * 1500))
        self.assertIsNone(e.state)
        self.assertNotIn("state", query_of(self.server.error_redirect(e)))

    def test_oversized_parameter(self) -> None:
        e = self.redirect_error(self.authorize_params(scope="read " * 1000))
        self.assertEqual(e.error.error, "invalid_request")

    def test_hostile_values(self) -> None:
        """
        NULs, control characters and markup are refused or carried as data.
        """
        self.untrusted(self.authorize_params(redirect_uri="https://client.example/cb\x00"))
        self.untrusted(self.authorize_params(client_id="<script>\x00"))
        request = self.validate(self.authorize_params(state="<b>&amp;\x00\u2028"))
        self.assertEqual(request.state, "<b>&amp;\x00\u2028")

    def test_error_redirect(self) -> None:
        """
        An error redirect carries error, state and iss (RFC 9207), and keeps
        the redirect URI's own query.
        """
        e = errors.AuthorizeRedirectError(
            "https://client.example/cb?x=%ZZ&y", "a&b=c#d", errors.invalid_scope("nope")
        )
        location = self.server.error_redirect(e)
        self.assertTrue(location.startswith("https://client.example/cb?x=%ZZ&y&"), location)
        q = query_of(location)
        self.assertEqual(q["error"], ["invalid_scope"])
        self.assertEqual(q["state"], ["a&b=c#d"])
        self.assertEqual(q["iss"], [ISSUER])

    def test_error_redirect_without_state(self) -> None:
        e = errors.AuthorizeRedirectError("https://client.example/cb", None, errors.invalid_scope("nope"))
        q = query_of(self.server.error_redirect(e))
        self.assertNotIn("state", q)
        self.assertEqual(q["iss"], [ISSUER])

    def test_deny(self) -> None:
        request = self.validate(self.authorize_params())
        with self.unchanged():
            location = self.server.deny(request)
        q = query_of(location)
        self.assertEqual((q["error"], q["state"], q["iss"]), (["access_denied"], ["xyz"], [ISSUER]))

    def test_form_fields_revalidate(self) -> None:
        """
        The consent form's hidden fields validate to the same request.
        """
        request = self.validate(self.authorize_params(scope=None, resource=RESOURCE + "/"))
        again = self.validate({k: [v] for k, v in request.form_fields()})
        self.assertEqual(again, request)


class PasteTests(ServerTestCase):
    def verify(self, pasted: str) -> Optional[Approval]:
        return self.drive(self.server.verify_paste(pasted))

    def test_shapes(self) -> None:
        """
        C{verify_bearer} may answer an Approval, True, a subject, or a
        Deferred or coroutine of one.
        """
        self.assertEqual(self.verify(SITE_TOKEN), Approval(subject="alice", site_token_id="st-1"))
        self.assertEqual(self.verify("plain-true"), Approval(subject="site"))
        self.assertEqual(self.verify("subject-bob"), Approval(subject="bob"))
        self.assertEqual(self.verify("deferred-carol"), Approval(subject="carol"))
        self.assertEqual(self.verify("coroutine-dave"), Approval(subject="dave"))

    def test_refusals(self) -> None:
        for pasted in ("wrong", "", "empty-subject", "x" * 5000):
            self.assertIsNone(self.verify(pasted), pasted)

    def test_accepted_events(self) -> None:
        """
        A paste accepted to sign in to a page (connected apps, the flow
        timeline) is an info event naming the token; on the consent form it
        is not (C{grant_approved} that follows names it).
        """
        with capturedLogs() as events:
            self.drive(self.server.check_paste(SITE_TOKEN, "192.0.2.1"))
        [accepted] = [e for e in events if e["log_level"].name == "info"]
        self.assertEqual((accepted["site_token_id"], accepted["subject"]), ("st-1", "alice"))
        self.assertIn("to sign in to a page", formatEvent(accepted))
        request = self.validate(self.authorize_params())
        with capturedLogs() as events:
            self.drive(self.server.check_paste(SITE_TOKEN, "192.0.2.1", request))
        self.assertEqual([e for e in events if e["log_level"].name == "info"], [])

    def test_exceptions_refuse_without_logging_the_token(self) -> None:
        """
        A C{verify_bearer} that raises (even quoting the token) refuses, and
        the token does not reach the log.
        """
        with capturedLogs() as events:
            self.assertIsNone(self.verify("raise-secret-paste"))
            self.assertIsNone(self.verify("deferred-failing"))
        self.assertTrue(events)
        for event in events:
            text = formatEvent(event) + repr(event)
            self.assertNotIn("raise-secret-paste", text)
            self.assertNotIn("deferred-failing", text)


class CodeGrantTests(ServerTestCase):
    def test_approve(self) -> None:
        """
        Approval stores a grant and the code's hash, never the code, and
        redirects with code, state and iss.
        """
        request = self.validate(self.authorize_params())
        with capturedLogs() as events:
            location = self.drive(self.server.approve(request, Approval(subject="alice", site_token_id="st-1")))
        # The one info event of a consent: who approved, with which token.
        [approved] = [e for e in events if e.get("smeldr_event") == "grant_approved"]
        self.assertEqual((approved["subject"], approved["site_token_id"]), ("alice", "st-1"))
        self.assertTrue(location.startswith("https://client.example/cb?code="))
        q = query_of(location)
        self.assertEqual((q["state"], q["iss"]), (["xyz"], [ISSUER]))
        code = q["code"][0]
        self.assertNotIn(code, repr(snapshot(self.store)))
        [grant] = self.successResultOf(self.store.list_grants())
        self.assertEqual(
            (grant.subject, grant.site_token_id, grant.client_id), ("alice", "st-1", self.client_id)
        )

    def test_grant_ids_in_creation_order(self) -> None:
        """
        Each grant's id starts with the milliseconds of its approval: the
        grants made one after another sort one after another (see
        L{smeldr_oauth.oauth.secrets.new_ordered_id}).
        """
        made = []
        for _ in range(5):
            self.code_for()
            made.append(self.clock.seconds())
            self.clock.advance(0.002)
        grants = sorted(self.successResultOf(self.store.list_grants()), key=lambda g: g.created_at)
        self.assertEqual([g.grant_id[:12] for g in grants], ["%012x" % int(now * 1000) for now in made])
        self.assertEqual(sorted(g.grant_id for g in grants), [g.grant_id for g in grants])

    def test_exchange(self) -> None:
        body = self.tokens()
        self.assertEqual(body["token_type"], "Bearer")
        self.assertEqual(body["expires_in"], 3600)
        self.assertEqual(body["scope"], "read offline_access")
        self.assertIn("refresh_token", body)
        info = self.access_info(body["access_token"])
        assert info is not None
        self.assertEqual((info.subject, info.client_id, info.resource), ("alice", self.client_id, RESOURCE))
        self.assertEqual(info.scopes, frozenset({"read", "offline_access"}))
        self.assertNotIn(body["access_token"], repr(snapshot(self.store)))
        self.assertNotIn(body["refresh_token"], repr(snapshot(self.store)))

    def test_no_refresh_without_offline_access(self) -> None:
        """
        With C{refresh_for_refresh_grant_clients} off (C{--offline-access-only}),
        only C{offline_access} earns a refresh token.
        """
        self.reconfigure(refresh_for_refresh_grant_clients=False)
        self.assertNotIn("refresh_token", self.tokens(scope="read"))

    def test_refresh_for_refresh_grant_clients(self) -> None:
        """
        By default, clients whose metadata lists the refresh_token grant get
        one even without offline_access (the TypeScript SDK and Python SDK
        1.x never ask for it).
        """
        self.assertTrue(self.server.config.refresh_for_refresh_grant_clients)
        self.assertIn("refresh_token", self.tokens(scope="read"))

    def test_rfc7636_appendix_b(self) -> None:
        self.assertEqual(pkce.s256(RFC_VERIFIER), RFC_CHALLENGE)
        code = self.code_for(code_challenge=RFC_CHALLENGE)
        body = self.drive(self.server.token(self.exchange_params(code, code_verifier=RFC_VERIFIER)))
        self.assertIn("access_token", body)

    def test_wrong_verifier(self) -> None:
        """
        A wrong verifier fails, and spends the code: it never works again,
        not even with the right verifier.
        """
        code = self.code_for()
        self.oauth_fails(
            self.server.token(self.exchange_params(code, code_verifier="w" * 43)), "invalid_grant"
        )
        self.oauth_fails(self.server.token(self.exchange_params(code)), "invalid_grant")

    def test_malformed_verifier_changes_nothing(self) -> None:
        code = self.code_for()
        for verifier in ("short", "!" * 43, "v" * 129):
            with self.unchanged():
                self.oauth_fails(
                    self.server.token(self.exchange_params(code, code_verifier=verifier)), "invalid_grant"
                )
        self.drive(self.server.token(self.exchange_params(code)))

    def test_wrong_client(self) -> None:
        other = self.drive(self.server.register({"redirect_uris": ["https://client.example/cb"]}))
        code = self.code_for()
        self.oauth_fails(
            self.server.token(self.exchange_params(code, client_id=other["client_id"])), "invalid_grant"
        )

    def test_wrong_redirect_uri(self) -> None:
        code = self.code_for()
        self.oauth_fails(
            self.server.token(self.exchange_params(code, redirect_uri="https://client.example/other")),
            "invalid_grant",
        )

    def test_redirect_uri_optional(self) -> None:
        code = self.code_for()
        self.drive(self.server.token(self.exchange_params(code, redirect_uri=None)))

    def test_expired_code(self) -> None:
        code = self.code_for()
        self.clock.advance(300)
        self.oauth_fails(self.server.token(self.exchange_params(code)), "invalid_grant")

    def test_code_ttl_configurable(self) -> None:
        self.reconfigure(auth_code_ttl=10)
        code = self.code_for()
        self.clock.advance(10)
        self.oauth_fails(self.server.token(self.exchange_params(code)), "invalid_grant")

    def test_unknown_code(self) -> None:
        with self.unchanged():
            self.oauth_fails(self.server.token(self.exchange_params("nope")), "invalid_grant")

    def test_exchange_is_one_store_call(self) -> None:
        """
        The code is spent and the tokens stored by one atomic store call
        (L{IOAuthStore.exchange_code}): the server never spends a code with
        C{consume_code} and stores tokens with C{add_tokens} afterwards,
        where a crash between the two would spend the code for nothing.
        """

        def forbidden(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError("the code exchange must be one store call")

        code = self.code_for()
        self.store.consume_code = forbidden  # type: ignore[method-assign]
        self.store.add_tokens = forbidden  # type: ignore[method-assign]
        body = self.drive(self.server.token(self.exchange_params(code)))
        self.assertIsNotNone(self.access_info(body["access_token"]))
        self.assertIn("refresh_token", body)

    def test_refused_exchange_stores_no_token(self) -> None:
        """
        A refused exchange (wrong verifier) spends the code and stores no
        token: the store holds exactly what it held, but for the spent code.
        """
        code = self.code_for()
        before = self.successResultOf(self.store.list_grants())
        self.oauth_fails(self.server.token(self.exchange_params(code, code_verifier="w" * 43)), "invalid_grant")
        self.assertEqual([g.grant_id for g in self.successResultOf(self.store.list_grants())], [g.grant_id for g in before])
        self.assertEqual((snapshot(self.store)["_access"], snapshot(self.store)["_refresh"]), ({}, {}))

    def test_replay_revokes_tokens(self) -> None:
        """
        A replayed code fails and ends everything issued from it.
        """
        code = self.code_for()
        body = self.drive(self.server.token(self.exchange_params(code)))
        self.assertIsNotNone(self.access_info(body["access_token"]))
        self.oauth_fails(self.server.token(self.exchange_params(code)), "invalid_grant")
        self.assertIsNone(self.access_info(body["access_token"]))
        self.oauth_fails(self.server.token(self.refresh(body["refresh_token"])), "invalid_grant")
        self.assertEqual(len(self.revoked), 1)
        self.assertEqual(self.successResultOf(self.store.list_grants()), [])

    def test_resource(self) -> None:
        code = self.code_for()
        self.drive(self.server.token(self.exchange_params(code, resource=RESOURCE + "/")))

    def test_resource_mismatch_changes_nothing(self) -> None:
        code = self.code_for()
        for resource in ("https://other.example/mcp", "garbage"):
            with self.unchanged():
                self.oauth_fails(
                    self.server.token(self.exchange_params(code, resource=resource)), "invalid_target"
                )
        self.drive(self.server.token(self.exchange_params(code)))

    def test_bad_requests_change_nothing(self) -> None:
        """
        Missing, repeated, oversized or unknown parameters: the standard
        error, and the code is still good afterwards.
        """
        code = self.code_for()
        cases: list[tuple[dict[str, list[str]], str, int]] = []
        for name in ("grant_type", "code", "code_verifier"):
            p = self.exchange_params(code)
            del p[name]
            cases.append((p, "invalid_request", 400))
        for name in ("grant_type", "code", "code_verifier", "redirect_uri", "client_id"):
            p = self.exchange_params(code)
            p[name] = p[name] * 2
            cases.append((p, "invalid_request", 400))
        p = self.exchange_params(code)
        p["resource"] = [RESOURCE, RESOURCE]
        cases.append((p, "invalid_target", 400))
        cases.append((self.exchange_params(code, code="c" * 3000), "invalid_request", 400))
        cases.append((self.exchange_params(code, grant_type="password"), "unsupported_grant_type", 400))
        cases.append(
            (self.exchange_params(code, grant_type="client_credentials"), "unsupported_grant_type", 400)
        )
        cases.append((self.exchange_params(code, client_id=None), "invalid_client", 401))
        cases.append((self.exchange_params(code, client_id="unknown"), "invalid_client", 401))
        cases.append((self.exchange_params(code, client_id="u" * 3000), "invalid_request", 400))
        cases.append((self.exchange_params(code, client_secret="guess"), "invalid_client", 401))
        for params, error, status in cases:
            with self.unchanged():
                self.oauth_fails(self.server.token(params), error, status)
        self.drive(self.server.token(self.exchange_params(code)))

    def test_cimd_client(self) -> None:
        code = self.code_for(client_id=CIMD_ID, redirect_uri="http://localhost:4444/callback")
        body = self.drive(
            self.server.token(
                self.exchange_params(code, client_id=CIMD_ID, redirect_uri="http://localhost:4444/callback")
            )
        )
        info = self.access_info(body["access_token"])
        assert info is not None
        self.assertEqual(info.client_id, CIMD_ID)


class ConfidentialClientTests(ServerTestCase):
    def setUp(self) -> None:
        super().setUp()
        registered = self.drive(
            self.server.register(
                {
                    "redirect_uris": ["https://client.example/cb"],
                    "token_endpoint_auth_method": "client_secret_basic",
                }
            )
        )
        self.client_id = registered["client_id"]
        self.secret = registered["client_secret"]
        self.assertEqual(registered["client_secret_expires_at"], 0)

    def test_basic(self) -> None:
        code = self.code_for()
        self.drive(
            self.server.token(self.exchange_params(code, client_id=None), basic=(self.client_id, self.secret))
        )

    def test_basic_with_matching_client_id(self) -> None:
        code = self.code_for()
        self.drive(self.server.token(self.exchange_params(code), basic=(self.client_id, self.secret)))

    def test_post(self) -> None:
        code = self.code_for()
        self.drive(self.server.token(self.exchange_params(code, client_secret=self.secret)))

    def test_refused(self) -> None:
        """
        No secret, a wrong one, two methods at once, or a Basic user that
        contradicts client_id: refused before the code is spent.
        """
        code = self.code_for()
        cases: list[tuple[dict[str, list[str]], Any, str]] = [
            (self.exchange_params(code), None, "invalid_client"),
            (self.exchange_params(code, client_secret="wrong"), None, "invalid_client"),
            (self.exchange_params(code, client_id=None), (self.client_id, "wrong"), "invalid_client"),
            (self.exchange_params(code, client_id=None), (self.client_id, ""), "invalid_client"),
            (
                self.exchange_params(code, client_secret=self.secret),
                (self.client_id, self.secret),
                "invalid_request",
            ),
            (
                self.exchange_params(code, client_id="someone-else"),
                (self.client_id, self.secret),
                "invalid_client",
            ),
        ]
        for params, basic, error in cases:
            with self.unchanged():
                self.oauth_fails(self.server.token(params, basic=basic), error)
        self.drive(self.server.token(self.exchange_params(code, client_secret=self.secret)))

    def test_public_client_empty_basic_password(self) -> None:
        """
        Some libraries send C{client_id:} in Basic for a public client.
        """
        public = self.drive(self.server.register({"redirect_uris": ["https://client.example/cb"]}))
        self.client_id = public["client_id"]
        code = self.code_for()
        self.drive(self.server.token(self.exchange_params(code, client_id=None), basic=(self.client_id, "")))


class RefreshTests(ServerTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.first = self.tokens(scope="read write offline_access")

    def test_rotation(self) -> None:
        body = self.drive(self.server.token(self.refresh(self.first["refresh_token"])))
        self.assertNotEqual(body["refresh_token"], self.first["refresh_token"])
        self.assertEqual(body["scope"], "read write offline_access")
        self.assertIsNotNone(self.access_info(body["access_token"]))
        # The old access token lives on until it expires.
        self.assertIsNotNone(self.access_info(self.first["access_token"]))
        again = self.drive(self.server.token(self.refresh(body["refresh_token"])))
        self.assertIn("refresh_token", again)

    def test_known_client_not_awaited(self) -> None:
        """
        A refresh by a client the resolver already knows is authenticated
        at once (C{authenticated_now}), without the C{authenticate}
        coroutine; one it does not know yet still goes through it.
        """
        resolver = self.server.tokens.clients
        awaited: list[Any] = []
        authenticate = resolver.authenticate

        def counted(*a: Any, **kw: Any) -> Any:
            awaited.append(a)
            return authenticate(*a, **kw)

        self.patch(resolver, "authenticate", counted)
        body = self.drive(self.server.token(self.refresh(self.first["refresh_token"])))
        self.assertIn("refresh_token", body)
        self.assertEqual(awaited, [])
        resolver._known.clear()
        self.drive(self.server.token(self.refresh(body["refresh_token"])))
        self.assertEqual(len(awaited), 1)

    def test_narrowing(self) -> None:
        body = self.drive(self.server.token(self.refresh(self.first["refresh_token"], scope="read")))
        self.assertEqual(body["scope"], "read")
        info = self.access_info(body["access_token"])
        assert info is not None
        self.assertEqual(info.scopes, frozenset({"read"}))
        # The grant keeps its scopes: the next refresh may ask for all again.
        wide = self.drive(self.server.token(self.refresh(body["refresh_token"], scope="read write")))
        self.assertEqual(wide["scope"], "read write")

    def test_widening_refused(self) -> None:
        narrow = self.tokens(scope="read offline_access")
        with self.unchanged():
            self.oauth_fails(
                self.server.token(self.refresh(narrow["refresh_token"], scope="read write")), "invalid_scope"
            )
        with self.unchanged():
            self.oauth_fails(
                self.server.token(self.refresh(narrow["refresh_token"], scope="admin")), "invalid_scope"
            )
        self.drive(self.server.token(self.refresh(narrow["refresh_token"], scope="read")))

    def test_grace_window(self) -> None:
        """
        The previous token may be used again within the grace window
        (parallel refreshes): the grant survives.
        """
        second = self.drive(self.server.token(self.refresh(self.first["refresh_token"])))
        self.clock.advance(30)
        parallel = self.drive(self.server.token(self.refresh(self.first["refresh_token"])))
        self.assertIsNotNone(self.access_info(parallel["access_token"]))
        self.assertIsNotNone(self.access_info(second["access_token"]))
        self.assertEqual(self.revoked, [])

    def test_reuse_after_grace_revokes(self) -> None:
        second = self.drive(self.server.token(self.refresh(self.first["refresh_token"])))
        self.assertIsNotNone(self.access_info(second["access_token"]))
        self.clock.advance(61)
        self.oauth_fails(self.server.token(self.refresh(self.first["refresh_token"])), "invalid_grant")
        self.assertIsNone(self.access_info(second["access_token"]))
        self.oauth_fails(self.server.token(self.refresh(second["refresh_token"])), "invalid_grant")
        self.assertEqual(len(self.revoked), 1)

    def test_older_generation_revokes(self) -> None:
        second = self.drive(self.server.token(self.refresh(self.first["refresh_token"])))
        third = self.drive(self.server.token(self.refresh(second["refresh_token"])))
        self.oauth_fails(self.server.token(self.refresh(self.first["refresh_token"])), "invalid_grant")
        self.assertIsNone(self.access_info(third["access_token"]))

    def test_idle_expiry(self) -> None:
        self.clock.advance(30 * 24 * 3600)
        self.oauth_fails(self.server.token(self.refresh(self.first["refresh_token"])), "invalid_grant")

    def test_use_extends_lifetime(self) -> None:
        self.clock.advance(29 * 24 * 3600)
        second = self.drive(self.server.token(self.refresh(self.first["refresh_token"])))
        self.clock.advance(29 * 24 * 3600)
        self.drive(self.server.token(self.refresh(second["refresh_token"])))

    def test_other_client_revokes(self) -> None:
        """
        A refresh token presented by another client is a stolen one.
        """
        other = self.drive(self.server.register({"redirect_uris": ["https://client.example/cb"]}))
        with capturedLogs() as events:
            self.oauth_fails(
                self.server.token(self.refresh(self.first["refresh_token"], client_id=other["client_id"])),
                "invalid_grant",
            )
        self.assertIn("refresh_wrong_client", [e.get("smeldr_event") for e in events])
        self.assertIsNone(self.access_info(self.first["access_token"]))
        self.assertEqual(len(self.revoked), 1)

    def test_bad_requests_change_nothing(self) -> None:
        token = self.first["refresh_token"]
        cases = [
            (self.refresh(token, refresh_token=None), "invalid_request"),
            (self.refresh("unknown"), "invalid_grant"),
            (self.refresh(token, resource="https://other.example/mcp"), "invalid_target"),
            (self.refresh(token, client_id="unknown"), "invalid_client"),
            (self.refresh(token, client_id=None), "invalid_client"),
            (self.refresh("r" * 3000), "invalid_request"),
        ]
        p = self.refresh(token)
        p["refresh_token"] = [token, token]
        cases.append((p, "invalid_request"))
        p = self.refresh(token, scope="read")
        p["scope"] = ["read", "write"]
        cases.append((p, "invalid_request"))
        for params, error in cases:
            with self.unchanged():
                self.oauth_fails(self.server.token(params), error)
        self.drive(self.server.token(self.refresh(token, resource=RESOURCE)))

    def test_revoked_grant(self) -> None:
        info = self.access_info(self.first["access_token"])
        assert info is not None
        self.assertTrue(self.drive(self.server.revoke_grant(info.grant_id)))
        self.oauth_fails(self.server.token(self.refresh(self.first["refresh_token"])), "invalid_grant")
        self.assertFalse(self.drive(self.server.revoke_grant(info.grant_id)))


class RevocationTests(ServerTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.body = self.tokens()

    def revoke(self, **params: str) -> None:
        self.assertIsNone(self.drive(self.server.revoke({k: [v] for k, v in params.items()})))

    def test_access_token(self) -> None:
        """
        Revoking an access token ends it at once, even though it is cached,
        and leaves the grant alone.
        """
        self.assertIsNotNone(self.access_info(self.body["access_token"]))
        self.revoke(token=self.body["access_token"], token_type_hint="access_token")
        self.assertIsNone(self.access_info(self.body["access_token"]))
        self.assertEqual(self.revoked, [])
        self.drive(self.server.token(self.refresh(self.body["refresh_token"])))

    def test_refresh_token_ends_grant(self) -> None:
        self.assertIsNotNone(self.access_info(self.body["access_token"]))
        self.revoke(token=self.body["refresh_token"], client_id=self.client_id)
        self.assertIsNone(self.access_info(self.body["access_token"]))
        self.assertEqual(len(self.revoked), 1)
        self.oauth_fails(self.server.token(self.refresh(self.body["refresh_token"])), "invalid_grant")

    def test_unknown_tokens(self) -> None:
        """
        Unknown, oversized or oddly hinted tokens: success, nothing changes.
        """
        for token, hint in (("unknown", "refresh_token"), ("x" * 5000, "access_token"), ("y", "id_token")):
            with self.unchanged():
                self.revoke(token=token, token_type_hint=hint)

    def test_bad_requests(self) -> None:
        for params, error in (
            ({}, "invalid_request"),
            ({"token": [""]}, "invalid_request"),
            ({"token": ["a", "b"]}, "invalid_request"),
            ({"token": ["a"], "token_type_hint": ["a", "b"]}, "invalid_request"),
            (
                {"token": [self.body["access_token"]], "client_id": [self.client_id], "client_secret": ["x"]},
                "invalid_client",
            ),
        ):
            with self.unchanged():
                self.oauth_fails(self.server.revoke(params), error)
        self.assertIsNotNone(self.access_info(self.body["access_token"]))

    def test_confidential_client(self) -> None:
        registered = self.drive(
            self.server.register(
                {
                    "redirect_uris": ["https://client.example/cb"],
                    "token_endpoint_auth_method": "client_secret_post",
                }
            )
        )
        params = {"token": [self.body["access_token"]], "client_id": [registered["client_id"]]}
        with self.unchanged():
            self.oauth_fails(
                self.server.revoke(params, basic=(registered["client_id"], "wrong")), "invalid_client"
            )
        # Authenticated, but the token is another client's: a 200 that
        # changes nothing (RFC 7009 section 2.1).
        with self.unchanged():
            self.drive(
                self.server.revoke(params, basic=(registered["client_id"], registered["client_secret"]))
            )
        self.assertIsNotNone(self.access_info(self.body["access_token"]))


class RegistrationTests(ServerTestCase):
    def register(self, metadata: Any) -> dict[str, Any]:
        return self.drive(self.server.register(metadata))

    def test_public_by_default(self) -> None:
        body = self.register(
            {
                "redirect_uris": [
                    "https://claude.ai/api/mcp/auth_callback",
                    "http://localhost:6274/oauth/callback",
                ],
                "client_name": "Claude",
                "scope": "read offline_access",
                "client_uri": "https://claude.ai",
                "unknown_field": {"ignored": True},
            }
        )
        self.assertEqual(body["token_endpoint_auth_method"], "none")
        self.assertNotIn("client_secret", body)
        self.assertEqual(body["client_id_issued_at"], int(T0))
        self.assertEqual(body["grant_types"], ["authorization_code"])
        self.assertEqual(body["response_types"], ["code"])
        client = self.successResultOf(self.store.get_client(body["client_id"]))
        assert client is not None
        self.assertIsNone(client.client_secret_hash)
        self.assertEqual(client.client_name, "Claude")

    def test_grant_types_default(self) -> None:
        """
        Without C{grant_types} a client registers for C{authorization_code}
        alone (RFC 7591 section 2), so it gets a refresh token only by
        asking for C{offline_access}; one that names the refresh grant gets
        one without (C{refresh_for_refresh_grant_clients}).
        """
        plain = self.register({"redirect_uris": ["https://client.example/cb"]})["client_id"]
        both = self.register(
            {"redirect_uris": ["https://client.example/cb"], "grant_types": ["authorization_code", "refresh_token"]}
        )["client_id"]
        stored = self.successResultOf(self.store.get_client(plain))
        assert stored is not None
        self.assertEqual(stored.grant_types, ("authorization_code",))
        self.client_id = plain
        self.assertNotIn("refresh_token", self.tokens(scope="read"))
        self.assertIn("refresh_token", self.tokens(scope="read offline_access"))
        self.client_id = both
        self.assertIn("refresh_token", self.tokens(scope="read"))

    def test_name_cleaned(self) -> None:
        """
        Control and format characters cannot forge log lines or disguise
        the name on the consent page.
        """
        body = self.register(
            {"redirect_uris": ["https://client.example/cb"], "client_name": "Good\nApp\u202e\u200b  x"}
        )
        self.assertEqual(body["client_name"], "Good App x")
        client = self.successResultOf(self.store.get_client(body["client_id"]))
        assert client is not None
        self.assertEqual(client.client_name, "Good App x")

    def test_secret_hashed(self) -> None:
        body = self.register(
            {
                "redirect_uris": ["https://client.example/cb"],
                "token_endpoint_auth_method": "client_secret_post",
            }
        )
        self.assertNotIn(body["client_secret"], repr(snapshot(self.store)))

    def test_refused(self) -> None:
        ok = ["https://client.example/cb"]
        cases: list[tuple[Any, str]] = [
            ([], "invalid_client_metadata"),
            ("string", "invalid_client_metadata"),
            (None, "invalid_client_metadata"),
            ({}, "invalid_redirect_uri"),
            ({"redirect_uris": []}, "invalid_redirect_uri"),
            ({"redirect_uris": "https://client.example/cb"}, "invalid_redirect_uri"),
            ({"redirect_uris": [1]}, "invalid_redirect_uri"),
            ({"redirect_uris": [None]}, "invalid_redirect_uri"),
            ({"redirect_uris": ["http://client.example/cb"]}, "invalid_redirect_uri"),
            ({"redirect_uris": ["https://client.example/cb#x"]}, "invalid_redirect_uri"),
            ({"redirect_uris": ["javascript:alert(1)"]}, "invalid_redirect_uri"),
            ({"redirect_uris": ["com.example.app:/cb"]}, "invalid_redirect_uri"),
            ({"redirect_uris": ["/relative"]}, "invalid_redirect_uri"),
            ({"redirect_uris": ["https://user:pw@client.example/cb"]}, "invalid_redirect_uri"),
            ({"redirect_uris": ["https://a;script-src:*/cb"]}, "invalid_redirect_uri"),
            ({"redirect_uris": ["https://client.example/" + "x" * 3000]}, "invalid_redirect_uri"),
            ({"redirect_uris": ok * 21}, "invalid_redirect_uri"),
            (
                {"redirect_uris": ok, "token_endpoint_auth_method": "private_key_jwt"},
                "invalid_client_metadata",
            ),
            ({"redirect_uris": ok, "token_endpoint_auth_method": ["none"]}, "invalid_client_metadata"),
            ({"redirect_uris": ok, "grant_types": ["refresh_token"]}, "invalid_client_metadata"),
            (
                {"redirect_uris": ok, "grant_types": ["authorization_code", "implicit"]},
                "invalid_client_metadata",
            ),
            ({"redirect_uris": ok, "grant_types": "authorization_code"}, "invalid_client_metadata"),
            ({"redirect_uris": ok, "grant_types": [{}]}, "invalid_client_metadata"),
            ({"redirect_uris": ok, "response_types": ["token"]}, "invalid_client_metadata"),
            ({"redirect_uris": ok, "client_name": 5}, "invalid_client_metadata"),
            ({"redirect_uris": ok, "client_name": "n" * 201}, "invalid_client_metadata"),
            ({"redirect_uris": ok, "scope": "read admin"}, "invalid_client_metadata"),
            ({"redirect_uris": ok, "scope": ["read"]}, "invalid_client_metadata"),
            ({"redirect_uris": ok, "client_uri": "http://client.example"}, "invalid_client_metadata"),
            ({"redirect_uris": ok, "logo_uri": 7}, "invalid_client_metadata"),
            ({"redirect_uris": ok, "logo_uri": "https://logo.example/\ud800"}, "invalid_client_metadata"),
            ({"redirect_uris": ok, "client_uri": "https://client.example/\u00e9"}, "invalid_client_metadata"),
        ]
        for metadata, error in cases:
            with self.unchanged():
                self.oauth_fails(self.server.register(metadata), error)

    def test_cap(self) -> None:
        self.reconfigure(max_registered_clients=3)
        self.register({"redirect_uris": ["https://client.example/cb"]})
        self.register({"redirect_uris": ["https://client.example/cb"]})
        with capturedLogs():
            with self.unchanged():
                self.oauth_fails(
                    self.server.register({"redirect_uris": ["https://client.example/cb"]}),
                    "temporarily_unavailable",
                    503,
                )


class SlowLookupStore(MemoryStore):
    """
    A memory store whose access-token look-ups wait until the test fires
    them, to race a revocation against a look-up.
    """

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock)
        self.pending: list[tuple[Deferred[Any], Deferred[Any]]] = []
        self.lookups = 0
        self.touches = 0
        self.hold_exchanges = False
        self.held: list[tuple[Deferred[Any], Deferred[Any]]] = []

    def exchange_code(self, *args: Any) -> "Deferred[Any]":
        return self._held(super().exchange_code(*args))

    def redeem_refresh_token(self, *args: Any) -> "Deferred[Any]":
        return self._held(super().redeem_refresh_token(*args))

    def _held(self, answer: "Deferred[Any]") -> "Deferred[Any]":
        """The store's C{answer}, or, with C{hold_exchanges}, a Deferred it reaches at L{release_exchanges}."""
        if not self.hold_exchanges:
            return answer
        d: Deferred[Any] = Deferred()
        self.held.append((d, answer))
        return d

    def release_exchanges(self) -> None:
        held, self.held = self.held, []
        for d, answer in held:
            answer.chainDeferred(d)

    def touch_grant(self, grant_id: str, now: float) -> "Deferred[None]":
        self.touches += 1
        return super().touch_grant(grant_id, now)

    def lookup_access_token(self, token_hash: str, now: float) -> "Deferred[Optional[AccessInfo]]":
        self.lookups += 1
        d: Deferred[Optional[AccessInfo]] = Deferred()
        self.pending.append((d, super().lookup_access_token(token_hash, now)))
        return d

    def release(self) -> None:
        pending, self.pending = self.pending, []
        for d, answer in pending:
            answer.chainDeferred(d)


class SlowStoreTestCase(ServerTestCase):
    """
    A server on a L{SlowLookupStore}, with a registered client.
    """

    def setUp(self) -> None:
        super().setUp()
        self.store = SlowLookupStore(self.clock)
        self.server = OAuthServer(self.config, self.store, self.clock, self.resolver)
        self.client_id = self.drive(self.server.register({"redirect_uris": ["https://client.example/cb"]}))[
            "client_id"
        ]


class AccessCacheTests(SlowStoreTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.body = self.tokens()
        # These tests are about look-ups: start from an empty cache (the
        # exchange put its token there; ExchangeRemembersTests).
        self.server.forget_cached_tokens()

    def lookup(self, token: str) -> Optional[AccessInfo]:
        d = self.server.verify_access_token(token)
        self.store.release()
        return self.successResultOf(d)

    def test_cached(self) -> None:
        self.assertIsNotNone(self.lookup(self.body["access_token"]))
        self.assertIsNotNone(self.lookup(self.body["access_token"]))
        self.assertEqual(self.store.lookups, 1)
        self.clock.advance(self.config.access_cache_ttl)
        self.assertIsNotNone(self.lookup(self.body["access_token"]))
        self.assertEqual(self.store.lookups, 2)

    def test_expiry_beats_cache(self) -> None:
        self.assertIsNotNone(self.lookup(self.body["access_token"]))
        self.clock.advance(3600 - 1)
        self.assertIsNotNone(self.lookup(self.body["access_token"]))
        self.clock.advance(1)
        self.assertIsNone(self.lookup(self.body["access_token"]))

    def test_revocation_during_lookup_not_cached(self) -> None:
        """
        A look-up that read the token before a revocation and answers after
        it is neither trusted nor cached: it asks the store again and sees
        the revocation, and so does the next look-up.
        """
        d = self.server.verify_access_token(self.body["access_token"])
        self.drive(self.server.revoke({"token": [self.body["access_token"]]}))
        self.store.release()
        self.store.release()
        self.assertIsNone(self.successResultOf(d))
        self.assertIsNone(self.lookup(self.body["access_token"]))

    def test_use_touches_grant_once_a_minute(self) -> None:
        """
        Using a token records the grant's last use for the connected-apps
        page, at most once a minute per grant.  The code exchange is a use
        recorded in its own transaction, so the new token's first use
        within the minute writes nothing.
        """
        exchanged = self.clock.seconds()
        [grant] = self.successResultOf(self.store.list_grants())
        self.assertEqual(grant.last_used_at, exchanged)
        self.clock.advance(30)
        self.assertIsNotNone(self.lookup(self.body["access_token"]))
        [grant] = self.successResultOf(self.store.list_grants())
        self.assertEqual((grant.last_used_at, self.store.touches), (exchanged, 0))
        self.clock.advance(31)
        self.lookup(self.body["access_token"])
        [grant] = self.successResultOf(self.store.list_grants())
        self.assertEqual((grant.last_used_at, self.store.touches), (self.clock.seconds(), 1))
        used = self.clock.seconds()
        self.clock.advance(30)
        self.lookup(self.body["access_token"])
        [grant] = self.successResultOf(self.store.list_grants())
        self.assertEqual((grant.last_used_at, self.store.touches), (used, 1))
        self.clock.advance(31)
        self.lookup(self.body["access_token"])
        [grant] = self.successResultOf(self.store.list_grants())
        self.assertEqual((grant.last_used_at, self.store.touches), (self.clock.seconds(), 2))

    def test_grant_revocation_clears_cache(self) -> None:
        info = self.lookup(self.body["access_token"])
        assert info is not None
        self.drive(self.server.revoke_grant(info.grant_id))
        self.assertIsNone(self.lookup(self.body["access_token"]))

    def test_garbage(self) -> None:
        for token in ("", "x" * 600, "unknown"):
            self.assertIsNone(self.lookup(token))
        self.assertIsNone(self.successResultOf(self.server.verify_access_token(None)))  # type: ignore[arg-type]

    def test_other_resource(self) -> None:
        """
        A token issued for another resource (the server was reconfigured)
        is not accepted.
        """
        self.reconfigure(resource=ISSUER + "/other")
        self.assertIsNone(self.lookup(self.body["access_token"]))

    def test_cache_bounded(self) -> None:
        self.reconfigure(access_cache_size=2)
        tokens = [self.tokens()["access_token"] for _ in range(4)]
        for token in tokens:
            self.assertIsNotNone(self.lookup(token))
        self.assertEqual(len(self.server.verifier._cache), 2)



class ExchangeRemembersTests(SlowStoreTestCase):
    """
    A code exchange puts its access token in the verifier's cache as a
    look-up would have found it, unless a revocation happened meanwhile.
    """

    def stored(self, token: str) -> Optional[AccessInfo]:
        d = self.store.lookup_access_token(hash_secret(token), self.clock.seconds())
        self.store.release()
        return self.successResultOf(d)

    def test_first_use_from_cache(self) -> None:
        body = self.tokens()
        info = self.access_info(body["access_token"])
        self.assertEqual(self.store.lookups, 0)
        self.assertIsNotNone(info)
        self.assertEqual(info, self.stored(body["access_token"]))

    def test_revocation_during_exchange_not_remembered(self) -> None:
        """
        The grant revoked while the exchange's answer was on its way: the
        token is not remembered, and its first use asks the store (which
        refuses it).
        """
        code = self.code_for()
        self.store.hold_exchanges = True
        d = Deferred.fromCoroutine(self.server.token(self.exchange_params(code)))
        [grant] = self.successResultOf(self.store.list_grants())
        self.drive(self.server.revoke_grant(grant.grant_id))
        self.store.release_exchanges()
        body = self.successResultOf(d)
        looked = self.server.verify_access_token(body["access_token"])
        self.store.release()
        self.assertIsNone(self.successResultOf(looked))
        self.assertEqual(self.store.lookups, 1)

    def test_any_revocation_during_exchange(self) -> None:
        """
        Any revocation (of another grant, or every cached token forgotten
        for another process's) between the exchange's start and its
        answer: not remembered, but the token is live.
        """
        other = self.tokens()
        for revoke in (
            lambda: self.drive(self.server.revoke({"token": [other["access_token"]]})),
            self.server.forget_cached_tokens,
        ):
            code = self.code_for()
            self.store.hold_exchanges = True
            d = Deferred.fromCoroutine(self.server.token(self.exchange_params(code)))
            revoke()
            self.store.release_exchanges()
            self.store.hold_exchanges = False
            body = self.successResultOf(d)
            before = self.store.lookups
            looked = self.server.verify_access_token(body["access_token"])
            self.store.release()
            self.assertIsNotNone(self.successResultOf(looked))
            self.assertEqual(self.store.lookups, before + 1)

    def test_unprotected_resource_not_remembered(self) -> None:
        info = AccessInfo(
            subject="alice",
            client_id="c",
            scopes=frozenset({"read"}),
            resource="https://elsewhere.example/mcp",
            grant_id="g",
            expires_at=self.clock.seconds() + 60,
        )
        verifier = self.server.verifier
        verifier.access_issued("h1", info, verifier.revocation_mark())
        self.assertNotIn("h1", verifier._cache)
        verifier.access_issued("h2", attr.evolve(info, resource=RESOURCE), verifier.revocation_mark())
        self.assertIn("h2", verifier._cache)

class LeftBeforeTheStoreTests(SlowStoreTestCase):
    """
    A replayed code or a reused refresh token whose client leaves before
    the store answers (a request cancelled, as the site does when the
    connection is lost): the store has revoked the grant all the same, so
    the replay is logged and the caches are told.  Over a real socket on
    PostgreSQL, clients that hung up at once had grants revoked without a
    log line, their access tokens still accepted from this process's cache.
    """

    def setUp(self) -> None:
        super().setUp()
        self.server.add_revocation_observer(self.revoked.append)

    def left(self, params: dict[str, list[str]], event: str) -> None:
        from twisted.internet.defer import CancelledError, ensureDeferred

        self.store.hold_exchanges = True
        request = ensureDeferred(self.server.token(params))
        self.assertNoResult(request)
        request.cancel()
        self.failureResultOf(request, CancelledError)
        with capturedLogs() as events:
            self.store.release_exchanges()
        self.assertIn(event, [e.get("smeldr_event") for e in events])
        self.assertEqual(len(self.revoked), 1)

    def test_replayed_code(self) -> None:
        code = self.code_for()
        body = self.drive(self.server.token(self.exchange_params(code)))
        self.assertIn(hash_secret(body["access_token"]), self.server.verifier._cache)
        self.left(self.exchange_params(code), "code_replay")
        self.assertNotIn(hash_secret(body["access_token"]), self.server.verifier._cache)

    def test_reused_refresh_token(self) -> None:
        first = self.tokens(scope="read write offline_access")
        second = self.drive(self.server.token(self.refresh(first["refresh_token"])))
        self.clock.advance(self.config.refresh_grace + 1)
        self.left(self.refresh(first["refresh_token"]), "refresh_reuse")
        self.assertNotIn(hash_secret(second["access_token"]), self.server.verifier._cache)

    def test_stolen_refresh_token(self) -> None:
        """
        A refresh token presented by another client, who hangs up before
        the store answers: the token was rotated all the same, so the
        grant is revoked and the theft logged (checked after the request's
        await, the grant stayed alive, nothing logged).
        """
        first = self.tokens(scope="read write offline_access")
        other = self.drive(self.server.register({"redirect_uris": ["https://client.example/cb"]}))
        self.assertIn(hash_secret(first["access_token"]), self.server.verifier._cache)
        self.left(self.refresh(first["refresh_token"], client_id=other["client_id"]), "refresh_wrong_client")
        self.assertNotIn(hash_secret(first["access_token"]), self.server.verifier._cache)
        looked = self.server.verify_access_token(first["access_token"])
        self.store.release()
        self.assertIsNone(self.successResultOf(looked))


class ConfigTests(SynchronousTestCase):
    def test_issuer(self) -> None:
        from smeldr_oauth.oauth.config import ConfigError

        self.assertEqual(
            Config(issuer="http://127.0.0.1:8080/", verify_bearer=verify_bearer).issuer,
            "http://127.0.0.1:8080",
        )
        for bad in ("http://example.com", "example.com", "https://example.com/?q=1", "https://u@example.com"):
            self.assertRaises(ConfigError, Config, issuer=bad, verify_bearer=verify_bearer)


class SupersededRefreshTests(ServerTestCase):
    """
    Finding: two parallel refreshes of r0 give a and b; refreshing a
    revokes b; using b soon after must not log the user out.
    """

    def setUp(self) -> None:
        super().setUp()
        first = self.tokens(scope="read write offline_access")
        r0 = first["refresh_token"]
        self.a = self.drive(self.server.token(self.refresh(r0)))
        self.b = self.drive(self.server.token(self.refresh(r0)))
        self.clock.advance(5)
        self.c = self.drive(self.server.token(self.refresh(self.a["refresh_token"])))

    def test_loser_refused_grant_kept(self) -> None:
        self.clock.advance(self.config.refresh_grace)
        with capturedLogs() as events:
            with self.unchanged():
                e = self.oauth_fails(self.server.token(self.refresh(self.b["refresh_token"])), "invalid_grant")
        self.assertIn("superseded", e.description)
        self.assertIn("refresh_superseded", [ev.get("smeldr_event") for ev in events])
        self.assertNotIn("refresh_reuse", [ev.get("smeldr_event") for ev in events])
        self.assertEqual(self.revoked, [])
        self.assertIsNotNone(self.access_info(self.c["access_token"]))
        self.drive(self.server.token(self.refresh(self.c["refresh_token"])))

    def test_loser_late_is_reuse(self) -> None:
        self.clock.advance(self.config.refresh_grace + 1)
        self.oauth_fails(self.server.token(self.refresh(self.b["refresh_token"])), "invalid_grant")
        self.assertEqual(len(self.revoked), 1)
        self.assertIsNone(self.access_info(self.c["access_token"]))


class RevokeOwnershipTests(ServerTestCase):
    """
    RFC 7009 section 2.1: a client that names itself revokes only its own
    tokens; another client's are left alone, with the same 200.
    """

    def setUp(self) -> None:
        super().setUp()
        self.body = self.tokens(scope="read offline_access")
        self.other = self.drive(self.server.register({"redirect_uris": ["https://other.example/cb"]}))

    def test_other_public_client(self) -> None:
        for token in (self.body["access_token"], self.body["refresh_token"]):
            with self.unchanged():
                self.assertIsNone(
                    self.drive(self.server.revoke({"token": [token], "client_id": [self.other["client_id"]]}))
                )
        self.assertIsNotNone(self.access_info(self.body["access_token"]))
        self.assertEqual(self.revoked, [])

    def test_unknown_client_id(self) -> None:
        with self.unchanged():
            self.drive(self.server.revoke({"token": [self.body["refresh_token"]], "client_id": ["nobody"]}))
        self.assertIsNotNone(self.access_info(self.body["access_token"]))

    def test_own_client(self) -> None:
        self.drive(self.server.revoke({"token": [self.body["access_token"]], "client_id": [self.client_id]}))
        self.assertIsNone(self.access_info(self.body["access_token"]))
        self.drive(self.server.revoke({"token": [self.body["refresh_token"]], "client_id": [self.client_id]}))
        self.assertEqual(len(self.revoked), 1)

    def test_no_client_id(self) -> None:
        """
        A request that does not name a client is trusted on the token alone,
        as before.
        """
        self.drive(self.server.revoke({"token": [self.body["refresh_token"]]}))
        self.assertEqual(len(self.revoked), 1)


class RegisteredScopeTests(ServerTestCase):
    """
    RFC 7591 section 2: a registered client's C{scope} bounds what it may
    ask for at the authorization endpoint.
    """

    def setUp(self) -> None:
        super().setUp()
        self.narrow = self.drive(
            self.server.register({"redirect_uris": ["https://client.example/cb"], "scope": "read"})
        )["client_id"]

    def test_within(self) -> None:
        request = self.validate(self.authorize_params(client_id=self.narrow, scope="read"))
        self.assertEqual(request.scopes, ("read",))

    def test_beyond(self) -> None:
        for scope in ("read write", "write", "read offline_access"):
            e = self.redirect_error(self.authorize_params(client_id=self.narrow, scope=scope))
            self.assertEqual(e.error.error, "invalid_scope", scope)
            self.assertEqual(e.state, "xyz")

    def test_default_intersected(self) -> None:
        request = self.validate(self.authorize_params(client_id=self.narrow, scope=None))
        self.assertEqual(request.scopes, ("read",))

    def test_no_default_left(self) -> None:
        only_refresh = self.drive(
            self.server.register({"redirect_uris": ["https://client.example/cb"], "scope": "offline_access"})
        )["client_id"]
        e = self.redirect_error(self.authorize_params(client_id=only_refresh, scope=None))
        self.assertEqual(e.error.error, "invalid_scope")
        request = self.validate(self.authorize_params(client_id=only_refresh, scope="offline_access"))
        self.assertEqual(request.scopes, ("offline_access",))

    def test_unlimited_without_registered_scope(self) -> None:
        request = self.validate(self.authorize_params(scope="read write offline_access"))
        self.assertEqual(request.scopes, ("read", "write", "offline_access"))

    def test_cimd_scope_not_enforced(self) -> None:
        """
        A metadata document serves its client with every server, so its
        scope names are not ours to enforce.
        """
        self.resolver.clients[CIMD_ID] = attr.evolve(CIMD_CLIENT, scope="openid profile")
        request = self.validate(
            self.authorize_params(
                client_id=CIMD_ID, redirect_uri="https://app.example/callback", scope="read write"
            )
        )
        self.assertEqual(request.scopes, ("read", "write"))


class SlowResolver:
    """
    A CIMD resolver whose fetches wait until the test fires them, and whose
    cache answers at once.
    """

    def __init__(self) -> None:
        self.cached: dict[str, Client] = {}
        self.pending: list[Deferred[Client]] = []

    def resolve(self, client_id: str) -> "Deferred[Client]":
        if client_id in self.cached:
            return succeed(self.cached[client_id])
        d: Deferred[Client] = Deferred()
        self.pending.append(d)
        return d


class CIMDFetchLimitTests(ServerTestCase):
    config_overrides = {"cimd_fetches_per_minute": 3}

    def setUp(self) -> None:
        super().setUp()
        self.slow = SlowResolver()
        self.server = OAuthServer(self.config, self.store, self.clock, self.slow)

    def authorize(self, n: int, address: str = "192.0.2.1") -> "Deferred[AuthorizationRequest]":
        params = self.authorize_params(client_id=f"https://app{n}.example/client.json")
        return Deferred.fromCoroutine(self.server.validate_authorization_request(params, address))

    def test_fetches_limited_per_address(self) -> None:
        with capturedLogs() as events:
            for n in range(3):
                self.assertNoResult(self.authorize(n))
            e = self.failureResultOf(self.authorize(3), errors.UntrustedRedirect).value
        # 3 fetches a minute: the next is allowed in 20 seconds.
        self.assertEqual((e.status, e.retry_after), (429, 20))
        self.assertEqual(len(self.slow.pending), 3)
        [limited] = [ev for ev in events if ev.get("smeldr_event") == "rate_limited"]
        self.assertEqual(limited["endpoint"], "cimd")
        # Another address has its own bucket; an IPv6 /64 is one bucket.
        self.assertNoResult(self.authorize(4, "192.0.2.2"))
        for n in range(3):
            self.assertNoResult(self.authorize(5 + n, f"2001:db8::{n + 1}"))
        self.failureResultOf(self.authorize(9, "2001:db8::ffff"), errors.UntrustedRedirect)
        # The bucket refills.
        self.clock.advance(20)
        self.assertNoResult(self.authorize(10))

    def test_cached_answers_not_counted(self) -> None:
        client = attr.evolve(CIMD_CLIENT, client_id="https://app0.example/client.json", redirect_uris=("https://client.example/cb",))
        self.slow.cached[client.client_id] = client
        for _ in range(10):
            self.assertEqual(self.successResultOf(self.authorize(0)).client, client)

    def test_token_endpoint_not_counted(self) -> None:
        """
        Without an address (token and revocation endpoints: client back
        ends, many users behind one address) nothing is counted.
        """
        for n in range(5):
            self.assertNoResult(self.server.resolve_client(f"https://app{n}.example/client.json"))
        self.assertNoResult(self.authorize(0))


class LogInjectionTests(ServerTestCase):
    def test_loggable(self) -> None:
        from smeldr_oauth.oauth.server import loggable

        self.assertEqual(loggable("https://app.example/client.json"), "https://app.example/client.json")
        for value in ("a\nforged line", "\x1b[31mred", "x" * 500, "\u202eevil", "'quoted'", "back\\slash"):
            out = loggable(value)
            self.assertLessEqual(len(out), 200, value)
            self.assertTrue(all(" " <= c <= "~" for c in out), out)
            self.assertNotIn("\n", out)
        self.assertEqual(loggable(None), "None")

    def test_loggable_passes_exactly_printable_ascii(self) -> None:
        """
        A text passes unchanged exactly when every character is from space
        to C{~} (no backslash, no leading quote, short enough), whatever the
        characters: the fast check (C{isascii} and C{isprintable}) decides
        as the per-character comparison did, at each end of the range and
        beyond it (tab, DEL, Latin-1 and other printable non-ASCII).
        """
        from smeldr_oauth.oauth.server import loggable

        for code in [*range(0, 0x250), 0x2028, 0x202E, 0x3000, 0xFEFF, 0x1F600]:
            value = f"id{chr(code)}x"
            plain = all(" " <= c <= "~" for c in value) and "\\" not in value
            self.assertEqual(loggable(value) == value, plain, hex(code))

    def test_cimd_refusal_logged_safely(self) -> None:
        """
        A refused document's client_id and reason are client-chosen: the
        log line carries them escaped and bounded.
        """
        client_id = "https://app.example/" + "x" * 400 + ".json"
        self.resolver.broken = CIMDError("bad \x1b[2J\nFAKE: admin logged in")
        with capturedLogs() as events:
            self.untrusted(self.authorize_params(client_id=client_id))
        [event] = [e for e in events if e.get("smeldr_event") == "cimd_refused"]
        text = formatEvent(event)
        self.assertNotIn("\n", text)
        self.assertNotIn("\x1b", text)
        self.assertLessEqual(len(event["client_id"]), 200)


class TokenRateLimitTests(ServerTestCase):
    """
    The token endpoint's limits: per client address and per client id.
    """

    config_overrides = {"token_requests_per_minute_per_address": 3, "token_requests_per_minute_per_client": 5}

    def refresh_from(self, address: str, client_id: Optional[str] = None) -> "Deferred[dict[str, Any]]":
        params = self.refresh("unknown-refresh-token", client_id=client_id or self.client_id)
        return Deferred.fromCoroutine(self.server.token(params, address=address))

    def test_per_address(self) -> None:
        with capturedLogs() as events:
            for _ in range(3):
                self.failureResultOf(self.refresh_from("192.0.2.1"), errors.OAuthError)
            limited = self.failureResultOf(self.refresh_from("192.0.2.1"), errors.RateLimited).value
        self.assertEqual(limited.retry_after, 20)
        [event] = [e for e in events if e.get("smeldr_event") == "rate_limited"]
        self.assertEqual(event["endpoint"], "token")
        # Another address has its own bucket, and the bucket refills.
        self.failureResultOf(self.refresh_from("192.0.2.2"), errors.OAuthError)
        self.clock.advance(20)
        self.failureResultOf(self.refresh_from("192.0.2.1"), errors.OAuthError)

    def test_per_client(self) -> None:
        """
        One client id from many addresses is limited too; unknown ids
        count (so cycling ids is bounded by the address limit instead).
        """
        with capturedLogs():
            for n in range(5):
                self.failureResultOf(self.refresh_from(f"192.0.2.{n}"), errors.OAuthError)
            self.failureResultOf(self.refresh_from("192.0.2.99"), errors.RateLimited)
            self.failureResultOf(self.refresh_from("192.0.2.99", "another-client"), errors.OAuthError)

    def test_without_address(self) -> None:
        """
        Called without an address (the library's own calls), only the
        client id counts.
        """
        for _ in range(5):
            self.failureResultOf(
                Deferred.fromCoroutine(self.server.token(self.refresh("x"))), errors.OAuthError
            )


class ClaudeBurstTests(ServerTestCase):
    """
    With the default limits, Claude.ai's way of refreshing never meets a
    429: every user's token refreshed three times at once, from a few
    addresses, under one metadata-document client id.
    """

    def test_parallel_refresh_bursts(self) -> None:
        users = 60
        refresh_tokens = [self.tokens()["refresh_token"] for _ in range(users)]
        addresses = ["160.79.104.10", "160.79.104.11", "160.79.104.12"]
        refused = 0
        with capturedLogs():
            for n, token in enumerate(refresh_tokens):
                for attempt in range(3):
                    d = Deferred.fromCoroutine(
                        self.server.token(self.refresh(token), address=addresses[(n + attempt) % 3])
                    )
                    self.assertIsNotNone(d.result)
                    if isinstance(getattr(d.result, "value", None), errors.RateLimited):
                        refused += 1
                    d.addErrback(lambda f: None)
        self.assertEqual(refused, 0)
