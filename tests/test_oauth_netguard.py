"""
Tests for L{smeldr_oauth.oauth.netguard}: the address classifier, the
address policy, and the vetted endpoints (resolve once, refuse special-use
addresses, connect to the vetted address, TLS against the host name).
"""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionRefusedError, DNSLookupError
from twisted.internet.interfaces import IHostnameResolver
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS
from twisted.web.error import SchemeNotSupported
from zope.interface import implementer

from smeldr_oauth.oauth.netguard import (
    FORBIDDEN_V4,
    AddressPolicy,
    ForbiddenAddress,
    VettedEndpointFactory,
    is_forbidden_address,
    make_vetted_agent,
)

FORBIDDEN = [
    "0.0.0.0",
    "0.1.2.3",
    "10.0.0.1",
    "100.64.0.1",
    "100.127.255.254",
    "127.0.0.1",
    "127.255.255.255",
    "169.254.169.254",
    "172.16.0.1",
    "172.31.255.255",
    "192.0.0.8",
    "192.0.2.1",
    "192.88.99.1",
    "192.168.1.1",
    "198.18.0.1",
    "198.51.100.7",
    "203.0.113.9",
    "224.0.0.1",
    "239.255.255.250",
    "240.0.0.1",
    "255.255.255.255",
    "::",
    "::1",
    "::127.0.0.1",  # deprecated IPv4-compatible
    "::ffff:127.0.0.1",
    "::ffff:10.1.2.3",
    "::ffff:169.254.169.254",
    "::ffff:0:a01:203",  # IPv4-translated
    "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
    "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
    "64:ff9b:1::808:808",  # local-use NAT64
    "100::1",
    "2001:db8::1",
    "2001:10::1",
    "2002:7f00:1::1",  # 6to4 of 127.0.0.1
    "2002:c0a8:101::1",  # 6to4 of 192.168.1.1
    "2001:0:808:808::3f57:fefe",  # Teredo, client 192.168.1.1
    "2001:0:7f00:1::f7f7:fbfb",  # Teredo, server 127.0.0.1
    "3fff::1",
    "fc00::1",
    "fd12:3456:789a::1",
    "fe80::1",
    "fe80::1%eth0",
    "fec0::1",
    "ff02::1",
    "4000::1",  # outside global unicast
    "not an address",
    "",
    "127.1",
]

ALLOWED = [
    "8.8.8.8",
    "1.1.1.1",
    "93.184.216.34",
    "100.63.255.255",
    "100.128.0.0",
    "172.15.255.255",
    "172.32.0.0",
    "2606:4700:4700::1111",
    "2a00:1450:4001:80b::200e",
    "::ffff:8.8.8.8",
    "64:ff9b::808:808",
    "2002:808:808::1",  # 6to4 of 8.8.8.8
    "2001:0:808:808::f7f7:fbfb",  # Teredo, server 8.8.8.8 client 8.8.4.4
]


class ClassifierTests(SynchronousTestCase):
    def test_forbidden(self) -> None:
        for text in FORBIDDEN:
            self.assertTrue(is_forbidden_address(text), text)

    def test_allowed(self) -> None:
        for text in ALLOWED:
            self.assertFalse(is_forbidden_address(text), text)

    def test_address_objects(self) -> None:
        self.assertTrue(is_forbidden_address(ipaddress.ip_address("10.0.0.1")))
        self.assertFalse(is_forbidden_address(ipaddress.ip_address("8.8.8.8")))

    def test_not_an_address_object(self) -> None:
        self.assertTrue(is_forbidden_address(object()))  # type: ignore[arg-type]

    @given(st.ip_addresses(v=4))
    def test_v4_listed_ranges(self, ip: ipaddress.IPv4Address) -> None:
        """
        An IPv4 address is forbidden exactly when it is in one of the
        listed ranges.
        """
        self.assertEqual(is_forbidden_address(ip), any(ip in net for net in FORBIDDEN_V4))

    @given(st.ip_addresses(v=4))
    def test_v4_covers_stdlib(self, ip: ipaddress.IPv4Address) -> None:
        """
        Whatever the C{ipaddress} module considers non-global (or multicast)
        is forbidden.
        """
        if not ip.is_global or ip.is_multicast or ip.is_reserved:
            self.assertTrue(is_forbidden_address(ip))

    @given(st.ip_addresses(v=4))
    def test_embedded_v4_decides(self, ip: ipaddress.IPv4Address) -> None:
        """
        IPv4-mapped, NAT64 and 6to4 forms are judged like the IPv4 address
        they carry.
        """
        expected = is_forbidden_address(ip)
        n = int(ip)
        mapped = ipaddress.IPv6Address((0xFFFF << 32) | n)
        nat64 = ipaddress.IPv6Address((0x64FF9B << 96) | n)
        sixtofour = ipaddress.IPv6Address((0x2002 << 112) | (n << 80) | 1)
        self.assertEqual(is_forbidden_address(mapped), expected)
        self.assertEqual(is_forbidden_address(nat64), expected)
        self.assertEqual(is_forbidden_address(sixtofour), expected)

    @given(st.ip_addresses(v=6))
    def test_v6_covers_stdlib(self, ip: ipaddress.IPv6Address) -> None:
        """
        Outside the embedded-IPv4 forms (judged above), whatever
        C{ipaddress} considers special is forbidden.
        """
        embedded = (
            ip.ipv4_mapped is not None
            or ip.sixtofour is not None
            or ip.teredo is not None
            or ip in ipaddress.ip_network("64:ff9b::/96")
        )
        if embedded:
            return
        if not ip.is_global or ip.is_multicast or ip.is_link_local or ip.is_site_local or ip.is_private:
            self.assertTrue(is_forbidden_address(ip), str(ip))

    @given(st.ip_addresses(v=6))
    def test_v6_outside_global_unicast(self, ip: ipaddress.IPv6Address) -> None:
        """
        Outside 2000::/3 only the mapped and NAT64 forms can be allowed.
        """
        if ip in ipaddress.ip_network("2000::/3"):
            return
        if ip in ipaddress.ip_network("::ffff:0:0/96") or ip in ipaddress.ip_network("64:ff9b::/96"):
            return
        self.assertTrue(is_forbidden_address(ip))


