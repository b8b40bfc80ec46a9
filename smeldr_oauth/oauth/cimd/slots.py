# -*- test-case-name: tests.test_oauth_cimd -*-
"""
Fetch slots: how many metadata documents may be fetched at once, overall
and per host, with a share kept for documents that loaded before.

Anyone can make us fetch a URL (it is just a C{client_id} on an
authorization request), so fetch slots are a resource strangers compete
for.  The rules that keep one stranger from taking them all:

  - at most C{max_per_host} fetches per host (counted separately for known
    and unknown documents), so one slow host, whatever paths and ports it
    uses, gets a few slots (an IPv6 literal counts by its /64);
  - documents fetched successfully before ("known", a bounded LRU of URLs)
    may use the last C{reserved_for_known} of the C{max_in_flight} slots,
    which unknown ones may not; a known document whose refetch fails is
    forgotten (L{FetchSlots.forget}), so a stranger's own documents cannot
    keep those slots by dripping;
  - concurrent lookups of one URL share one fetch (one L{Flight}).
"""

from __future__ import annotations

from collections import Counter
from typing import Optional

import attr
from cachetools import LRUCache
from twisted.internet.defer import Deferred

from smeldr_oauth.oauth.cimd.errors import CIMDError
from smeldr_oauth.oauth.cimd.url import host_key
from smeldr_oauth.oauth.model import Client

MAX_IN_FLIGHT = 64
MAX_IN_FLIGHT_PER_HOST = 4
MAX_KNOWN_DOCUMENTS = 1024


@attr.s(auto_attribs=True, eq=False, kw_only=True)
class Flight:
    """
    One fetch in progress and the callers waiting for it.

    @ivar known: whether the URL was fetched successfully before the fetch
        started; it decides which slots the fetch counts against.
    """

    host: str
    key: tuple[str, bool]
    known: bool
    waiters: list[Deferred[Client]] = attr.ib(factory=list)


class FetchSlots:
    """
    The fetches in progress, and which documents are known.

    @raise ValueError: if the limits contradict each other.
    """

    def __init__(
        self,
        max_in_flight: int = MAX_IN_FLIGHT,
        max_per_host: int = MAX_IN_FLIGHT_PER_HOST,
        reserved_for_known: Optional[int] = None,
        max_known: int = MAX_KNOWN_DOCUMENTS,
    ) -> None:
        if reserved_for_known is None:
            reserved_for_known = max_in_flight // 4
        if max_in_flight < 1 or max_per_host < 1:
            raise ValueError("max_in_flight and max_in_flight_per_host must be positive")
        if not 0 <= reserved_for_known < max_in_flight:
            raise ValueError("reserved_for_known must leave slots for unknown documents")
        if max_known < 0:
            raise ValueError("max_known_documents must not be negative")
        self._max_in_flight = max_in_flight
        self._max_per_host = max_per_host
        self._max_unknown = max_in_flight - reserved_for_known
        self._known: Optional[LRUCache[str, None]] = LRUCache(max_known) if max_known else None
        self._flights: dict[str, Flight] = {}
        self._unknown = 0
        self._per_host: Counter[tuple[str, bool]] = Counter()

    def flight(self, client_id: str) -> Optional[Flight]:
        """
        The fetch of C{client_id} under way, if any.
        """
        return self._flights.get(client_id)

    def is_known(self, client_id: str) -> bool:
        """
        Whether C{client_id} loaded before (and, if so, it is now the most
        recently used known document).
        """
        return self._known is not None and self._known.get(client_id, False) is None

    def remember(self, client_id: str) -> None:
        if self._known is not None:
            self._known[client_id] = None

    def forget(self, client_id: str) -> None:
        if self._known is not None:
            self._known.pop(client_id, None)

    def busy(self, host: str, known: bool) -> Optional[CIMDError]:
        """
        Why a new fetch from C{host} cannot start now, or C{None} if it can.
        """
        if len(self._flights) >= self._max_in_flight or (not known and self._unknown >= self._max_unknown):
            return CIMDError("too many client metadata documents are being fetched; try again", transient=True)
        if self._per_host[(host_key(host), known)] >= self._max_per_host:
            return CIMDError(
                "too many client metadata documents are being fetched from this host; try again",
                transient=True,
            )
        return None

    def start(self, client_id: str, host: str, known: bool) -> Flight:
        """
        Take a slot for fetching C{client_id} (L{busy} said there is one).
        """
        flight = Flight(host=host, key=(host_key(host), known), known=known)
        self._flights[client_id] = flight
        self._per_host[flight.key] += 1
        if not known:
            self._unknown += 1
        return flight

    def finish(self, client_id: str) -> Flight:
        """
        Give back the slot of C{client_id}'s fetch.
        """
        flight = self._flights.pop(client_id)
        self._per_host[flight.key] -= 1
        if not self._per_host[flight.key]:
            del self._per_host[flight.key]
        if not flight.known:
            self._unknown -= 1
        return flight
