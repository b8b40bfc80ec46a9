# -*- test-case-name: tests.test_service_web -*-
"""
The HTTP site: a L{Request} that refuses oversized bodies, and the
L{Site} that uses it.

twisted.web buffers any request body it is sent; the cap has to live in
C{handleContentChunk} (as synapse does), so a client cannot make the
server hold more than C{max_body} bytes of one request.
"""

from __future__ import annotations

import ipaddress
import json
import time
from typing import Iterable, Optional

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.logger import Logger
from twisted.web.resource import IResource
from twisted.web.server import Site

from smeldr_oauth.mcp.http import CappedRequest

log = Logger()

DEFAULT_MAX_BODY = 1 << 20


class LimitedRequest(CappedRequest):
    """
    The MCP layer's L{CappedRequest} (which stops storing a body past its
    limit), with the limit taken from C{channel.site.max_body} and the 413
    given before routing, so that every endpoint, not only the MCP ones, is
    covered by the one mechanism.
    """

    def gotLength(self, length):  # type: ignore[no-untyped-def]
        site = getattr(self.channel, "site", None)
        self.max_body = getattr(site, "max_body", DEFAULT_MAX_BODY)
        super().gotLength(length)

    _started: float = 0.0

    def getClientAddress(self):  # type: ignore[no-untyped-def]
        """
        The client's address: the peer, unless the peer is a proxy the
        operator said to trust (C{--trust-forwarded-from}); then the
        nearest address in C{X-Forwarded-For} that is not itself a trusted
        proxy.  Without that option forwarded headers are ignored, so a
        client cannot pick its own rate-limit key.
        """
        peer = super().getClientAddress()
        site = getattr(getattr(self, "channel", None), "site", None)
        proxies: Optional[TrustedProxies] = getattr(site, "trusted_proxies", None)
        if proxies is None or not proxies:
            return peer
        forwarded = proxies.client_of(
            getattr(peer, "host", ""), self.requestHeaders.getRawHeaders(b"x-forwarded-for", [])
        )
        if forwarded is None:
            return peer
        kind = IPv6Address if ":" in forwarded else IPv4Address
        return kind("TCP", forwarded, 0)

    def process(self) -> None:
        self._started = time.perf_counter()
        if self.body_too_large:
            self.setResponseCode(413)
            self.setHeader(b"content-type", b"application/json")
            self.setHeader(b"connection", b"close")
            self.write(
                json.dumps(
                    {"error": "invalid_request", "error_description": "request body too large"}
                ).encode()
            )
            self.finish()
            return
        super().process()


    def finish(self) -> None:
        metrics = getattr(getattr(getattr(self, "channel", None), "site", None), "metrics", None)
        super().finish()
        if metrics is None or not self._started:
            return
        content_type = self.responseHeaders.getRawHeaders(b"content-type", [b""])[0]
        if content_type.startswith(b"text/event-stream"):
            return
        metrics.observe_request(self.path, self.method, self.code, time.perf_counter() - self._started)


class TrustedProxies:
    """
    The proxies whose C{X-Forwarded-For} header is believed.
    """

    def __init__(self, networks: Iterable[str] = ()) -> None:
        self.networks = tuple(ipaddress.ip_network(n, strict=False) for n in networks)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def trusts(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in network for network in self.networks)

    def client_of(self, peer: str, headers: list[bytes]) -> Optional[str]:
        """
        Walk C{X-Forwarded-For} from the right (the hop nearest to us) past
        trusted proxies; the first other address is the client.  C{None}
        when the peer is not trusted or the header says nothing usable.
        """
        if not self.trusts(peer):
            return None
        hops: list[str] = []
        for header in headers:
            hops.extend(part.strip() for part in header.decode("latin-1").split(","))
        for hop in reversed(hops):
            try:
                address = ipaddress.ip_address(hop)
            except ValueError:
                return None
            if not self.trusts(str(address)):
                return str(address)
        return None


class SmeldrSite(Site):
    """
    The site for every smeldr-oauth HTTP listener.
    """

    requestFactory = LimitedRequest

    def __init__(  # type: ignore[no-untyped-def]
        self,
        resource: IResource,
        max_body: int = DEFAULT_MAX_BODY,
        metrics=None,
        trusted_proxies: Optional[TrustedProxies] = None,
        **kw,
    ) -> None:
        # Every endpoint parses its own body (the token endpoint must not
        # mix query and form parameters), so twisted.web's form parsing into
        # request.args is both unused and, through email.headerregistry, a
        # fifth of the CPU of an MCP POST.
        kw.setdefault("parsePOSTFormSubmission", False)
        super().__init__(resource, **kw)
        self.max_body = max_body
        self.metrics = metrics
        self.trusted_proxies = trusted_proxies
