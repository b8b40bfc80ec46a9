# -*- test-case-name: tests.test_oauth_jsontext -*-
"""
JSON text for what the server writes many times a second (token
responses, JSON-RPC messages, a tool's result as text), without the
per-call set-up of C{JSONEncoder.encode}.

C{JSONEncoder.encode} makes a new C encoder on every call, with a fresh
dict of the containers being encoded (its circular-reference check), and
runs two Python frames around it: a quarter of encoding a C{tools/call}
answer (59,300 → 45,100 instructions under callgrind).  The C encoder
keeps no state between calls when it has no such dict, so one is made
here, once, and called directly.

The check is not lost: a value that contains itself makes the C encoder
recurse until Python's recursion limit, and that C{RecursionError} sends
the value once more through the standard encoder, which answers as it
always did (C{ValueError} for a cycle, C{RecursionError} for nesting
deeper than the limit).  The text is the standard encoder's, byte for
byte.

(In the OAuth core, below the web edge and the MCP protocol alike, which
both use it.)
"""

from __future__ import annotations

import json
from json import encoder as _encoder
from typing import Any, Callable, Optional

_c_make_encoder = getattr(_encoder, "c_make_encoder", None)

#: What C{json.JSONEncoder(separators=(",", ":"))} writes: no spaces.
COMPACT = (",", ":")


def encoder(
    separators: tuple[str, str] = COMPACT,
    ensure_ascii: bool = True,
    default: Optional[Callable[[Any], Any]] = None,
) -> Callable[[Any], str]:
    """
    A function that gives a value as the text
    C{json.JSONEncoder(separators=separators, ensure_ascii=ensure_ascii,
    default=default).encode(value)} gives (compact by default).
    """
    checked = json.JSONEncoder(separators=separators, ensure_ascii=ensure_ascii, default=default)
    if _c_make_encoder is None:  # pragma: no cover (CPython has the C encoder)
        fast: Callable[[Any], str] = json.JSONEncoder(
            separators=separators, ensure_ascii=ensure_ascii, default=default, check_circular=False
        ).encode
    else:
        strings = _encoder.encode_basestring_ascii if ensure_ascii else _encoder.encode_basestring
        item_separator, key_separator = separators
        # (markers, default, encoder, indent, key_separator, item_separator,
        # sort_keys, skipkeys, allow_nan), as JSONEncoder.iterencode passes
        # them, with no markers: no state kept from one call to the next.
        chunks = _c_make_encoder(
            None, checked.default, strings, None, key_separator, item_separator, False, False, True
        )

        def fast(value: Any) -> str:
            return "".join(chunks(value, 0))

    def encode(value: Any) -> str:
        try:
            return fast(value)
        except RecursionError:
            return checked.encode(value)

    return encode
