# -*- test-case-name: tests.test_doctor_checks -*-
"""
The doctor's checks: each a pure function from what was fetched (plain
L{Fetched} records, parsed documents, times) to one L{Verdict}.

A failure says what was seen and what to change; the report adds the link
to the check's section of C{docs/troubleshooting.md}.  Nothing here
fetches, reads a clock or holds a secret, so every branch is tested with
crafted inputs (C{tests/test_doctor_checks.py}).
"""

from __future__ import annotations

import datetime
import email.utils
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Optional

import attr

from smeldr_oauth.doctor.discovery import compare_resource, origin
from smeldr_oauth.doctor.model import Fetched, Verdict, describe_body, fail, ok, skip
from smeldr_oauth.oauth.urls import is_loopback_host, parse

#: Clock difference beyond which the clock check fails, in seconds.  The
#: server checks client metadata documents' TLS certificates and its own
#: token lifetimes against its clock, and people read its logs next to the
#: clients'; a minute is far beyond what NTP leaves.
MAX_CLOCK_SKEW = 60.0

_RENEW = (
    "Renew the certificate (and make sure renewal runs on its own: certbot's timer, your "
    "platform's managed certificates)."
)

#: The metadata fields whose values are URLs the clients follow.
_AS_URL_FIELDS = (
    "issuer",
    "authorization_endpoint",
    "token_endpoint",
    "registration_endpoint",
    "revocation_endpoint",
    "introspection_endpoint",
    "jwks_uri",
)


def _secure_url(value: Any) -> bool:
    """
    An https URL, or an http one on a loopback host (development).
    """
    if not isinstance(value, str):
        return False
    url = parse(value)
    if url is None:
        return False
    scheme = url.scheme.lower()
    return scheme == "https" or (scheme == "http" and is_loopback_host(url.host))


# -- the URL and its certificate ------------------------------------------


def check_url(problem: Optional[str], mcp_url: str) -> Verdict:
    """
    @param problem: what is wrong with the URL (from
        L{parse_mcp_url<smeldr_oauth.doctor.discovery.parse_mcp_url>}), or
        C{None}.
    """
    if problem is not None:
        return fail(
            "url",
            problem,
            "Give the URL you paste into ChatGPT or Claude.ai: https://<your host>/mcp.",
            url=mcp_url,
        )
    return ok("url", f"checking {mcp_url}", url=mcp_url)


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class Certificate:
    """
    The server certificate as the TLS handshake showed it.

    @ivar error: why the handshake or verification failed, else C{None}.
    @ivar not_before: the start of validity (POSIX seconds).
    @ivar not_after: the end of validity (POSIX seconds).
    @ivar subject: its subject, for the message.
    @ivar issuer: its issuer, for the message.
    """

    error: Optional[str] = None
    not_before: Optional[float] = None
    not_after: Optional[float] = None
    subject: str = ""
    issuer: str = ""


def check_tls(certificate: Optional[Certificate], now: float, min_days: float) -> Verdict:
    """
    The certificate is trusted, valid for the host, and valid for at least
    C{min_days} more days.

    @param certificate: C{None} for an http URL (loopback development).
    """
    if certificate is None:
        return skip("tls", "not https (loopback development): no certificate to check")
    if certificate.error is not None:
        if certificate.not_after is not None and certificate.not_after < now:
            # OpenSSL says only "verify failed"; the dates say why.
            return fail(
                "tls",
                f"the certificate expired on {_utc(certificate.not_after)} ({certificate.error})",
                _RENEW,
                error=certificate.error,
            )
        return fail(
            "tls",
            f"TLS failed: {certificate.error}",
            "Serve a certificate from a public CA (e.g. Let's Encrypt) that names this host, with its "
            "intermediate certificates; the assistants do not accept self-signed ones.",
            error=certificate.error,
        )
    details = {"subject": certificate.subject, "issuer": certificate.issuer, "not_after": certificate.not_after}
    if certificate.not_before is not None and certificate.not_before > now:
        return fail(
            "tls",
            f"the certificate is not valid yet (from {_utc(certificate.not_before)})",
            "Check the server's clock and the certificate's dates.",
            **details,
        )
    if certificate.not_after is None:
        return fail("tls", "the certificate has no end date", "Serve a well-formed certificate.", **details)
    days = (certificate.not_after - now) / 86400
    if days < 0:
        return fail(
            "tls",
            f"the certificate expired on {_utc(certificate.not_after)}",
            _RENEW,
            **details,
        )
    if days < min_days:
        return fail(
            "tls",
            f"the certificate expires in {days:.1f} days ({_utc(certificate.not_after)})",
            f"Renew it now; automatic renewal should have happened by {min_days:g} days before expiry.",
            **details,
        )
    return ok("tls", f"certificate valid for {days:.0f} more days, issued by {certificate.issuer}", **details)


