"""
Persistence for the authorization server: the L{IOAuthStore} seam, a SQLite
implementation for production and an in-memory one for tests and embedding.
"""

from smeldr_oauth.store.common import StoreConflict, start_purging
from smeldr_oauth.store.interface import CodeRedemption, IOAuthStore, RefreshRedemption
from smeldr_oauth.store.memory import MemoryStore
from smeldr_oauth.store.sqlite import SQLiteStore

__all__ = [
    "CodeRedemption",
    "IOAuthStore",
    "MemoryStore",
    "RefreshRedemption",
    "SQLiteStore",
    "StoreConflict",
    "start_purging",
]
