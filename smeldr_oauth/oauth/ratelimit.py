# -*- test-case-name: tests.test_oauth_ratelimit -*-
"""
Token-bucket rate limiters keyed by client address (or client id), on an
injected clock so tests drive them with L{twisted.internet.task.Clock},
and L{Limits}: the set of them the authorization server spends, built once
(from the configuration) and handed in.

Two implementations of L{IRateLimiter}:

  - L{RateLimiter}, in this process's memory: the limiter of a single
    process (SQLite);
  - L{SharedRateLimiter}, whose buckets live in an L{IRateLimitStore} (a
    table in the PostgreSQL database every process shares,
    L{smeldr_oauth.store.ratelimits}), so that N processes allow what one
    would, not N times as much.  One statement per check; refusals are
    decided locally once the shared bucket has said no (see its
    docstring, and docs/postgresql.md for what it costs).

Both answer through a L{Deferred}: the memory one's has already fired, and
L{spend_now} spares a hot path (the token endpoint) making and awaiting it.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import math

from typing import Any, Optional, Union

import attr
from cachetools import LRUCache
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from smeldr_oauth.oauth.errors import RateLimited
from smeldr_oauth.oauth.ratelimit_both import BothAsked
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


class IRateLimiter(Interface):
    """
    Allows a number of events per key (a client address, a client id) per
    window, however many processes answer the requests.
    """

    def take(key: str) -> "Deferred[Optional[int]]":  # type: ignore[misc]
        """
        Spend one event for C{key}.

        @return: a L{Deferred} firing with C{None} when the event was
            spent, or with the whole seconds (at least 1) until one will be
            available when none was left (then nothing was spent).  It
            fails with L{smeldr_oauth.db.errors.StoreUnavailable} when a
            shared limiter cannot reach its store.
        """

    def refund(key: str) -> None:  # type: ignore[misc]
        """
        Give back one event spent by a successful L{take} (never beyond the
        bucket's capacity).  Best effort: nothing to wait for.
        """


class IRateLimitStore(Interface):
    """
    Token buckets that several processes spend from, each change one
    atomic statement.  A bucket is named by its limiter's C{name} and a
    C{key}; it holds up to C{capacity} events and refills at C{rate}
    events per second; C{now} is the caller's clock (machines sharing a
    store keep their clocks in step, as they must for token expiry).
    """

    def take(  # type: ignore[misc]
        name: str, key: str, capacity: float, rate: float, now: float
    ) -> "Deferred[tuple[bool, float]]":
        """
        Spend one event if the bucket holds one.

        @return: whether it was spent, and the events left after.
        """

    def refund(name: str, key: str, capacity: float, rate: float, now: float) -> "Deferred[None]":  # type: ignore[misc]
        """
        Put one event back (up to the capacity).
        """

    def purge_expired(now: float) -> "Deferred[int]":  # type: ignore[misc]
        """
        Delete buckets that have refilled completely (a missing bucket is
        a full one), in batches; the number deleted.
        """


@implementer(IRateLimiter)
class RateLimiter:
    """
    Allow C{count} events per C{window} seconds per key, in bursts of up to
    C{count}.  At most C{max_keys} keys are tracked (least recently seen
    forgotten first), so a flood of keys cannot grow memory without bound.

    Keys are folded by L{bucket_key} (IPv6 addresses per /64) unless
    C{addresses} is false (client ids).

    To limit something that waits (a site-token check), spend first with
    L{hit} and give the event back with L{refund} if it turns out not to
    count.  (There is deliberately no "is there room?" query: checking,
    waiting, then spending lets any number of parallel requests through
    the check before the first one spends.)
    """

    def __init__(
        self, clock: IReactorTime, count: int, max_keys: int = 10000, window: float = 60.0, addresses: bool = True
    ) -> None:
        self._clock = clock
        self._fold = bucket_key if addresses else str
        self._capacity = float(max(count, 1))
        self._rate = self._capacity / window
        # [tokens, stamp], changed in place by a spend (the look-up makes it the most
        # recent): the cache's __setitem__ was a third of a spend (performance.md).
        self._buckets: LRUCache[str, list[float]] = LRUCache(max_keys)

    def _level(self, key: str, now: Optional[float] = None) -> float:
        now = self._clock.seconds() if now is None else now
        try:
            # Indexing, not .get(): a cachetools .get is a lookup twice over.
            tokens, stamp = self._buckets[key]
        except KeyError:
            return self._capacity
        return min(self._capacity, tokens + (now - stamp) * self._rate)

    def hit(self, key: str) -> bool:
        """
        Spend one event for C{key}; C{False} if none was left (then nothing
        was spent).
        """
        key = self._fold(key)
        now = self._clock.seconds()
        try:
            bucket = self._buckets[key]
        except KeyError:
            # A key not tracked has a full bucket, of at least one event.
            self._buckets[key] = [self._capacity - 1.0, now]
            return True
        tokens = min(self._capacity, bucket[0] + (now - bucket[1]) * self._rate)
        ok = tokens >= 1.0
        bucket[0], bucket[1] = (tokens - 1.0 if ok else tokens), now
        return ok

    def refund(self, key: str) -> None:
        """Give back one event spent by a successful L{hit}, up to the bucket's capacity."""
        key = self._fold(key)
        if key in self._buckets:
            self._buckets[key] = [min(self._capacity, self._level(key) + 1.0), self._clock.seconds()]

    def retry_after(self, key: str) -> int:
        """
        Whole seconds until C{key} may have one more event (at least 1).
        """
        missing = 1.0 - self._level(self._fold(key))
        return max(1, math.ceil(missing / self._rate))

    def take(self, key: str) -> "Deferred[Optional[int]]":
        """
        L{IRateLimiter.take}: L{take_now}, in a L{Deferred} that has fired.
        """
        return succeed(self.take_now(key))

    def take_now(self, key: str) -> Optional[int]:
        """
        L{take} without the L{Deferred}: C{None} when the event was spent,
        else the seconds until the next one (see L{spend_now}).
        """
        if self.hit(key):
            return None
        return self.retry_after(key)


