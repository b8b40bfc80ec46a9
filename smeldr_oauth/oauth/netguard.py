# -*- test-case-name: tests.test_oauth_netguard -*-
"""
Outbound connections to hosts named by strangers, made safe against SSRF.

A Client ID Metadata Document URL is chosen by whoever starts an
authorization request, so fetching it lets anyone on the internet make this
server open a connection.  Without a guard that connection could reach the
loopback interface, the cloud metadata service (169.254.169.254), or any
host on the private network behind us.

The guard has two parts:

  - L{is_forbidden_address} classifies one IP address: special-use ranges
    (loopback, RFC 1918, link-local, CGNAT, multicast, documentation,
    reserved, IPv6 ULA...) are forbidden, and IPv6 forms that embed an IPv4
    address (IPv4-mapped, NAT64, 6to4, Teredo) are judged by the embedded
    address too.  The tables are our own rather than the C{ipaddress}
    module's C{is_private}/C{is_global}, whose answers change between Python
    versions.

  - L{make_vetted_agent} builds an L{IAgent} whose endpoints resolve the
    host name exactly once, refuse the whole host if I{any} resolved address
    is forbidden (a mix of public and private records is a rebinding trick,
    not a configuration anyone needs), and then connect to the vetted
    address itself, so a second DNS answer can never be used.  TLS still
    runs against the original host name: SNI and certificate verification
    use the name from the URL while the TCP connection goes to the IP
    address we checked.  This is the shape of synapse's IP-blocklisting
    resolver and agent, done with an endpoint factory instead of a wrapped
    reactor so that the refusal surfaces as a typed L{ForbiddenAddress}
    rather than as an anonymous DNS failure.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

import attr
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.error import ConnectError, DNSLookupError, TimeoutError
from twisted.internet.interfaces import (
    IHostnameResolver,
    IProtocol,
    IProtocolFactory,
    IResolutionReceiver,
    IStreamClientEndpoint,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
)
from twisted.web.error import SchemeNotSupported
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IPolicyForHTTPS
from zope.interface import implementer

log = Logger()

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_v4 = ipaddress.IPv4Network
_v6 = ipaddress.IPv6Network

#: IPv4 ranges we never connect to (IANA special-purpose registry, plus
#: multicast and the old class E space, which includes 255.255.255.255).
FORBIDDEN_V4: tuple[ipaddress.IPv4Network, ...] = (
    _v4("0.0.0.0/8"),  # "this network", includes the unspecified address
    _v4("10.0.0.0/8"),  # RFC 1918
    _v4("100.64.0.0/10"),  # CGNAT shared address space (RFC 6598)
    _v4("127.0.0.0/8"),  # loopback
    _v4("169.254.0.0/16"),  # link-local, cloud metadata services
    _v4("172.16.0.0/12"),  # RFC 1918
    _v4("192.0.0.0/24"),  # IETF protocol assignments
    _v4("192.0.2.0/24"),  # TEST-NET-1 (documentation)
    _v4("192.31.196.0/24"),  # AS112-v4
    _v4("192.52.193.0/24"),  # AMT
    _v4("192.88.99.0/24"),  # deprecated 6to4 relay anycast
    _v4("192.168.0.0/16"),  # RFC 1918
    _v4("192.175.48.0/24"),  # direct delegation AS112
    _v4("198.18.0.0/15"),  # benchmarking
    _v4("198.51.100.0/24"),  # TEST-NET-2 (documentation)
    _v4("203.0.113.0/24"),  # TEST-NET-3 (documentation)
    _v4("224.0.0.0/4"),  # multicast
    _v4("240.0.0.0/4"),  # reserved, includes limited broadcast
)

#: IPv6 ranges we never connect to, checked after the embedded-IPv4 forms
#: below.  Everything outside 2000::/3 (global unicast) is refused anyway;
#: these are the special-use blocks inside it, listed for clarity.
FORBIDDEN_V6: tuple[ipaddress.IPv6Network, ...] = (
    _v6("::/96"),  # unspecified, loopback, deprecated IPv4-compatible
    _v6("::ffff:0:0:0/96"),  # IPv4-translated (SIIT)
    _v6("64:ff9b:1::/48"),  # local-use NAT64 (RFC 8215)
    _v6("100::/64"),  # discard-only
    _v6("2001::/23"),  # IETF protocol assignments (Teredo handled first)
    _v6("2001:db8::/32"),  # documentation
    _v6("3fff::/20"),  # documentation (RFC 9637)
    _v6("5f00::/16"),  # SRv6 SIDs
    _v6("fc00::/7"),  # unique local addresses
    _v6("fe80::/10"),  # link-local
    _v6("fec0::/10"),  # deprecated site-local
    _v6("ff00::/8"),  # multicast
)

_GLOBAL_UNICAST_V6 = _v6("2000::/3")
_IPV4_MAPPED = _v6("::ffff:0:0/96")
_NAT64_WKP = _v6("64:ff9b::/96")
_SIX_TO_FOUR = _v6("2002::/16")
_TEREDO = _v6("2001::/32")


def parse_ip(text: str) -> IPAddress | None:
    """
    The IP address written in C{text}, or C{None} if it is not one.

    IPv6 zone identifiers (C{fe80::1%eth0}) are dropped: the zone does not
    change which range an address is in.
    """
    if "%" in text:
        text = text.split("%", 1)[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def is_forbidden_address(ip: str | IPAddress) -> bool:
    """
    Whether an outbound fetch must never connect to C{ip}.

    Anything that is not a parseable IP address is forbidden: this is a
    guard, and it fails closed.

    @param ip: an address object or its text form.
    """
    if isinstance(ip, str):
        parsed = parse_ip(ip)
        if parsed is None:
            return True
        ip = parsed
    if isinstance(ip, ipaddress.IPv4Address):
        return any(ip in net for net in FORBIDDEN_V4)
    if not isinstance(ip, ipaddress.IPv6Address):
        return True
    # Forms that carry an IPv4 address: a packet to them reaches (or is
    # tunnelled towards) that IPv4 address, so it decides.
    if ip in _IPV4_MAPPED or ip in _NAT64_WKP:
        return is_forbidden_address(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    if ip in _SIX_TO_FOUR:
        embedded = ip.sixtofour
        return embedded is None or is_forbidden_address(embedded)
    if ip in _TEREDO:
        teredo = ip.teredo
        if teredo is None:
            return True
        server, client = teredo
        return is_forbidden_address(server) or is_forbidden_address(client)
    if ip not in _GLOBAL_UNICAST_V6:
        return True
    return any(ip in net for net in FORBIDDEN_V6)


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class AddressPolicy:
    """
    Which addresses an outbound fetch may connect to.

    @ivar allow_all: the development switch (C{allow_insecure}): every
        address is allowed, loopback and private ones included.
    @ivar allowed_networks: networks allowed even though they are special
        use.  A hook for tests that serve documents on 127.0.0.1 (and for an
        operator who deliberately trusts one internal range); never derived
        from request data.
    """

    allow_all: bool = False
    allowed_networks: tuple[IPNetwork, ...] = attr.ib(
        default=(), converter=lambda nets: tuple(ipaddress.ip_network(n) for n in nets)
    )

    def permits(self, ip: str | IPAddress) -> bool:
        """
        Whether a connection to C{ip} is allowed under this policy.
        """
        if self.allow_all:
            return True
        parsed = parse_ip(ip) if isinstance(ip, str) else ip
        if parsed is None:
            return False
        if not is_forbidden_address(parsed):
            return True
        return any(
            parsed.version == net.version and parsed in net
            for net in self.allowed_networks
        )


class ForbiddenAddress(ConnectError):
    """
    A host resolved to an address the L{AddressPolicy} does not allow, so no
    connection was attempted.

    It is a L{ConnectError} so that code which already handles connection
    failures handles this one too.

    @ivar host: the host name from the URL.
    @ivar address: the refused address, as text.
    """

    def __init__(self, host: str, address: str) -> None:
        super().__init__(string=f"{host} resolved to forbidden address {address}")
        self.host = host
        self.address = address


@implementer(IResolutionReceiver)
class _Collector:
    """
    Gathers every address of one resolution into a Deferred list.
    """

    def __init__(self) -> None:
        self.addresses: list[str] = []
        self.done: Deferred[list[str]] = Deferred()

    def resolutionBegan(self, resolution: object) -> None:
        pass

    def addressResolved(self, address: object) -> None:
        host = getattr(address, "host", None)
        if isinstance(host, str):
            self.addresses.append(host)

    def resolutionComplete(self) -> None:
        # The caller may have given up (timeout): a resolver thread cannot
        # be stopped, so its late answer is dropped here.
        if not self.done.called:
            self.done.callback(self.addresses)


def resolve_once(
    resolver: IHostnameResolver, host: str, port: int
) -> Deferred[list[str]]:
    """
    Every address C{resolver} gives for C{host}, from one resolution (the
    doctor resolves the host it is pointed at this way to allow it).
    """
    collector = _Collector()
    resolver.resolveHostName(collector, host, port)
    return collector.done


@implementer(IStreamClientEndpoint)
@attr.s(auto_attribs=True)
class _VettedEndpoint:
    """
    Resolves C{host} once, refuses it if any address is forbidden, then
    connects to the vetted addresses in order (TLS against C{host} when
    C{tls} is set).
    """

    reactor: object
    name_resolver: IHostnameResolver
    policy: AddressPolicy
    host: str
    port: int
    tls: IPolicyForHTTPS | None
    connect_timeout: float
    max_addresses: int = 4

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        literal = parse_ip(self.host)
        if literal is not None:
            resolved: Deferred[list[str]] = Deferred()
            resolved.callback([str(literal)])
        else:
            resolved = resolve_once(self.name_resolver, self.host, self.port)
        return resolved.addCallback(self._vet).addCallback(
            self._attempt, protocolFactory, 0
        )

    def _vet(self, addresses: list[str]) -> list[str]:
        if not addresses:
            raise DNSLookupError(f"no addresses for {self.host}")
        for address in addresses:
            if not self.policy.permits(address):
                log.warn(  # noqa: G010 - twisted.logger.Logger has warn, not warning
                    "Refused outbound connection to {host}: it resolved to "
                    "the special-use address {address}",
                    host=self.host,
                    address=address,
                )
                raise ForbiddenAddress(self.host, address)
        # Deduplicate, keep the resolver's order, cap the attempts.
        unique = list(dict.fromkeys(addresses))
        return unique[: self.max_addresses]

    def _attempt(
        self, addresses: Sequence[str], protocolFactory: IProtocolFactory, index: int
    ) -> Deferred[IProtocol]:
        address = addresses[index]
        ip = parse_ip(address)
        tcp: IStreamClientEndpoint
        if isinstance(ip, ipaddress.IPv6Address):
            tcp = TCP6ClientEndpoint(
                self.reactor, address, self.port, timeout=self.connect_timeout
            )
        else:
            tcp = TCP4ClientEndpoint(
                self.reactor, address, self.port, timeout=self.connect_timeout
            )
        endpoint: IStreamClientEndpoint = tcp
        if self.tls is not None:
            # SNI and certificate checks use the name from the URL; only
            # the TCP connection uses the vetted address.
            creator = self.tls.creatorForNetloc(self.host.encode("ascii"), self.port)
            endpoint = wrapClientTLS(creator, tcp)
        d: Deferred[IProtocol] = endpoint.connect(protocolFactory)
        if index + 1 < len(addresses):

            def next_address(failure: Failure) -> Deferred[IProtocol]:
                failure.trap(ConnectError, TimeoutError)
                return self._attempt(addresses, protocolFactory, index + 1)

            d.addErrback(next_address)
        return d


@implementer(IAgentEndpointFactory)
@attr.s(auto_attribs=True)
class VettedEndpointFactory:
    """
    Makes a L{_VettedEndpoint} for each URI an L{Agent} is asked to fetch.

    @ivar allow_http: whether plain C{http} URIs may be fetched at all (the
        development switch); C{https} is always allowed.
    """

    reactor: object
    policy: AddressPolicy
    tls: IPolicyForHTTPS
    name_resolver: IHostnameResolver | None = None
    allow_http: bool = False
    connect_timeout: float = 5.0

    def endpointForURI(self, uri: object) -> IStreamClientEndpoint:
        scheme = getattr(uri, "scheme", b"")
        raw_host = getattr(uri, "host", b"")
        port = getattr(uri, "port", 0)
        host = (
            raw_host.decode("ascii") if isinstance(raw_host, bytes) else str(raw_host)
        )
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        resolver = self.name_resolver
        if resolver is None:
            resolver = self.reactor.nameResolver  # type: ignore[attr-defined]
        if scheme == b"https":
            tls: IPolicyForHTTPS | None = self.tls
        elif scheme == b"http" and self.allow_http:
            tls = None
        else:
            raise SchemeNotSupported(f"Unsupported scheme: {scheme!r}")
        return _VettedEndpoint(
            reactor=self.reactor,
            name_resolver=resolver,
            policy=self.policy,
            host=host,
            port=port,
            tls=tls,
            connect_timeout=self.connect_timeout,
        )


def make_vetted_agent(
    reactor: object,
    *,
    policy: AddressPolicy | None = None,
    trust_root: object = None,
    allow_http: bool = False,
    name_resolver: IHostnameResolver | None = None,
    connect_timeout: float = 5.0,
) -> IAgent:
    """
    An L{IAgent} that only connects to addresses C{policy} permits, resolving
    each host once and connecting to the vetted address.

    It follows no redirects (a plain L{Agent} never does) and keeps no
    connections alive (each fetch is to a stranger's host).

    @param reactor: provides C{IReactorTCP}, C{IReactorTime} and (unless
        C{name_resolver} is given) C{IReactorPluggableNameResolver}.
    @param policy: which addresses are allowed; default: no special-use
        address.
    @param trust_root: an C{IOpenSSLTrustRoot} (for example from
        L{twisted.internet.ssl.trustRootFromCertificates}) to verify
        servers against instead of the platform's CA store.  Certificates
        are always verified, hostnames included.
    @param allow_http: allow plain C{http} URIs (development only).
    @param name_resolver: an C{IHostnameResolver}; default the reactor's.
    """
    if policy is None:
        policy = AddressPolicy()
    factory = VettedEndpointFactory(
        reactor=reactor,
        policy=policy,
        tls=BrowserLikePolicyForHTTPS(trustRoot=trust_root),
        name_resolver=name_resolver,
        allow_http=allow_http,
        connect_timeout=connect_timeout,
    )
    pool = HTTPConnectionPool(reactor, persistent=False)
    return Agent.usingEndpointFactory(reactor, factory, pool=pool)
