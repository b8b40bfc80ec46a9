# -*- test-case-name: tests.test_oauth_ratelimit -*-
"""
A small token-bucket rate limiter keyed by client address, on an injected
clock so tests drive it with L{twisted.internet.task.Clock}.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict

from twisted.internet.interfaces import IReactorTime

#: IPv6 addresses share a bucket per /64: one host is routinely handed a
#: whole /64 (SLAAC, privacy addresses), so a per-address bucket would let
#: it change address on every request and never be limited.
IPV6_PREFIX = 64


def bucket_key(address: str) -> str:
    """
    The rate-limit bucket of a client address: an IPv4 address is its own
    bucket, an IPv6 address shares one with its /64 (an IPv4-mapped IPv6
    address counts as the IPv4 address it maps).  Anything that is not an
    IP address (a UNIX socket, C{"unknown"}) is its own key.
    """
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, IPV6_PREFIX), strict=False))
    return str(ip)


class RateLimiter:
    """
    Allow C{per_minute} events per key, with bursts up to the same number.
    At most C{max_keys} keys are tracked (least recently seen forgotten
    first), so a flood of addresses cannot grow memory without bound.

    Keys are client addresses, folded by L{bucket_key} (IPv6 per /64).

    To limit something that waits (a site-token check), spend first with
    L{hit} and give the event back with L{refund} if it turns out not to
    count: checking with L{allowed}, waiting, then spending lets any number
    of parallel requests through the check before the first one spends.
    """

    def __init__(self, clock: IReactorTime, per_minute: int, max_keys: int = 10000) -> None:
        self._clock = clock
        self._capacity = float(max(per_minute, 1))
        self._rate = self._capacity / 60.0
        self._max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def _level(self, key: str) -> float:
        now = self._clock.seconds()
        tokens, stamp = self._buckets.get(key, (self._capacity, now))
        return min(self._capacity, tokens + (now - stamp) * self._rate)

    def _store(self, key: str, tokens: float) -> None:
        self._buckets[key] = (tokens, self._clock.seconds())
        self._buckets.move_to_end(key)
        while len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)

    def allowed(self, key: str) -> bool:
        """
        Is there room for one more event for C{key}?  (Does not spend it.)
        """
        return self._level(bucket_key(key)) >= 1.0

    def hit(self, key: str) -> bool:
        """
        Spend one event for C{key}; C{False} if none was left (then nothing
        was spent).
        """
        key = bucket_key(key)
        tokens = self._level(key)
        ok = tokens >= 1.0
        if ok:
            tokens -= 1.0
        self._store(key, tokens)
        return ok

    def refund(self, key: str) -> None:
        """
        Give back one event spent with a successful L{hit} (never beyond the
        bucket's capacity).
        """
        key = bucket_key(key)
        if key in self._buckets:
            self._store(key, min(self._capacity, self._level(key) + 1.0))
