"""
Tests for L{smeldr_oauth.db.rows}: a row to its record by field names, a
record to its row's C{INSERT}, the optional filters of a listing query.
"""

from __future__ import annotations

import sqlite3
from typing import Optional

import attr
from twisted.trial.unittest import SynchronousTestCase

from smeldr_oauth.db.rows import from_row, to_row, where


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class Thing:
    name: str
    tags: tuple[str, ...]
    note: Optional[str] = None


class FromRowTests(SynchronousTestCase):
    def test_by_name(self) -> None:
        """
        Every field comes from the column of its name, whatever the
        column order; a converted field replaces its column; other columns
        are ignored.
        """
        db = sqlite3.connect(":memory:")
        db.row_factory = sqlite3.Row
        row = db.execute("SELECT 'a b' AS tags, 'x' AS extra, NULL AS note, 'n' AS name").fetchone()
        self.assertEqual(
            from_row(Thing, row, tags=tuple(row["tags"].split())),
            Thing(name="n", tags=("a", "b"), note=None),
        )
        self.assertEqual(from_row(Thing, {"name": "m", "tags": (), "note": "y"}), Thing(name="m", tags=(), note="y"))

    def test_missing_column(self) -> None:
        """A field with neither a column nor a converted value is an error, not a default."""
        with self.assertRaises(KeyError):
            from_row(Thing, {"name": "n", "tags": ()})


class ToRowTests(SynchronousTestCase):
    def test_every_field(self) -> None:
        """
        One column per field, in the record's order, each with its
        placeholder; a converted field gives its value in place of the
        record's.
        """
        thing = Thing(name="n", tags=("a", "b"), note="x")
        self.assertEqual(
            to_row("things", thing, tags="a b"),
            ("INSERT INTO things (name, tags, note) VALUES (?, ?, ?)", ("n", "a b", "x")),
        )
        self.assertEqual(to_row("things", thing, tags="", note=None)[1], ("n", "", None))

    def test_round_trip(self) -> None:
        """What L{to_row} writes, L{from_row} reads back as the same record."""
        db = sqlite3.connect(":memory:")
        db.row_factory = sqlite3.Row
        db.execute("CREATE TABLE things (note TEXT, tags TEXT, name TEXT)")
        thing = Thing(name="n", tags=("a", "b"))
        db.execute(*to_row("things", thing, tags=" ".join(thing.tags)))
        row = db.execute("SELECT * FROM things").fetchone()
        self.assertEqual(from_row(Thing, row, tags=tuple(row["tags"].split())), thing)

    def test_unknown_field(self) -> None:
        """A converted name that is no field is a mistake, not an extra column."""
        with self.assertRaises(TypeError):
            to_row("things", Thing(name="n", tags=()), tag="x")


class WhereTests(SynchronousTestCase):
    def test_none(self) -> None:
        self.assertEqual(where(), ("", []))
        self.assertEqual(where(("a = ?", None)), ("", []))

    def test_conditions(self) -> None:
        """Fixed conditions always apply; a pair only with a value; parameters in order."""
        self.assertEqual(
            where("revoked_at IS NULL", ("a = ?", "x"), ("b = ?", None), ("c < ?", 0)),
            (" WHERE revoked_at IS NULL AND a = ? AND c < ?", ["x", 0]),
        )
