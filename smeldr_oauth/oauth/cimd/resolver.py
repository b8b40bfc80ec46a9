# -*- test-case-name: tests.test_oauth_cimd -*-
"""
L{CIMDResolver}: turns metadata-document client ids into L{Client} records,
fetching (L{smeldr_oauth.oauth.netguard}'s vetted agent, no redirects, one
deadline, a capped body), validating (L{smeldr_oauth.oauth.cimd.document})
and caching (L{smeldr_oauth.oauth.cimd.caching}) the documents, within the
fetch slots of L{smeldr_oauth.oauth.cimd.slots}.
"""

from __future__ import annotations

from collections.abc import Iterable
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any

from cachetools import LRUCache
from OpenSSL import SSL
from service_identity import CertificateError, VerificationError
from treq.client import HTTPClient
from twisted.internet import defer, error
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IHostnameResolver
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.error import SchemeNotSupported
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IResponse

from smeldr_oauth.oauth.cimd.body import CappedBody, GuardedAgent, discard, too_large
from smeldr_oauth.oauth.cimd.caching import DEFAULT_TTL, MAX_TTL, Entry, etag, freshness
from smeldr_oauth.oauth.cimd.document import parse_document
from smeldr_oauth.oauth.cimd.errors import CIMDError
from smeldr_oauth.oauth.cimd.slots import (
    MAX_IN_FLIGHT,
    MAX_IN_FLIGHT_PER_HOST,
    MAX_KNOWN_DOCUMENTS,
    FetchSlots,
)
from smeldr_oauth.oauth.cimd.url import check_client_id_url, loggable_host
from smeldr_oauth.oauth.model import Client
from smeldr_oauth.oauth.netguard import AddressPolicy, ForbiddenAddress, IPNetwork, make_vetted_agent

log = Logger()

MAX_BYTES = 5 * 1024
TIMEOUT = 5.0
MAX_CACHE_ENTRIES = 1024
STALE_IF_ERROR = 60 * 60.0
#: HTTP statuses that say "not now" rather than "not this document"
#: (RFC 5861's stale-if-error list).
TRANSIENT_STATUSES = frozenset({500, 502, 503, 504})


def _explain(failure: Failure) -> tuple[CIMDError, bool]:
    """
    Turn whatever a fetch failed with into a L{CIMDError} whose reason names
    the kind of failure and nothing the remote side chose, and whose
    C{transient} flag says whether a cached copy may stand in for it.

    Transient: timeouts, DNS failures, refused or dropped connections.  Not
    transient: anything that tells us about the host or document now (a
    special-use address, a TLS failure, a redirect, a 404, an invalid or
    oversized document) and our own bugs.

    @return: the error, and whether the failure was unexpected (a bug worth
        a traceback in the log rather than a remote host misbehaving).
    """
    if failure.check(CIMDError):
        return failure.value, False  # type: ignore[return-value]
    reasons = [
        r
        for r in getattr(failure.value, "reasons", None) or []
        if isinstance(r, Failure)
    ]
    # A cap hit below treq's content decoder comes back wrapped.
    for r in reasons:
        if r.check(CIMDError):
            return r.value, False  # type: ignore[return-value]
    # Our deadline cancels the request; the HTTP client may report that
    # as a response never received "because cancelled".
    timeouts = (defer.TimeoutError, error.TimeoutError, defer.CancelledError)
    if failure.check(*timeouts) or any(r.check(*timeouts) for r in reasons):
        return CIMDError(
            "fetching the client metadata document timed out", transient=True
        ), False
    if failure.check(ForbiddenAddress):
        return CIMDError(
            "client metadata host resolves to a special-use address"
        ), False
    if failure.check(error.DNSLookupError):
        return CIMDError(
            "client metadata host could not be resolved", transient=True
        ), False
    tls_errors = (SSL.Error, VerificationError, CertificateError)
    if failure.check(*tls_errors) or any(r.check(*tls_errors) for r in reasons):
        return CIMDError("TLS verification of the client metadata host failed"), False
    if failure.check(error.ConnectError):
        return CIMDError(
            "could not connect to the client metadata host", transient=True
        ), False
    if failure.check(SchemeNotSupported):
        return CIMDError("could not fetch the client metadata document"), False
    if failure.check(
        ResponseFailed,
        ResponseNeverReceived,
        RequestTransmissionFailed,
        error.ConnectionLost,
    ):
        return CIMDError(
            "could not fetch the client metadata document", transient=True
        ), False
    return CIMDError("could not fetch the client metadata document"), True