def store_key(key: str) -> str:
    """
    What a shared store keeps for a (folded) key: its SHA-256, so the
    table holds no client address and a client-chosen id of any length
    becomes 64 characters.
    """
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


@implementer(IRateLimiter)
class SharedRateLimiter:
    """
    A token bucket per key, kept in an L{IRateLimitStore} that every
    process shares: C{count} events per C{window} seconds per key, in
    bursts of up to C{count}, whichever process answers.

    Each allowed event costs one statement (the store's atomic C{take}).
    What stays local, deciding without the store:

      - a refusal, once the store has refused a key: until the bucket can
        have refilled one event, this process refuses the key itself (the
        bucket only fills at its rate; other processes' spending can only
        make it emptier), so a flood costs the database one statement per
        refill, not one per request;
      - a local pre-check: a bucket in memory counts the events this
        process let through; when that alone is empty the shared one must
        be too (it counts them as well as everyone else's), so this
        process refuses without asking.

    When the store cannot be reached, L{take} fails with its error
    (L{smeldr_oauth.db.errors.StoreUnavailable}: a 503 with
    C{Retry-After}): failing closed, since what the request was going to
    do needs the same database anyway.

    @ivar name: the limiter's name in the store (C{paste}, C{token_address}).
    """

    def __init__(
        self,
        store: IRateLimitStore,
        name: str,
        clock: IReactorTime,
        count: int,
        max_keys: int = 10000,
        window: float = 60.0,
        addresses: bool = True,
    ) -> None:
        self.name = name
        self._store = store
        self._clock = clock
        self._fold = bucket_key if addresses else str
        self._capacity = float(max(count, 1))
        self._rate = self._capacity / window
        self._local = RateLimiter(clock, count, max_keys=max_keys, window=window, addresses=False)
        self._refused_until: LRUCache[str, float] = LRUCache(max_keys)

    @property
    def store(self) -> IRateLimitStore:
        """
        The shared store the buckets live in.
        """
        return self._store

    def take(self, key: str) -> "Deferred[Optional[int]]":
        asked = self._ask(key)
        if asked.__class__ is int:
            return succeed(asked)  # type: ignore[arg-type]
        key, now = asked  # type: ignore[misc]
        return self._store.take(self.name, store_key(key), self._capacity, self._rate, now).addCallbacks(
            self._decided, self._failed, callbackArgs=(key, now), errbackArgs=(key,)
        )

    def take_with(self, key: str, then: "SharedRateLimiter", then_key: str) -> "Deferred[tuple[int, int]]":
        """
        L{take} C{key} and, if that was spent, C{then.take(then_key)}: what
        the two calls in turn would do, but in one statement when both
        must ask the store and it can take two buckets at once
        (C{take_both}; C{then} shares this limiter's store).

        @return: fires with C{(-1, 0)} when both were spent, else with
            which was refused (0: this one, 1: C{then}) and its
            C{Retry-After}.
        """
        asked = self.ask_with(key, then, then_key)
        if asked.__class__ is BothAsked:
            return self._store.take_both(*asked.request).addCallbacks(  # type: ignore[attr-defined, union-attr]
                asked.decided, asked.failed  # type: ignore[union-attr]
            )
        return asked  # type: ignore[return-value]

    def ask_with(
        self, key: str, then: "SharedRateLimiter", then_key: str
    ) -> "Union[Deferred[tuple[int, int]], BothAsked]":
        """
        L{take_with} up to the store: its answer (a L{Deferred}, as
        L{take_with}'s), or, when both buckets must be asked of the store
        at once, a L{BothAsked} (what to ask, what to make of the answer).
        """
        asked = self._ask(key)
        if asked.__class__ is int:
            return succeed((0, asked))  # type: ignore[arg-type]
        key, now = asked  # type: ignore[misc]
        take_both = getattr(self._store, "take_both", None)
        then_asked = then._ask(then_key) if take_both is not None and then._store is self._store else None
        if then_asked is None or then_asked.__class__ is int:
            # This bucket alone (then refused without asking, or cannot
            # be asked together), then the other, as in sequence.
            def second(retry_after: Optional[int]) -> Any:
                if retry_after is not None:
                    return (0, retry_after)
                if then_asked is not None:
                    return (1, then_asked)
                return then.take(then_key).addCallback(lambda later: (-1, 0) if later is None else (1, later))

            return self._store.take(self.name, store_key(key), self._capacity, self._rate, now).addCallbacks(
                self._decided, self._failed, callbackArgs=(key, now), errbackArgs=(key,)
            ).addCallback(second)
        then_key = then_asked[0]  # type: ignore[index]
        request = ((self.name, store_key(key), self._capacity, self._rate), (then.name, store_key(then_key), then._capacity, then._rate), now)
        return BothAsked(self, key, then, then_key, now, request)

    def _ask(self, key: str) -> "Union[int, tuple[str, float]]":
        """
        Decide C{key} here if this process can (the whole seconds to wait),
        else spend the local pre-check's event and say what to ask the
        store (the folded key and the time).
        """
        key = self._fold(key)
        now = self._clock.seconds()
        try:
            until = self._refused_until[key]
        except KeyError:
            pass
        else:
            if now < until:
                return max(1, math.ceil(until - now))
            del self._refused_until[key]
        if not self._local.hit(key):
            return self._local.retry_after(key)
        return key, now

    def _decided(self, result: tuple[bool, float], key: str, now: float) -> Optional[int]:
        spent, left = result
        if spent:
            return None
        self._local.refund(key)
        wait = max(0.0, 1.0 - left) / self._rate
        self._refused_until[key] = now + wait
        return max(1, math.ceil(wait))

    def _failed(self, failure: Failure, key: str) -> Failure:
        self._local.refund(key)
        return failure

    def refund(self, key: str) -> None:
        key = self._fold(key)
        self._local.refund(key)
        self._refused_until.pop(key, None)
        d = self._store.refund(self.name, store_key(key), self._capacity, self._rate, self._clock.seconds())
        d.addErrback(lambda f: log.failure("could not give back a rate-limited event", f))


