# -*- test-case-name: tests.test_doctor_flow -*-
"""
An OAuth flow run by the doctor with the operator's site token, as an MCP
client and a person at the consent page would run it: register (RFC 7591),
show the consent page, approve it with the site token, exchange the code
(PKCE S256, RFC 8707 C{resource}), and at the end revoke what it got.

The token is what the stream and session checks need; the flow itself is
also the check that registration, the consent page and the token endpoint
work through the proxy.

Secrets: the site token is read from a file or the environment (never the
command line), sent only in the consent form, and only to an authorization
endpoint on the MCP URL's own origin; the tokens are sent only to the MCP
URL and the authorization server's endpoints.  None of them is printed or
kept in a record's C{repr}.
"""

from __future__ import annotations

import secrets
from html.parser import HTMLParser
from typing import Any, Optional
from urllib.parse import parse_qs, urlencode, urljoin, urlsplit

import attr

from smeldr_oauth.doctor.discovery import origin
from smeldr_oauth.doctor.fetch import Fetcher
from smeldr_oauth.oauth.pkce import s256
from smeldr_oauth.oauth.urls import parse

#: Where the authorization answer "goes": a loopback redirect URI (RFC 8252,
#: any port) that nothing listens on; the doctor reads the code from the
#: redirect's Location instead of following it.
REDIRECT_URI = "http://127.0.0.1/smeldr-doctor/callback"

CLIENT_NAME = "smeldr-oauth doctor"


class FlowError(Exception):
    """
    A step of the flow did not go as a client needs; the message says what
    was seen (never a secret).
    """

    def __init__(self, step: str, seen: str) -> None:
        super().__init__(f"{step}: {seen}")
        self.step = step
        self.seen = seen


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class Credentials:
    """
    What the flow got.  The tokens never show in C{repr}.
    """

    access_token: str = attr.ib(repr=False)
    refresh_token: Optional[str] = attr.ib(default=None, repr=False)
    client_id: Optional[str] = None
    revocation_endpoint: Optional[str] = None


@attr.s(frozen=True, auto_attribs=True)
class ConsentForm:
    """
    The consent page's form as a browser would submit it.

    @ivar action: where it posts (absolute).
    @ivar fields: its hidden and other named inputs, in order, but the
        site token.
    """

    action: str
    fields: tuple[tuple[str, str], ...]


class _Forms(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.forms: list[dict[str, Any]] = []
        self._open: Optional[dict[str, Any]] = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, Optional[str]]]) -> None:
        values = {k: v or "" for k, v in attrs}
        if tag == "form":
            self._open = {"action": values.get("action", ""), "method": values.get("method", "get"), "inputs": []}
            self.forms.append(self._open)
        elif self._open is not None and tag in ("input", "button") and "name" in values:
            kind = values.get("type", "text" if tag == "input" else "submit").lower()
            self._open["inputs"].append((values["name"], values.get("value", ""), kind))

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._open = None


def consent_form(page: str, page_url: str) -> Optional[ConsentForm]:
    """
    The form on a consent page that takes a site token: the one with a
    C{site_token} input and a C{decision} button, or C{None}.
    """
    parser = _Forms()
    parser.feed(page)
    parser.close()
    for form in parser.forms:
        names = {name for name, _, _ in form["inputs"]}
        if "site_token" not in names or "decision" not in names or form["method"].lower() != "post":
            continue
        fields = tuple(
            (name, value)
            for name, value, kind in form["inputs"]
            if name != "site_token" and kind not in ("submit", "button", "image")
        )
        return ConsentForm(action=urljoin(page_url, form["action"] or page_url), fields=fields)
    return None


def same_origin(a: str, b: str) -> bool:
    first, second = parse(a), parse(b)
    return first is not None and second is not None and origin(first) == origin(second)


def _oauth_error(fetched: Any) -> str:
    """
    An OAuth error answer in a few words: its C{error} and (printable,
    capped) C{error_description}; never the body as such (a token endpoint
    might echo what it was sent).
    """
    body, _ = fetched.json_object()
    if body is None:
        return f"answered {fetched.answered()}"
    error = str(body.get("error", ""))[:60]
    description = "".join(c for c in str(body.get("error_description", ""))[:160] if c.isprintable())
    return f"answered {fetched.status} {error}" + (f": {description}" if description else "")


