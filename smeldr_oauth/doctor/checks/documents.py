# -*- test-case-name: tests.test_doctor_checks -*-
"""
The discovery documents: the protected resource metadata (RFC 9728), the
authorization server metadata (RFC 8414) and the fields the clients rely
on, the issuer they compare, and an C{openid-configuration} that must not
break ChatGPT.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

from smeldr_oauth.doctor.discovery import compare_resource
from smeldr_oauth.doctor.model import Fetched, Verdict, describe_body, fail, ok, skip
from smeldr_oauth.oauth.urls import is_loopback_host, parse


#: The metadata fields whose values are URLs the clients follow.
AS_URL_FIELDS = (
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
    for field in AS_URL_FIELDS:
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
