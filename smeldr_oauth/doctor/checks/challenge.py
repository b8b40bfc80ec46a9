# -*- test-case-name: tests.test_doctor_checks -*-
"""
The 401 an MCP request without a token gets: its C{WWW-Authenticate}
value parsed (RFC 9110 section 11.6.1) and its Bearer challenge's
C{resource_metadata} checked (RFC 6750, RFC 9728 section 5.1).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Optional

from smeldr_oauth.doctor.model import Fetched, Verdict, fail, ok


#: One piece of a C{WWW-Authenticate} value (RFC 9110 section 11.6.1): an
#: auth-param, a bare token (a scheme, or a token68), or a comma.
_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_PIECE = re.compile(
    rf'\s*(?:(?P<name>{_TOKEN})\s*=\s*(?:"(?P<quoted>(?:[^"\\]|\\.)*)"|(?P<plain>[^\s,]*))'
    rf"|(?P<bare>{_TOKEN}=*)|(?P<comma>,))"
)


def parse_challenges(header: str) -> list[tuple[str, dict[str, str]]]:
    """
    The challenges in a C{WWW-Authenticate} value: (scheme in lower case,
    parameters by lower-case name).  Junk ends the parse; what came before
    it is kept.
    """
    challenges: list[tuple[str, dict[str, str]]] = []
    position = 0
    while position < len(header):
        piece = _PIECE.match(header, position)
        if piece is None or piece.end() == position:
            break
        position = piece.end()
        if piece.group("comma"):
            continue
        if piece.group("name") is not None and challenges:
            value = piece.group("quoted")
            value = re.sub(r"\\(.)", r"\1", value) if value is not None else piece.group("plain")
            challenges[-1][1].setdefault(piece.group("name").lower(), value)
        elif piece.group("bare") is not None:
            if challenges and not header[: piece.start()].rstrip().endswith(",") and challenges[-1][1] == {}:
                # A token68 after the scheme ("Basic dXNlcg=="): not a new challenge.
                continue
            challenges.append((piece.group("bare").lower(), {}))
    return challenges


def parse_bearer_challenge(header: str) -> Optional[dict[str, str]]:
    """
    The parameters of the C{Bearer} challenge in a C{WWW-Authenticate}
    value (RFC 6750 section 3), or C{None} when there is none.
    """
    for scheme, params in parse_challenges(header):
        if scheme == "bearer":
            return params
    return None


def check_challenge(fetched: Fetched, metadata_ok: Mapping[str, str]) -> Verdict:
    """
    An MCP request without a token gets 401 with a Bearer challenge whose
    C{resource_metadata} names metadata that works (the TypeScript SDK
    fetches only that URL when it is named).

    @param metadata_ok: metadata URL -> its C{resource}, for each metadata
        URL that answered well.
    """
    if fetched.status is None:
        return fail(
            "challenge",
            f"POST {fetched.url}: {fetched.answered()}",
            "The MCP URL must reach the server.",
        )
    if fetched.status != 401:
        return fail(
            "challenge",
            f"POST {fetched.url} without a token answered {fetched.answered()}, not 401",
            "The MCP endpoint must answer 401 to a request without a token: check the URL, and that "
            "nothing in front of the server answers for it (an auth proxy, a login page).",
            status=fetched.status,
        )
    headers = fetched.headers.get("www-authenticate", ())
    if not headers:
        return fail(
            "challenge",
            "the 401 has no WWW-Authenticate header",
            "Something in front of the server drops WWW-Authenticate (or replaces the 401 with its own): "
            "let the server's 401 through unchanged; clients find the metadata from it.",
        )
    params = None
    for header in headers:
        params = parse_bearer_challenge(header)
        if params is not None:
            break
    if params is None:
        return fail(
            "challenge",
            f"WWW-Authenticate has no Bearer challenge: {headers[0][:80]!r}",
            "Answer with the server's Bearer challenge (RFC 6750, RFC 9728).",
        )
    named = params.get("resource_metadata")
    if not named:
        return fail(
            "challenge",
            "the Bearer challenge has no resource_metadata",
            "Name the resource metadata URL in the challenge (RFC 9728 section 5.1).",
        )
    if named not in metadata_ok:
        return fail(
            "challenge",
            f"resource_metadata names {named}, which is not metadata that answered (see above)",
            "Name the path-inserted metadata URL of this resource, and make it answer.",
            resource_metadata=named,
        )
    return ok("challenge", f"401 with resource_metadata={named}", resource_metadata=named)