def refuse_both(outcome: tuple[int, int], first_key: str, then_key: str, endpoint: str, what: str) -> None:
    """
    L{spend_both}'s answer from a L{SharedRateLimiter.take_with} outcome:
    a refusal is logged as a security event and raised (L{RateLimited}).
    """
    refused, retry_after = outcome
    if refused >= 0:
        _refused((first_key, then_key)[refused], endpoint, what)
        raise RateLimited(retry_after)


def _refused(key: str, endpoint: str, what: str) -> None:
    log.warn(
        "refused {what} from {address}: rate limited",
        what=what,
        address=loggable(key),
        endpoint=endpoint,
        smeldr_event="rate_limited",
    )


def spend(limiter: IRateLimiter, key: str, endpoint: str, what: str) -> "Deferred[None]":
    """
    Spend one event of C{limiter} for C{key}, or refuse: the refusal is a
    security event (C{smeldr_event} C{rate_limited}, which the metrics
    count) and a L{RateLimited} saying when to come back.

    @param endpoint: where the limit applies (a log field and metric label).
    @param what: what was refused, for the log line.
    @return: a L{Deferred} that fires when the event is spent, or fails
        with L{RateLimited} when nothing was left for C{key} (or with the
        store's error).
    """

    return limiter.take(key).addCallback(_decided, key, endpoint, what)


