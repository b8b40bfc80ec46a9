# -*- test-case-name: tests.test_store_sqlite -*-
"""
L{IOAuthStore} on a SQLite file: the SQL store (L{smeldr_oauth.store.sql})
on the SQLite engine (L{smeldr_oauth.db.sqlite}), with the constructor the
library API has always had.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from smeldr_oauth.db.database import Database
from smeldr_oauth.db.sqlite import SQLiteEngine, data_version
from smeldr_oauth.store.sql import SQLStore


class SQLiteStore(SQLStore):
    """
    The authorization server's store in one SQLite file.
    """

    def __init__(
        self,
        path: "str | os.PathLike[str]",
        reactor: Any = None,
        clock: Optional[IReactorTime] = None,
        *,
        threads: int = 1,
        threadpool: Any = None,
        **kwargs: Any,
    ) -> None:
        """
        @param path: the database file (C{":memory:"} works: the pool holds
            a single connection).
        @param reactor: provides threads and the shutdown trigger; the
            global reactor when C{None}.
        @param clock: the default clock of L{start_purging}; C{reactor}
            when C{None}.
        @param threads: 1 runs SQLite on a database thread of its own; 0 on
            the reactor thread (C{--db-threads 0}).
        @param threadpool: a replacement for the pool's thread (tests use a
            thread-less one).
        @param kwargs: the keyword arguments of L{SQLStore}.
        """
        database = Database(
            SQLiteEngine(path), reactor, threads=threads, threadpool=threadpool, clock=clock
        )
        super().__init__(database, clock, **kwargs)

    @classmethod
    def open(
        cls, path: "str | os.PathLike[str]", reactor: Any = None, clock: Any = None, **kwargs: Any
    ) -> "Deferred[Any]":
        """
        Open (creating or migrating as needed) the store at C{path}.
        """
        return cls(path, reactor, clock, **kwargs).ready

    def data_version(self) -> "Deferred[int]":
        """
        SQLite's C{PRAGMA data_version} on the store's connection: it
        changes when I{another} connection (another process, such as
        C{smeldr-oauth-admin}) commits to the file, and only then.
        """
        return self.database.with_connection(data_version)
