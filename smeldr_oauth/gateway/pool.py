# -*- test-case-name: tests.test_gateway_link -*-
"""
Every instance of one upstream: a L{Link} per isolation key, at most
C{max_instances} of them running.

Starting one more instance than the limit first stops the least recently
active instance that is doing nothing (no call in flight, no server request
waiting, no resource subscription); its sessions get a fresh instance on
their next call.  When every instance is busy, the new one is refused with
a clear C{UPSTREAM_UNAVAILABLE} error (C{reason: capacity}) rather than
queued.  Links with no instance and no session are forgotten, so the map
does not grow with every subject ever seen.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from smeldr_oauth.gateway import errors
from smeldr_oauth.gateway.config import UpstreamConfig
from smeldr_oauth.gateway.interfaces import IUpstreamChannel
from smeldr_oauth.gateway.link import Link
from smeldr_oauth.gateway.metrics import UpstreamMetrics

log = Logger()


class Pool:
    """
    The instances of one upstream.

    @ivar connector: makes a new (unstarted) channel for an owner principal
        (or C{None} under shared isolation).
    """

    def __init__(
        self,
        config: UpstreamConfig,
        clock: IReactorTime,
        connector: Callable[[Any], IUpstreamChannel],
        metrics: UpstreamMetrics,
    ) -> None:
        self.config = config
        self.clock = clock
        self.connector = connector
        self.metrics = metrics
        self.links: dict[tuple[Any, ...], Link] = {}
        metrics.live = self.live

    def link(self, key: tuple[Any, ...], owner: Any) -> Link:
        """The link of an isolation key, made on first use."""
        link = self.links.get(key)
        if link is None:
            link = self.links[key] = Link(self, key, owner)
        return link

    def live(self) -> int:
        """Instances starting or running."""
        return sum(1 for link in self.links.values() if link.live)

    def reserve(self, link: Link) -> None:
        """
        Make room for C{link} to start an instance.

        @raise JSONRPCError: C{UPSTREAM_UNAVAILABLE} (C{capacity}).
        """
        limit = self.config.limits.max_instances
        while self.live() >= limit:
            idle = [other for other in self.links.values() if other is not link and other.evictable]
            if not idle:
                self.metrics.refused += 1
                log.warn(
                    "Upstream {upstream}: {count} instances, all busy; a new one was refused",
                    upstream=self.config.name,
                    count=self.live(),
                    smeldr_event="gateway_capacity",
                )
                raise errors.unavailable(self.config.name, "capacity", "too many instances are busy")
            min(idle, key=lambda other: other.last_active).stop("evicted to make room")

    def released(self, link: Link) -> None:
        """C{link}'s instance ended (nothing to do yet: L{live} counts)."""

    def forget(self, link: Link) -> None:
        """Drop a link that has no instance, no session and nothing scheduled."""
        if link.forgettable:
            if self.links.get(link.key) is link:
                del self.links[link.key]

    def describe(self) -> dict[str, Any]:
        """The state of the instances, for C{/healthz} (no subjects, no secrets)."""
        return {
            "upstream": self.config.name,
            "kind": self.config.kind,
            "isolation": self.config.isolation,
            "live": self.live(),
            "max_instances": self.config.limits.max_instances,
            "instances": [
                {
                    "state": link.state,
                    "pid": link.pid,
                    "sessions": len(link.sessions),
                    "in_flight": link.client.in_flight if link.client is not None else 0,
                    "restarts_pending": link.not_before > self.clock.seconds(),
                }
                for link in self.links.values()
                if link.live
            ],
        }

    def stop(self) -> Deferred:
        """Stop every instance; fires when they have all ended."""
        return DeferredList([link.stop("gateway shutting down") for link in list(self.links.values())], consumeErrors=True)
