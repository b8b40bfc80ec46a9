# -*- test-case-name: tests.test_mcp_streams -*-
"""
What a twisted.web request lets go of once a long-lived response's headers
are sent.

An idle stream holds its request and channel for hours, by the thousand: the
headers it was routed and authorized by, the parsed query, the attribute
tables twisted.web sized for every request the server has seen.  L{shed}
keeps what the end of the response and the access log still read, and
nothing else (C{docs/performance.md}, "idle streams", measures each part).
Apart from L{smeldr_oauth.mcp.streams} because it is about twisted.web's
objects, not about SSE.
"""

from __future__ import annotations

from typing import Any

from twisted.web.http_headers import Headers


#: Request headers still read once a stream is open: the access log's
#: line, written when the stream ends (twisted.web's combined format, the
#: client address behind a trusted proxy).
_KEPT_REQUEST_HEADERS = (b"referer", b"user-agent", b"x-forwarded-for")

#: Response headers still read once they are sent: the site's metrics
#: leave SSE responses out by their content type.
_KEPT_RESPONSE_HEADERS = (b"content-type",)


#: A streaming request's attributes that nothing reads once its headers
#: are sent: the parsed query and cookies, the cookies it answered with,
#: where routing stood, the form-parsing switch, and the body limit
#: (the body is read).  What the end of the response and the access log
#: read (the channel, method, URI, protocol, path, client address, code,
#: length sent, notifications, producer) stays.
_DONE_WITH = frozenset(
    {
        "args",
        "received_cookies",
        "cookies",
        "prepath",
        "postpath",
        "sitepath",
        "_parsePOSTFormSubmission",
        "max_body",
    }
)


def shed(request: object) -> None:
    """
    Let go of what an open stream's request no longer needs: the headers
    it was routed and authorized by (each a list in a dict, ten or more of
    them: about 1.5 KiB and twenty objects the garbage collector walks, per
    idle stream), the response headers already sent, the empty body; then
    repack the attribute tables of the request and its channel
    (L{_compact}).  Only a twisted.web request is touched (a test's fake
    keeps its own).
    """
    if not _is_twisted_web(request) or not getattr(request, "startedWriting", False):
        return
    web: Any = request
    web.requestHeaders = _only(web.requestHeaders, _KEPT_REQUEST_HEADERS)
    web.responseHeaders = _only(web.responseHeaders, _KEPT_RESPONSE_HEADERS)
    content = getattr(web, "content", None)
    if content is not None:
        # The handler has read the body (a POST answered as a stream) or
        # there was none; twisted.web closes a present one at the end.
        web.content = None
        content.close()
    _compact(web, _DONE_WITH)
    _compact(web.channel)


_MISSING = object()


def _compact(obj: object, done_with: frozenset[str] = frozenset()) -> None:
    """
    Give C{obj} a new attribute dictionary holding only what it still
    needs: not the names in C{done_with}, nor the attributes that are the
    very object their class already has (twisted.web resets parser state
    to its class defaults, which the class still answers).

    Why: CPython shares one key table among a class's instances up to 30
    names; twisted.web's requests and channels set more than that over
    all the requests a server sees, so the attribute a stream sets last
    (the producer, at C{registerProducer}) turns each one's dictionary
    into one of its own, sized for 42 entries: 1.5 KiB each, per idle
    stream, twice.  Repacked without what is done with, each holds about
    20 and takes 464 bytes (tracemalloc, C{docs/performance.md}).
    """
    cls = type(obj)
    attributes = getattr(obj, "__dict__", None)
    if attributes is None:
        return
    obj.__dict__ = {
        name: value
        for name, value in attributes.items()
        if name not in done_with and getattr(cls, name, _MISSING) is not value
    }


def _is_twisted_web(request: object) -> bool:
    """A twisted.web request on its channel (not a test's fake), asked by what it has."""
    return (
        isinstance(getattr(request, "requestHeaders", None), Headers)
        and isinstance(getattr(request, "responseHeaders", None), Headers)
        and hasattr(getattr(request, "channel", None), "registerProducer")
        and hasattr(request, "startedWriting")
    )


def _only(headers: Headers, names: tuple[bytes, ...]) -> Headers:
    kept = Headers()
    for name in names:
        values = headers.getRawHeaders(name)
        if values is not None:
            kept.setRawHeaders(name, values)
    return kept