def spend_now(limiter: IRateLimiter, key: str, endpoint: str, what: str) -> "Optional[Deferred[None]]":
    """
    L{spend}, decided at once when C{limiter} is in this process's memory
    (a L{RateLimiter}): then C{None} once the event is spent, or
    L{RateLimited} raised (and logged) here, with no L{Deferred} made and
    awaited (two of them were 13 of a token request's microseconds).  Any
    other limiter answers later: the L{Deferred} of L{spend}, to await.
    """
    if isinstance(limiter, RateLimiter):
        _decided(limiter.take_now(key), key, endpoint, what)
        return None
    return spend(limiter, key, endpoint, what)


def _decided(retry_after: Optional[int], key: str, endpoint: str, what: str) -> None:
    """
    A limiter's answer (L{IRateLimiter.take}) made into L{spend}'s: a
    refusal is logged as a security event and raised.
    """
    if retry_after is None:
        return
    _refused(key, endpoint, what)
    raise RateLimited(retry_after)


def spend_both(
    first: IRateLimiter, first_key: str, then: IRateLimiter, then_key: str, endpoint: str, what: str
) -> "Optional[Deferred[None]]":
    """
    L{spend} C{first_key} of C{first}, then, if it was spent, C{then_key}
    of C{then}: in one statement of their store when both are shared
    limiters on one store (L{SharedRateLimiter.take_with}); decided at
    once when both are in this process's memory, as L{spend_now} (then
    C{None}, or L{RateLimited} raised).
    """
    if isinstance(first, SharedRateLimiter) and isinstance(then, SharedRateLimiter):
        return first.take_with(first_key, then, then_key).addCallback(refuse_both, first_key, then_key, endpoint, what)
    later = spend_now(first, first_key, endpoint, what)
    if later is None:
        return spend_now(then, then_key, endpoint, what)
    return later.addCallback(lambda _: spend(then, then_key, endpoint, what))


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class Limits:
    """
    The rate limits of one authorization server, each a L{RateLimiter}.

    Each is an L{IRateLimiter}: in memory (one process), or shared through
    an L{IRateLimitStore} (L{from_config}'s C{store}).

    @ivar paste: refused site-token pastes per client address (consent and
        connected-apps pages together).
    @ivar registration: dynamic registrations per client address.
    @ivar cimd_fetch: authorization requests that make the server fetch a
        client metadata document, per client address.
    @ivar token_per_address: token requests per client address.
    @ivar token_per_client: token requests per client id.
    @ivar introspection: introspection requests (RFC 7662) per client
        address.
    """

    paste: IRateLimiter
    registration: IRateLimiter
    cimd_fetch: IRateLimiter
    token_per_address: IRateLimiter
    token_per_client: IRateLimiter
    introspection: IRateLimiter

    @classmethod
    def from_config(cls, config: object, clock: IReactorTime, store: Optional[IRateLimitStore] = None) -> "Limits":
        """
        The limits a L{smeldr_oauth.oauth.config.Config} describes.

        @param store: where the buckets live when several processes answer
            (L{SharedRateLimiter}); C{None}: in this process's memory.
        """
        keys = getattr(config, "rate_limit_keys", 10000)

        def limiter(name: str, setting: str, addresses: bool = True) -> Any:
            count = getattr(config, setting)
            if store is None:
                return RateLimiter(clock, count, max_keys=keys, addresses=addresses)
            return SharedRateLimiter(store, name, clock, count, max_keys=keys, addresses=addresses)

        return cls(
            paste=limiter("paste", "paste_failures_per_minute"),
            registration=limiter("registration", "registrations_per_minute"),
            cimd_fetch=limiter("cimd_fetch", "cimd_fetches_per_minute"),
            token_per_address=limiter("token_address", "token_requests_per_minute_per_address"),
            token_per_client=limiter("token_client", "token_requests_per_minute_per_client", addresses=False),
            introspection=limiter("introspection", "introspections_per_minute"),
        )
