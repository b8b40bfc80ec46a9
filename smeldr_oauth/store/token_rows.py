# -*- test-case-name: tests.test_store_sqlite,tests.test_store_postgres -*-
"""
The rows of a new access and refresh token, for every rotation and code
exchange of L{smeldr_oauth.store.transactions}: their C{INSERT}s, with each
hash as the engine keeps it (L{smeldr_oauth.store.hashkeys}).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from smeldr_oauth.db.rows import to_row
from smeldr_oauth.oauth import model
from smeldr_oauth.store.scopelists import dump as _dump

#: The C{INSERT}s of a new access and refresh token: L{to_row}'s text for
#: their records, made once here.
_ACCESS_INSERT = to_row(
    "access_tokens", model.AccessToken(token_hash="", grant_id="", scopes=(), resource="", expires_at=0.0)
)[0]
_REFRESH_INSERT = to_row(
    "refresh_tokens",
    model.RefreshToken(token_hash="", grant_id="", scopes=(), generation=0, created_at=0.0, expires_at=0.0),
)[0]


# The rows of a new access and refresh token, as L{to_row} makes them
# (tests.test_store_sqlite holds the two to the same statement and values),
# written out: every rotation and code exchange makes both, and the generic
# way (the record's fields fetched, then each converted one put in its
# place) took three times as long (docs/performance.md, round ten).


def _access_row(
    access: model.AccessToken, grant_id: str, scopes: Sequence[str], resource: str, key: Callable[[str], Any]
) -> tuple[str, Sequence[Any]]:
    return _ACCESS_INSERT, (key(access.token_hash), grant_id, _dump(scopes), resource, access.expires_at)


def _refresh_row(
    refresh: model.RefreshToken, grant_id: str, scopes: Sequence[str], generation: int, key: Callable[[str], Any]
) -> tuple[str, Sequence[Any]]:
    values = (
        key(refresh.token_hash), grant_id, _dump(scopes), generation, refresh.created_at, refresh.expires_at, None
    )
    return _REFRESH_INSERT, values


