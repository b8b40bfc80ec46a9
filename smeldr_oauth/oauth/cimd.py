# -*- test-case-name: tests.test_oauth_cimd -*-
"""
Client ID Metadata Documents (CIMD): a client whose C{client_id} is an
https URL publishes its metadata at that URL, and we fetch it instead of
asking it to register.

Everything here treats the URL and the document as hostile input:

  - the URL must be a plain https URL with a path (L{check_client_id_url});
  - the fetch goes through L{smeldr_oauth.oauth.netguard}'s vetted agent
    (no special-use addresses, DNS resolved once, TLS verified against the
    host name), follows no redirects, accepts only a 200, reads at most
    C{max_bytes} and gives up after C{timeout} seconds;
  - the document must be a JSON object that names its own URL as
    C{client_id}, lists usable redirect URIs and asks for no shared secret
    (L{parse_document});
  - valid documents are cached per C{Cache-Control} (bounded, LRU),
    failures never are, and concurrent lookups of one URL share one fetch;
  - fetch slots are limited overall and per host, with a share kept for
    documents fetched successfully before, and a cached document may be
    served up to an hour stale when a refetch gets no slot or fails
    transiently, so that a stranger pointing client ids at slow hosts
    cannot lock out the clients we know (L{CIMDResolver}).

See C{docs/cimd.md} for the rules in prose.
"""

from __future__ import annotations

import ipaddress
import json
import re
import unicodedata
from collections import Counter, OrderedDict
from collections.abc import Iterable
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any

import attr
from hyperlink import URL, URLParseError
from OpenSSL import SSL
from service_identity import CertificateError, VerificationError
from treq.client import HTTPClient
from twisted.internet import defer, error
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IHostnameResolver
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.components import proxyForInterface
from twisted.python.failure import Failure
from twisted.web.client import (
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.error import SchemeNotSupported
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from zope.interface import implementer

from smeldr_oauth.oauth.model import Client
from smeldr_oauth.oauth.netguard import (
    AddressPolicy,
    ForbiddenAddress,
    IPNetwork,
    make_vetted_agent,
    parse_ip,
)

log = Logger()

MAX_BYTES = 5 * 1024
TIMEOUT = 5.0
DEFAULT_TTL = 300.0
MAX_TTL = 24 * 60 * 60.0
MAX_CACHE_ENTRIES = 1024
MAX_IN_FLIGHT = 64
MAX_IN_FLIGHT_PER_HOST = 4
MAX_KNOWN_DOCUMENTS = 1024
STALE_IF_ERROR = 60 * 60.0
#: HTTP statuses that say "not now" rather than "not this document"
#: (RFC 5861's stale-if-error list).
TRANSIENT_STATUSES = frozenset({500, 502, 503, 504})
MAX_URL_LENGTH = 2048
MAX_REDIRECT_URIS = 32
MAX_CLIENT_NAME = 200
MAX_SCOPE = 1000

#: Methods built on a secret shared with the authorization server, which a
#: client identified only by a public URL cannot have.
SHARED_SECRET_METHODS = frozenset(
    {"client_secret_post", "client_secret_basic", "client_secret_jwt"}
)
SUPPORTED_GRANT_TYPES = ("authorization_code", "refresh_token")
LOOPBACK_REDIRECT_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


class CIMDError(Exception):
    """
    A client ID metadata document could not be used.

    @ivar reason: short text that is safe to show on an error page: it never
        contains response bodies, tokens or internal addresses.
    @ivar transient: whether the failure says nothing about the document
        (a timeout, a refused connection, a 503, no free fetch slot), so
        that a cached copy may still stand in for it.
    """

    def __init__(self, reason: str, *, transient: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.transient = transient


# --- The client_id URL ---------------------------------------------------

# hyperlink parses almost anything (that is its job), so the strict grammar
# is a regular expression: lowercase https scheme, a host, an optional plain
# decimal port, a path, an optional query, and nothing else (no user info,
# no fragment, no characters outside RFC 3986).
_PCHAR = r"(?:[A-Za-z0-9\-._~!$&'()*+,;=:@]|%[0-9A-Fa-f]{2})"
_CLIENT_ID_RE = re.compile(
    r"(?P<scheme>https?)://"
    r"(?P<host>\[[0-9a-f:.]+\]|[a-z0-9.\-]+)"
    r"(?::(?P<port>[1-9][0-9]{0,4}))?"
    rf"(?P<path>(?:/{_PCHAR}*)+)"
    rf"(?:\?(?P<query>(?:{_PCHAR}|[/?])*))?"
)
_DOTTED_QUAD = re.compile(r"[0-9]+(?:\.[0-9]+){3}")
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9\-]{0,61}[a-z0-9])?")
# A last label like these makes getaddrinfo read the name as an IPv4
# address in one of its legacy forms (127.1, 0x7f.1, 2130706433).
_NUMERIC_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*")


