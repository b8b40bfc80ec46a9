# -*- test-case-name: tests.test_doctor_guard -*-
"""
Where the doctor may connect: one rule for every connection it makes (each
redirect hop, the certificate's handshake, the discovery, CORS and
forwarded-header requests, the flow's and the session's), built on the
server's own SSRF guard, L{smeldr_oauth.oauth.netguard}.

Why a rule: the operator names one URL; every other URL the doctor
fetches is named by whatever answers there (a redirect's C{Location},
C{authorization_servers[0]}, the metadata's endpoints, the consent form's
action).  Unguarded, a server (someone else's, or a compromised one) could
make the doctor connect to the cloud metadata service (169.254.169.254),
to the private network around the machine it runs on, or to a service on
its loopback interface, and print part of the answer in the report.

The rule:

  - The host of the URL the operator gave is resolved once, at the start.
    Its addresses are the operator's choice, so they are always allowed:
    a deployment on loopback or on a private address (development, an
    internal check) is checked as it is.  When one is a loopback address
    the whole loopback interface is allowed (C{localhost} and
    C{127.0.0.1} are the same machine, and a development server's
    metadata often names the other).
  - Every other connection goes to public addresses only (netguard's
    L{AddressPolicy}: no loopback, RFC 1918, link-local, CGNAT, multicast,
    reserved or documentation ranges, nor their IPv4-mapped, NAT64, 6to4
    or Teredo forms), each host resolved once and the connection made to
    the vetted address, so a second DNS answer cannot move it.
  - C{--allow-private} lifts the address rule, for a deployment spread
    over private hosts (its authorization server on another internal
    address) checked from inside.  It is an explicit flag, never implied,
    because the doctor is run against URLs people paste.
  - Plain C{http} only to a loopback host (C{localhost}, C{127.0.0.1},
    C{[::1]}), flag or not: the rule the checks judge URLs by (the MCP URL
    and the metadata's endpoints fail on http elsewhere), so the doctor
    never sends a code or a token in clear across a network.

A refusal is a failed exchange, like a refused connection: the check that
needed the answer fails and says why (L{describe_refusal}); nothing is
connected to.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Iterable, Optional

import attr
from twisted.internet.interfaces import IHostnameResolver, IStreamClientEndpoint
from twisted.web.error import SchemeNotSupported
from twisted.web.iweb import IAgentEndpointFactory, IPolicyForHTTPS
from zope.interface import implementer

from smeldr_oauth.doctor.discovery import parse_mcp_url
from smeldr_oauth.oauth.netguard import (
    AddressPolicy,
    ForbiddenAddress,
    VettedEndpointFactory,
    parse_ip,
    resolve_once,
)
from smeldr_oauth.oauth.urls import is_loopback_host

#: Allowed with a loopback URL: the same machine under any name.
LOOPBACK_NETWORKS = ("127.0.0.0/8", "::1/128")


class PlainHTTPRefused(SchemeNotSupported):
    """
    An C{http} URL on a host that is not loopback; nothing was sent.
    (A L{SchemeNotSupported}, so an L{Agent} fails the request with it.)
    """

    def __init__(self, host: str) -> None:
        super().__init__(f"plain http to {host}")
        self.host = host


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class Guard:
    """
    The doctor's connection rule for one run.

    @ivar policy: the addresses it may connect to.
    @ivar name_resolver: resolves host names (default the reactor's; tests
        map names to addresses of their choice).
    """

    policy: AddressPolicy = attr.Factory(AddressPolicy)
    name_resolver: Optional[IHostnameResolver] = None

    def endpoints(self, reactor: Any, tls: IPolicyForHTTPS, timeout: float) -> IAgentEndpointFactory:
        """
        The endpoint factory every connection of the doctor is made with:
        an L{Agent}'s, and the certificate handshake's.
        """
        vetted = VettedEndpointFactory(
            reactor=reactor,
            policy=self.policy,
            tls=tls,
            name_resolver=self.name_resolver,
            allow_http=True,
            connect_timeout=timeout,
        )
        return _LoopbackHTTPOnly(vetted)


def guard_around(
    addresses: Iterable[str], allow_private: bool = False, name_resolver: Optional[IHostnameResolver] = None
) -> Guard:
    """
    The guard for a run whose URL's host has C{addresses} (see the module's
    rule).
    """
    if allow_private:
        return Guard(policy=AddressPolicy(allow_all=True), name_resolver=name_resolver)
    own = [ip for ip in (parse_ip(a) for a in addresses) if ip is not None]
    networks: list[str] = [str(ipaddress.ip_network(ip)) for ip in own]
    if any(ip.is_loopback for ip in own):
        networks.extend(LOOPBACK_NETWORKS)
    return Guard(policy=AddressPolicy(allowed_networks=tuple(networks)), name_resolver=name_resolver)


async def guard_for(
    reactor: Any,
    url: str,
    timeout: float,
    allow_private: bool = False,
    name_resolver: Optional[IHostnameResolver] = None,
) -> Guard:
    """
    The guard for a run against C{url}: its host resolved once (within
    C{timeout}); a host that does not resolve, or a URL the doctor will
    not check, allows no special-use address (the checks then say why).
    """
    parsed, _ = parse_mcp_url(url)
    addresses: list[str] = []
    if parsed is not None and not allow_private:
        literal = parse_ip(parsed.host.strip("[]"))
        if literal is not None:
            addresses = [str(literal)]
        else:
            resolver = name_resolver if name_resolver is not None else reactor.nameResolver
            host = parsed.to_uri().host
            resolving = resolve_once(resolver, host, parsed.port or 0)
            resolving.addTimeout(timeout, reactor)
            try:
                addresses = await resolving
            except Exception:
                addresses = []
    return guard_around(addresses, allow_private, name_resolver)


def describe_refusal(value: BaseException) -> Optional[str]:
    """
    One line for a connection the guard refused, or C{None} for any other
    failure.
    """
    if isinstance(value, ForbiddenAddress):
        return (
            f"refused: {value.host[:80]} is at {value.address}, a special-use address (loopback, "
            "private, link-local...) other than the URL's own host; the doctor does not connect "
            "there (--allow-private allows it)"
        )
    if isinstance(value, PlainHTTPRefused):
        return (
            f"refused: plain http to {value.host[:80]}, which is not loopback; the doctor uses "
            "http only on localhost, 127.0.0.1 or [::1]"
        )
    return None


@implementer(IAgentEndpointFactory)
@attr.s(frozen=True, auto_attribs=True)
class _LoopbackHTTPOnly:
    """
    Refuse C{http} URLs on hosts that are not loopback, then hand the URL
    to netguard's vetted endpoints.
    """

    vetted: VettedEndpointFactory

    def endpointForURI(self, uri: Any) -> IStreamClientEndpoint:
        host = uri.host.decode("ascii", "replace") if isinstance(uri.host, bytes) else str(uri.host)
        if uri.scheme == b"http" and not is_loopback_host(host):
            raise PlainHTTPRefused(host)
        return self.vetted.endpointForURI(uri)
