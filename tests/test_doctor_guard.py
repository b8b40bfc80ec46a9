"""
Tests for L{smeldr_oauth.doctor.guard}: where the doctor may connect.  The
rule itself (which addresses a run allows, from the URL it was given), and
over real sockets on 127.0.0.1 that nothing the rule refuses is connected
to: a redirect hop, a metadata document's authorization server or
registration endpoint, the certificate handshake.  Host names are mapped
to addresses by a resolver of the test's (so "metadata.example" can be
169.254.169.254), and the reactor records every TCP connection made.
"""

from __future__ import annotations

import io
import json
from typing import Any

from twisted.internet import reactor as _globalReactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import directlyProvides, providedBy

from smeldr_oauth.doctor.cli import run
from smeldr_oauth.doctor.fetch import guarded_fetcher, load_trust_root
from smeldr_oauth.doctor.guard import Guard, guard_around, guard_for
from smeldr_oauth.doctor.run import DoctorOptions, diagnose
from smeldr_oauth.site.admin import parse
from tests.test_doctor_fetch import serveOnLoopback
from tests.test_doctor_proxy import NaiveMetadata
from tests.test_oauth_netguard import FakeResolver

reactor: Any = _globalReactor

#: What the test's resolver answers.
NAMES = {
    "mcp.example": ["93.184.216.34"],
    "public.example": ["93.184.216.34"],
    "metadata.example": ["169.254.169.254"],
    "internal.example": ["10.0.0.1"],
    "mixed.example": ["93.184.216.34", "10.0.0.1"],
    "loopback.example": ["127.0.0.1"],
    "private.example": ["10.0.0.5"],
}


class RuleTests(SynchronousTestCase):
    """
    Which addresses a run allows.
    """

    def assertPermits(self, guard: Guard, allowed: list[str], refused: list[str]) -> None:
        self.assertEqual([a for a in allowed if not guard.policy.permits(a)], [])
        self.assertEqual([a for a in refused if guard.policy.permits(a)], [])

    def test_publicURL(self) -> None:
        """
        A URL on a public address: public addresses only.
        """
        self.assertPermits(
            guard_around(["93.184.216.34"]),
            ["93.184.216.34", "2606:4700:4700::1111"],
            ["127.0.0.1", "::1", "10.0.0.1", "169.254.169.254", "192.168.1.1", "::ffff:169.254.169.254"],
        )

    def test_privateURL(self) -> None:
        """
        A URL on a private address: that address (the operator's choice),
        and no other special-use one.
        """
        self.assertPermits(
            guard_around(["10.0.0.5"]),
            ["10.0.0.5", "93.184.216.34"],
            ["10.0.0.6", "169.254.169.254", "127.0.0.1"],
        )

    def test_loopbackURL(self) -> None:
        """
        A URL on loopback: the whole loopback interface (the same machine),
        nothing else special-use.
        """
        self.assertPermits(
            guard_around(["127.0.0.1"]),
            ["127.0.0.1", "127.0.0.2", "::1", "93.184.216.34"],
            ["10.0.0.1", "169.254.169.254", "192.168.1.1"],
        )

    def test_allowPrivate(self) -> None:
        self.assertPermits(guard_around(["93.184.216.34"], allow_private=True), ["10.0.0.1", "169.254.169.254"], [])

    def resolvedGuard(self, url: str, resolver: FakeResolver) -> Guard:
        # The resolver answers at once: no time passes.
        return self.successResultOf(ensureDeferred(guard_for(Clock(), url, 5.0, name_resolver=resolver)))

    def test_resolvedOnce(self) -> None:
        """
        The URL's host name is resolved once, and its addresses are what
        the run allows beyond the public ones.
        """
        resolver = FakeResolver(NAMES)
        guard = self.resolvedGuard("https://private.example/mcp", resolver)
        self.assertEqual(resolver.calls, ["private.example"])
        self.assertIs(guard.name_resolver, resolver)
        self.assertPermits(guard, ["10.0.0.5"], ["10.0.0.1", "169.254.169.254", "127.0.0.1"])
        self.assertPermits(self.resolvedGuard("https://mcp.example/mcp", resolver), [], ["10.0.0.5", "127.0.0.1"])

    def test_notResolved(self) -> None:
        """
        A name that does not resolve, or a URL the doctor does not check
        (plain http elsewhere than loopback): no special-use address, and
        nothing asked of the resolver for the latter.
        """
        resolver = FakeResolver(NAMES)
        self.assertPermits(self.resolvedGuard("https://nowhere.example/mcp", resolver), [], ["127.0.0.1"])
        self.assertPermits(self.resolvedGuard("http://private.example/mcp", resolver), [], ["10.0.0.5"])
        self.assertEqual(resolver.calls, ["nowhere.example"])

    def test_literal(self) -> None:
        resolver = FakeResolver(NAMES)
        self.assertPermits(self.resolvedGuard("http://[::1]:8080/mcp", resolver), ["::1", "127.0.0.1"], ["10.0.0.1"])
        self.assertEqual(resolver.calls, [])


