# -*- test-case-name: tests.test_oauth_cimd -*-
"""
Which C{client_id} URLs are metadata documents we are willing to fetch.

hyperlink parses almost anything (that is its job), so the strict grammar
is a regular expression: lowercase https scheme, a host, an optional plain
decimal port, a path, an optional query, and nothing else (no user info,
no fragment, no characters outside RFC 3986).  Host names follow the one
grammar of L{smeldr_oauth.oauth.urls.is_host_name}.
"""

from __future__ import annotations

import ipaddress
import re

from hyperlink import URL, URLParseError

from smeldr_oauth.oauth.cimd.errors import CIMDError
from smeldr_oauth.oauth.netguard import AddressPolicy, parse_ip
from smeldr_oauth.oauth.urls import MAX_URL_LENGTH, is_host_name

_PCHAR = r"(?:[A-Za-z0-9\-._~!$&'()*+,;=:@]|%[0-9A-Fa-f]{2})"
_CLIENT_ID_RE = re.compile(
    r"(?P<scheme>https?)://"
    r"(?P<host>\[[0-9a-f:.]+\]|[a-z0-9.\-]+)"
    r"(?::(?P<port>[1-9][0-9]{0,4}))?"
    rf"(?P<path>(?:/{_PCHAR}*)+)"
    rf"(?:\?(?P<query>(?:{_PCHAR}|[/?])*))?"
)
_DOTTED_QUAD = re.compile(r"[0-9]+(?:\.[0-9]+){3}")


def is_cimd_client_id(client_id: object, *, allow_insecure: bool = False) -> bool:
    """
    Whether C{client_id} is meant as a metadata document URL: an https URL
    (or http, with C{allow_insecure}) whose path is more than C{/}.

    This only classifies; L{check_client_id_url} does the full validation,
    so a malformed URL is reported as such rather than as an unknown client.
    Registered client ids are random tokens and never look like this.
    """
    if not isinstance(client_id, str) or len(client_id) > MAX_URL_LENGTH:
        return False
    try:
        url = URL.from_text(client_id)
    except (URLParseError, ValueError):
        return False
    schemes = ("https", "http") if allow_insecure else ("https",)
    return url.scheme.lower() in schemes and bool(url.host) and url.path not in ((), ("",))


def check_client_id_url(
    client_id: object,
    *,
    allow_insecure: bool = False,
    policy: AddressPolicy | None = None,
) -> str:
    """
    Check that C{client_id} is a URL we are willing to fetch.

    @return: its host (without brackets for an IPv6 literal).
    @raise CIMDError: if it is not.
    """
    if policy is None:
        policy = AddressPolicy(allow_all=allow_insecure)
    if not isinstance(client_id, str):
        raise CIMDError("client_id must be a string")
    if len(client_id) > MAX_URL_LENGTH:
        raise CIMDError("client_id URL is too long")
    match = _CLIENT_ID_RE.fullmatch(client_id)
    if match is None:
        raise CIMDError(
            "client_id is not a plain https URL (lowercase scheme and host, "
            "no user info, no fragment, no unusual characters)"
        )
    if match["scheme"] == "http" and not allow_insecure:
        raise CIMDError("client_id URL must use https")
    if match["port"] is not None and int(match["port"]) > 65535:
        raise CIMDError("client_id URL has an invalid port")
    path = match["path"]
    if path == "/":
        raise CIMDError("client_id URL must have a path")
    for segment in path.split("/")[1:]:
        if segment.lower().replace("%2e", ".") in (".", ".."):
            raise CIMDError("client_id URL must not contain . or .. segments")

    host = match["host"]
    ip = None
    if host.startswith("["):
        host = host[1:-1]
        ip = parse_ip(host)
        if ip is None or ip.version != 6:
            raise CIMDError("client_id URL has an invalid IPv6 address")
    elif _DOTTED_QUAD.fullmatch(host):
        ip = parse_ip(host)  # refuses leading zeros and out-of-range parts
        if ip is None:
            raise CIMDError("client_id URL has an invalid IPv4 address")
    else:
        _check_host_name(host, allow_insecure)
    if ip is not None and not policy.permits(ip):
        raise CIMDError("client_id URL points at a special-use address")
    return host


def _check_host_name(host: str, allow_insecure: bool) -> None:
    if not is_host_name(host):
        raise CIMDError("client_id URL has an invalid host name (or one that looks like a numeric address)")
    if allow_insecure:
        return
    labels = host.split(".")
    if len(labels) < 2:
        raise CIMDError("client_id URL host must be a fully qualified domain name")
    if labels[-1] == "localhost":
        raise CIMDError("client_id URL points at localhost")


def loggable_host(client_id: object) -> str:
    """
    The host of a (possibly malformed) client_id, made safe for a log line.
    """
    if not isinstance(client_id, str):
        return "<not a string>"
    try:
        host = URL.from_text(client_id[:MAX_URL_LENGTH]).host
    except (URLParseError, ValueError):
        host = "<unparseable>"
    return host.encode("ascii", "backslashreplace").decode("ascii")[:100]


def host_key(host: str) -> str:
    """
    What the per-host fetch limit counts by: the host name, or for an IPv6
    literal its /64, which one machine usually holds whole (so that it
    cannot pose as 2**64 hosts).  Ports are not part of it: they are free.
    """
    ip = parse_ip(host)
    if ip is not None and ip.version == 6:
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return host
