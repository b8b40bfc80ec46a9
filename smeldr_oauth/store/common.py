# -*- test-case-name: tests.test_store_memory -*-
"""
What the store implementations share beyond the interface: retention
times and the periodic purge.  (L{StoreConflict} lives in
L{smeldr_oauth.db.errors}, with the database layer's other errors.)
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from smeldr_oauth.db.errors import StoreConflict  # noqa: F401 (its old home)
from smeldr_oauth.db.errors import log_failure

log = Logger()

#: How long a revoked or dead grant is kept (for the connected-apps page and
#: for forensics) before C{purge_expired} deletes it.
GRANT_RETENTION = 7 * 24 * 3600.0

#: How old a registered client must be before C{purge_expired} deletes it,
#: once no grant refers to it: registrations are never deleted otherwise,
#: and a registration cap filled with abandoned clients would close
#: dynamic registration for good.  A client gets a grant within minutes of
#: registering, so 30 days leaves every real one alone.
CLIENT_RETENTION = 30 * 24 * 3600.0

#: Once an hour is plenty: expired rows are already inert (every read checks
#: expiry), purging only bounds the size of the database.
DEFAULT_PURGE_INTERVAL = 3600.0


def start_purging(
    store: Any,
    clock: IReactorTime,
    interval: float = DEFAULT_PURGE_INTERVAL,
    what: str = "expired OAuth rows",
) -> LoopingCall:
    """
    Call C{store.purge_expired(clock.seconds())} now and every C{interval}
    seconds until the returned L{LoopingCall} is stopped.

    A failing purge is logged and the loop goes on: a transient database
    error must not end clean-up for the life of the process (a L{LoopingCall}
    whose call fails stops for good).

    @param store: an L{smeldr_oauth.oauth.interfaces.IOAuthStore}, or any
        store with C{purge_expired}.
    @param what: what is purged, for the log lines.
    """

    def purge() -> "Deferred[None]":
        d: "Deferred[int]" = maybeDeferred(store.purge_expired, clock.seconds())

        def purged(count: int) -> None:
            if count:
                log.info("Purged {count} {what}", count=count, what=what)

        def failed(failure: Failure) -> None:
            # An outage (PostgreSQL restarting) is one line each interval, not a traceback.
            log_failure(failure, "Purging {what} failed", logger=log, what=what)

        return d.addCallbacks(purged, failed)

    loop = LoopingCall(purge)
    loop.clock = clock
    loop.start(interval, now=True)
    return loop
