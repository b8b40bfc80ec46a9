# -*- test-case-name: tests.test_oauth_ratelimit -*-
"""
Token-bucket rate limiters keyed by client address (or client id), on an
injected clock so tests drive them with L{twisted.internet.task.Clock},
and L{Limits}: the set of them the authorization server spends, built once
(from the configuration) and handed in.
"""

from __future__ import annotations

import functools
import ipaddress
import math

from typing import Optional

import attr
from cachetools import LRUCache
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from smeldr_oauth.oauth.errors import RateLimited
from smeldr_oauth.oauth.text import loggable

log = Logger()

#: IPv6 addresses share a bucket per /64: one host is routinely handed a
#: whole /64 (SLAAC, privacy addresses), so a per-address bucket would let
#: it change address on every request and never be limited.
IPV6_PREFIX = 64


@functools.lru_cache(maxsize=4096)
def bucket_key(address: str) -> str:
    """
    The rate-limit bucket of a client address: an IPv4 address is its own
    bucket, an IPv6 address shares one with its /64 (an IPv4-mapped IPv6
    address counts as the IPv4 address it maps).  Anything that is not an
    IP address (a UNIX socket, C{"unknown"}, a client id) is its own key.
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
    Allow C{count} events per C{window} seconds per key, in bursts of up to
    C{count}.  At most C{max_keys} keys are tracked (least recently seen
    forgotten first), so a flood of keys cannot grow memory without bound.

    Keys are folded by L{bucket_key} (IPv6 addresses per /64) unless
    C{addresses} is false (client ids).

    To limit something that waits (a site-token check), spend first with
    L{hit} and give the event back with L{refund} if it turns out not to
    count: checking with L{allowed}, waiting, then spending lets any number
    of parallel requests through the check before the first one spends.
    """

    def __init__(
        self, clock: IReactorTime, count: int, max_keys: int = 10000, window: float = 60.0, addresses: bool = True
    ) -> None:
        self._clock = clock
        self._fold = bucket_key if addresses else str
        self._capacity = float(max(count, 1))
        self._rate = self._capacity / window
        self._buckets: LRUCache[str, tuple[float, float]] = LRUCache(max_keys)

    def _level(self, key: str, now: Optional[float] = None) -> float:
        if now is None:
            now = self._clock.seconds()
        try:
            # Indexing, not .get(): a cachetools .get is a lookup twice over.
            tokens, stamp = self._buckets[key]
        except KeyError:
            return self._capacity
        return min(self._capacity, tokens + (now - stamp) * self._rate)

    def allowed(self, key: str) -> bool:
        """
        Is there room for one more event for C{key}?  (Does not spend it.)
        """
        return self._level(self._fold(key)) >= 1.0

    def hit(self, key: str) -> bool:
        """
        Spend one event for C{key}; C{False} if none was left (then nothing
        was spent).
        """
        key = self._fold(key)
        now = self._clock.seconds()
        tokens = self._level(key, now)
        ok = tokens >= 1.0
        if ok:
            tokens -= 1.0
        self._buckets[key] = (tokens, now)
        return ok

    def refund(self, key: str) -> None:
        """
        Give back one event spent with a successful L{hit} (never beyond the
        bucket's capacity).
        """
        key = self._fold(key)
        if key in self._buckets:
            self._buckets[key] = (min(self._capacity, self._level(key) + 1.0), self._clock.seconds())

    def retry_after(self, key: str) -> int:
        """
        Whole seconds until C{key} may have one more event (at least 1).
        """
        missing = 1.0 - self._level(self._fold(key))
        return max(1, math.ceil(missing / self._rate))


def spend(limiter: RateLimiter, key: str, endpoint: str, what: str) -> None:
    """
    Spend one event of C{limiter} for C{key}, or refuse: the refusal is a
    security event (C{smeldr_event} C{rate_limited}, which the metrics
    count) and a L{RateLimited} saying when to come back.

    @param endpoint: where the limit applies (a log field and metric label).
    @param what: what was refused, for the log line.
    @raise RateLimited: nothing was left for C{key}.
    """
    if limiter.hit(key):
        return
    log.warn(
        "refused {what} from {address}: rate limited",
        what=what,
        address=loggable(key),
        endpoint=endpoint,
        smeldr_event="rate_limited",
    )
    raise RateLimited(limiter.retry_after(key))


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class Limits:
    """
    The rate limits of one authorization server, each a L{RateLimiter}.

    @ivar paste: refused site-token pastes per client address (consent and
        connected-apps pages together).
    @ivar registration: dynamic registrations per client address.
    @ivar cimd_fetch: authorization requests that make the server fetch a
        client metadata document, per client address.
    @ivar token_per_address: token requests per client address.
    @ivar token_per_client: token requests per client id.
    """

    paste: RateLimiter
    registration: RateLimiter
    cimd_fetch: RateLimiter
    token_per_address: RateLimiter
    token_per_client: RateLimiter

    @classmethod
    def from_config(cls, config: object, clock: IReactorTime) -> "Limits":
        """
        The limits a L{smeldr_oauth.oauth.config.Config} describes.
        """
        keys = getattr(config, "rate_limit_keys", 10000)

        def limiter(name: str, addresses: bool = True) -> RateLimiter:
            return RateLimiter(clock, getattr(config, name), max_keys=keys, addresses=addresses)

        return cls(
            paste=limiter("paste_failures_per_minute"),
            registration=limiter("registrations_per_minute"),
            cimd_fetch=limiter("cimd_fetches_per_minute"),
            token_per_address=limiter("token_requests_per_minute_per_address"),
            token_per_client=limiter("token_requests_per_minute_per_client", addresses=False),
        )