class PolicyTests(SynchronousTestCase):
    def test_default(self) -> None:
        policy = AddressPolicy()
        self.assertTrue(policy.permits("8.8.8.8"))
        self.assertFalse(policy.permits("127.0.0.1"))
        self.assertFalse(policy.permits("garbage"))

    def test_allow_all(self) -> None:
        policy = AddressPolicy(allow_all=True)
        self.assertTrue(policy.permits("127.0.0.1"))
        self.assertTrue(policy.permits("10.0.0.1"))

    def test_allowed_networks(self) -> None:
        policy = AddressPolicy(allowed_networks=["127.0.0.1/32", "fd00::/8"])
        self.assertTrue(policy.permits("127.0.0.1"))
        self.assertTrue(policy.permits(ipaddress.ip_address("fd00::5")))
        self.assertFalse(policy.permits("127.0.0.2"))
        self.assertFalse(policy.permits("10.0.0.1"))
        self.assertFalse(policy.permits("::1"))


@implementer(IHostnameResolver)
class FakeResolver:
    """
    Answers from a table, synchronously, and counts the questions.
    """

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.calls: list[str] = []

    def resolveHostName(
        self,
        receiver,
        hostName,
        portNumber=0,
        addressTypes=None,
        transportSemantics="TCP",
    ):
        self.calls.append(hostName)
        receiver.resolutionBegan(None)
        for address in self.answers.get(hostName, []):
            cls = IPv6Address if ":" in address else IPv4Address
            receiver.addressResolved(cls("TCP", address, portNumber))
        receiver.resolutionComplete()


class RecordingTLSPolicy:
    """
    The browser-like policy, remembering which names it made creators for.
    """

    def __init__(self) -> None:
        self.netlocs: list[tuple[bytes, int]] = []
        self._real = BrowserLikePolicyForHTTPS()

    def creatorForNetloc(self, hostname: bytes, port: int):
        self.netlocs.append((hostname, port))
        return self._real.creatorForNetloc(hostname, port)


class VettedAgentTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.resolver = FakeResolver(
            {
                "cimd.example": ["93.184.216.34"],
                "two.example": ["93.184.216.34", "2606:4700:4700::1111"],
                "rebind.example": ["93.184.216.34", "127.0.0.1"],
                "private.example": ["10.0.0.7"],
                "mapped.example": ["::ffff:169.254.169.254"],
            }
        )
        self.tls = RecordingTLSPolicy()

    def agent(self, policy: AddressPolicy | None = None, allow_http: bool = False) -> Agent:
        factory = VettedEndpointFactory(
            reactor=self.reactor,
            policy=policy or AddressPolicy(),
            tls=self.tls,
            name_resolver=self.resolver,
            allow_http=allow_http,
        )
        return Agent.usingEndpointFactory(self.reactor, factory)

    def test_connects_to_vetted_address(self) -> None:
        """
        The TCP connection goes to the resolved address, while TLS is set up
        for the host name from the URL; the name is resolved once.
        """
        d = self.agent().request(b"GET", b"https://cimd.example/client.json")
        self.assertNoResult(d)
        [(host, port, _factory, _timeout, _bind)] = self.reactor.tcpClients
        self.assertEqual((host, port), ("93.184.216.34", 443))
        self.assertEqual(self.tls.netlocs, [(b"cimd.example", 443)])
        self.assertEqual(self.resolver.calls, ["cimd.example"])

    def test_refuses_if_any_address_is_forbidden(self) -> None:
        """
        A name with one public and one private record is refused outright,
        and the refusal is logged as a security event.
        """
        with capturedLogs() as events:
            d = self.agent().request(b"GET", b"https://rebind.example/x")
            failure = self.failureResultOf(d, ForbiddenAddress)
        self.assertEqual(failure.value.host, "rebind.example")
        self.assertEqual(failure.value.address, "127.0.0.1")
        self.assertEqual(self.reactor.tcpClients, [])
        [event] = [e for e in events if e.get("host") == "rebind.example"]
        self.assertEqual(event["address"], "127.0.0.1")

    def test_refuses_private_and_mapped(self) -> None:
        for url in (b"https://private.example/x", b"https://mapped.example/x"):
            self.failureResultOf(self.agent().request(b"GET", url), ForbiddenAddress)
        self.assertEqual(self.reactor.tcpClients, [])

    def test_refuses_ip_literal(self) -> None:
        """
        An IP literal is vetted too, without asking the resolver.
        """
        for url in (
            b"https://127.0.0.1/x",
            b"https://[::1]/x",
            b"https://169.254.169.254/x",
        ):
            self.failureResultOf(self.agent().request(b"GET", url), ForbiddenAddress)
        self.assertEqual(self.resolver.calls, [])
        self.assertEqual(self.reactor.tcpClients, [])

    def test_public_ip_literal(self) -> None:
        self.agent().request(b"GET", b"https://[2606:4700:4700::1111]:8443/x")
        [(host, port, *_)] = self.reactor.tcpClients
        self.assertEqual((host, port), ("2606:4700:4700::1111", 8443))

    def test_allowed_networks(self) -> None:
        agent = self.agent(AddressPolicy(allowed_networks=["10.0.0.0/24"]))
        agent.request(b"GET", b"https://private.example/x")
        [(host, *_)] = self.reactor.tcpClients
        self.assertEqual(host, "10.0.0.7")

    def test_no_addresses(self) -> None:
        d = self.agent().request(b"GET", b"https://nowhere.example/x")
        self.failureResultOf(d, DNSLookupError)

    def test_next_address_after_failure(self) -> None:
        """
        If the first vetted address refuses the connection, the next one is
        tried; the name is still resolved only once.
        """
        d = self.agent().request(b"GET", b"https://two.example/x")
        [(host, _port, factory, _t, _b)] = self.reactor.tcpClients
        self.assertEqual(host, "93.184.216.34")
        factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        self.assertEqual(self.reactor.tcpClients[-1][0], "2606:4700:4700::1111")
        self.assertEqual(self.resolver.calls, ["two.example"])
        self.assertNoResult(d)

    def test_http_refused_by_default(self) -> None:
        d = self.agent().request(b"GET", b"http://cimd.example/x")
        self.failureResultOf(d, SchemeNotSupported)
        self.assertEqual(self.reactor.tcpClients, [])

    def test_http_when_allowed(self) -> None:
        self.agent(allow_http=True).request(b"GET", b"http://cimd.example/x")
        [(host, port, *_)] = self.reactor.tcpClients
        self.assertEqual((host, port), ("93.184.216.34", 80))
        self.assertEqual(self.tls.netlocs, [])

    def test_other_scheme(self) -> None:
        d = self.agent(allow_http=True).request(b"GET", b"ftp://cimd.example/x")
        self.failureResultOf(d, SchemeNotSupported)

    def test_make_vetted_agent(self) -> None:
        """
        The factory function wires the same guard.
        """
        agent = make_vetted_agent(self.reactor, name_resolver=self.resolver)
        self.failureResultOf(agent.request(b"GET", b"https://rebind.example/x"), ForbiddenAddress)
        agent.request(b"GET", b"https://cimd.example/x")
        self.assertEqual(self.reactor.tcpClients[0][0], "93.184.216.34")

    def test_late_resolution_ignored(self) -> None:
        """
        A resolver that answers after the request was cancelled does not
        cause an error.
        """
        pending = []

        @implementer(IHostnameResolver)
        class Slow:
            def resolveHostName(self, receiver, hostName, portNumber=0, *a, **kw):
                pending.append(receiver)

        factory = VettedEndpointFactory(
            reactor=self.reactor,
            policy=AddressPolicy(),
            tls=self.tls,
            name_resolver=Slow(),
        )
        d = Agent.usingEndpointFactory(self.reactor, factory).request(b"GET", b"https://x.example/")
        d.cancel()
        self.failureResultOf(d)
        [receiver] = pending
        receiver.addressResolved(IPv4Address("TCP", "8.8.8.8", 443))
        receiver.resolutionComplete()
        self.assertEqual(self.reactor.tcpClients, [])