def _utc(stamp: float) -> str:
    return datetime.datetime.fromtimestamp(stamp, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


# -- documents --------------------------------------------------------------


def document(check: str, fetched: Fetched, what: str, fix: str) -> tuple[Verdict, Optional[dict[str, Any]]]:
    """
    A discovery document was answered 200 with a JSON object.

    @param what: the document, for the message ("the resource metadata").
    @param fix: what to change when it was not.
    @return: the verdict and, on success, the document.
    """
    where = fetched.url
    if fetched.status is None:
        return fail(check, f"{where}: {fetched.answered()}", fix, url=where), None
    if fetched.status != 200:
        return (
            fail(check, f"{where} answered {fetched.answered()} ({describe_body(fetched)})", fix, url=where,
                 status=fetched.status),
            None,
        )
    body, problem = fetched.json_object()
    if body is None:
        return (
            fail(
                check,
                f"{where} answered 200 {fetched.media_type() or 'without a content type'}, but {problem}",
                fix,
                url=where,
            ),
            None,
        )
    if fetched.media_type() != "application/json":
        return (
            fail(
                check,
                f"{where} is JSON served as {fetched.media_type() or 'no content type'!r}",
                "Serve it as application/json: some clients check the type.",
                url=where,
            ),
            None,
        )
    return ok(check, f"{what} at {where}", url=where), body


def _not_forwarded(fetched: Fetched, mcp_answered_by_server: bool) -> str:
    """
    The fix for a discovery document that did not come back: when the MCP
    URL itself is answered by the server and this is not, something in
    front of the server keeps the path to itself.
    """
    base = (
        "The server publishes it at this path; make every /.well-known/ path reach it "
        "(HAProxy: route /.well-known/ to the same backend as /mcp; nginx: a location for "
        "/.well-known/oauth-protected-resource and /.well-known/oauth-authorization-server)."
    )
    if mcp_answered_by_server and fetched.status is not None:
        return "The MCP URL reaches the server but this path does not: " + base
    return base


def check_protected_resource_metadata(
    check: str, fetched: Fetched, mcp_answered_by_server: bool
) -> tuple[Verdict, Optional[dict[str, Any]]]:
    """
    One of the two protected resource metadata URLs (path-inserted,
    root): 200 with a JSON object naming C{resource} and
    C{authorization_servers}.

    @param mcp_answered_by_server: the unauthenticated MCP request got the
        server's 401 challenge, so a failure here is the path's alone.
    """
    which = "path-inserted" if check == "prm-path" else "root"
    verdict, body = document(
        check, fetched, f"resource metadata ({which})", _not_forwarded(fetched, mcp_answered_by_server)
    )
    if body is None:
        return verdict, None
    servers = body.get("authorization_servers")
    if not isinstance(body.get("resource"), str):
        return fail(check, f"{fetched.url} has no \"resource\" string", "Publish RFC 9728 metadata."), None
    if not isinstance(servers, list) or not servers or not all(isinstance(s, str) for s in servers):
        return (
            fail(
                check,
                f"{fetched.url} names no authorization_servers",
                "List the authorization server's issuer in \"authorization_servers\".",
            ),
            None,
        )
    return verdict, body


def check_resource(mcp_url: str, documents: Mapping[str, Mapping[str, Any]]) -> Verdict:
    """
    The C{resource} the metadata names is one the clients accept for the
    URL they connect to, and both metadata URLs agree on it.

    @param documents: metadata URL -> document, for each that was fetched.
    """
    if not documents:
        return skip("resource", "no resource metadata to compare")
    values = {url: doc.get("resource") for url, doc in documents.items()}
    distinct = sorted({str(v) for v in values.values()})
    if len(distinct) > 1:
        named = "; ".join(f"{url} says {value!r}" for url, value in values.items())
        return fail(
            "resource",
            f"the metadata URLs disagree: {named}",
            "Publish one resource, the URL people connect to, at every metadata URL.",
            values=values,
        )
    resource = distinct[0]
    match = compare_resource(mcp_url, resource)
    if not match.accepted:
        return fail(
            "resource",
            f"resource {resource!r} does not fit the URL {mcp_url!r}: {match.problem}",
            "Set --resource (or --issuer) so the resource is exactly the URL people paste, "
            "https://<host>/mcp without a trailing slash.",
            resource=resource,
            url=mcp_url,
        )
    if not match.exact:
        return ok(
            "resource",
            f"resource {resource!r} covers {mcp_url!r} (a prefix; the SDKs accept it)",
            resource=resource,
            url=mcp_url,
        )
    return ok("resource", f"resource {resource!r} matches the URL", resource=resource, url=mcp_url)


def check_authorization_server_metadata(
    fetched: Optional[Fetched],
    issuer: Optional[str],
    mcp_answered_by_server: bool,
    head: Optional[Fetched] = None,
) -> tuple[Verdict, Optional[dict[str, Any]]]:
    """
    The authorization server's RFC 8414 metadata, at the URL derived from
    the resource metadata's C{authorization_servers[0]}; and a C{HEAD} for
    it answered like the C{GET} (ChatGPT sends both).
    """
    if fetched is None or issuer is None:
        return skip("as-metadata", "no authorization server named (see the resource metadata)"), None
    verdict, body = document(
        "as-metadata",
        fetched,
        "authorization server metadata",
        _not_forwarded(fetched, mcp_answered_by_server),
    )
    if body is not None and head is not None and head.status != 200:
        return (
            fail(
                "as-metadata",
                f"HEAD {fetched.url} answered {head.answered()} while GET answers 200",
                "Answer HEAD like GET on the metadata URLs: ChatGPT sends HEAD before it reads them.",
                status=head.status,
            ),
            body,
        )
    return verdict, body


def check_issuer(metadata: Mapping[str, Any], named: str) -> Verdict:
    """
    The metadata's C{issuer} equals C{authorization_servers[0]} byte for
    byte (the Python SDK 2.x compares them so; RFC 8414 section 3.3), and
    is an https URL.
    """
    issuer = metadata.get("issuer")
    if not isinstance(issuer, str):
        return fail("issuer", "the authorization server metadata has no issuer", "Publish RFC 8414 metadata.")
    if issuer != named:
        difference = ""
        if issuer.rstrip("/") == named.rstrip("/"):
            difference = " (a trailing slash apart)"
        elif issuer.lower() == named.lower():
            difference = " (letter case apart)"
        return fail(
            "issuer",
            f"issuer {issuer!r} is not the {named!r} the resource metadata names{difference}",
            "Make them identical byte for byte: set --issuer to the public origin, no trailing slash.",
            issuer=issuer,
            authorization_server=named,
        )
    if not _secure_url(issuer):
        return fail(
            "issuer",
            f"issuer {issuer!r} is not https",
            "Set --issuer to the public https URL.",
            issuer=issuer,
        )
    return ok("issuer", f"issuer {issuer!r} matches the resource metadata", issuer=issuer)


def check_metadata_fields(metadata: Mapping[str, Any]) -> Verdict:
    """
    The fields the clients depend on (C{/work/shared/CLIENTS.md}): S256,
    C{response_types_supported} with C{code}, the two endpoints, a way to
    get a client id (registration or metadata documents), and C{none}
    among the token endpoint's methods when metadata documents are
    offered (else the clients do not use them).
    """
    problems = []
    methods = metadata.get("code_challenge_methods_supported")
    if not isinstance(methods, list) or "S256" not in methods:
        problems.append("code_challenge_methods_supported lacks S256 (both SDKs refuse the server)")
    types = metadata.get("response_types_supported")
    if not isinstance(types, list) or "code" not in types:
        problems.append("response_types_supported lacks \"code\" (the TypeScript SDK needs it)")
    for field in ("authorization_endpoint", "token_endpoint"):
        if not isinstance(metadata.get(field), str):
            problems.append(f"no {field}")
    grants = metadata.get("grant_types_supported")
    if grants is not None and (not isinstance(grants, list) or "authorization_code" not in grants):
        problems.append("grant_types_supported lacks authorization_code")
    cimd = metadata.get("client_id_metadata_document_supported") is True
    registration = isinstance(metadata.get("registration_endpoint"), str)
    auth_methods = metadata.get("token_endpoint_auth_methods_supported")
    if cimd and (not isinstance(auth_methods, list) or "none" not in auth_methods):
        problems.append(
            "client_id_metadata_document_supported is true but token_endpoint_auth_methods_supported "
            "lacks \"none\" (the clients then ignore metadata documents)"
        )
        cimd = False
    if not cimd and not registration:
        problems.append("neither a registration_endpoint nor client metadata documents: clients cannot get a client id")
    for field in _AS_URL_FIELDS:
        value = metadata.get(field)
        if value is not None and not _secure_url(value):
            problems.append(f"{field} {value!r} is not an https URL")
    if problems:
        return fail(
            "as-fields",
            "; ".join(problems),
            "Publish the fields MCP clients need (see the section).",
            problems=problems,
        )
    ways = [w for w, on in (("dynamic registration", registration), ("client metadata documents", cimd)) if on]
    return ok("as-fields", f"S256, code flow, {' and '.join(ways)}")


def check_openid_configuration(fetched: Fetched, issuer: Optional[str]) -> Verdict:
    """
    C{/.well-known/openid-configuration} on the MCP host: ChatGPT and the
    Python SDK probe it, and an HTML page or broken JSON there breaks
    ChatGPT, while a 404 (not an OpenID provider) is fine.
    """
    if fetched.status is None:
        return fail(
            "oidc",
            f"{fetched.url}: {fetched.answered()}",
            "Answer it with 404 (or a valid OpenID configuration).",
        )
    if fetched.status in (404, 410):
        return ok("oidc", f"{fetched.url} answers {fetched.status} (not an OpenID provider: fine)")
    if fetched.status == 200:
        body, problem = fetched.json_object()
        if body is None:
            return fail(
                "oidc",
                f"{fetched.url} answers 200 but {problem}",
                "Something answers every path with a page (a catch-all website or SPA route): make this "
                "path a 404, or route it to the server.",
            )
        if issuer is not None and body.get("issuer") != issuer:
            return fail(
                "oidc",
                f"{fetched.url} names issuer {body.get('issuer')!r}, not {issuer!r}",
                "Remove it, or publish the same issuer as the OAuth metadata.",
            )
        return ok("oidc", f"{fetched.url} is a valid OpenID configuration")
    return fail(
        "oidc",
        f"{fetched.url} answers {fetched.answered()}",
        "ChatGPT treats anything but a 404 or a valid document as an error: answer 404.",
    )


# -- the challenge --------------------------------------------------------------


#: One piece of a C{WWW-Authenticate} value (RFC 9110 section 11.6.1): an
#: auth-param, a bare token (a scheme, or a token68), or a comma.
_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_PIECE = re.compile(
    rf'\s*(?:(?P<name>{_TOKEN})\s*=\s*(?:"(?P<quoted>(?:[^"\\]|\\.)*)"|(?P<plain>[^\s,]*))'
    rf"|(?P<bare>{_TOKEN}=*)|(?P<comma>,))"
)


def parse_challenges(header: str) -> list[tuple[str, dict[str, str]]]:
    """
    The challenges in a C{WWW-Authenticate} value: (scheme in lower case,
    parameters by lower-case name).  Junk ends the parse; what came before
    it is kept.
    """
    challenges: list[tuple[str, dict[str, str]]] = []
    position = 0
    while position < len(header):
        piece = _PIECE.match(header, position)
        if piece is None or piece.end() == position:
            break
        position = piece.end()
        if piece.group("comma"):
            continue
        if piece.group("name") is not None and challenges:
            value = piece.group("quoted")
            value = re.sub(r"\\(.)", r"\1", value) if value is not None else piece.group("plain")
            challenges[-1][1].setdefault(piece.group("name").lower(), value)
        elif piece.group("bare") is not None:
            if challenges and not header[: piece.start()].rstrip().endswith(",") and challenges[-1][1] == {}:
                # A token68 after the scheme ("Basic dXNlcg=="): not a new challenge.
                continue
            challenges.append((piece.group("bare").lower(), {}))
    return challenges


def parse_bearer_challenge(header: str) -> Optional[dict[str, str]]:
    """
    The parameters of the C{Bearer} challenge in a C{WWW-Authenticate}
    value (RFC 6750 section 3), or C{None} when there is none.
    """
    for scheme, params in parse_challenges(header):
        if scheme == "bearer":
            return params
    return None


def check_challenge(fetched: Fetched, metadata_ok: Mapping[str, str]) -> Verdict:
    """
    An MCP request without a token gets 401 with a Bearer challenge whose
    C{resource_metadata} names metadata that works (the TypeScript SDK
    fetches only that URL when it is named).

    @param metadata_ok: metadata URL -> its C{resource}, for each metadata
        URL that answered well.
    """
    if fetched.status is None:
        return fail(
            "challenge",
            f"POST {fetched.url}: {fetched.answered()}",
            "The MCP URL must reach the server.",
        )
    if fetched.status != 401:
        return fail(
            "challenge",
            f"POST {fetched.url} without a token answered {fetched.answered()}, not 401",
            "The MCP endpoint must answer 401 to a request without a token: check the URL, and that "
            "nothing in front of the server answers for it (an auth proxy, a login page).",
            status=fetched.status,
        )
    headers = fetched.headers.get("www-authenticate", ())
    if not headers:
        return fail(
            "challenge",
            "the 401 has no WWW-Authenticate header",
            "Something in front of the server drops WWW-Authenticate (or replaces the 401 with its own): "
            "let the server's 401 through unchanged; clients find the metadata from it.",
        )
    params = None
    for header in headers:
        params = parse_bearer_challenge(header)
        if params is not None:
            break
    if params is None:
        return fail(
            "challenge",
            f"WWW-Authenticate has no Bearer challenge: {headers[0][:80]!r}",
            "Answer with the server's Bearer challenge (RFC 6750, RFC 9728).",
        )
    named = params.get("resource_metadata")
    if not named:
        return fail(
            "challenge",
            "the Bearer challenge has no resource_metadata",
            "Name the resource metadata URL in the challenge (RFC 9728 section 5.1).",
        )
    if named not in metadata_ok:
        return fail(
            "challenge",
            f"resource_metadata names {named}, which is not metadata that answered (see above)",
            "Name the path-inserted metadata URL of this resource, and make it answer.",
            resource_metadata=named,
        )
    return ok("challenge", f"401 with resource_metadata={named}", resource_metadata=named)


# -- CORS ---------------------------------------------------------------------------


def check_cors(gets: Sequence[Fetched], preflights: Sequence[Fetched], origin_sent: str) -> Verdict:
    """
    Browser-based clients (MCP Inspector, web apps) read the discovery
    documents across origins: each GET carries C{Access-Control-Allow-Origin}
    for any origin, and a preflight with C{MCP-Protocol-Version} is
    allowed.
    """
    problems = []
    for fetched in gets:
        allowed = fetched.header("access-control-allow-origin")
        if fetched.status != 200:
            continue
        if allowed not in ("*", origin_sent):
            problems.append(f"GET {fetched.url} with Origin has no Access-Control-Allow-Origin")
    for fetched in preflights:
        if fetched.status is None or not 200 <= fetched.status < 300:
            problems.append(f"OPTIONS {fetched.url} answered {fetched.answered()}")
            continue
        if fetched.header("access-control-allow-origin") not in ("*", origin_sent):
            problems.append(f"OPTIONS {fetched.url} has no Access-Control-Allow-Origin")
            continue
        allowed_headers = ",".join(fetched.headers.get("access-control-allow-headers", ())).lower()
        names = {h.strip() for h in allowed_headers.split(",")}
        if "*" not in names and "mcp-protocol-version" not in names:
            problems.append(f"OPTIONS {fetched.url} does not allow the MCP-Protocol-Version header")
    if problems:
        return fail(
            "cors",
            "; ".join(problems),
            "Let the server's CORS headers through on /.well-known/ (a proxy that answers OPTIONS itself "
            "or strips Access-Control-* headers breaks browser-based clients).",
            problems=problems,
        )
    if not gets and not preflights:
        return skip("cors", "no discovery document to check")
    return ok("cors", "discovery documents readable from any origin")


# -- forwarded headers ---------------------------------------------------------------


def published_urls(documents: Iterable[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """
    Every (field, URL) a client will follow in the metadata documents.
    """
    found = []
    for doc in documents:
        for field in ("resource", *_AS_URL_FIELDS):
            value = doc.get(field)
            if isinstance(value, str):
                found.append((field, value))
        servers = doc.get("authorization_servers")
        if isinstance(servers, list):
            found.extend(("authorization_servers", s) for s in servers if isinstance(s, str))
    return found


def check_forwarded(
    mcp_url: str,
    documents: Sequence[Mapping[str, Any]],
    challenge_url: Optional[str],
    spoofed: Sequence[tuple[Mapping[str, Any], Mapping[str, Any]]],
) -> Verdict:
    """
    The URLs the server publishes do not depend on how the request reached
    it: behind a proxy that terminates TLS they are still https on the
    public host (a server that builds them from the request needs the
    proxy's C{X-Forwarded-Proto}), and headers a client sends itself
    (C{X-Forwarded-Proto}, C{X-Forwarded-Host}, C{Forwarded}) change
    nothing (the proxy must overwrite them, the server trust them only
    from the proxy).

    @param documents: the metadata documents as normally fetched.
    @param challenge_url: the 401's C{resource_metadata}, if any.
    @param spoofed: (normal document, the same fetched with spoofed
        forwarding headers) pairs.
    """
    url = parse(mcp_url)
    if url is None:
        return skip("forwarded", "no URL")
    public = origin(url)
    urls = published_urls(documents)
    if challenge_url:
        urls.append(("resource_metadata", challenge_url))
    if not urls:
        return skip("forwarded", "no metadata to check")
    if url.scheme.lower() == "https":
        plain = [(f, u) for f, u in urls if u.lower().startswith("http://")]
        if plain:
            field, value = plain[0]
            return fail(
                "forwarded",
                f"{field} is {value!r}: the server builds http:// URLs behind TLS termination",
                "The proxy must send X-Forwarded-Proto: https (HAProxy: http-request set-header "
                "X-Forwarded-Proto https if { ssl_fc }; nginx: proxy_set_header X-Forwarded-Proto $scheme) "
                "and the server trust it from the proxy only; or configure the public URL (smeldr-oauth: "
                "--issuer https://...).",
                field=field,
                value=value,
            )
    for field, value in urls:
        parsed = parse(value)
        if field in ("resource", "resource_metadata") and parsed is not None and origin(parsed) != public:
            return fail(
                "forwarded",
                f"{field} is on {origin(parsed)}, not on {public}: the server builds its URLs from a host "
                "the proxy passes it",
                "Configure the public URL (smeldr-oauth: --issuer), or have the proxy pass the public "
                "Host (nginx: proxy_set_header Host $host).",
                field=field,
                value=value,
            )
    for normal, changed in spoofed:
        if normal != changed:
            differing = sorted(k for k in set(normal) | set(changed) if normal.get(k) != changed.get(k))
            return fail(
                "forwarded",
                "sending X-Forwarded-Proto/X-Forwarded-Host/Forwarded ourselves changed the metadata "
                f"({', '.join(differing)}): anyone can make the server publish other URLs",
                "The proxy must overwrite those headers, not pass on the client's (HAProxy: http-request "
                "set-header / del-header; nginx: proxy_set_header), and the server trust them only from "
                "the proxy's address.",
                fields=differing,
            )
    scheme = "https URLs" if url.scheme.lower() == "https" else "URLs"
    return ok("forwarded", f"published {scheme} on {public}, unchanged by forwarded headers from clients")


# -- the clock ---------------------------------------------------------------------


def check_clock(answers: Sequence[Fetched], max_skew: float = MAX_CLOCK_SKEW) -> Verdict:
    """
    The server's C{Date} headers agree with this machine's clock.  C{Date}
    has one-second resolution and each answer took some time to arrive,
    so the difference is measured against the time it was received and
    only the smallest one counts.
    """
    skews = []
    for fetched in answers:
        value = fetched.header("date")
        if value is None or fetched.received_at is None:
            continue
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            continue
        if when.tzinfo is None:
            when = when.replace(tzinfo=datetime.timezone.utc)
        skews.append(when.timestamp() - fetched.received_at)
    if not skews:
        return skip("clock", "no Date header in any answer")
    skew = min(skews, key=abs)
    if abs(skew) > max_skew:
        direction = "ahead of" if skew > 0 else "behind"
        return fail(
            "clock",
            f"the server's clock is {abs(skew):.0f} s {direction} this machine's",
            "Run NTP (chrony, systemd-timesyncd) on the server (and on this machine, if it is the one "
            "that is wrong).",
            skew=skew,
        )
    return ok("clock", f"clock within {max(abs(skew), 1.0):.0f} s of this machine's", skew=skew)


# -- with credentials -------------------------------------------------------------


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class SessionProbe:
    """
    Requests made on one MCP session after its C{initialize}.

    @ivar statuses: the status of each request that named the session.
    @ivar session_id_given: the server gave a session id at all.
    """

    statuses: tuple[Optional[int], ...]
    session_id_given: bool


def check_session(probe: Optional[SessionProbe], reason: str = "") -> Verdict:
    """
    Requests on one session keep working, wherever a balancer sends them:
    the most reported MCP deployment fault is "session not found" behind a
    load balancer that spreads a session's requests over processes that do
    not share sessions.
    """
    if probe is None:
        return skip("session", reason or "needs a token (see --site-token-file)")
    if not probe.session_id_given:
        return ok("session", "the server is stateless (no Mcp-Session-Id)")
    good = sum(1 for s in probe.statuses if s is not None and 200 <= s < 300)
    if good == len(probe.statuses):
        return ok("session", f"{good} requests on one session all answered")
    lost = [s for s in probe.statuses if s == 404]
    if lost:
        return fail(
            "session",
            f"{len(lost)} of {len(probe.statuses)} requests on one session answered 404 (session not found)",
            "Requests of one session reach processes that do not share sessions: share them "
            "(smeldr-oauth on PostgreSQL), or make the balancer sticky on Mcp-Session-Id.",
            statuses=list(probe.statuses),
        )
    return fail(
        "session",
        f"requests on one session answered {', '.join(str(s) for s in probe.statuses)}",
        "Look at the server log for these requests.",
        statuses=list(probe.statuses),
    )


def check_flow(steps: Sequence[tuple[str, bool, str]], reason: str = "") -> Verdict:
    """
    The OAuth flow the doctor ran with the operator's site token.

    @param steps: (step, succeeded, what was seen) in order; the flow stops
        at the first failed step.
    """
    if not steps:
        return skip("flow", reason or "not run: give a site token (--site-token-file) to run a real flow")
    for step, good, seen in steps:
        if not good:
            return fail(
                "flow",
                f"{step}: {seen}",
                "Run the same flow with a client (see the section) and read the server log at that step.",
                step=step,
            )
    return ok("flow", ", ".join(step for step, _, _ in steps))
