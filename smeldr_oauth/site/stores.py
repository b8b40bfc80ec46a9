# -*- test-case-name: tests.test_site_tokens -*-
"""
Opening the site database with all its stores at once.
"""

from __future__ import annotations

import os
from typing import Any

import attr

from smeldr_oauth.site.db import SecondsClock, SQLiteDatabase
from smeldr_oauth.site.posts import PostStore
from smeldr_oauth.site.tokens import SiteTokenStore


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class SiteStores:
    """
    The stores of one site database, sharing its one-writer pool.
    """

    db: SQLiteDatabase
    posts: PostStore
    tokens: SiteTokenStore

    def close(self) -> None:
        self.db.close()


def open_site(
    path: str | os.PathLike[str],
    reactor: Any | None = None,
    clock: SecondsClock | None = None,
    threads: int | None = None,
) -> SiteStores:
    """
    Open (creating if needed) the site database at C{path}.  Tables are
    created or migrated on first use, so this returns at once.

    @param reactor: passed to the adbapi pool (the global reactor if
        C{None}: leave that to the service-wiring layer).
    @param clock: the stores' time source; C{reactor} if C{None} and it has
        C{seconds()}, else the wall clock.
    @param threads: C{0} runs SQLite on the reactor thread, C{1} on a
        database thread (see L{SQLiteDatabase}); C{None} for its default.
    """
    if clock is None and reactor is not None and hasattr(reactor, "seconds"):
        clock = reactor
    db = SQLiteDatabase(path, reactor=reactor, clock=clock, threads=threads)
    return SiteStores(
        db=db, posts=PostStore(db, clock), tokens=SiteTokenStore(db, clock)
    )
