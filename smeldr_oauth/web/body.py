# -*- test-case-name: tests.test_web_body -*-
"""
Reading request bodies: one reader with a size cap and a media-type check
(L{read_body}), and the three formats built on it.

The site's request already stops buffering past the site-wide cap
(L{smeldr_oauth.web.site}); each endpoint reads through here with its own,
smaller limit, so no endpoint parses more than it needs.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Union
from urllib.parse import unquote

from twisted.web.iweb import IRequest

from smeldr_oauth.web import errors
from smeldr_oauth.web.headers import media_type as request_media_type

FORM = "application/x-www-form-urlencoded"
JSON = "application/json"

#: Limits for the small bodies of the OAuth endpoints and forms.
MAX_FORM = 64 * 1024
MAX_JSON = 64 * 1024

#: At most this many parameters in a form or query (a bound on parsing).
MAX_FIELDS = 100


def read_body(request: IRequest, media_type: Union[str, Iterable[str], None], limit: int) -> bytes:
    """
    The request body, when it has media type C{media_type} (one of them,
    if several are given; any, if C{None}) and at most C{limit} bytes.

    @raise errors.HTTPError: 413 if it is larger (or the site stopped
        buffering it), 415 if it is of another type, 400 if the
        C{Content-Type} header is malformed.
    """
    if getattr(request, "body_too_large", False):
        raise errors.body_too_large()
    if media_type is not None:
        allowed = (media_type,) if isinstance(media_type, str) else tuple(media_type)
        if request_media_type(request) not in allowed:
            raise errors.unsupported_media_type(allowed)
    content = request.content
    if content is None:
        return b""
    content.seek(0)
    data = content.read(limit + 1)
    if len(data) > limit:
        raise errors.body_too_large()
    return data


#: Encoded names and values already decoded: a client's redirect URI and
#: its resource come percent-encoded in every consent and every code
#: exchange, the same text each time, and C{unquote} took about 3 µs for
#: each (docs/performance.md, round seven).  Decoding is a pure function of
#: the text, so a kept answer is the answer; bounded (emptied when full,
#: short texts only), and a text that does not decode is never kept.
_DECODED: dict[str, str] = {}
_MAX_DECODED = 256
_MAX_DECODED_LENGTH = 512


def _decoded(text: str) -> str:
    decoded = _DECODED.get(text)
    if decoded is None:
        decoded = unquote(text.replace("+", " "), errors="strict")
        if len(text) <= _MAX_DECODED_LENGTH:
            if len(_DECODED) >= _MAX_DECODED:
                _DECODED.clear()
            _DECODED[text] = decoded
    return decoded


def _parse_pairs(data: bytes, what: str) -> dict[str, list[str]]:
    """
    What C{urllib.parse.parse_qs} answers with blank values kept, at most
    L{MAX_FIELDS} fields and strict UTF-8 (a test compares the two on
    arbitrary bytes), without its general machinery: a consent and a code
    exchange each parse a form, and C{parse_qs} was 1-2% of a flow.
    """
    try:
        text = data.decode("utf-8")
        if not text:
            return {}
        if text.count("&") >= MAX_FIELDS:
            raise ValueError("too many fields")
        pairs: dict[str, list[str]] = {}
        for field in text.split("&"):
            if not field:
                continue
            name, _, value = field.partition("=")
            if "%" in name or "+" in name:
                name = _decoded(name)
            if "%" in value or "+" in value:
                value = _decoded(value)
            values = pairs.get(name)
            if values is None:
                pairs[name] = [value]
            else:
                values.append(value)
        return pairs
    except (UnicodeDecodeError, ValueError):
        raise errors.bad_request(f"the {what} is not valid")


def read_form(request: IRequest, limit: int = MAX_FORM) -> dict[str, list[str]]:
    """
    An C{application/x-www-form-urlencoded} body, parsed here rather than
    taken from C{request.args}, which merges the query string into it (the
    token endpoint must not take parameters from the URL).
    """
    return _parse_pairs(read_body(request, FORM, limit), "form")


def read_query(request: IRequest) -> dict[str, list[str]]:
    """
    The query string's parameters (strict UTF-8, bounded).
    """
    uri = request.uri
    _, _, query = uri.partition(b"?")
    return _parse_pairs(query, "query string")


def read_json(request: IRequest, limit: int = MAX_JSON) -> Any:
    """
    An C{application/json} body, parsed.

    @raise errors.HTTPError: 400 if it is not JSON (or nests too deeply),
        besides L{read_body}'s errors.
    """
    data = read_body(request, JSON, limit)
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise errors.bad_request("the body is not valid JSON")
