# -*- test-case-name: tests.test_site_db -*-
"""
The site database: where posts and site tokens live.

The site stores are written on the one database layer
(L{smeldr_oauth.db}): on SQLite, a file of their own (C{--site-db}), apart
from the OAuth database so that an operator can back it up, move it or
throw it away on its own; on PostgreSQL, the same database as the OAuth
data (C{--database}).  Each store declares its tables as a L{Schema} (a
component and its migrations) in the one migration scheme; the first call
that touches a component applies whatever migrations the database lacks.

What is left here is the stores' clock.
"""

from __future__ import annotations

import time
from typing import Protocol

from smeldr_oauth.db.errors import SchemaTooNew
from smeldr_oauth.db.migrations import Migration, Schema

__all__ = ["Migration", "Schema", "SchemaTooNew", "SecondsClock", "wall_clock"]


class SecondsClock(Protocol):
    """
    What the stores need of a clock: L{IReactorTime.seconds}.  A reactor or
    a L{twisted.internet.task.Clock} fits.
    """

    def seconds(self) -> float: ...


class _WallClock:
    """
    The default clock of the stores when none is injected.
    """

    def seconds(self) -> float:
        return time.time()


def wall_clock() -> SecondsClock:
    """
    A L{SecondsClock} reading the wall clock.
    """
    return _WallClock()
