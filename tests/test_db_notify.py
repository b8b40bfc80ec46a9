"""
Tests for L{smeldr_oauth.db.notify}: C{LISTEN}/C{NOTIFY} on the reactor,
against the real PostgreSQL server of L{tests.postgres}, and the
revocation push built on it.
"""

from __future__ import annotations

from typing import Any, Optional

import attr
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from smeldr_oauth.db import open_database
from smeldr_oauth.db.notify import NOTIFY_LIMIT, NOTIFICATIONS_SCHEMA, Listener, check_channel, publish
from smeldr_oauth.oauth.config import Config
from smeldr_oauth.oauth.secrets import hash_secret
from smeldr_oauth.oauth.server import OAuthServer
from smeldr_oauth.service.standalone import watch_external_changes
from smeldr_oauth.store import open_store
from tests import postgres
from tests.test_store_memory import RESOURCE, T0, access, make_code, make_grant


class Inbox:
    """
    Collects what a subscription hears; L{next} is a Deferred for the
    next item (no polling, no sleeping).
    """

    def __init__(self) -> None:
        self.items: list[Optional[str]] = []
        self._waiting: list[tuple[int, Deferred[list[Optional[str]]]]] = []

    def __call__(self, item: Optional[str] = None) -> None:
        self.items.append(item)
        still = []
        for count, d in self._waiting:
            if len(self.items) >= count:
                d.callback(list(self.items))
            else:
                still.append((count, d))
        self._waiting = still

    def resync(self) -> None:
        self(None)

    def until(self, count: int) -> "Deferred[list[Optional[str]]]":
        d: Deferred[list[Optional[str]]] = Deferred()
        if len(self.items) >= count:
            d.callback(list(self.items))
        else:
            self._waiting.append((count, d))
        return d


class ChannelTests(SynchronousTestCase):
    def test_names(self) -> None:
        self.assertEqual(check_channel("smeldr_oauth_changes"), "smeldr_oauth_changes")
        for bad in ("", "A", "1abc", "a-b", 'a"b', "x" * 64, None):
            self.assertRaises(ValueError, check_channel, bad)


class ListenerTests(TestCase):
    """
    A listener and a sender on one database, on the real reactor.
    """

    def setUp(self) -> None:
        self.url = postgres.database_url(self)
        self.db = open_database(self.url, global_reactor, threads=1)
        self.addCleanup(self.db.close)
        self.listener = Listener(self.db, self.db.engine.conninfo(), min_delay=0.05, max_delay=0.5)
        self.addCleanup(self.listener.stop)

    @inlineCallbacks
    def subscribe(self, channel: str = "things") -> Any:
        inbox = Inbox()
        subscription = self.listener.listen(channel, inbox, resync=inbox.resync)
        yield subscription.ready
        return inbox, subscription

    @inlineCallbacks
    def test_notify(self) -> Any:
        """
        A notification reaches the callback through the socket the reactor
        watches: the listener is one of the reactor's readers, and it has
        no timer of its own.
        """
        inbox, _ = yield self.subscribe()
        self.assertIn(self.listener, global_reactor.getReaders())
        yield self.listener.notify("things", "hello")
        items = yield inbox.until(1)
        self.assertEqual(items, ["hello"])
        self.assertTrue(self.listener.connected)

    @inlineCallbacks
    def test_large_payloads_in_order(self) -> Any:
        """
        A payload beyond what NOTIFY carries goes through the table and
        arrives whole, in its place among the others.
        """
        inbox, _ = yield self.subscribe()
        big = "é" * NOTIFY_LIMIT
        yield self.listener.notify("things", "first")
        yield self.listener.notify("things", big)
        yield self.listener.notify("things", "last")
        items = yield inbox.until(3)
        self.assertEqual(items, ["first", big, "last"])
        stored = yield self.db.read(
            NOTIFICATIONS_SCHEMA,
            lambda txn: txn.execute("SELECT COUNT(*) FROM notification_payloads").fetchone()[0],
        )
        self.assertEqual(stored, 1)

    @inlineCallbacks
    def test_only_committed(self) -> Any:
        """
        A notification is sent with the transaction that made the change,
        or not at all.
        """
        inbox, _ = yield self.subscribe()

        def change_then_fail(txn: Any) -> None:
            publish(txn, "things", "rolled back")
            raise ValueError("stop")

        yield self.assertFailure(self.db.write(NOTIFICATIONS_SCHEMA, change_then_fail), ValueError)
        yield self.listener.notify("things", "committed")
        items = yield inbox.until(1)
        self.assertEqual(items, ["committed"])

    @inlineCallbacks
    def test_channels_and_unlisten(self) -> Any:
        """
        Each subscription hears its own channel; a stopped one hears
        nothing more.
        """
        things, subscription = yield self.subscribe("things")
        other, _ = yield self.subscribe("other")
        also = Inbox()
        second = self.listener.listen("things", also)
        yield second.ready
        yield self.listener.notify("things", "one")
        yield things.until(1)
        yield also.until(1)
        subscription.stop()
        second.stop()
        yield self.listener.notify("things", "two")
        yield self.listener.notify("other", "three")
        yield other.until(1)
        self.assertEqual((things.items, also.items, other.items), (["one"], ["one"], ["three"]))

    @inlineCallbacks
    def test_execute(self) -> Any:
        """
        L{Listener.execute} runs a statement on the listening connection
        itself, in autocommit: a C{pg_notify} goes out at once, to this
        very connection too, in order with the statements before it; it
        answers with the rows, as text.
        """
        inbox, _ = yield self.subscribe()
        self.assertFalse(self.listener._writing)
        rows = yield self.listener.execute(
            "SELECT pg_notify('things', v) FROM unnest(ARRAY[$1, $2]) AS v", ["=one", "=two"]
        )
        self.assertEqual(rows, [("",), ("",)])
        rows = yield self.listener.execute("SELECT pg_notify($1, $2) WHERE false", ["things", "=never"])
        self.assertEqual(rows, [])
        rows = yield self.listener.execute("SELECT $1::int + 1, NULL", ["41"])
        self.assertEqual(rows, [("42", None)])
        yield self.listener.notify("things", "three")
        items = yield inbox.until(3)
        self.assertEqual(items, ["one", "two", "three"])

    @inlineCallbacks
    def test_execute_errors(self) -> Any:
        """
        A statement the server refuses fails with its message, and the
        connection goes on; before the connection is up, and when it goes
        before the answer, the caller hears L{ConnectionError}.
        """
        idle = Listener(self.db, self.db.engine.conninfo())
        self.addCleanup(idle.stop)
        self.failureResultOf(idle.execute("SELECT 1", []), ConnectionError)
        inbox, _ = yield self.subscribe()
        failure = yield self.assertFailure(self.listener.execute("SELECT nonsense", []), RuntimeError)
        self.assertIn("nonsense", str(failure))
        rows = yield self.listener.execute("SELECT 1", [])
        self.assertEqual(rows, [("1",)])
        lost = self.listener.execute("SELECT pg_sleep(10)", [])
        self.listener.stop()
        self.failureResultOf(lost, ConnectionError)

    @inlineCallbacks
    def test_server_restart(self) -> Any:
        """
        The server restarts: the listener reconnects by itself, listens
        again, tells its subscribers they may have missed something, and
        hears what is sent afterwards.
        """
        inbox, _ = yield self.subscribe()
        cluster = postgres.cluster()
        self.addCleanup(cluster.start)
        cluster.restart()
        items = yield inbox.until(1)
        self.assertEqual(items, [None])
        yield self.listener.when_connected()
        yield self.listener.notify("things", "after")
        items = yield inbox.until(2)
        self.assertEqual(items, [None, "after"])

    @inlineCallbacks
    def test_server_down_at_start(self) -> Any:
        """
        A listener started while the server is down keeps trying, and
        subscribes once it is up.
        """
        cluster = postgres.cluster()
        self.addCleanup(cluster.start)
        cluster.stop()
        inbox = Inbox()
        subscription = self.listener.listen("things", inbox)
        self.assertFalse(self.listener.connected)
        cluster.start()
        yield subscription.ready
        yield self.listener.notify("things", "up")
        items = yield inbox.until(1)
        self.assertEqual(items, ["up"])