def is_cimd_client_id(client_id: object, *, allow_insecure: bool = False) -> bool:
    """
    Whether C{client_id} is meant as a metadata document URL: an https URL
    (or http, with C{allow_insecure}) whose path is more than C{/}.

    This only classifies; L{CIMDResolver.resolve} does the full validation,
    so a malformed URL is reported as such rather than as an unknown client.
    Registered client ids are random tokens and never look like this.
    """
    if not isinstance(client_id, str) or len(client_id) > MAX_URL_LENGTH:
        return False
    try:
        url = URL.from_text(client_id)
    except (URLParseError, ValueError):
        return False
    schemes = ("https", "http") if allow_insecure else ("https",)
    return (
        url.scheme.lower() in schemes and bool(url.host) and url.path not in ((), ("",))
    )


def check_client_id_url(
    client_id: object,
    *,
    allow_insecure: bool = False,
    policy: AddressPolicy | None = None,
) -> str:
    """
    Check that C{client_id} is a URL we are willing to fetch.

    @return: its host (without brackets for an IPv6 literal).
    @raise CIMDError: if it is not.
    """
    if policy is None:
        policy = AddressPolicy(allow_all=allow_insecure)
    if not isinstance(client_id, str):
        raise CIMDError("client_id must be a string")
    if len(client_id) > MAX_URL_LENGTH:
        raise CIMDError("client_id URL is too long")
    match = _CLIENT_ID_RE.fullmatch(client_id)
    if match is None:
        raise CIMDError(
            "client_id is not a plain https URL (lowercase scheme and host, "
            "no user info, no fragment, no unusual characters)"
        )
    if match["scheme"] == "http" and not allow_insecure:
        raise CIMDError("client_id URL must use https")
    if match["port"] is not None and int(match["port"]) > 65535:
        raise CIMDError("client_id URL has an invalid port")
    path = match["path"]
    if path == "/":
        raise CIMDError("client_id URL must have a path")
    for segment in path.split("/")[1:]:
        if segment.lower().replace("%2e", ".") in (".", ".."):
            raise CIMDError("client_id URL must not contain . or .. segments")

    host = match["host"]
    ip = None
    if host.startswith("["):
        host = host[1:-1]
        ip = parse_ip(host)
        if ip is None or ip.version != 6:
            raise CIMDError("client_id URL has an invalid IPv6 address")
    elif _DOTTED_QUAD.fullmatch(host):
        ip = parse_ip(host)  # refuses leading zeros and out-of-range parts
        if ip is None:
            raise CIMDError("client_id URL has an invalid IPv4 address")
    else:
        _check_host_name(host, allow_insecure)
    if ip is not None and not policy.permits(ip):
        raise CIMDError("client_id URL points at a special-use address")
    return host


def _check_host_name(host: str, allow_insecure: bool) -> None:
    labels = host.split(".")
    if len(host) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise CIMDError("client_id URL has an invalid host name")
    if _NUMERIC_LABEL.fullmatch(labels[-1]):
        raise CIMDError("client_id URL host looks like a numeric address")
    if allow_insecure:
        return
    if len(labels) < 2:
        raise CIMDError("client_id URL host must be a fully qualified domain name")
    if labels[-1] == "localhost":
        raise CIMDError("client_id URL points at localhost")


