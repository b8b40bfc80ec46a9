"""
Tests for L{smeldr_oauth.db.arrays}: the one rule that quotes an array
parameter's elements, its literals' text, and every hostile element read
back as it was sent by a real PostgreSQL (L{tests.postgres}), in both of
the engine's protocols.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from twisted.trial.unittest import SynchronousTestCase

from smeldr_oauth.db import Migration, Schema, open_database
from smeldr_oauth.db.arrays import number_array, text_array, typed_array
from tests import postgres
from tests.test_store_sqlite import InlineReactor

#: Elements that would end, split or retype an element quoted wrongly: a
#: quote, a backslash (alone, last, before a quote), a comma, braces, a
#: NUL, non-ASCII (two-, three- and four-byte UTF-8), spaces at either
#: end, white space, C{NULL} in either case, the empty text, a string
#: literal's quote and a comment, dollar quotes, and C{None}.
HOSTILE: tuple[Any, ...] = (
    'a"b', "c\\d", "\\", "end\\", '\\"', '"', "a,b", ",", "{x}", "{", "}", "{}", "a\x00b", "\x00",
    "\u00e9", "\u4e2d", "\U0001f600", " lead", "trail ", " ", "\t\n", "NULL", "null", "", "'; DROP TABLE x; --",
    "$$", "ARRAY[1]", None,
)

#: The same as PostgreSQL stores them: a NUL as U+FFFD, as in every text
#: parameter (PostgreSQL refuses NUL in text).
STORED = tuple(None if value is None else value.replace("\x00", "\ufffd") for value in HOSTILE)

#: Numbers whose text must read back as the same value: the shortest
#: decimal of a double at both ends of its range, a negative zero, whole
#: numbers past a float's exact range, and C{None}.
NUMBERS: tuple[Any, ...] = (0, -1, 2**31 - 1, 0.1, 1e-7, 1e16, -0.0, 5e-324, 1.7976931348623157e308, 1 / 3, None)

SCHEMA = Schema("arrays", (Migration(1, ()),))


class LiteralTests(SynchronousTestCase):
    def test_text_every_element_quoted(self) -> None:
        """
        Every text element is quoted, a backslash and a quote escaped with a
        backslash, C{None} an unquoted C{NULL}, a NUL stored as U+FFFD.
        """
        self.assertEqual(text_array(["a", "b"]), '{"a","b"}')
        self.assertEqual(text_array(['q"', "b\\", None, "NULL", ""]), '{"q\\"","b\\\\",NULL,"NULL",""}')
        self.assertEqual(text_array(["a\x00b", ","]), '{"a\ufffdb",","}')
        self.assertEqual(text_array([]), "{}")

    def test_text_not_text(self) -> None:
        """A value not text is stored as its text."""
        self.assertEqual(text_array([1, 'x"', None, 2.5]), '{"1","x\\"",NULL,"2.5"}')

    def test_numbers(self) -> None:
        """
        Whole numbers and finite floats as C{repr} writes them, C{None} a
        C{NULL}; an infinity, a NaN or another class as the list itself.
        """
        self.assertEqual(number_array([1, 2.5, None, 1e16]), "{1,2.5,NULL,1e+16}")
        self.assertEqual(number_array([]), "{}")
        for odd in ([1.0, math.inf], [math.nan], [True], ["1"]):
            self.assertIs(number_array(odd), odd)

    def test_typed(self) -> None:
        self.assertEqual(typed_array("text", [1]), '{"1"}')
        self.assertEqual(typed_array("float8", [1]), "{1}")
        self.assertEqual(typed_array("int4", [None]), "{NULL}")


class PostgresRoundTripTests(SynchronousTestCase):
    """
    Each literal cast by a real PostgreSQL reads back as what was sent,
    one element for each value: as a bound parameter and in the text of a
    simple-protocol statement (a batch's, L{smeldr_oauth.db.database}).
    """

    def setUp(self) -> None:
        self.db = open_database(postgres.database_url(self), InlineReactor(), threads=0)
        self.addCleanup(self.db.close)

    def cast(self, kind: str, parameters: Sequence[Any]) -> list[tuple[Any, ...]]:
        marks = ", ".join(f"?::{kind}[]" for _ in parameters)

        def run(txn: Any) -> Any:
            return [tuple(txn.execute(f"SELECT {marks}", parameters, simple=simple).fetchone()) for simple in (False, True)]

        return self.successResultOf(self.db.write(SCHEMA, run))  # type: ignore[no-any-return]

    def test_hostile_text(self) -> None:
        """
        Every hostile element, alone and all in one array, reads back as it
        was (a NUL as U+FFFD).
        """
        literals = [text_array([value]) for value in HOSTILE] + [text_array(HOSTILE)]
        expected = tuple([value] for value in STORED) + (list(STORED),)
        for row in self.cast("text", literals):
            self.assertEqual(row, expected)

    def test_numbers(self) -> None:
        """
        Numbers read back as the same values, as float8 (whole ones
        included) and as int4; an infinity and a NaN (sent as a list) too.
        """
        floats = [number_array(NUMBERS), number_array([math.inf, -math.inf])]
        for row in self.cast("float8", floats):
            self.assertEqual(row[0], [None if value is None else float(value) for value in NUMBERS])
            self.assertEqual([repr(value) for value in row[0]], [repr(value if value is None else float(value)) for value in NUMBERS])
            self.assertEqual(row[1], [math.inf, -math.inf])
        for row in self.cast("int4", [number_array([0, -1, 2**31 - 1, None])]):
            self.assertEqual(row, ([0, -1, 2**31 - 1, None],))
        self.assertTrue(math.isnan(self.cast("float8", [number_array([math.nan])])[0][0][0]))