class RevocationPushTests(TestCase):
    """
    A revocation made by one process reaches another's token cache,
    pushed: the watching side's clock never moves, so nothing polls.
    """

    @inlineCallbacks
    def stores(self) -> Any:
        """
        Two stores (two pools, as two processes would have) on one
        database: the server's and the admin's.
        """
        url = postgres.database_url(self)
        stores = []
        for _ in range(2):
            store = open_store(url, global_reactor, threads=1)
            self.addCleanup(store.close)
            yield store.ready
            stores.append(store)
        return stores

    @inlineCallbacks
    def test_watch_changes(self) -> Any:
        server_store, admin_store = yield self.stores()
        inbox = Inbox()
        watch = server_store.watch_changes(inbox, Clock())
        self.addCleanup(watch.stop)
        yield watch.ready
        yield admin_store.create_grant(make_grant("g1"), make_code("c1", "g1"))
        yield admin_store.add_tokens("g1", access("a1"), None)
        yield admin_store.revoke_grant("g1", T0 + 1)
        yield admin_store.revoke_token(hash_secret("secret-a1"), T0 + 1)
        items = yield inbox.until(1)
        self.assertEqual(items, ["grant g1"])
        yield admin_store.create_grant(make_grant("g2"), make_code("c2", "g2"))
        yield admin_store.add_tokens("g2", access("a2"), None)
        yield admin_store.revoke_token(hash_secret("secret-a2"), T0 + 1)
        items = yield inbox.until(2)
        self.assertEqual(items, ["grant g1", f"access_token {hash_secret('secret-a2')}"])

    @inlineCallbacks
    def test_token_cache(self) -> Any:
        """
        The server's cached answer for a token goes as soon as another
        process revokes its grant.
        """
        server_store, admin_store = yield self.stores()
        clock = Clock()
        clock.advance(T0)
        yield server_store.create_grant(make_grant("g1"), make_code("c1", "g1"))
        token = "the-access-token"
        record = attr.evolve(access("ignored"), token_hash=hash_secret(token), resource=RESOURCE)
        yield server_store.add_tokens("g1", record, None)
        oauth = OAuthServer(Config(issuer="https://example.com", verify_bearer=lambda t: False), server_store, clock)
        forgotten = Inbox()
        original = oauth.forget_cached_tokens

        def forget() -> None:
            original()
            forgotten()

        oauth.forget_cached_tokens = forget  # type: ignore[method-assign]
        watch = watch_external_changes(server_store, oauth, clock)
        self.addCleanup(watch.stop)
        yield watch.ready
        info = yield oauth.verify_access_token(token)
        self.assertIsNotNone(info)
        yield admin_store.revoke_grant("g1", T0 + 1)
        yield forgotten.until(1)
        info = yield oauth.verify_access_token(token)
        self.assertIsNone(info)
