"""
Persistence for the authorization server: implementations of
L{smeldr_oauth.oauth.interfaces.IOAuthStore} in SQL (one store for SQLite
and PostgreSQL, over L{smeldr_oauth.db}) and in memory (tests, embedding).
"""

from __future__ import annotations

import os
from typing import Any, Optional

from twisted.internet.interfaces import IReactorTime

from smeldr_oauth.db import open_database
# Importable from here as before; documented where they live.
from smeldr_oauth.db.errors import StoreConflict, StoreUnavailable  # noqa: F401
from smeldr_oauth.oauth.interfaces import CodeRedemption, IOAuthStore, RefreshRedemption  # noqa: F401
from smeldr_oauth.store.common import start_purging
from smeldr_oauth.store.memory import MemoryStore
from smeldr_oauth.store.sql import SQLStore
from smeldr_oauth.store.sqlite import SQLiteStore

__all__ = [
    "MemoryStore",
    "SQLStore",
    "SQLiteStore",
    "open_store",
    "start_purging",
]


def open_store(
    location: "str | os.PathLike[str]",
    reactor: Any = None,
    clock: Optional[IReactorTime] = None,
    *,
    threads: Optional[int] = None,
    **kwargs: Any,
) -> SQLStore:
    """
    The OAuth store at a C{--database} value: a C{postgresql://} URL or a
    SQLite path.  Wait for its C{ready} before relying on it.

    @param threads: see L{smeldr_oauth.db.open_database}.
    """
    return SQLStore(open_database(location, reactor, threads=threads, clock=clock), clock, **kwargs)
