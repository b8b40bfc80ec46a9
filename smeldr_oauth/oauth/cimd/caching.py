# -*- test-case-name: tests.test_oauth_cimd -*-
"""
How long a fetched document may be reused: C{Cache-Control} and C{Age}
(RFC 9111), read with Werkzeug's header parsers, and the C{ETag} kept for
revalidation.
"""

from __future__ import annotations

import re
from typing import Optional

import attr
from twisted.web.http_headers import Headers
from werkzeug.http import parse_list_header, unquote_header_value

from smeldr_oauth.oauth.model import Client

DEFAULT_TTL = 300.0
MAX_TTL = 24 * 60 * 60.0

_SECONDS = re.compile(r"[0-9]{1,10}")
_ETAG = re.compile(rb'(?:W/)?"[\x21\x23-\x7e]{0,250}"')


def _directives(headers: Headers) -> Optional[dict[str, Optional[str]]]:
    """
    The C{Cache-Control} directives, lower-cased, values unquoted; C{None}
    when one is given twice with different values (two readers would
    disagree about the response, so it is not cached).
    """
    directives: dict[str, Optional[str]] = {}
    raw = b", ".join(headers.getRawHeaders(b"cache-control", [])).decode("latin-1")
    for item in parse_list_header(raw):
        name, sep, argument = item.partition("=")
        name = name.strip().lower()
        if not name:
            continue
        value = unquote_header_value(argument.strip()) if sep else None
        if name in directives and directives[name] != value:
            return None
        directives[name] = value
    return directives


def freshness(headers: Headers, *, default_ttl: float = DEFAULT_TTL, max_ttl: float = MAX_TTL) -> Optional[float]:
    """
    How many seconds a response may be reused, from its C{Cache-Control}
    (and C{Age}) headers, or C{None} if it must not be cached.

    C{no-store} and C{no-cache} mean no caching; a malformed or conflicting
    C{max-age} too (RFC 9111 treats it as stale).  Without C{max-age} the
    default applies.  The result is clamped to C{max_ttl}.
    """
    directives = _directives(headers)
    if directives is None or "no-store" in directives or "no-cache" in directives:
        return None
    if "max-age" in directives:
        value = directives["max-age"] or ""
        if _SECONDS.fullmatch(value) is None:
            return None
        ttl = float(int(value))
    else:
        ttl = default_ttl
    ages = headers.getRawHeaders(b"age", [])
    if ages and re.fullmatch(rb"[0-9]{1,10}", ages[0].strip()):
        ttl -= int(ages[0].strip())
    ttl = min(ttl, max_ttl)
    return ttl if ttl > 0 else None


def etag(headers: Headers) -> Optional[bytes]:
    """
    The response's one well-formed C{ETag}, or C{None}.
    """
    values = headers.getRawHeaders(b"etag", [])
    if len(values) == 1 and _ETAG.fullmatch(values[0].strip()):
        return values[0].strip()
    return None


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class Entry:
    """
    A cached document: the client it describes, until when it is fresh,
    and its C{ETag}.
    """

    client: Client
    expires_at: float
    etag: Optional[bytes]
