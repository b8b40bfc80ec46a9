# -*- test-case-name: tests.test_store_hashkeys -*-
"""
How the SQL store keeps the hash of a secret in its key columns (the
codes', the access tokens' and the refresh tokens' C{code_hash} and
C{token_hash}): one rule per engine, and this module is the only place
that knows it.

Above the store, everything has a hash as L{hash_secret} makes it, hex
digits (64, or 76 with a secret's time stamp first): the model's records, the store interface, the memory store,
revocation notices, PostgreSQL's columns and facts functions (C{TEXT}).

SQLite keeps the bytes themselves (C{BLOB}, OAuth migration 9): 32, or
38 with the stamp (L{smeldr_oauth.oauth.secrets}).  Every rotation inserts
two hashes into two primary-key indexes; an entry of 32 bytes rather than
64 characters halves those indexes' leaves, so more of a checkpoint
interval's inserts share a leaf (the store loop at 120,000 refreshes of
unstamped secrets: 4.8 -> 4.4 WAL frames a refresh, the checkpoint's copy
about a quarter smaller; C{docs/performance.md}, "Round twelve: refresh").  PostgreSQL keeps hex: its two facts functions take and return
C{TEXT}, and its share of a refresh is elsewhere.

A value that is not a hash in L{hash_secret}'s form (64 or 76 lowercase
hex digits) is bound to SQLite unchanged, as text: it matches no stored
hash, as it matched none before (a stored hash was always that form).
"""

from __future__ import annotations

from typing import Any, Callable

#: Bytes of a SHA-256.
HASH_BYTES = 32

#: Bytes of a stamped secret's hash: the 6 of its time stamp, then its
#: SHA-256 (L{smeldr_oauth.oauth.secrets.hash_secret}).
STAMPED_BYTES = 6 + HASH_BYTES


def _sqlite_key(hex_hash: str) -> Any:
    try:
        raw = bytes.fromhex(hex_hash)
    except (TypeError, ValueError):
        return hex_hash
    # bytes.fromhex also takes capitals and spaces between bytes: only the
    # spellings hash_secret makes are keys.
    return raw if (len(raw) == STAMPED_BYTES or len(raw) == HASH_BYTES) and raw.hex() == hex_hash else hex_hash


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