class RecordingReactor:
    """
    The real reactor, but every TCP connection it is asked to make is
    recorded first (by host).
    """

    def __init__(self, real: Any) -> None:
        self._real = real
        self.connected: list[str] = []
        directlyProvides(self, providedBy(real))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def connectTCP(self, host: str, port: int, factory: Any, timeout: float = 30, bindAddress: Any = None) -> Any:
        self.connected.append(host)
        return self._real.connectTCP(host, port, factory, timeout, bindAddress)


class Steering(NaiveMetadata):
    """
    A server on 127.0.0.1 that points the doctor elsewhere: its resource
    metadata names C{authorization_server} (else itself), the root
    metadata URL redirects to C{redirect}, and its own authorization
    server metadata has its registration endpoint at C{registration}.
    """

    def __init__(self, redirect: str, authorization_server: str = "", registration: str = "") -> None:
        super().__init__()
        self.redirect = redirect
        self.authorization_server = authorization_server
        self.registration = registration
        self.pending: list[Any] = []

    def resource_metadata(self, base: str) -> dict[str, Any]:
        return {"resource": base + "/mcp", "authorization_servers": [self.authorization_server or base]}

    def server_metadata(self, base: str) -> dict[str, Any]:
        return {**super().server_metadata(base), "registration_endpoint": self.registration}

    def render_GET(self, request: Any) -> bytes:
        if request.path == b"/.well-known/oauth-protected-resource":
            request.setResponseCode(302)
            request.setHeader(b"location", self.redirect.encode())
            return b""
        return super().render_GET(request)


