# -*- test-case-name: tests.test_db_database -*-
"""
The errors the database layer raises, whatever the engine.

Callers never see an engine's own exception classes for the three cases
that have a meaning above the database: a broken rule (L{StoreConflict}),
a database that cannot be reached right now (L{StoreUnavailable}), and a
database written by a newer version (L{SchemaTooNew}).  Anything else (a
programming error, a syntax error) propagates as the engine raised it.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet.defer import FirstError
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

log = Logger()


class StoreConflict(Exception):
    """
    A change would break a uniqueness or reference rule (a secret hash or an
    id already stored, a token for a grant that does not exist).  The whole
    call was rolled back: nothing changed.

    With 256-bit secrets this never happens by chance; it means a bug, so it
    is an exception rather than a status.
    """


class StoreUnavailable(Exception):
    """
    The database could not be reached, or could not finish the call in
    time: PostgreSQL is down, restarting or refusing connections; a
    connection broke half-way; a SQLite file stayed locked by another
    process beyond the busy timeout; the disk is full.

    The call's transaction did not commit (or, when the connection broke
    during the commit itself, the call may have committed: only an
    idempotent retry is safe, as for any network call).  Nothing is ever
    half-written: every call is one transaction.

    The database layer reconnects by itself on the next call; an HTTP layer
    answers 503 with C{Retry-After: <retry_after>}.

    @ivar retry_after: seconds a client should wait before trying again.
    """

    def __init__(self, message: str = "the database is unavailable", retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class SchemaTooNew(Exception):
    """
    The database was migrated by a newer smeldr-oauth than this one: refuse
    to touch it rather than misread it.
    """


def log_failure(
    failure: Failure, format: str, outage: LogLevel = LogLevel.warn, logger: Optional[Logger] = None, **fields: Any
) -> None:
    """
    C{logger.failure(format, failure, **fields)}, but a database out of
    reach (L{StoreUnavailable}: restarting, a failover) as one warning line
    with its reason: expected, the operator's to see, not a bug, as every
    endpoint says an outage (C{docs/operations.md}); with a traceback and
    at critical level, a tool call, a stream, a periodic purge or a
    shutdown in an outage read as a crash.  (C{outage}: that line's level;
    critical when the server cannot start.  C{logger}: the caller's, for
    its namespace; this module's when C{None}.)
    """
    logger = log if logger is None else logger
    if failure.check(FirstError):
        # Of a gatherResults (the session's record and its claims saved).
        failure = failure.value.subFailure  # type: ignore[union-attr]
    if failure.check(StoreUnavailable):
        logger.emit(outage, "{what}: {error}", what=format.format(**fields), error=str(failure.value))
    else:
        logger.failure(format, failure, **fields)
