# -*- test-case-name: tests.test_site_tokens -*-
"""
Opening the site database with all its stores at once.
"""

from __future__ import annotations

import os
from typing import Any, Union

import attr

from smeldr_oauth.db import Database, open_database
from smeldr_oauth.site.db import SecondsClock
from smeldr_oauth.site.posts import PostStore
from smeldr_oauth.site.tokens import SiteTokenStore


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class SiteStores:
    """
    The stores of one site database, sharing its pool.
    """

    db: Database
    posts: PostStore
    tokens: SiteTokenStore

    def close(self) -> None:
        self.db.close()


def open_site(
    location: Union[str, "os.PathLike[str]", Database],
    reactor: Any | None = None,
    clock: SecondsClock | None = None,
    threads: int | None = None,
) -> SiteStores:
    """
    Open (creating if needed) the site database.  Tables are created or
    migrated on first use, so this returns at once.

    @param location: a SQLite path, a C{postgresql://} URL, or an open
        L{Database} (which the stores then share with its other users, such
        as the OAuth store on one PostgreSQL database).
    @param reactor: passed to the adbapi pool (the global reactor if
        C{None}: leave that to the service-wiring layer).
    @param clock: the stores' time source; C{reactor} if C{None} and it has
        C{seconds()}, else the wall clock.
    @param threads: C{0} runs calls on the reactor thread, C{N} on database
        threads (see L{smeldr_oauth.db.open_database}); C{None} for the
        engine's default.
    """
    if clock is None and reactor is not None and hasattr(reactor, "seconds"):
        clock = reactor
    if isinstance(location, Database):
        db = location
    else:
        db = open_database(location, reactor, threads=threads, clock=clock)  # type: ignore[arg-type]
    return SiteStores(db=db, posts=PostStore(db, clock), tokens=SiteTokenStore(db, clock))
