"""
Tests for L{smeldr_oauth.store.hashkeys}: the one rule per engine for how a
secret's hash is kept in the SQL store's key columns.
"""

from __future__ import annotations

import sqlite3

from twisted.trial.unittest import SynchronousTestCase

from smeldr_oauth.db.sqlite import SQLiteEngine
from smeldr_oauth.oauth.secrets import hash_secret
from smeldr_oauth.store import hashkeys


class KeyTests(SynchronousTestCase):
    def test_sqlite_bytes(self) -> None:
        """
        On SQLite a hash as L{hash_secret} spells it is bound as its 32
        bytes, and read back as the same hex.
        """
        hashed = hash_secret("a secret")
        key = hashkeys.key_for("sqlite")(hashed)
        self.assertEqual(key, bytes.fromhex(hashed))
        self.assertEqual(len(key), 32)
        self.assertEqual(hashkeys.shown(key), hashed)

    def test_sqlite_stamped(self) -> None:
        """
        A stamped secret's hash (76 hex digits: its time stamp, then its
        SHA-256) is bound as its 38 bytes.
        """
        from smeldr_oauth.oauth.secrets import new_secret

        hashed = hash_secret(new_secret())
        key = hashkeys.key_for("sqlite")(hashed)
        self.assertEqual((key, len(key)), (bytes.fromhex(hashed), 38))
        self.assertEqual(hashkeys.shown(key), hashed)
        for other in (hashed.upper(), hashed[:-2], hashed + "00"):
            self.assertIs(hashkeys.key_for("sqlite")(other), other)

    def test_sqlite_other_spellings_unchanged(self) -> None:
        """
        Anything else is bound unchanged (as text, which no stored hash
        equals): capitals, spaces, a wrong length, not hex, not a string.
        """
        hashed = hash_secret("a secret")
        key = hashkeys.key_for("sqlite")
        for other in (hashed.upper(), hashed[:-2], hashed + "00", " ".join([hashed[:2], hashed[2:]]), "zz" * 32, ""):
            self.assertIs(key(other), other)
        self.assertIsNone(key(None))  # type: ignore[arg-type]

    def test_postgresql_hex(self) -> None:
        """
        PostgreSQL keeps the hex: the value is bound and read as it is.
        """
        hashed = hash_secret("a secret")
        self.assertIs(hashkeys.key_for("postgresql")(hashed), hashed)
        self.assertIs(hashkeys.shown(hashed), hashed)


class ToBlobSQLTests(SynchronousTestCase):
    """
    Migration 9's conversion, run by SQLite on the engine's connection.
    """

    def convert(self, value: object) -> object:
        connection = sqlite3.connect(":memory:")
        self.addCleanup(connection.close)
        SQLiteEngine(":memory:").prepare(connection)
        connection.row_factory = None
        return connection.execute(f"SELECT {hashkeys.to_blob_sql('k')} FROM (SELECT ? AS k)", (value,)).fetchone()[0]

    def test_hex_converted(self) -> None:
        hashed = hash_secret("a secret")
        self.assertEqual(self.convert(hashed), bytes.fromhex(hashed))

    def test_other_text_kept(self) -> None:
        hashed = hash_secret("a secret")
        for other in (hashed.upper(), hashed[:-2], "by-hand", "g" * 64):
            self.assertEqual(self.convert(other), other)


class UnhexTests(SynchronousTestCase):
    """
    L{smeldr_oauth.db.sqlite.unhex}, SQLite 3.41's C{unhex} for the older
    libraries, which the engine's connections get.
    """

    def test_unhex(self) -> None:
        from smeldr_oauth.db.sqlite import unhex

        self.assertEqual(unhex("00aFff"), b"\x00\xaf\xff")
        self.assertEqual(unhex(""), b"")
        for bad in ("0", "zz", "ab cd", " ab", "ab\n", None, 12, b"ab"):
            self.assertIsNone(unhex(bad))

    def test_connection_has_unhex(self) -> None:
        """
        Whatever the library's version, the engine's connection has
        C{unhex} (its own, or this one).
        """
        connection = sqlite3.connect(":memory:")
        self.addCleanup(connection.close)
        SQLiteEngine(":memory:").prepare(connection)
        self.assertEqual(tuple(connection.execute("SELECT unhex('0aff'), unhex('x')").fetchone()), (b"\n\xff", None))
