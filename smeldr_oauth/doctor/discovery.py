# -*- test-case-name: tests.test_doctor_discovery -*-
"""
The URLs an MCP client derives from the one URL a person types, and the
resource comparison it then makes, written as the clients do them (see
C{/work/shared/CLIENTS.md} and C{docs/clients.md}):

  - RFC 9728 section 3.1: the protected resource metadata at
    C{/.well-known/oauth-protected-resource} inserted before the path
    (the TypeScript SDK strips a trailing slash first), then at the root;
  - RFC 8414 section 3: the authorization server metadata at
    C{/.well-known/oauth-authorization-server} inserted before the
    issuer's path;
  - the resource check both SDKs make before they use a token: same
    origin, and the metadata's path a prefix of the URL's, where the
    TypeScript SDK refuses a URL path shorter than the resource's (so
    C{/mcp/} in the metadata fails a client of C{/mcp}).

Pure functions over strings.
"""

from __future__ import annotations

from typing import Optional

import attr
from hyperlink import URL

from smeldr_oauth.oauth.urls import is_loopback_host, parse

PRM_WELL_KNOWN = "/.well-known/oauth-protected-resource"
AS_WELL_KNOWN = "/.well-known/oauth-authorization-server"
OIDC_WELL_KNOWN = "/.well-known/openid-configuration"


def origin(url: URL) -> str:
    """
    C{scheme://host[:port]}, lower case, default port left out.
    """
    scheme = url.scheme.lower()
    host = url.host.lower()
    hostpart = f"[{host}]" if ":" in host else host
    default = {"http": 80, "https": 443}.get(scheme)
    if url.port is not None and url.port != default:
        hostpart = f"{hostpart}:{url.port}"
    return f"{scheme}://{hostpart}"


def path_of(url: URL) -> str:
    """
    The URL's path as written (C{""} for none, C{"/mcp/"} keeps its slash).
    """
    return "/" + "/".join(url.path) if url.path else ""


def parse_mcp_url(value: str) -> tuple[Optional[URL], Optional[str]]:
    """
    The URL a person gives the assistant, or C{None} and what is wrong
    with it.
    """
    url = parse(value)
    if url is None:
        return None, f"{value!r} is not an absolute URL"
    scheme = url.scheme.lower()
    if scheme not in ("http", "https"):
        return None, f"{value!r} is not an http(s) URL"
    if url.fragment or "#" in value:
        return None, f"{value!r} has a fragment, which a resource identifier must not have (RFC 8707)"
    if url.userinfo:
        return None, f"{value!r} carries a user name or password"
    if scheme == "http" and not is_loopback_host(url.host):
        return None, f"{value!r} is plain http: ChatGPT and Claude.ai only connect over https"
    return url, None


def protected_resource_metadata_urls(url: URL) -> list[tuple[str, str]]:
    """
    Where clients look for the resource metadata when the 401 names none,
    in their order: C{("prm-path", path-inserted)} (only when the URL has a
    path) and C{("prm-root", root)}.
    """
    base = origin(url)
    path = path_of(url).rstrip("/")
    found = []
    if path:
        found.append(("prm-path", base + PRM_WELL_KNOWN + path))
    found.append(("prm-root", base + PRM_WELL_KNOWN))
    return found


def authorization_server_metadata_url(issuer: str) -> Optional[str]:
    """
    RFC 8414 section 3.1: the metadata URL of C{issuer}, the well-known
    suffix inserted between the host and the issuer's path; C{None} when
    the issuer is not an absolute URL.
    """
    url = parse(issuer)
    if url is None:
        return None
    return origin(url) + AS_WELL_KNOWN + path_of(url).rstrip("/")


def openid_configuration_url(url: URL) -> str:
    """
    Where ChatGPT and the Python SDK probe for OpenID discovery on the MCP
    host.
    """
    return origin(url) + OIDC_WELL_KNOWN


@attr.s(frozen=True, auto_attribs=True)
class ResourceMatch:
    """
    How the metadata's C{resource} compares with the URL a client uses.

    @ivar accepted: the SDKs go on (same origin, path prefix, and not the
        TypeScript SDK's shorter-path refusal).
    @ivar exact: the two are the same resource (trailing slash and case of
        scheme and host aside).
    @ivar problem: for a refusal, the difference in words.
    """

    accepted: bool
    exact: bool
    problem: Optional[str] = None


def compare_resource(requested: str, configured: str) -> ResourceMatch:
    """
    Compare the URL the client connects to (C{requested}) with the
    metadata's C{resource} (C{configured}) as the Python and TypeScript
    SDKs do (C{check_resource_allowed}, C{checkResourceAllowed}).
    """
    want = parse(requested)
    have = parse(configured)
    if have is None or have.scheme.lower() not in ("http", "https"):
        return ResourceMatch(False, False, f"the resource {configured!r} is not an absolute http(s) URL")
    assert want is not None
    if origin(want) != origin(have):
        return ResourceMatch(
            False, False, f"the resource is on {origin(have)}, the URL on {origin(want)} (another origin)"
        )
    # As WHATWG URLs have it (the TypeScript SDK): an empty path is "/".
    want_path, have_path = path_of(want) or "/", path_of(have) or "/"
    if have.query:
        return ResourceMatch(False, False, "the resource carries a query string")
    # Both SDKs end both paths with one slash before comparing.
    want_dir = want_path if want_path.endswith("/") else want_path + "/"
    have_dir = have_path if have_path.endswith("/") else have_path + "/"
    if len(want_path) < len(have_path) and want_dir == have_dir:
        return ResourceMatch(
            False,
            False,
            f"the resource path {have_path!r} ends with a slash the URL's {want_path!r} lacks "
            "(the TypeScript SDK refuses a URL path shorter than the resource's)",
        )
    if len(want_path) < len(have_path) or not want_dir.startswith(have_dir):
        return ResourceMatch(False, False, f"the resource path {have_path!r} is not a prefix of {want_path!r}")
    exact = want_dir == have_dir
    return ResourceMatch(True, exact)
