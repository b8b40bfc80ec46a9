# -*- test-case-name: tests.test_db_arrays -*-
"""
A column of values as one PostgreSQL array parameter (C{?::text[]},
C{?::float8[]}, C{?::int4[]}): the one place where an array element is
quoted.

Why literals: psycopg dumps a list element by element in Python, with a
regular expression search for each text element to decide its quoting: a
batch's nine lists of the rate limits cost 130-225 us of the server's CPU
a statement against 65-97 us as literals (C{docs/performance.md}, "Round
nine").  The batches of refreshes (L{smeldr_oauth.store.refresh_batch},
L{smeldr_oauth.store.rotation_writes}) and of token requests' rate limits
(L{smeldr_oauth.store.ratelimits}) send every column so.

Why one place: the quoting of an element is what keeps a value (a grant
id, a scope, a key) from being read as two elements, a C{NULL} or a
brace, so it is a security rule, and it was written three ways before
round fifteen.  The rule (PostgreSQL's C{array_in}): every text element is
written in double quotes, in which only a backslash and a double quote are
special, each escaped with a backslash; C{None} is an unquoted C{NULL};
a NUL, which PostgreSQL refuses in text, is stored as U+FFFD, as in every
text parameter (L{smeldr_oauth.db.postgres}).  Numbers are written as
C{repr} writes them, the shortest text that reads back as the same value.
"""

from __future__ import annotations

from typing import Any, Sequence

from smeldr_oauth.db.postgres import scrub


def text_array(values: Sequence[Any]) -> str:
    """
    Text values as an array literal, every element quoted (a quote and a
    backslash escaped, C{None} an unquoted NULL), a NUL stored as U+FFFD.
    The values are joined with NULs and escaped in one pass over the
    joined text: a Python call a value would cost more than the server's
    C{array_in} saves (a batch's scopes hold quotes).  A value not text
    is stored as its text (C{str}), as a JSON number was.
    """
    if not values:
        return "{}"
    try:
        joined = "\x00".join(values)
    except TypeError:
        return "{" + ",".join("NULL" if value is None else text_array([str(value)])[1:-1] for value in values) + "}"
    if joined.count("\x00") != len(values) - 1:
        joined = "\x00".join(scrub(value) for value in values)
    return '{"' + joined.replace("\\", "\\\\").replace('"', '\\"').replace("\x00", '","') + '"}'


#: The classes of values written into a number array as C{repr} writes them.
_NUMBERS = frozenset((int, float, type(None)))


def number_array(values: Sequence[Any]) -> Any:
    """
    Whole numbers and finite floats as an array literal (C{repr}; C{None}
    a NULL), else the list, which psycopg dumps element by element (an
    infinity or NaN, spelled as psycopg spells them, or a value of
    another class: none is text, so none is quoted here).
    """
    if _NUMBERS.issuperset(map(type, values)):
        text = ",".join(map(repr, values))
        # Only infinities and NaN have these letters.
        if "inf" not in text and "nan" not in text:
            return "{" + text.replace("None", "NULL") + "}"
    return values


def typed_array(kind: str, values: Sequence[Any]) -> Any:
    """
    C{values} as the parameter of a C{?::kind[]} cast: L{text_array} for
    C{text}, else L{number_array}.
    """
    return text_array(values) if kind == "text" else number_array(values)