def _loggable_host(client_id: object) -> str:
    """
    The host of a (possibly malformed) client_id, made safe for a log line.
    """
    if not isinstance(client_id, str):
        return "<not a string>"
    try:
        host = URL.from_text(client_id[:MAX_URL_LENGTH]).host
    except (URLParseError, ValueError):
        host = "<unparseable>"
    return host.encode("ascii", "backslashreplace").decode("ascii")[:100]


# --- The document -------------------------------------------------------


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Two "client_id" members would let two parsers disagree about the
    # document: refuse rather than pick one.
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError("duplicate key")
        result[key] = value
    return result


def _no_constants(name: str) -> None:
    raise ValueError("NaN and Infinity are not JSON")


def parse_document(client_id: str, body: bytes, *, created_at: float = 0.0) -> Client:
    """
    Validate a fetched metadata document and turn it into a L{Client}.

    @param client_id: the URL the document was fetched from.
    @param body: the response body, already size-capped.
    @param created_at: the fetch time, for L{Client.created_at}.
    @raise CIMDError: if the document is not acceptable.
    """
    try:
        doc = json.loads(
            body.decode("utf-8"),
            object_pairs_hook=_unique_keys,
            parse_constant=_no_constants,
        )
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise CIMDError("client metadata document is not valid JSON") from None
    if not isinstance(doc, dict):
        raise CIMDError("client metadata document must be a JSON object")
    if doc.get("client_id") != client_id:
        raise CIMDError("client metadata document's client_id does not match its URL")
    redirect_uris = _redirect_uris(doc.get("redirect_uris"))
    _check_auth_methods(doc)
    grant_types = _grant_types(doc.get("grant_types"))
    _check_response_types(doc.get("response_types"))
    return Client(
        client_id=client_id,
        client_name=_client_name(doc.get("client_name")),
        redirect_uris=redirect_uris,
        token_endpoint_auth_method="none",
        grant_types=grant_types,
        scope=_scope(doc.get("scope")),
        kind="cimd",
        created_at=created_at,
        client_uri=_display_url(doc, "client_uri"),
        logo_uri=_display_url(doc, "logo_uri"),
    )


