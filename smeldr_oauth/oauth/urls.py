# -*- test-case-name: tests.test_oauth_urls -*-
"""
URL rules: issuer and resource canonicalisation (RFC 8414, RFC 8707,
RFC 9728) and redirect URI matching (OAuth 2.1 exact match, with RFC 8252's
any-port rule for loopback redirects).

Pure functions over strings, built on L{hyperlink}.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Optional
from urllib.parse import quote

from hyperlink import URL

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})

# A DNS name (letters, digits, hyphens and underscores in dot-separated
# labels, IDNs in their xn-- form).  Hosts end up in a Content-Security-Policy
# (the consent form's form-action), where a ';' or a quote would be an
# injection.
_HOST_NAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_\-]{0,61}[A-Za-z0-9_])?(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_\-]{0,61}[A-Za-z0-9_])?)*\.?$"
)


_PORT = re.compile(r"[0-9]{1,5}")


def _port_text(value: str) -> Optional[str]:
    """
    The port of C{value}'s authority exactly as written, or C{None} when
    the authority names none.
    """
    _, sep, rest = value.partition("://")
    if not sep:
        return None
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    hostport = authority.rpartition("@")[2]
    if hostport.startswith("["):
        after = hostport.partition("]")[2]
        return after[1:] if after.startswith(":") else None
    return hostport.rpartition(":")[2] if ":" in hostport else None


def valid_port_text(port: Optional[str]) -> bool:
    """
    Is C{port} (as written in a URL) absent, or 1 to 5 ASCII digits naming
    a port from 1 to 65535?  L{hyperlink} (through C{int()}) would also
    take C{+1234}, C{-1}, C{0}, C{99999} and non-ASCII digits, and a
    loopback redirect URI matches on any port, so each of those would be
    accepted as "the same" redirect URI.
    """
    if port is None:
        return True
    return bool(_PORT.fullmatch(port)) and 1 <= int(port) <= 65535


def parse(value: str) -> Optional[URL]:
    """
    Parse an absolute URL, or C{None} if it is not one.  Control
    characters, spaces and a port that is not ASCII digits from 1 to 65535
    make it not one.
    """
    if not isinstance(value, str) or not value or len(value) > 2048:
        return None
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in value):
        return None
    if not valid_port_text(_port_text(value)):
        return None
    try:
        url = URL.from_text(value)
    except Exception:
        return None
    if not url.absolute or not url.host:
        return None
    if url.port is not None and not 1 <= url.port <= 65535:
        return None
    return url


def valid_host(host: str) -> bool:
    """
    Is C{host} a plain DNS name or an IP address literal?
    """
    try:
        ipaddress.ip_address(host.strip("[]") if host.startswith("[") else host)
        return True
    except ValueError:
        return bool(_HOST_NAME.match(host))


def is_loopback_host(host: str) -> bool:
    host = host.lower().strip("[]")
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _default_port(scheme: str) -> Optional[int]:
    return {"http": 80, "https": 443}.get(scheme)


def canonical_resource(value: str) -> Optional[str]:
    """
    Canonicalise a resource indicator (RFC 8707) or an issuer for
    comparison: lower-case scheme and host, default port dropped, no query
    and no fragment, trailing slashes stripped from the path (Python SDK 1.x
    adds one to a bare origin; Claude.ai strips them).  C{None} when the
    value is not an absolute http(s) URL.

    Query parameters are dropped because ChatGPT has been seen appending
    them; a resource is identified by origin and path alone here, which is
    safe because this server only ever issues tokens for its own
    configured resource.
    """
    url = parse(value)
    if url is None or url.scheme.lower() not in ("http", "https"):
        return None
    if url.userinfo:
        return None
    scheme = url.scheme.lower()
    host = url.host.lower()
    port = url.port
    path = "/".join(url.path).rstrip("/")
    if path and not path.startswith("/"):
        path = "/" + path
    hostpart = f"[{host}]" if ":" in host else host
    if port is not None and port != _default_port(scheme):
        hostpart = f"{hostpart}:{port}"
    return f"{scheme}://{hostpart}{path}"


def redirect_uri_matches(registered: str, presented: str) -> bool:
    """
    Does C{presented} match the C{registered} redirect URI?

    Exact string match (OAuth 2.1 section 2.3.1), except that for loopback
    redirect URIs (127.0.0.1, [::1], localhost, over http) the port is
    ignored, as RFC 8252 section 7.3 requires: native clients such as
    Claude Code register C{http://localhost/callback} and listen on an
    ephemeral port.  Either side with a port that is not ASCII digits
    from 1 to 65535 matches nothing (see L{parse}).
    """
    reg = parse(registered)
    pres = parse(presented)
    if reg is None or pres is None:
        # Not even an exact match is trusted: a registration made before
        # ports were checked must not keep working with a bad one.
        return False
    if registered == presented:
        return True
    if reg.scheme != "http" or pres.scheme != "http":
        return False
    if not is_loopback_host(reg.host) or reg.host.lower() != pres.host.lower():
        return False
    if reg.userinfo or pres.userinfo or pres.fragment:
        return False
    return (reg.path, reg.query) == (pres.path, pres.query)


def valid_redirect_uri(value: str, allow_insecure: bool = False) -> bool:
    """
    May a client register this redirect URI?  https anywhere, http only on
    a loopback host (RFC 8252) unless C{allow_insecure}; never a fragment
    or user info, and the host must be a plain DNS name or IP literal.
    Private-use schemes are not accepted: no MCP client uses them.
    """
    url = parse(value)
    if url is None or url.fragment or url.userinfo or "#" in value:
        return False
    if not valid_host(url.host):
        return False
    scheme = url.scheme.lower()
    if scheme == "https":
        return True
    if scheme == "http":
        return allow_insecure or is_loopback_host(url.host)
    return False


def with_query(base: str, params: list[tuple[str, str]]) -> str:
    """
    Add query parameters to C{base}, keeping the ones it already has
    byte for byte (OAuth 2.1 section 4.1.2: the redirect URI's own query is
    retained).  Values are percent-encoded here, so a C{state} holding
    C{&}, C{#} or C{%} comes back to the client as it was sent.
    """
    url = URL.from_text(base)
    for name, value in params:
        url = url.add(quote(name, safe=""), quote(value, safe=""))
    return url.to_text()
