# -*- test-case-name: tests.test_doctor_checks -*-
"""
What something in front of the server changes: CORS headers on the
discovery documents (browser-based clients read them across origins), and
the URLs the server publishes, which must not depend on forwarding headers
a client can send itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Optional

from smeldr_oauth.doctor.checks.documents import AS_URL_FIELDS
from smeldr_oauth.doctor.discovery import origin
from smeldr_oauth.doctor.model import Fetched, Verdict, fail, ok, skip
from smeldr_oauth.oauth.urls import parse


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


def published_urls(documents: Iterable[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """
    Every (field, URL) a client will follow in the metadata documents.
    """
    found = []
    for doc in documents:
        for field in ("resource", *AS_URL_FIELDS):
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