def _is_list_of_str(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _plain_ascii(text: str) -> bool:
    return all(" " < c < "\x7f" for c in text)


def _redirect_uris(value: object) -> tuple[str, ...]:
    if not _is_list_of_str(value) or not value:
        raise CIMDError("redirect_uris must be a non-empty list of strings")
    assert isinstance(value, list)
    if len(value) > MAX_REDIRECT_URIS:
        raise CIMDError("client metadata document lists too many redirect_uris")
    for uri in value:
        check_redirect_uri(uri)
    return tuple(dict.fromkeys(value))


def check_redirect_uri(uri: str) -> None:
    """
    A redirect URI in a metadata document must be absolute, https (or http
    on a loopback host, for native apps, RFC 8252), without user info or
    fragment.

    @raise CIMDError: if it is not.
    """
    if not uri or len(uri) > MAX_URL_LENGTH or not _plain_ascii(uri):
        raise CIMDError("redirect URIs must be plain ASCII URIs without spaces")
    if "#" in uri:
        raise CIMDError("redirect URIs must not contain a fragment")
    try:
        url = URL.from_text(uri)
        port = url.port
    except (URLParseError, ValueError):
        raise CIMDError("redirect URI is not a valid URI") from None
    if port is not None and not 0 < port < 65536:
        raise CIMDError("redirect URI has an invalid port")
    if not url.absolute or not url.host or not uri.startswith(url.scheme + "://"):
        raise CIMDError("redirect URIs must be absolute")
    if url.userinfo:
        raise CIMDError("redirect URIs must not contain user info")
    if url.scheme == "https":
        return
    if url.scheme == "http" and url.host in LOOPBACK_REDIRECT_HOSTS:
        return
    raise CIMDError("redirect URIs must use https (http only for localhost)")


def _check_auth_methods(doc: dict[str, Any]) -> None:
    """
    The rule: a metadata client is always a public client (C{none}, with
    PKCE).  Refuse a C{client_secret} member; refuse a declared
    C{token_endpoint_auth_method} that needs a shared secret (the client
    would send a secret it never got); refuse a non-empty
    C{token_endpoint_auth_methods_supported} made only of shared-secret
    methods.  Other methods (C{private_key_jwt}, as ChatGPT declares next to
    C{none}) are tolerated: the client is still treated as public.
    """
    if "client_secret" in doc:
        raise CIMDError("client metadata document must not contain a client_secret")
    method = doc.get("token_endpoint_auth_method")
    if method is not None:
        if not isinstance(method, str):
            raise CIMDError("token_endpoint_auth_method must be a string")
        if method in SHARED_SECRET_METHODS:
            raise CIMDError(
                f"token_endpoint_auth_method {method} needs a shared secret, "
                "which metadata document clients cannot have"
            )
    supported = doc.get("token_endpoint_auth_methods_supported")
    if supported is not None:
        if not _is_list_of_str(supported):
            raise CIMDError(
                "token_endpoint_auth_methods_supported must be a list of strings"
            )
        assert isinstance(supported, list)
        if supported and all(m in SHARED_SECRET_METHODS for m in supported):
            raise CIMDError(
                "token_endpoint_auth_methods_supported lists only shared-secret methods"
            )


def _grant_types(value: object) -> tuple[str, ...]:
    if value is None:
        return ("authorization_code",)
    if not _is_list_of_str(value):
        raise CIMDError("grant_types must be a list of strings")
    assert isinstance(value, list)
    if "authorization_code" not in value:
        raise CIMDError("grant_types must include authorization_code")
    return tuple(g for g in dict.fromkeys(value) if g in SUPPORTED_GRANT_TYPES)


def _check_response_types(value: object) -> None:
    if value is None:
        return
    if not _is_list_of_str(value) or "code" not in value:  # type: ignore[operator]
        raise CIMDError("response_types must be a list of strings including code")


def _client_name(value: object) -> str | None:
    """
    The name shown on the consent page: control and format characters
    (bidi overrides included) removed, whitespace collapsed, capped.
    """
    if value is None:
        return None
    if not isinstance(value, str):
        raise CIMDError("client_name must be a string")
    # Control characters (newlines, tabs) separate words; format characters
    # (bidi overrides, zero-width joiners) are dropped.
    visible = "".join(
        " " if unicodedata.category(c) == "Cc" else c
        for c in value
        if unicodedata.category(c)[0] != "C" or unicodedata.category(c) == "Cc"
    )
    name = " ".join(visible.split())[:MAX_CLIENT_NAME].strip()
    return name or None


def _scope(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > MAX_SCOPE:
        raise CIMDError("scope must be a space-separated string")
    return " ".join(value.split()) or None


def _display_url(doc: dict[str, Any], key: str) -> str | None:
    """
    C{client_uri} and C{logo_uri} are cosmetic: a wrong type is an error,
    but a string that is not a plain https URL is dropped rather than
    failing the sign-in, so the consent page only ever sees https links.
    """
    value = doc.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise CIMDError(f"{key} must be a string")
    if len(value) > MAX_URL_LENGTH or not _plain_ascii(value):
        return None
    try:
        url = URL.from_text(value)
        url.port  # noqa: B018
    except (URLParseError, ValueError):
        return None
    if url.scheme != "https" or not url.host or url.userinfo:
        return None
    if not value.startswith("https://"):
        return None
    return value


# --- Caching ------------------------------------------------------------

_MAX_AGE_VALUE = re.compile(rb'"?([0-9]{1,10})"?')
_ETAG = re.compile(rb'(?:W/)?"[\x21\x23-\x7e]{0,250}"')


def freshness(
    headers: Headers, *, default_ttl: float = DEFAULT_TTL, max_ttl: float = MAX_TTL
) -> float | None:
    """
    How many seconds a response may be reused, from its C{Cache-Control}
    (and C{Age}) headers, or C{None} if it must not be cached.

    C{no-store} and C{no-cache} mean no caching; a malformed or conflicting
    C{max-age} too (RFC 9111 treats it as stale).  Without C{max-age} the
    default applies.  The result is clamped to C{max_ttl}.
    """
    directives: dict[bytes, bytes | None] = {}
    for raw in headers.getRawHeaders(b"cache-control", []):
        for part in raw.split(b","):
            name, sep, argument = part.strip().partition(b"=")
            name = name.strip().lower()
            if not name:
                continue
            value = argument.strip() if sep else None
            if name in directives and directives[name] != value:
                return None
            directives[name] = value
    if b"no-store" in directives or b"no-cache" in directives:
        return None
    if b"max-age" in directives:
        match = _MAX_AGE_VALUE.fullmatch(directives[b"max-age"] or b"")
        if match is None:
            return None
        ttl = float(int(match.group(1)))
    else:
        ttl = default_ttl
    ages = headers.getRawHeaders(b"age", [])
    if ages and re.fullmatch(rb"[0-9]{1,10}", ages[0].strip()):
        ttl -= int(ages[0].strip())
    ttl = min(ttl, max_ttl)
    return ttl if ttl > 0 else None


def _etag(headers: Headers) -> bytes | None:
    values = headers.getRawHeaders(b"etag", [])
    if len(values) == 1 and _ETAG.fullmatch(values[0].strip()):
        return values[0].strip()
    return None


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class _Entry:
    client: Client
    expires_at: float
    etag: bytes | None


# --- Reading the body ---------------------------------------------------


def _stop(transport: object) -> None:
    """
    Stop the connection under a response body.  The body protocol's
    transport is the agent's producer proxy, whose C{stopProducing} closes
    the connection and stops reading from it.
    """
    stop = getattr(transport, "stopProducing", None)
    if stop is not None:
        stop()


def _too_large(max_bytes: int) -> CIMDError:
    return CIMDError(f"client metadata document is larger than {max_bytes} bytes")


class _RawCap(Protocol):
    """
    Counts bytes as they come off the connection, before any content
    decoding, and stops the connection once there are too many: a gzip
    body can only inflate what was allowed in.
    """

    def __init__(self, inner: Protocol, max_bytes: int) -> None:
        self._inner = inner
        self._max = max_bytes
        self._size = 0
        self._done = False

    def makeConnection(self, transport: Any) -> None:
        Protocol.makeConnection(self, transport)
        self._inner.makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        if self._done:
            return
        self._size += len(data)
        if self._size > self._max:
            self._done = True
            _stop(self.transport)
            self._inner.connectionLost(Failure(_too_large(self._max)))
            return
        self._inner.dataReceived(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if not self._done:
            self._done = True
            self._inner.connectionLost(reason)


class _RawCappedResponse(proxyForInterface(IResponse)):  # type: ignore[misc]
    def __init__(self, original: IResponse, max_bytes: int) -> None:
        super().__init__(original)
        self._max = max_bytes

    def deliverBody(self, protocol: Protocol) -> None:
        self.original.deliverBody(_RawCap(protocol, self._max))


@implementer(IAgent)
class _GuardedAgent:
    """
    Sits under treq's content-decoding agent: takes back its
    C{Accept-Encoding: gzip} (a 5 KB document gains nothing from it) and
    caps the raw body, whichever agent actually fetches.
    """

    def __init__(self, agent: IAgent, max_bytes: int) -> None:
        self._agent = agent
        self._max = max_bytes

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        headers = headers.copy() if headers is not None else Headers()
        headers.removeHeader(b"accept-encoding")
        d = self._agent.request(method, uri, headers, bodyProducer)
        d.addCallback(_RawCappedResponse, self._max)
        return d


class _CappedBody(Protocol):
    """
    Collects a response body of at most C{max_bytes} into C{finished},
    stopping the connection as soon as it grows past the cap.
    """

    def __init__(self, max_bytes: int) -> None:
        self._max = max_bytes
        self._chunks: list[bytes] = []
        self._size = 0
        self.finished: Deferred[bytes] = Deferred(self._cancel)

    def _cancel(self, d: Deferred[bytes]) -> None:
        if self.transport is not None:
            _stop(self.transport)

    def dataReceived(self, data: bytes) -> None:
        if self.finished.called:
            return
        self._size += len(data)
        if self._size > self._max:
            _stop(self.transport)
            if not self.finished.called:
                self.finished.errback(_too_large(self._max))
            return
        self._chunks.append(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.finished.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.finished.callback(b"".join(self._chunks))
        else:
            self.finished.errback(reason)


class _Discard(Protocol):
    """
    Stops a response we will not read, so that its body is neither
    buffered nor waited for.
    """

    def makeConnection(self, transport: Any) -> None:
        Protocol.makeConnection(self, transport)
        _stop(transport)


def _discard(response: IResponse) -> None:
    response.deliverBody(_Discard())


# --- The resolver -------------------------------------------------------


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


def _host_key(host: str) -> str:
    """
    What the per-host fetch limit counts by: the host name, or for an IPv6
    literal its /64, which one machine usually holds whole (so that it
    cannot pose as 2**64 hosts).  Ports are not part of it: they are free.
    """
    ip = parse_ip(host)
    if ip is not None and ip.version == 6:
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return host


@attr.s(auto_attribs=True, eq=False, kw_only=True)
class _Flight:
    """
    One fetch in progress and the callers waiting for it.

    @ivar known: whether the URL was fetched successfully before the fetch
        started; it decides which slots the fetch counts against.
    """

    host: str
    key: tuple[str, bool]
    known: bool
    waiters: list[Deferred[Client]] = attr.ib(factory=list)


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
        if reserved_for_known is None:
            reserved_for_known = max_in_flight // 4
        if max_in_flight < 1 or max_in_flight_per_host < 1:
            raise ValueError("max_in_flight and max_in_flight_per_host must be positive")
        if not 0 <= reserved_for_known < max_in_flight:
            raise ValueError("reserved_for_known must leave slots for unknown documents")
        if max_known_documents < 0 or stale_if_error < 0:
            raise ValueError("max_known_documents and stale_if_error must not be negative")
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
        self._http = HTTPClient(_GuardedAgent(agent, max_bytes), cookiejar=jar)  # type: ignore[arg-type]
        self._max_bytes = max_bytes
        self._timeout = timeout
        self._max_entries = max_cache_entries
        self._default_ttl = default_ttl
        self._max_ttl = max_ttl
        self._max_in_flight = max_in_flight
        self._max_per_host = max_in_flight_per_host
        self._max_unknown = max_in_flight - reserved_for_known
        self._max_known = max_known_documents
        self._stale_if_error = stale_if_error
        self._cache: OrderedDict[str, _Entry] = OrderedDict()
        self._known: OrderedDict[str, None] = OrderedDict()
        self._in_flight: dict[str, _Flight] = {}
        self._unknown_in_flight = 0
        self._per_host: Counter[tuple[str, bool]] = Counter()

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
            self._refused(_loggable_host(client_id), e)
            return fail(e)
        entry = self._cache.get(client_id)
        if entry is not None and self._clock.seconds() < entry.expires_at:
            self._cache.move_to_end(client_id)
            if client_id in self._known:
                self._known.move_to_end(client_id)
            return succeed(entry.client)

        flight = self._in_flight.get(client_id)
        if flight is None:
            known = client_id in self._known
            busy = self._no_slot(host, known)
            if busy is not None:
                stale = self._stale(client_id, host, busy)
                if stale is not None:
                    return succeed(stale)
                self._refused(host, busy)
                return fail(busy)

        def forget(d: Deferred[Client]) -> None:
            # A caller giving up does not cancel the fetch others share.
            current = self._in_flight.get(client_id)
            if current is not None and d in current.waiters:
                current.waiters.remove(d)

        waiter: Deferred[Client] = Deferred(forget)
        if flight is not None:
            flight.waiters.append(waiter)
            return waiter
        flight = _Flight(host=host, key=(_host_key(host), known), known=known)
        flight.waiters.append(waiter)
        self._in_flight[client_id] = flight
        self._per_host[flight.key] += 1
        if not known:
            self._unknown_in_flight += 1
        fetching = maybeDeferred(self._fetch, client_id, entry)
        fetching.addBoth(self._settle, client_id)
        return waiter

    def _no_slot(self, host: str, known: bool) -> CIMDError | None:
        """
        Why a new fetch from C{host} cannot start now, or C{None} if it can.
        """
        if len(self._in_flight) >= self._max_in_flight or (
            not known and self._unknown_in_flight >= self._max_unknown
        ):
            return CIMDError(
                "too many client metadata documents are being fetched; try again",
                transient=True,
            )
        if self._per_host[(_host_key(host), known)] >= self._max_per_host:
            return CIMDError(
                "too many client metadata documents are being fetched from "
                "this host; try again",
                transient=True,
            )
        return None

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

    def _remember_known(self, client_id: str) -> None:
        self._known[client_id] = None
        self._known.move_to_end(client_id)
        while len(self._known) > self._max_known:
            self._known.popitem(last=False)

    def _fetch(self, client_id: str, stale: _Entry | None) -> Deferred[Client]:
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
        self, response: IResponse, client_id: str, stale: _Entry | None
    ) -> Client | Deferred[Client]:
        code = response.code
        if code == 304 and stale is not None and stale.etag is not None:
            _discard(response)
            return self._revalidated(client_id, stale, response.headers)
        if code in (301, 302, 303, 307, 308):
            _discard(response)
            raise CIMDError("client metadata URL redirects; redirects are not followed")
        if code != 200:
            _discard(response)
            raise CIMDError(
                f"client metadata URL answered HTTP {int(code)}, not 200",
                transient=code in TRANSIENT_STATUSES,
            )
        length = response.length
        if isinstance(length, int) and length > self._max_bytes:
            _discard(response)
            raise _too_large(self._max_bytes)
        reader = _CappedBody(self._max_bytes)
        response.deliverBody(reader)
        headers = response.headers
        return reader.finished.addCallback(self._got_body, client_id, headers)

    def _got_body(self, body: bytes, client_id: str, headers: Headers) -> Client:
        client = parse_document(client_id, body, created_at=self._clock.seconds())
        ttl = freshness(headers, default_ttl=self._default_ttl, max_ttl=self._max_ttl)
        if ttl is None:
            self._cache.pop(client_id, None)
        else:
            self._store(
                client_id,
                _Entry(
                    client=client,
                    expires_at=self._clock.seconds() + ttl,
                    etag=_etag(headers),
                ),
            )
        return client

    def _revalidated(self, client_id: str, stale: _Entry, headers: Headers) -> Client:
        ttl = freshness(headers, default_ttl=self._default_ttl, max_ttl=self._max_ttl)
        if ttl is None:
            self._cache.pop(client_id, None)
        else:
            self._store(
                client_id,
                attr.evolve(
                    stale,
                    expires_at=self._clock.seconds() + ttl,
                    etag=_etag(headers) or stale.etag,
                ),
            )
        return stale.client

    def _store(self, client_id: str, entry: _Entry) -> None:
        self._cache[client_id] = entry
        self._cache.move_to_end(client_id)
        while len(self._cache) > self._max_entries:
            self._cache.popitem(last=False)

    def _settle(self, result: Client | Failure, client_id: str) -> None:
        flight = self._in_flight.pop(client_id)
        self._per_host[flight.key] -= 1
        if not self._per_host[flight.key]:
            del self._per_host[flight.key]
        if not flight.known:
            self._unknown_in_flight -= 1
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
            self._known.pop(client_id, None)
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
            self._remember_known(client_id)
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
