"""
Tests for L{smeldr_oauth.service.standalone}: revocations made by another
process on the same database reach a running server's token cache, and the
service behind C{twist smeldr-oauth} starts (and stops) what keeps it
right: the watcher of outside changes and the periodic purge.
"""

from __future__ import annotations

import gc
import json
import os
from typing import Any

import attr
from prometheus_client import generate_latest
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.http_headers import Headers

from smeldr_oauth.oauth.config import Config
from smeldr_oauth.oauth.secrets import hash_secret
from smeldr_oauth.oauth.server import OAuthServer
from smeldr_oauth.service import collector, tap
from smeldr_oauth.service.standalone import StandaloneService, watch_external_changes
from smeldr_oauth.store.common import DEFAULT_PURGE_INTERVAL
from tests import e2e
from tests.test_conformance import httpClient, obtainAccessToken
from tests.test_store_memory import RESOURCE, T0, access, make_code, make_grant
from tests.test_store_sqlite import InlineReactor, inline_store


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


class StandaloneServiceTests(SynchronousTestCase):
    """
    L{StandaloneService}, as C{twist smeldr-oauth} builds it (real SQLite
    files, C{--db-threads 0}), on a L{Clock}: what it starts once its
    database is open, seen from a second store object on the same file, as
    the admin command would be.
    """

    def setUp(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        self.path = os.path.join(directory, "oauth.db")
        options = tap.Options()
        options.parseOptions(
            [
                "--issuer", "http://127.0.0.1:1",
                "--oauth-db", self.path,
                "--site-db", os.path.join(directory, "site.db"),
                "--db-threads", "0",
            ]
        )
        self.clock = InlineReactor()
        self.clock.advance(T0)
        # The trial process's own objects are not frozen.
        self.settled: list[None] = []
        self.patch(collector, "settle", lambda: self.settled.append(None))
        self.service = StandaloneService(options, self.clock)
        self.service.startService()
        self.addCleanup(self.stop)
        # Another process's view of the same file.
        self.admin = inline_store(self, self.path)

    def stop(self) -> None:
        if self.service.running:
            self.successResultOf(self.service.stopService())

    def now(self) -> float:
        return self.clock.seconds()

    def addExpiredCode(self, name: str) -> None:
        """
        A grant whose authorization code expires at once, written by the
        other store: only a purge removes the code.
        """
        code = attr.evolve(make_code(name, name), expires_at=self.now() - 1)
        self.successResultOf(self.admin.create_grant(make_grant(name, created_at=self.now()), code))

    def test_purgesPeriodically(self) -> None:
        """
        Expired rows written after the start are purged by the service's own
        loop within one purge interval: the other store then finds nothing
        left to purge.
        """
        self.addExpiredCode("g1")
        self.clock.advance(DEFAULT_PURGE_INTERVAL)
        self.assertEqual(self.successResultOf(self.admin.purge_expired(self.now())), 0)
        # And again an interval later: the loop goes on.
        self.addExpiredCode("g2")
        self.clock.advance(DEFAULT_PURGE_INTERVAL)
        self.assertEqual(self.successResultOf(self.admin.purge_expired(self.now())), 0)

    def test_purgeStopsWithTheService(self) -> None:
        """
        Once stopped, the service purges nothing more (its database is
        closed): the rows are left to the next start.
        """
        self.stop()
        self.addExpiredCode("g1")
        self.clock.advance(DEFAULT_PURGE_INTERVAL)
        self.assertEqual(self.successResultOf(self.admin.purge_expired(self.now())), 1)

    def test_watchesOutsideRevocations(self) -> None:
        """
        A grant revoked through the other store stops being accepted by the
        running service within one poll (a second), although its token's
        answer was cached for much longer.
        """
        oauth = self.service.oauth
        self.assertGreater(oauth.config.access_cache_ttl, 1.0)
        consented = self.service.store.create_grant(make_grant("g1", created_at=self.now()), make_code("c1", "g1"))
        # A consent shares the group commit: answered at the end of the turn.
        self.clock.advance(0)
        self.successResultOf(consented)
        token = "the-access-token"
        record = attr.evolve(
            access("ignored", now=self.now()),
            token_hash=hash_secret(token),
            grant_id="g1",
            resource=str(oauth.config.resource),
        )
        self.successResultOf(self.service.store.add_tokens("g1", record, None))
        self.assertIsNotNone(self.successResultOf(oauth.verify_access_token(token)))

        self.assertTrue(self.successResultOf(self.admin.revoke_grant("g1", self.now())))
        self.assertIsNotNone(
            self.successResultOf(oauth.verify_access_token(token)), "the answer should be cached"
        )
        self.clock.advance(1.0)
        self.assertIsNone(self.successResultOf(oauth.verify_access_token(token)))

    def test_collectorSettledOnceStarted(self) -> None:
        """
        On the turn after the database opened, the start-up objects are
        frozen out of the garbage collector (L{collector.settle}), once;
        collection pauses are timed from the start, for the metrics page.
        """
        self.assertEqual(self.settled, [])
        self.clock.advance(0)
        self.assertEqual(self.settled, [None])
        self.clock.advance(60)
        self.assertEqual(self.settled, [None])
        self.assertIn(self.service.collector.pauses._callback, gc.callbacks)
        gc.collect()
        self.assertGreater(self.service.collector.pauses.count[2], 0)
        self.assertIn(b"smeldr_gc_pause_longest_seconds", generate_latest(self.service.metrics.registry))
        self.stop()
        self.assertNotIn(self.service.collector.pauses._callback, gc.callbacks)

    def test_nothingLeftScheduled(self) -> None:
        """
        Stopping the service stops its loops: nothing of it is left on the
        clock.
        """
        self.assertTrue(self.clock.getDelayedCalls())
        self.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])


