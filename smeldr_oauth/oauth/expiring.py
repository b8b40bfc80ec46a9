# -*- test-case-name: tests.test_oauth_expiring -*-
"""
A bounded mapping whose entries expire a fixed time after they were set:
what the access-token verifier keeps (answers for C{access_cache_ttl}
seconds, grants whose use was recorded for a minute).

C{cachetools.TTLCache} did this in pure Python with an LRU order kept
beside the expiry order: on a busy server (the cache full, every new token
evicting one) an insert cost about 5 µs and a hit 0.5-0.7 µs, two inserts
and a hit a full flow (docs/performance.md, round seven).  Here one
C{OrderedDict} (C, insertion order) does both jobs: with one time-to-live
for every entry, insertion order I{is} expiry order, so expired entries
are at the front and an insert drops them from there, then the oldest
entries while the mapping is full.  A full mapping evicts the entry set
longest ago, where C{TTLCache} evicted the one read longest ago: an entry
read often may go sooner, which costs its next use a look-up, never a
wrong answer (everything here is a cache of what the store says).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Generic, Hashable, Iterator, Optional, TypeVar, Union

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
D = TypeVar("D")

_MISSING = object()


class ExpiringDict(Generic[K, V]):
    """
    At most C{maxsize} entries, each readable for C{ttl} seconds (by
    C{timer}) after it was set.  Setting a key again restarts its time.
    """

    __slots__ = ("maxsize", "ttl", "timer", "_items")

    def __init__(self, maxsize: int, ttl: float, timer: Callable[[], float]) -> None:
        if maxsize < 1:
            raise ValueError(f"maxsize must be at least 1, not {maxsize!r}")
        self.maxsize = maxsize
        self.ttl = ttl
        self.timer = timer
        # key -> (expires at, value), oldest first.
        self._items: OrderedDict[K, tuple[float, V]] = OrderedDict()

    def __setitem__(self, key: K, value: V) -> None:
        items = self._items
        now = self.timer()
        if items.pop(key, _MISSING) is _MISSING:
            # The expired at the front, then the oldest while full.
            maxsize = self.maxsize
            while items:
                expires = next(iter(items.values()))[0]
                if expires > now and len(items) < maxsize:
                    break
                items.popitem(last=False)
        items[key] = (now + self.ttl, value)

    def __getitem__(self, key: K) -> V:
        expires, value = self._items[key]
        if expires <= self.timer():
            del self._items[key]
            raise KeyError(key)
        return value

    def __contains__(self, key: object) -> bool:
        try:
            self[key]  # type: ignore[index]
        except KeyError:
            return False
        return True

    def get(self, key: K, default: Optional[D] = None) -> Union[V, D, None]:
        try:
            return self[key]
        except KeyError:
            return default

    def pop(self, key: K, default: Union[D, object] = _MISSING) -> Union[V, D]:
        entry = self._items.pop(key, None)
        if entry is None or entry[0] <= self.timer():
            if default is _MISSING:
                raise KeyError(key)
            return default  # type: ignore[return-value]
        return entry[1]

    def items(self) -> list[tuple[K, V]]:
        """The live entries, oldest first (a list: the caller may pop while it walks)."""
        now = self.timer()
        return [(key, value) for key, (expires, value) in self._items.items() if expires > now]

    def __iter__(self) -> Iterator[K]:
        return iter([key for key, _ in self.items()])

    def __len__(self) -> int:
        """Entries held, the expired not yet dropped included."""
        return len(self._items)

    def clear(self) -> None:
        self._items.clear()
