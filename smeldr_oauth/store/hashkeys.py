# -*- test-case-name: tests.test_store_hashkeys -*-
"""
How the SQL store keeps the hash of a secret in its key columns (the
codes', the access tokens' and the refresh tokens' C{code_hash} and
C{token_hash}): one rule per engine, and this module is the only place
that knows it.

Above the store, everything has a hash as L{hash_secret} makes it, 64 hex
digits: the model's records, the store interface, the memory store,
revocation notices, PostgreSQL's columns and facts functions (C{TEXT}).

SQLite keeps the 32 bytes themselves (C{BLOB}, OAuth migration 9).  Every
rotation inserts two random hashes into two primary-key indexes; an entry
of 32 bytes rather than 64 characters halves those indexes' leaves, so
more of a checkpoint interval's inserts share a leaf: the store loop at
120,000 refreshes wrote 4.8 -> 4.4 WAL frames a refresh and its checkpoint
copied about a quarter fewer pages (C{docs/performance.md}, "Round twelve:
refresh").  PostgreSQL keeps hex: its two facts functions take and return
C{TEXT}, and its share of a refresh is elsewhere.

A value that is not a hash in L{hash_secret}'s form (64 lowercase hex
digits) is bound to SQLite unchanged, as text: it matches no stored
hash, as it matched none before (a stored hash was always that form).
"""

from __future__ import annotations

from typing import Any, Callable

#: Bytes of a SHA-256.
HASH_BYTES = 32


def _sqlite_key(hex_hash: str) -> Any:
    try:
        raw = bytes.fromhex(hex_hash)
    except (TypeError, ValueError):
        return hex_hash
    # bytes.fromhex also takes capitals and spaces between bytes: only the
    # one spelling hash_secret makes is a key.
    return raw if len(raw) == HASH_BYTES and raw.hex() == hex_hash else hex_hash


def _same(hex_hash: str) -> Any:
    return hex_hash


def key_for(engine_name: str) -> Callable[[str], Any]:
    """
    The function that turns a hex hash into what C{engine_name}'s key
    columns hold (the value to bind).
    """
    return _sqlite_key if engine_name == "sqlite" else _same


def shown(value: Any) -> Any:
    """
    A key column's value as the rest of the program has it: 32 bytes read
    from SQLite as their hex, anything else (PostgreSQL's text) as it is.
    """
    return value.hex() if isinstance(value, bytes) else value


#: OAuth migration 9's conversion of a hex key column C{column} on SQLite:
#: the hex of a hash (64 lowercase hex digits) made its bytes, any other
#: value left as it is (none was ever written but by hand).  C{unhex} is
#: SQLite's own from 3.41, and L{smeldr_oauth.db.sqlite}'s before that.
def to_blob_sql(column: str) -> str:
    return (
        f"CASE WHEN length({column}) = {2 * HASH_BYTES} AND {column} NOT GLOB '*[^0-9a-f]*'"
        f" THEN unhex({column}) ELSE {column} END"
    )