class SteeredTests(TestCase):
    """
    The whole doctor against a loopback server that names other hosts:
    each refused, the check that needed it failing with the reason, and
    no connection made anywhere but 127.0.0.1.
    """

    timeout = 30

    async def steer(self, server: Steering, **options: Any) -> tuple[dict[str, Any], RecordingReactor]:
        url = await serveOnLoopback(self, server) + "/mcp"
        recording = RecordingReactor(reactor)
        guard = await guard_for(recording, url, 5.0, name_resolver=FakeResolver(NAMES))
        fetcher = guarded_fetcher(recording, load_trust_root(None), 5.0, guard)
        verdicts = await diagnose(fetcher, DoctorOptions(url=url, keepalive=0.2, **options))
        return {v.check: v for v in verdicts}, recording

    async def test_metadataAndRedirect(self) -> None:
        """
        The authorization server on the cloud metadata address, a redirect
        hop to a private one: both refused, saying so.
        """
        server = Steering(
            redirect="https://internal.example/latest/meta-data/",
            authorization_server="https://metadata.example",
        )
        verdicts, recording = await self.steer(server)
        self.assertEqual(verdicts["prm-path"].status, "ok")
        self.assertEqual(verdicts["prm-root"].status, "fail")
        self.assertIn("refused: internal.example is at 10.0.0.1", verdicts["prm-root"].summary)
        self.assertEqual(verdicts["as-metadata"].status, "fail")
        self.assertIn("refused: metadata.example is at 169.254.169.254", verdicts["as-metadata"].summary)
        self.assertEqual(set(recording.connected), {"127.0.0.1"})

    async def test_plainHTTPHop(self) -> None:
        """
        A redirect to plain http on a host that is not loopback (public
        or not): refused before any connection.
        """
        server = Steering(redirect="http://public.example/doc")
        verdicts, recording = await self.steer(server)
        self.assertIn("refused: plain http to public.example", verdicts["prm-root"].summary)
        self.assertEqual(set(recording.connected), {"127.0.0.1"})

    async def test_flowRequest(self) -> None:
        """
        The flow's registration POST to a private address: the flow check
        fails at that step with the reason; the site token went nowhere.
        """
        server = Steering(redirect="/.well-known/oauth-protected-resource/mcp", registration="https://internal.example/register")
        verdicts, recording = await self.steer(server, site_token="site-token-0123456789")
        self.assertEqual(verdicts["flow"].status, "fail")
        self.assertIn("registered: POST https://internal.example/register answered refused:", verdicts["flow"].summary)
        self.assertEqual(set(recording.connected), {"127.0.0.1"})


    async def test_command(self) -> None:
        """
        The command as an operator runs it: its guard is the given URL's
        (127.0.0.1 checked, the metadata address refused).
        """
        url = await serveOnLoopback(self, Steering(redirect="/", authorization_server="https://169.254.169.254")) + "/mcp"
        out, err = io.StringIO(), io.StringIO()
        status = await run(reactor, parse(["doctor", url, "--json", "--timeout", "5"]), out, err, io.StringIO())
        checks = {c["check"]: c for c in json.loads(out.getvalue())["checks"]}
        self.assertEqual((status, err.getvalue(), checks["prm-path"]["status"]), (1, "", "ok"))
        self.assertIn("refused: 169.254.169.254 is at 169.254.169.254", checks["as-metadata"]["summary"])


class Counting(Factory):
    """
    Counts the connections made to a listening port.
    """

    protocol = Protocol

    def __init__(self) -> None:
        self.count = 0

    def buildProtocol(self, addr: Any) -> Protocol:
        self.count += 1
        return super().buildProtocol(addr)


class PublicURLTests(TestCase):
    """
    A run against a public URL: a name that resolves to loopback, where a
    real server listens, is never connected to, by a request or by the
    certificate handshake.
    """

    async def test_loopbackRefused(self) -> None:
        counting = Counting()
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(counting)
        self.addCleanup(port.stopListening)
        number = port.getHost().port
        guard = await guard_for(reactor, "https://mcp.example/mcp", 5.0, name_resolver=FakeResolver(NAMES))
        fetcher = guarded_fetcher(reactor, load_trust_root(None), 5.0, guard)
        for url in (f"https://loopback.example:{number}/x", f"http://127.0.0.1:{number}/x"):
            fetched = await fetcher.get(url)
            self.assertIsNone(fetched.status)
            self.assertIn("refused:", fetched.error or "")
        certificate = await fetcher.certificate(f"https://loopback.example:{number}/mcp")
        self.assertEqual(
            certificate.error,
            "refused: loopback.example is at 127.0.0.1, a special-use address (loopback, private, "
            "link-local...) other than the URL's own host; the doctor does not connect there "
            "(--allow-private allows it)",
        )
        observed = await fetcher.stream(f"https://loopback.example:{number}/mcp", {}, 1.0)
        self.assertIn("refused:", observed.error or "")
        self.assertEqual(counting.count, 0)

    async def test_mixedName(self) -> None:
        """
        A name with a public and a private address (a rebinding trick) is
        refused whole.
        """
        guard = await guard_for(reactor, "https://mcp.example/mcp", 5.0, name_resolver=FakeResolver(NAMES))
        fetched = await guarded_fetcher(reactor, None, 5.0, guard).get("https://mixed.example/x")
        self.assertIn("refused: mixed.example is at 10.0.0.1", fetched.error or "")
