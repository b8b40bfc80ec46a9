# -*- test-case-name: tests.test_web_routes -*-
"""
The successful answers routes give, written one way everywhere: a JSON
document (L{json_response}, or L{StaticJSON} for one known at start-up)
and the C{303 See Other} after a form (L{see_other}).
"""

from __future__ import annotations

from typing import Any

from twisted.web.iweb import IRequest

from smeldr_oauth.oauth.jsontext import encoder
from smeldr_oauth.web.errors import JSON_HEADERS


#: Compact JSON.  One encoder for every answer: C{json.dumps} with
#: C{separators} builds a new one per call (a third of encoding a token
#: response), and C{JSONEncoder.encode} a new C encoder per call (see
#: L{smeldr_oauth.oauth.jsontext}).
_compact = encoder()


def json_response(request: IRequest, body: Any, status: int = 200) -> bytes:
    """
    C{body} as compact JSON, uncacheable (it may hold tokens).
    """
    request.setResponseCode(status)
    for key, value in JSON_HEADERS:
        request.setHeader(key, value)
    return _compact(body).encode("utf-8")


class StaticJSON:
    """
    A JSON document known at start-up (the metadata documents): serialised
    once, answered with a shared cache lifetime.
    """

    def __init__(self, body: Any, max_age: int = 300) -> None:
        self.body = _compact(body).encode("utf-8")
        self.headers = (
            (b"Content-Type", b"application/json"),
            (b"Cache-Control", b"public, max-age=%d" % (max_age,)),
            (b"X-Content-Type-Options", b"nosniff"),
        )

    def __call__(self, request: IRequest) -> bytes:
        for key, value in self.headers:
            request.setHeader(key, value)
        return self.body


def see_other(request: IRequest, location: str) -> bytes:
    """
    303 See Other: after a POST the browser follows with a GET, so what was
    posted (a pasted site token) is never re-posted to where it goes next
    (a 307 would).
    """
    request.setResponseCode(303)
    request.setHeader("Location", location)
    request.setHeader("Cache-Control", "no-store")
    request.setHeader("Referrer-Policy", "no-referrer")
    request.setHeader("X-Frame-Options", "DENY")
    request.setHeader("Content-Security-Policy", "default-src 'none'; frame-ancestors 'none'")
    request.setHeader("Content-Type", "text/plain; charset=utf-8")
    return b"Redirecting\n"