class OutsideRevocationProcessTests(TestCase):
    """
    The same over real processes: a C{twist smeldr-oauth} server, and the
    admin command revoking the grant on its database.
    """

    timeout = 90

    async def probe(self, http: Any, server: e2e.RunningServer, token: str) -> int:
        """
        The status of an MCP ping with C{token} and no session: 401 when the
        token is refused; 400 (send initialize first) once it was accepted,
        since the session is checked after the token.
        """
        response = await http.post(
            server.mcpURL,
            data=json.dumps({"jsonrpc": "2.0", "id": 1, "method": "ping"}).encode("utf-8"),
            headers=Headers(
                {
                    "Authorization": [f"Bearer {token}"],
                    "Content-Type": ["application/json"],
                    "Accept": ["application/json, text/event-stream"],
                }
            ),
        )
        await response.content()
        return int(response.code)

    async def test_adminRevocationSeenBeforeTheCacheExpires(self) -> None:
        """
        A revocation made with C{smeldr-oauth-admin grants revoke} turns the
        running server's answer for the token into 401 well before the
        server's cached answer would have expired by itself.
        """
        server = await e2e.startServer(self, reactor)
        siteToken = await e2e.createSiteToken(reactor, server, "watch")
        http = httpClient(self)
        token = await obtainAccessToken(http, server, siteToken)
        cachedAt = reactor.seconds()
        self.assertEqual(await self.probe(http, server, token), 400, server.annotate("ping"))

        admin = e2e.adminCommand()
        out, err, code = await e2e.runProgram(reactor, [*admin, "grants", "list", "--oauth-db", server.oauthDB])
        self.assertEqual(code, 0, err)
        grants = [line.split()[0] for line in out.splitlines()[1:] if line.strip()]
        self.assertEqual(len(grants), 1, out)
        out, err, code = await e2e.runProgram(
            reactor, [*admin, "grants", "revoke", grants[0], "--oauth-db", server.oauthDB]
        )
        self.assertEqual(code, 0, out + err)

        # Without the watcher the cached answer stands for access_cache_ttl
        # after it was cached; the watcher polls every second.
        deadline = cachedAt + Config(issuer="https://example.com", verify_bearer=lambda t: False).access_cache_ttl - 5
        statuses = []
        while reactor.seconds() < deadline:
            statuses.append(await self.probe(http, server, token))
            if statuses[-1] == 401:
                break
            await deferLater(reactor, 0.2, lambda: None)
        self.assertEqual(
            statuses[-1:],
            [401],
            server.annotate(f"the token was still accepted after the revocation: {statuses}"),
        )
        self.assertEqual(set(statuses[:-1]) - {400}, set(), statuses)
