"""
Tests for the registered-client cache of
L{smeldr_oauth.oauth.clients.ClientResolver}.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from smeldr_oauth.oauth.clients import CLIENT_CACHE_TTL, ClientResolver
from smeldr_oauth.oauth.config import Config
from smeldr_oauth.oauth.ratelimit import RateLimiter
from smeldr_oauth.oauth.model import Client
from smeldr_oauth.oauth.server import OAuthServer
from smeldr_oauth.store.memory import MemoryStore


class CountingStore(MemoryStore):
    """A L{MemoryStore} that counts client look-ups."""

    lookups = 0

    def get_client(self, client_id: str) -> "Deferred[Optional[Client]]":
        self.lookups += 1
        return super().get_client(client_id)


def make_client(client_id: str) -> Client:
    return Client(
        client_id=client_id,
        client_name="cached",
        redirect_uris=("http://127.0.0.1:9/cb",),
        token_endpoint_auth_method="none",
        grant_types=("authorization_code", "refresh_token"),
        scope=None,
        kind="registered",
        client_secret_hash=None,
        created_at=1.0,
    )


class ClientCacheTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.store = CountingStore(self.clock)
        config = Config(issuer="http://127.0.0.1:8080", verify_bearer=lambda token: None)
        self.server = OAuthServer(config, self.store, self.clock)

    def resolve(self, client_id: str) -> Any:
        return self.successResultOf(self.server.resolve_client(client_id))

    def test_registered_client_looked_up_once(self) -> None:
        client = make_client("c1")
        self.successResultOf(self.store.save_client(client))
        self.assertEqual(self.resolve("c1"), client)
        self.assertEqual(self.resolve("c1"), client)
        self.assertEqual(self.store.lookups, 1)

    def test_unknown_not_cached(self) -> None:
        """
        A miss is asked again: a client registered after a failed look-up
        is found at once.
        """
        self.assertIsNone(self.resolve("late"))
        self.successResultOf(self.store.save_client(make_client("late")))
        self.assertEqual(self.resolve("late").client_id, "late")
        self.assertEqual(self.store.lookups, 2)

    def test_bounded_lru(self) -> None:
        resolver = ClientResolver(
            self.server.config, self.store, self.clock, None, RateLimiter(self.clock, 1), cache_size=2
        )
        self.resolve = lambda client_id: self.successResultOf(resolver.resolve(client_id))  # type: ignore[method-assign]
        for name in ("a", "b", "c"):
            self.successResultOf(self.store.save_client(make_client(name)))
        self.resolve("a")
        self.resolve("b")
        self.resolve("a")  # a is now the most recent
        self.resolve("c")  # evicts b
        self.assertEqual(self.store.lookups, 3)
        self.resolve("a")
        self.resolve("c")
        self.assertEqual(self.store.lookups, 3)
        self.resolve("b")
        self.assertEqual(self.store.lookups, 4)

    def test_entries_expire(self) -> None:
        """
        The store purges long-unused registrations, so a remembered one is
        asked for again after C{client_cache_ttl}: a purged client stops
        working in a running server too.
        """
        self.successResultOf(self.store.save_client(make_client("c1")))
        self.resolve("c1")
        self.clock.advance(CLIENT_CACHE_TTL - 1)
        self.resolve("c1")
        self.assertEqual(self.store.lookups, 1)
        self.clock.advance(1)
        del self.store._clients["c1"]
        self.assertIsNone(self.resolve("c1"))
        self.assertEqual(self.store.lookups, 2)

    def test_known(self) -> None:
        """
        C{known} answers from the cache alone: a client once resolved,
        until its entry expires; never an unknown one.
        """
        clients = self.server.clients
        self.successResultOf(self.store.save_client(make_client("c1")))
        self.assertIsNone(clients.known("c1"))
        self.resolve("c1")
        self.assertEqual(clients.known("c1"), make_client("c1"))
        self.assertIsNone(clients.known("nobody"))
        self.clock.advance(CLIENT_CACHE_TTL)
        self.assertIsNone(clients.known("c1"))
        self.assertEqual(self.store.lookups, 1)
