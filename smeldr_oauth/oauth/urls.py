# -*- test-case-name: tests.test_oauth_urls -*-
"""
URL rules, each in one place: issuer and resource canonicalisation
(RFC 8414, RFC 8707, RFC 9728), the host-name grammar, the loopback hosts,
which redirect URIs a client may have (L{check_redirect_uri}, for
registrations and metadata documents alike) and how a presented one
matches (OAuth 2.1 exact match, with RFC 8252's any-port rule for loopback
redirects).

Pure functions over strings, built on L{hyperlink}.
"""

from __future__ import annotations

import functools

import ipaddress
import re
from typing import Optional
from urllib.parse import quote

from hyperlink import URL

#: The loopback hosts a redirect URI may use over http: the two loopback
#: IP literals RFC 8252 section 7.3 and OAuth 2.1 section 8.4.2 name, and
#: C{localhost}, which they advise against but Claude Code, mcp-remote and
#: the SDKs use.  Other loopback addresses (C{127.0.0.2}) are not in it: no
#: client uses them, and one rule for everyone is easier to get right.
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})

#: One DNS label: letters, digits and inner hyphens (RFC 1123 section 2.1),
#: in any case; IDNs in their xn-- form.
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")

#: A last label like these makes resolvers read the name as an IPv4
#: address in one of its legacy forms (127.1, 0x7f.1, 2130706433).
_NUMERIC_LABEL = re.compile(r"[0-9]+|0[xX][0-9A-Fa-f]*")

#: Longest redirect URI (or client id URL) accepted.
MAX_URL_LENGTH = 2048


