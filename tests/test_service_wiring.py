"""
Tests for L{smeldr_oauth.service.wiring}: revocations made by another
process on the same database reach a running server's token cache.
"""

from __future__ import annotations

import attr
from twisted.trial.unittest import SynchronousTestCase

from smeldr_oauth.oauth.config import Config
from smeldr_oauth.oauth.secrets import hash_secret
from smeldr_oauth.oauth.server import OAuthServer
from smeldr_oauth.service.wiring import watch_external_changes
from tests.test_store_memory import RESOURCE, T0, access, make_code, make_grant
from tests.test_store_sqlite import inline_store


class ExternalChangesTests(SynchronousTestCase):
    def test_revocation_by_another_process(self) -> None:
        """
        The admin command (another connection to the same file) revokes a
        grant; within one poll the server stops accepting its token, even
        though the token's answer was cached.
        """
        path = self.mktemp() + ".db"
        server_store = inline_store(self, path)
        admin_store = inline_store(self, path)
        clock = server_store._clock
        clock.advance(T0)
        self.successResultOf(server_store.create_grant(make_grant("g1"), make_code("c1", "g1")))
        token = "the-access-token"
        record = attr.evolve(access("ignored"), token_hash=hash_secret(token), grant_id="g1", resource=RESOURCE)
        self.successResultOf(server_store.add_tokens("g1", record, None))
        config = Config(issuer="https://example.com", verify_bearer=lambda t: False)
        oauth = OAuthServer(config, server_store, clock)
        loop = watch_external_changes(server_store, oauth, clock, interval=1.0)
        self.addCleanup(loop.stop)
        self.assertIsNotNone(self.successResultOf(oauth.verify_access_token(token)))

        self.assertTrue(self.successResultOf(admin_store.revoke_grant("g1", T0 + 1)))
        # Still cached until the next poll...
        self.assertIsNotNone(self.successResultOf(oauth.verify_access_token(token)))
        clock.advance(1.0)
        # ...which sees the outside write and drops the cache.
        self.assertIsNone(self.successResultOf(oauth.verify_access_token(token)))

    def test_own_writes_do_not_clear(self) -> None:
        """
        C{data_version} does not change for the server's own commits, so its
        own traffic does not empty the cache.
        """
        path = self.mktemp() + ".db"
        store = inline_store(self, path)
        first = self.successResultOf(store.data_version())
        self.successResultOf(store.create_grant(make_grant("g1"), make_code("c1", "g1")))
        self.assertEqual(self.successResultOf(store.data_version()), first)
