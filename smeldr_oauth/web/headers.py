# -*- test-case-name: tests.test_web_headers -*-
"""
Reading request headers without trusting their bytes.

HTTP allows bytes 0x80-0xFF in a header value (RFC 9110's obs-text), and
twisted.web passes them on as they came.  C{request.getHeader("name")} with
a C{str} name decodes the value as UTF-8, which raises on most such bytes:
a stray byte in C{Authorization} or C{Content-Type} was a 500 with a
traceback.  Every header this project reads goes through L{header} (or
L{media_type}), which never raises on bytes: a value that is not what the
caller can use is an L{HTTPError} 400 the caller may turn into its own
protocol's error (C{invalid_client} for C{Authorization}).
"""

from __future__ import annotations

import re
from typing import Optional

from twisted.web.iweb import IRequest
from werkzeug.http import parse_options_header

from smeldr_oauth.web import errors

#: Anything but visible ASCII, space and tab.
_NOT_TEXT = re.compile(rb"[^\x20-\x7e\t]")


def header(request: IRequest, name: bytes, *, unique: bool = False, ascii_only: bool = True) -> Optional[str]:
    """
    The value of header C{name}, stripped, or C{None} when it is absent.

    @param unique: refuse a header sent more than once (otherwise the last
        one counts, as twisted.web's C{getHeader} does).
    @param ascii_only: refuse a value with bytes outside visible ASCII,
        space and tab (every header we read is defined over ASCII);
        without it, the value is decoded as Latin-1, which maps every byte
        and so never fails.
    @raise errors.HTTPError: 400, when the header is repeated (with
        C{unique}) or not ASCII (with C{ascii_only}).
    """
    values = request.requestHeaders.getRawHeaders(name)
    if not values:
        return None
    if unique and len(values) > 1:
        raise errors.bad_header(_label(name), "repeated")
    value = values[-1]
    if ascii_only and _NOT_TEXT.search(value) is not None:
        raise errors.bad_header(_label(name), "not printable ASCII")
    return value.decode("latin-1").strip()


def media_type(request: IRequest) -> str:
    """
    The media type of the body (C{Content-Type} without its parameters),
    lower-cased; C{""} when none was sent.

    @raise errors.HTTPError: 400, when C{Content-Type} is repeated or not
        ASCII.
    """
    value = header(request, b"content-type", unique=True)
    if not value:
        return ""
    known = _MEDIA_TYPES.get(value)
    if known is None:
        known = parse_options_header(value)[0].lower()
        if len(_MEDIA_TYPES) >= _MAX_MEDIA_TYPES:
            _MEDIA_TYPES.clear()
        if len(value) <= _MAX_MEDIA_TYPE_LENGTH:
            _MEDIA_TYPES[value] = known
    return known


#: C{Content-Type} values already parsed: clients send the same few on
#: every token request and MCP call, and parsing one (Werkzeug's
#: C{parse_options_header}) took about 0.6 µs a request against 0.1 µs for
#: the look-up (docs/performance.md, round ten).  The media type is a pure
#: function of the text (checked first by L{header}), so a kept answer is
#: the answer; bounded (emptied when full, short texts only).
_MEDIA_TYPES: dict[str, str] = {}
_MAX_MEDIA_TYPES = 64
_MAX_MEDIA_TYPE_LENGTH = 256


def _label(name: bytes) -> str:
    return "-".join(part.capitalize() for part in name.decode("ascii", "replace").split("-"))