class InvalidRedirectURI(ValueError):
    """
    A redirect URI a client may not have; the message says why.
    """


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

    The answers are remembered (a bounded LRU; a L{URL} is immutable): one
    authorization flow parsed the same resource and redirect URI four
    times, about 160 µs of the flow's CPU in the profile.
    """
    if not isinstance(value, str) or not value or len(value) > MAX_URL_LENGTH:
        return None
    return _parse(value)


@functools.lru_cache(maxsize=1024)
def _parse(value: str) -> Optional[URL]:
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


def is_host_name(host: str) -> bool:
    """
    The one host-name grammar: dot-separated DNS labels, at most 253
    characters, no trailing dot, and a last label that is not a number (a
    resolver would take C{127.1} or C{0x7f.1} for an address).  Hosts end
    up in a Content-Security-Policy (the consent form's C{form-action}),
    where a C{;} or a quote would be an injection.
    """
    if not host or len(host) > 253:
        return False
    labels = host.split(".")
    if not all(_LABEL.fullmatch(label) for label in labels):
        return False
    return _NUMERIC_LABEL.fullmatch(labels[-1]) is None


def is_ip_literal(host: str) -> bool:
    """
    Is C{host} an IPv4 or IPv6 address (brackets allowed, no zone id)?
    """
    text = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if "%" in text:
        return False
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def is_host(host: str) -> bool:
    """
    Is C{host} a host name (L{is_host_name}) or an IP address literal?
    """
    return is_ip_literal(host) or is_host_name(host)


def is_loopback_host(host: str) -> bool:
    """
    Is C{host} one of L{LOOPBACK_HOSTS} (any case, brackets allowed)?
    """
    return host.lower().strip("[]") in LOOPBACK_HOSTS


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

    The answers are remembered (a bounded LRU, as L{parse}'s): a flow asks
    for the same resource's on the consent, the exchange, the token's
    first use and every look-up.
    """
    if not isinstance(value, str):
        return None
    return _canonical_resource(value)


@functools.lru_cache(maxsize=1024)
def _canonical_resource(value: str) -> Optional[str]:
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


def check_redirect_uri(value: object, allow_insecure: bool = False) -> str:
    """
    The one rule for the redirect URIs a client may have, whether it
    registers them (RFC 7591) or publishes them in a metadata document:
    an absolute URI of plain ASCII, no user info, no fragment, a valid host
    and port; https anywhere, http only on a loopback host (L{LOOPBACK_HOSTS},
    RFC 8252) unless C{allow_insecure} (development).  Private-use schemes
    are refused: no MCP client uses them.

    @return: C{value}.
    @raise InvalidRedirectURI: saying why it is refused.
    """
    if not isinstance(value, str) or not value or len(value) > MAX_URL_LENGTH:
        raise InvalidRedirectURI("redirect URIs must be strings of 1 to 2048 characters")
    if not all(" " < c < "\x7f" for c in value):
        raise InvalidRedirectURI("redirect URIs must be plain ASCII without spaces")
    if "#" in value:
        raise InvalidRedirectURI("redirect URIs must not contain a fragment")
    url = parse(value)
    if url is None or not value.startswith(url.scheme + "://"):
        raise InvalidRedirectURI("redirect URIs must be absolute URIs with a valid port")
    if url.userinfo:
        raise InvalidRedirectURI("redirect URIs must not contain user info")
    if not is_host(url.host):
        raise InvalidRedirectURI("redirect URIs must name a valid host")
    if url.scheme == "https":
        return value
    if url.scheme == "http" and (allow_insecure or is_loopback_host(url.host)):
        return value
    raise InvalidRedirectURI("redirect URIs must use https (http only on localhost, 127.0.0.1 or [::1])")


def valid_redirect_uri(value: str, allow_insecure: bool = False) -> bool:
    """
    Whether L{check_redirect_uri} accepts C{value}.
    """
    try:
        check_redirect_uri(value, allow_insecure)
    except InvalidRedirectURI:
        return False
    return True


def with_query(base: str, params: list[tuple[str, str]]) -> str:
    """
    Add query parameters to C{base}, keeping the ones it already has
    byte for byte (OAuth 2.1 section 4.1.2: the redirect URI's own query is
    retained).  Values are percent-encoded here, so a C{state} holding
    C{&}, C{#} or C{%} comes back to the client as it was sent.
    """
    if not params:
        return URL.from_text(base).to_text()
    # hyperlink's answer is the text of the base with its query, then each
    # added parameter as name=value joined by "&" (percent-encoded here:
    # hyperlink leaves such text as it is).  That text is found once per
    # redirect URI with hyperlink (_query_prefix) and the parameters are
    # joined to it as strings: building and printing a URL per redirect was
    # ~90 µs of a consent (docs/performance.md).  A base the shortcut does
    # not fit (a fragment: never a registered redirect URI) takes
    # hyperlink's way; a test compares both on arbitrary input.
    prefix = _query_prefix(base)
    added = "&".join(_quoted(name) + "=" + _quoted(value) for name, value in params)
    if prefix is None:
        return _hyperlink_with_query(base, params)
    return prefix + added


#: Text that percent-encoding leaves as it is (RFC 3986's unreserved
#: characters): the parameter names, and a code (base64url).
_UNRESERVED = re.compile(r"[A-Za-z0-9_.~-]*")


def _quoted(text: str) -> str:
    """
    C{quote(text, safe="")}, without its encoding and byte loop when
    C{text} has nothing to encode (a third of C{with_query}'s time).
    """
    return text if _UNRESERVED.fullmatch(text) else quote(text, safe="")


def _hyperlink_with_query(base: str, params: list[tuple[str, str]]) -> str:
    """
    L{with_query} by hyperlink alone (one C{replace} rather than an C{add}
    per parameter: hyperlink checks every part again on each).
    """
    url = URL.from_text(base)
    added = tuple((quote(name, safe=""), quote(value, safe="")) for name, value in params)
    return url.replace(query=url.query + added).to_text()


#: A parameter whose text hyperlink gives back as it is.
_MARK = ("smeldr_mark", "1")
_MARK_TEXT = "smeldr_mark=1"


@functools.lru_cache(maxsize=1024)
def _query_prefix(base: str) -> Optional[str]:
    """
    The text L{_hyperlink_with_query} puts before the first added parameter
    of C{base} (the base's text, then C{?} or C{&}), or C{None} when its
    answer is not that prefix followed by the parameters (a fragment comes
    after them).  Raises as hyperlink does on a base it cannot parse.
    """
    text = _hyperlink_with_query(base, [_MARK])
    if not text.endswith(_MARK_TEXT):
        return None
    return text[: -len(_MARK_TEXT)]