class CIMDResolver:
    """
    Turns metadata-document client ids into L{Client} records, fetching,
    validating and caching the documents.

    Anyone can make us fetch a URL (it is just a C{client_id} on an
    authorization request), so fetch slots are a resource strangers compete
    for.  Four rules keep one stranger from taking them all:

      - each fetch has one deadline, C{timeout}, for everything (DNS,
        connect, TLS, headers, body); a host that drips a byte a second
        holds its slot for C{timeout} and no longer;
      - at most C{max_in_flight_per_host} fetches per host (counted
        separately for known and unknown documents, see below), so one
        slow host, whatever paths and ports it uses, gets a few slots;
      - documents fetched successfully before ("known", a bounded LRU of
        URLs) may use the last C{reserved_for_known} of the
        C{max_in_flight} slots, which unknown ones may not; a known document
        whose refetch fails is forgotten, so a stranger's own documents
        cannot keep those slots by dripping;
      - when a refetch is refused for capacity or fails transiently, a
        cached document up to C{stale_if_error} seconds past its expiry is
        served instead (RFC 5861's stale-if-error), so clients already seen
        keep working while the slots are contested.

    @ivar allow_insecure: the development switch: http client ids, loopback
        and private addresses, single-label host names.  Never on in
        production.
    """

    def __init__(
        self,
        reactor: Any,
        *,
        agent: IAgent | None = None,
        allow_insecure: bool = False,
        trust_root: object = None,
        allowed_networks: Iterable[str | IPNetwork] = (),
        name_resolver: IHostnameResolver | None = None,
        max_bytes: int = MAX_BYTES,
        timeout: float = TIMEOUT,
        max_cache_entries: int = MAX_CACHE_ENTRIES,
        default_ttl: float = DEFAULT_TTL,
        max_ttl: float = MAX_TTL,
        max_in_flight: int = MAX_IN_FLIGHT,
        max_in_flight_per_host: int = MAX_IN_FLIGHT_PER_HOST,
        reserved_for_known: int | None = None,
        max_known_documents: int = MAX_KNOWN_DOCUMENTS,
        stale_if_error: float = STALE_IF_ERROR,
    ) -> None:
        """
        @param reactor: the clock for timeouts and cache expiry, and (for
            the default agent) the network.
        @param agent: the L{IAgent} to fetch with.  The default is
            L{smeldr_oauth.oauth.netguard.make_vetted_agent}; an injected
            agent is trusted to do its own address vetting (tests use this).
        @param trust_root: an C{IOpenSSLTrustRoot} for the default agent,
            instead of the platform CA store (tests serving real TLS).
        @param allowed_networks: special-use networks the default agent and
            the URL check may nevertheless reach (a test hook; see
            L{AddressPolicy}).
        @param name_resolver: C{IHostnameResolver} for the default agent;
            default the reactor's.
        @param timeout: the deadline of a whole fetch, in seconds.
        @param max_in_flight: how many documents may be fetched at once.
        @param max_in_flight_per_host: how many documents from one host may
            be fetched at once (known and unknown ones each).
        @param reserved_for_known: how many of the C{max_in_flight} slots
            only known documents may use; default a quarter.
        @param max_known_documents: how many known document URLs to
            remember (LRU).
        @param stale_if_error: how many seconds past its expiry a cached
            document may stand in for a refetch that could not be done.
        @raise ValueError: if the limits contradict each other.
        """
        if stale_if_error < 0:
            raise ValueError("stale_if_error must not be negative")
        self._slots = FetchSlots(max_in_flight, max_in_flight_per_host, reserved_for_known, max_known_documents)
        self._clock = reactor
        self._allow_insecure = allow_insecure
        self._policy = AddressPolicy(
            allow_all=allow_insecure, allowed_networks=tuple(allowed_networks)
        )
        if agent is None:
            agent = make_vetted_agent(
                reactor,
                policy=self._policy,
                trust_root=trust_root,
                allow_http=allow_insecure,
                name_resolver=name_resolver,
                connect_timeout=timeout,
            )
        # A cookie jar that accepts nothing: a document host has no business
        # setting state in our client.
        jar = CookieJar(DefaultCookiePolicy(allowed_domains=[]))
        self._http = HTTPClient(GuardedAgent(agent, max_bytes), cookiejar=jar)  # type: ignore[arg-type]
        self._max_bytes = max_bytes
        self._timeout = timeout
        self._default_ttl = default_ttl
        self._max_ttl = max_ttl
        self._stale_if_error = stale_if_error
        # Documents stay past their expiry, least recently used first out:
        # a stale one may stand in for a failed refetch (for
        # stale_if_error seconds), and its ETag revalidates it (at any age).
        self._cache: LRUCache[str, Entry] = LRUCache(max_cache_entries)

    def resolve(self, client_id: str) -> Deferred[Client]:
        """
        The L{Client} described by the metadata document at C{client_id}.

        Fires from the cache while the cached document is fresh; otherwise
        fetches (revalidating with C{If-None-Match} when a stale copy has an
        ETag).  Concurrent calls for one URL share one fetch.  When there is
        no slot for the fetch, or it fails transiently, a copy at most
        C{stale_if_error} seconds past expiry is served instead.  Errbacks
        with L{CIMDError}.
        """
        try:
            host = check_client_id_url(
                client_id, allow_insecure=self._allow_insecure, policy=self._policy
            )
            if ":" in host:
                # treq IDNA-encodes the host of the URL it is given, which
                # fails for an IPv6 literal: refuse it plainly rather than
                # fail inside the fetch.  (No known client uses one.)
                raise CIMDError("client_id URLs with an IPv6 address cannot be fetched; use a host name")
        except CIMDError as e:
            self._refused(loggable_host(client_id), e)
            return fail(e)
        entry = self._cache.get(client_id)
        if entry is not None and self._clock.seconds() < entry.expires_at:
            self._slots.is_known(client_id)
            return succeed(entry.client)

        flight = self._slots.flight(client_id)
        if flight is None:
            known = self._slots.is_known(client_id)
            busy = self._slots.busy(host, known)
            if busy is not None:
                stale = self._stale(client_id, host, busy)
                if stale is not None:
                    return succeed(stale)
                self._refused(host, busy)
                return fail(busy)

        def forget(d: Deferred[Client]) -> None:
            # A caller giving up does not cancel the fetch others share.
            current = self._slots.flight(client_id)
            if current is not None and d in current.waiters:
                current.waiters.remove(d)

        waiter: Deferred[Client] = Deferred(forget)
        if flight is not None:
            flight.waiters.append(waiter)
            return waiter
        flight = self._slots.start(client_id, host, known)
        flight.waiters.append(waiter)
        fetching = maybeDeferred(self._fetch, client_id, entry)
        fetching.addBoth(self._settle, client_id)
        return waiter

    def _stale(self, client_id: str, host: str, problem: CIMDError) -> Client | None:
        """
        The cached client for C{client_id} if it may stand in for a refetch
        that failed transiently with C{problem}: at most C{stale_if_error}
        seconds past its expiry.  The copy is not refreshed, so the next
        lookup tries the host again.
        """
        entry = self._cache.get(client_id)
        if entry is None:
            return None
        late = self._clock.seconds() - entry.expires_at
        if late >= self._stale_if_error:
            return None
        log.warn(  # noqa: G010 - twisted.logger.Logger has warn, not warning
            "Serving a stale client metadata document from {host}, "
            "{late:.0f}s past expiry: {reason}",
            host=host,
            late=late,
            reason=problem.reason,
        )
        return entry.client

    def _fetch(self, client_id: str, stale: Entry | None) -> Deferred[Client]:
        headers = Headers({b"Accept": [b"application/json"]})
        if stale is not None and stale.etag is not None:
            headers.setRawHeaders(b"If-None-Match", [stale.etag])
        d: Deferred[Any] = self._http.get(
            client_id,
            headers=headers,
            allow_redirects=False,
            unbuffered=True,
            reactor=self._clock,
        )
        d.addCallback(self._got_response, client_id, stale)
        d.addTimeout(self._timeout, self._clock)
        return d

    def _got_response(
        self, response: IResponse, client_id: str, stale: Entry | None
    ) -> Client | Deferred[Client]:
        code = response.code
        if code == 304 and stale is not None and stale.etag is not None:
            discard(response)
            return self._revalidated(client_id, stale, response.headers)
        if code in (301, 302, 303, 307, 308):
            discard(response)
            raise CIMDError("client metadata URL redirects; redirects are not followed")
        if code != 200:
            discard(response)
            raise CIMDError(
                f"client metadata URL answered HTTP {int(code)}, not 200",
                transient=code in TRANSIENT_STATUSES,
            )
        length = response.length
        if isinstance(length, int) and length > self._max_bytes:
            discard(response)
            raise too_large(self._max_bytes)
        reader = CappedBody(self._max_bytes)
        response.deliverBody(reader)
        headers = response.headers
        return reader.finished.addCallback(self._got_body, client_id, headers)

    def _got_body(self, body: bytes, client_id: str, headers: Headers) -> Client:
        client = parse_document(
            client_id, body, created_at=self._clock.seconds(), allow_insecure=self._allow_insecure
        )
        self._cache_for(client_id, client, headers, etag(headers))
        return client

    def _revalidated(self, client_id: str, stale: Entry, headers: Headers) -> Client:
        self._cache_for(client_id, stale.client, headers, etag(headers) or stale.etag)
        return stale.client

    def _cache_for(self, client_id: str, client: Client, headers: Headers, tag: bytes | None) -> None:
        """
        Keep C{client} for as long as the response's headers allow, or
        forget it if they forbid caching.
        """
        ttl = freshness(headers, default_ttl=self._default_ttl, max_ttl=self._max_ttl)
        if ttl is None:
            self._cache.pop(client_id, None)
        else:
            self._store(client_id, Entry(client=client, expires_at=self._clock.seconds() + ttl, etag=tag))

    def _store(self, client_id: str, entry: Entry) -> None:
        self._cache[client_id] = entry

    def _settle(self, result: Client | Failure, client_id: str) -> None:
        flight = self._slots.finish(client_id)
        host = flight.host
        waiters = flight.waiters
        if isinstance(result, Failure):
            problem, unexpected = _explain(result)
            if unexpected:
                log.failure(
                    "Unexpected failure fetching a client metadata document from {host}",
                    result,
                    host=host,
                )
            # A known document that fails is known no more: otherwise a
            # stranger could keep the reserved slots with documents of
            # their own that once loaded and now drip.
            self._slots.forget(client_id)
            stale = self._stale(client_id, host, problem) if problem.transient else None
            if stale is not None:
                for waiter in waiters:
                    if not waiter.called:
                        waiter.callback(stale)
                return
            if not problem.transient:
                # Never cache a failure, and forget a stale copy: its ETag
                # must not vouch for whatever the host serves now.
                self._cache.pop(client_id, None)
            self._refused(host, problem)
            for waiter in waiters:
                if not waiter.called:
                    waiter.errback(CIMDError(problem.reason, transient=problem.transient))
        else:
            self._slots.remember(client_id)
            log.info("Resolved client metadata document from {host}", host=host)
            for waiter in waiters:
                if not waiter.called:
                    waiter.callback(result)

    def _refused(self, host: str, problem: CIMDError) -> None:
        log.warn(  # noqa: G010 - twisted.logger.Logger has warn, not warning
            "Refused client metadata document from {host}: {reason}",
            host=host,
            reason=problem.reason,
        )