class Flow:
    """
    Run the flow, step by step, keeping the steps for the report.

    @param fetcher: makes the requests.
    @param mcp_url: the URL the person gives the assistant.
    @param resource: the resource metadata's C{resource} (sent verbatim,
        as the SDKs do).
    @param metadata: the authorization server metadata.
    """

    def __init__(self, fetcher: Fetcher, mcp_url: str, resource: str, metadata: dict[str, Any]) -> None:
        self.fetcher = fetcher
        self.mcp_url = mcp_url
        self.resource = resource
        self.metadata = metadata
        self.steps: list[tuple[str, bool, str]] = []

    def _done(self, step: str, seen: str) -> None:
        self.steps.append((step, True, seen))

    def _endpoint(self, name: str) -> str:
        value = self.metadata.get(name)
        if not isinstance(value, str) or parse(value) is None:
            raise FlowError(name.replace("_", " "), f"the metadata has no {name}")
        return value

    async def run(self, site_token: str) -> Credentials:
        """
        @raise FlowError: a step failed (also recorded in L{steps}).
        """
        try:
            return await self._run(site_token)
        except FlowError as e:
            self.steps.append((e.step, False, e.seen))
            raise

    async def _run(self, site_token: str) -> Credentials:
        authorize = self._endpoint("authorization_endpoint")
        if not same_origin(authorize, self.mcp_url):
            raise FlowError(
                "consent",
                f"the authorization endpoint {authorize} is not on the MCP URL's origin; the doctor sends "
                "a site token only there (use --access-token-file)",
            )
        client_id = await self._register()
        verifier = secrets.token_urlsafe(48)
        state = secrets.token_urlsafe(16)
        query = [
            ("response_type", "code"),
            ("client_id", client_id),
            ("redirect_uri", REDIRECT_URI),
            ("code_challenge", s256(verifier)),
            ("code_challenge_method", "S256"),
            ("state", state),
            ("resource", self.resource),
        ]
        separator = "&" if "?" in authorize else "?"
        page_url = authorize + separator + urlencode(query)
        page = await self.fetcher.request("GET", page_url, {"Accept": "text/html"})
        if page.status != 200:
            raise FlowError("consent page", f"GET {authorize} {_oauth_error(page)}")
        form = consent_form(page.body.decode("utf-8", "replace"), page_url)
        if form is None:
            raise FlowError("consent page", "no form with a site_token field and Approve/Deny buttons")
        if not same_origin(form.action, self.mcp_url):
            raise FlowError("consent page", f"the form posts to {form.action}, off the MCP URL's origin")
        self._done("consent page", "shown")
        answer = await self.fetcher.post_form(
            form.action,
            [*form.fields, ("site_token", site_token), ("decision", "approve")],
            {"Accept": "text/html"},
        )
        code = self._code(answer, state)
        self._done("approved", f"{answer.status} to the redirect URI")
        token = await self.fetcher.post_form(
            self._endpoint("token_endpoint"),
            [
                ("grant_type", "authorization_code"),
                ("code", code),
                ("redirect_uri", REDIRECT_URI),
                ("client_id", client_id),
                ("code_verifier", verifier),
                ("resource", self.resource),
            ],
        )
        body, _ = token.json_object()
        if token.status != 200 or body is None or not isinstance(body.get("access_token"), str):
            raise FlowError("token", f"POST token {_oauth_error(token)}")
        if str(body.get("token_type", "")).lower() != "bearer":
            raise FlowError("token", f"token_type is {body.get('token_type')!r}, not Bearer")
        self._done("token issued", f"expires in {body.get('expires_in')} s")
        refresh = body.get("refresh_token")
        revocation = self.metadata.get("revocation_endpoint")
        return Credentials(
            access_token=body["access_token"],
            refresh_token=refresh if isinstance(refresh, str) else None,
            client_id=client_id,
            revocation_endpoint=revocation if isinstance(revocation, str) else None,
        )

    async def _register(self) -> str:
        endpoint = self.metadata.get("registration_endpoint")
        if not isinstance(endpoint, str):
            raise FlowError(
                "registered",
                "the server offers no dynamic registration; give an access token with --access-token-file",
            )
        answer = await self.fetcher.post_json(
            endpoint,
            {
                "client_name": CLIENT_NAME,
                "redirect_uris": [REDIRECT_URI],
                "grant_types": ["authorization_code", "refresh_token"],
                "response_types": ["code"],
                "token_endpoint_auth_method": "none",
            },
        )
        body, _ = answer.json_object()
        if answer.status not in (200, 201) or body is None or not isinstance(body.get("client_id"), str):
            raise FlowError("registered", f"POST {endpoint} {_oauth_error(answer)}")
        if body.get("client_secret"):
            # A secret we did not ask for: the TypeScript SDK would not send
            # it, and fail at the token endpoint (see CLIENTS.md).
            raise FlowError("registered", "the server issued a client secret to a client that asked for none")
        self._done("registered", "dynamic registration")
        return str(body["client_id"])

    def _code(self, answer: Any, state: str) -> str:
        location = answer.header("location")
        if answer.status not in (302, 303) or not location:
            if answer.status == 307:
                raise FlowError("approved", "the consent POST answered 307 (re-posts the site token); use 303")
            raise FlowError("approved", f"the consent POST {_oauth_error(answer)}, not a redirect")
        target = urlsplit(urljoin(answer.url, location))
        expected = urlsplit(REDIRECT_URI)
        if (target.scheme, target.hostname, target.path) != (expected.scheme, expected.hostname, expected.path):
            raise FlowError("approved", "the redirect does not go to the redirect URI")
        params = parse_qs(target.query)
        if "error" in params:
            description = params.get("error_description", [""])[0][:160]
            raise FlowError("approved", f"error={params['error'][0][:60]} {description}".strip())
        if params.get("state") != [state]:
            raise FlowError("approved", "the redirect does not carry the state sent")
        issuer = self.metadata.get("issuer")
        if self.metadata.get("authorization_response_iss_parameter_supported") and params.get("iss") != [issuer]:
            raise FlowError("approved", f"iss is {params.get('iss')}, not {issuer!r} (RFC 9207)")
        codes = params.get("code")
        if not codes or not codes[0]:
            raise FlowError("approved", "the redirect carries no code")
        return codes[0]

    async def revoke(self, credentials: Credentials) -> None:
        """
        Revoke the refresh token (which ends the grant) and the access
        token; record the outcome as the last step.
        """
        endpoint = credentials.revocation_endpoint
        if endpoint is None:
            self.steps.append(("revoked", False, "no revocation endpoint: the grant stays until it expires"))
            return
        statuses = []
        for token in (credentials.refresh_token, credentials.access_token):
            if token is None:
                continue
            fields = [("token", token)]
            if credentials.client_id:
                fields.append(("client_id", credentials.client_id))
            answer = await self.fetcher.post_form(endpoint, fields)
            statuses.append(answer.status)
        if all(s == 200 for s in statuses):
            self._done("revoked", "grant ended")
        else:
            self.steps.append(("revoked", False, f"POST {endpoint} answered {statuses}"))
