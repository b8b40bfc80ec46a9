# -*- test-case-name: tests.test_oauth_text -*-
"""
Client-chosen text made safe: a client's self-declared name for a page
(L{clean_client_name}, the one cleaner for registrations and metadata
documents alike) and any client-chosen value for a log line (L{loggable}).
"""

from __future__ import annotations

import unicodedata
from typing import Optional

#: Longest client name kept.
MAX_CLIENT_NAME = 200

#: Longest rendering of a client-chosen value in a log line.
MAX_LOGGED = 200


def clean_client_name(name: str, limit: int = MAX_CLIENT_NAME) -> Optional[str]:
    """
    A self-declared client name made safe to show and to log: control
    characters (newlines, tabs) become spaces, the other characters of
    Unicode's category C (format characters such as bidi overrides and
    zero-width joiners that could disguise the name, surrogates, private
    use, unassigned) go, whitespace is collapsed, and the result is cut to
    C{limit} characters.  C{None} when nothing visible is left.
    """
    visible = "".join(
        " " if category == "Cc" else c
        for c, category in ((c, unicodedata.category(c)) for c in name)
        if category[0] != "C" or category == "Cc"
    )
    return " ".join(visible.split())[:limit].strip() or None


def loggable(value: object) -> str:
    """
    A client-chosen value (a client_id, a CIMD refusal reason quoting a
    document) made safe for a log line: plain printable ASCII up to
    L{MAX_LOGGED} characters passes as it is; anything else is written as
    its escaped C{ascii()} form, cut to L{MAX_LOGGED}, so that a newline
    cannot forge a log line and an escape sequence cannot drive the
    operator's terminal.
    """
    # isascii() and isprintable() together are "every character from
    # space to ~", in C: a generator over the characters was 0.5% of a
    # full flow's CPU (docs/performance.md, round ten).
    if isinstance(value, str) and len(value) <= MAX_LOGGED and value.isascii() and value.isprintable():
        if "\\" not in value and not value.startswith(("'", '"')):
            return value
    return ascii(value)[:MAX_LOGGED]
