"""
L{smeldr_oauth.flows.store}: the timeline in memory, in a SQLite file and in
PostgreSQL, with its retention limits.
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from smeldr_oauth.db import open_database
from smeldr_oauth.flows import model
from smeldr_oauth.flows.model import Step
from smeldr_oauth.flows.store import FlowStore, Retention
from tests import postgres
from tests.test_store_sqlite import NoCallFromThreadReactor

T0 = 1_800_000_000.0


def step(at: float, kind: str = model.MCP_CALL, **kw: Any) -> Step:
    return Step(at=at, kind=kind, **kw)


class FlowStoreMixin:
    """The store's contract; subclasses say where the store lives."""

    def open(self, clock: Clock, retention: Retention) -> FlowStore:
        raise NotImplementedError

    def store(self, retention: Retention = Retention()) -> tuple[FlowStore, Clock]:
        clock = Clock()
        clock.advance(T0)
        store = self.open(clock, retention)
        self.addCleanup(store.close)  # type: ignore[attr-defined]
        return store, clock

    def record(self, store: FlowStore, steps: list[Step]) -> None:
        self.successResultOf(store.record(steps))  # type: ignore[attr-defined]

    def test_interface(self) -> None:
        from zope.interface.verify import verifyObject

        from smeldr_oauth.flows.store import IFlowStore

        store, _ = self.store()
        self.assertTrue(verifyObject(IFlowStore, store))  # type: ignore[attr-defined]

    def test_round_trip(self) -> None:
        """Steps come back oldest first, with their details."""
        store, _ = self.store()
        steps = [
            step(T0 - 5, model.DISCOVERY, address="10.0.0.1", detail={"path": "/.well-known/oauth-protected-resource/mcp"}),
            step(T0 - 4, model.REGISTERED, client_id="c1", address="10.0.0.1"),
            step(T0 - 3, model.CODE_EXCHANGED, client_id="c1", grant_id="g1", detail={"grant_type": "authorization_code"}),
            step(T0 - 2, model.MCP_INITIALIZE, client_id="c1", grant_id="g1", detail={"version": "2025-06-18"}),
        ]
        self.record(store, steps)
        got = self.successResultOf(store.timeline(client_id="c1"))  # type: ignore[attr-defined]
        self.assertEqual(got, steps)  # type: ignore[attr-defined]

    def test_client_timeline_takes_anonymous_steps_of_its_addresses_only(self) -> None:
        store, _ = self.store()
        mine = step(T0 - 9, model.DISCOVERY, address="10.0.0.1")
        theirs = step(T0 - 8, model.DISCOVERY, address="10.0.0.2")
        other = step(T0 - 7, model.REGISTERED, client_id="c2", address="10.0.0.2")
        registered = step(T0 - 6, model.REGISTERED, client_id="c1", address="10.0.0.1")
        self.record(store, [mine, theirs, other, registered])
        got = self.successResultOf(store.timeline(client_id="c1"))  # type: ignore[attr-defined]
        self.assertEqual(got, [mine, registered])  # type: ignore[attr-defined]

    def test_grant_timeline(self) -> None:
        """A grant's steps, and its client's steps that name no grant."""
        store, _ = self.store()
        shown = step(T0 - 9, model.AUTHORIZE, client_id="c1")
        g1 = step(T0 - 8, model.CODE_EXCHANGED, client_id="c1", grant_id="g1")
        g2 = step(T0 - 7, model.CODE_EXCHANGED, client_id="c1", grant_id="g2")
        self.record(store, [shown, g1, g2])
        got = self.successResultOf(store.timeline(grant_id="g1"))  # type: ignore[attr-defined]
        self.assertEqual(got, [shown, g1])  # type: ignore[attr-defined]

    def test_last(self) -> None:
        store, _ = self.store()
        steps = [step(T0 - 100 + i, client_id="c1") for i in range(10)]
        self.record(store, steps)
        got = self.successResultOf(store.timeline(client_id="c1", last=3))  # type: ignore[attr-defined]
        self.assertEqual(got, steps[-3:])  # type: ignore[attr-defined]

    def test_clients_newest_first(self) -> None:
        store, _ = self.store()
        self.record(store, [step(T0 - 9, client_id="old"), step(T0 - 1, client_id="new"), step(T0 - 5, client_id="old")])
        got = self.successResultOf(store.clients())  # type: ignore[attr-defined]
        self.assertEqual([(c.client_id, c.steps) for c in got], [("new", 1), ("old", 2)])  # type: ignore[attr-defined]

    def test_per_client_limit(self) -> None:
        store, _ = self.store(Retention(per_client=5))
        steps = [step(T0 - 50 + i, client_id="c1") for i in range(12)]
        self.record(store, steps[:6])
        self.record(store, steps[6:])
        got = self.successResultOf(store.timeline(client_id="c1", last=100))  # type: ignore[attr-defined]
        self.assertEqual(got, steps[-5:])  # type: ignore[attr-defined]

    def test_per_grant_limit(self) -> None:
        store, _ = self.store(Retention(per_grant=3))
        steps = [step(T0 - 50 + i, client_id="c1", grant_id="g1") for i in range(7)]
        self.record(store, steps)
        got = self.successResultOf(store.timeline(grant_id="g1", last=100))  # type: ignore[attr-defined]
        self.assertEqual(got, steps[-3:])  # type: ignore[attr-defined]

    def test_age_limit(self) -> None:
        store, clock = self.store(Retention(max_age=3600))
        self.record(store, [step(T0 - 10, client_id="c1")])
        clock.advance(3600)
        fresh = step(clock.seconds(), client_id="c2")
        self.record(store, [fresh])
        self.assertEqual(self.successResultOf(store.timeline(last=100)), [fresh])  # type: ignore[attr-defined]

    def test_junk_client_flood_is_bounded(self) -> None:
        """
        Thousands of invented clients (registrations, client_id values,
        bogus tokens from many addresses) never grow the table past
        C{total}; the newest steps are the ones kept.
        """
        store, _ = self.store(Retention(total=300))
        for batch in range(10):
            steps = [
                step(
                    T0 - 1000 + batch,
                    model.REGISTERED if i % 3 else model.MCP_REFUSED,
                    client_id=f"junk-{batch}-{i}" if i % 3 else None,
                    address=f"10.{batch}.{i // 256}.{i % 256}",
                    outcome="401",
                )
                for i in range(500)
            ]
            self.record(store, steps)
            self.assertLessEqual(self.successResultOf(store.count()), 300)  # type: ignore[attr-defined]
        newest = self.successResultOf(store.timeline(last=1))  # type: ignore[attr-defined]
        self.assertEqual(newest[0].address, "10.9.1.243")  # type: ignore[attr-defined]


class MemoryFlowStoreTests(FlowStoreMixin, SynchronousTestCase):
    def open(self, clock: Clock, retention: Retention) -> FlowStore:
        return FlowStore.in_memory(clock, retention)


class SQLiteFlowStoreTests(FlowStoreMixin, SynchronousTestCase):
    def open(self, clock: Clock, retention: Retention) -> FlowStore:
        path = os.path.join(self.mktemp() + ".db")
        return FlowStore(open_database(path, NoCallFromThreadReactor(), threads=0), clock, retention)


class PostgresFlowStoreTests(FlowStoreMixin, SynchronousTestCase):
    def open(self, clock: Clock, retention: Retention) -> FlowStore:
        url = postgres.database_url(self)
        return FlowStore(open_database(url, NoCallFromThreadReactor(), threads=0), clock, retention)


class GroupedFlowStoreTests(SynchronousTestCase):
    """
    On SQLite on the reactor thread with group commit (the server's OAuth
    database), a batch of steps shares the transaction of the other
    grouped writes of its reactor turn.
    """

    def test_shares_the_turns_transaction(self) -> None:
        from tests.test_store_sqlite import InlineReactor

        reactor = InlineReactor()
        reactor.advance(T0)
        database = open_database(self.mktemp() + ".db", reactor, threads=0, group_commit=True)
        store = FlowStore(database, reactor)
        self.addCleanup(store.close)
        self.successResultOf(database.ensure(store.schema))
        begins = []
        begin = database.engine.begin
        self.patch(database.engine, "begin", lambda txn: (begins.append(1), begin(txn)))
        first = store.record([step(T0, client_id="c1", detail={"tool": "a", "version": "1"})])
        second = store.record([step(T0, client_id="c2", detail={"version": "1", "tool": "b"})])
        self.assertNoResult(first)
        reactor.advance(0)
        self.successResultOf(first)
        self.successResultOf(second)
        self.assertEqual(len(begins), 1)
        steps = self.successResultOf(store.timeline())
        self.assertEqual([dict(s.detail) for s in steps], [{"tool": "a", "version": "1"}, {"tool": "b", "version": "1"}])


class DetailJSONTests(SynchronousTestCase):
    """
    The details' JSON, remembered by their fields, is the JSON of each.
    """

    def test_each_its_own(self) -> None:
        from smeldr_oauth.flows import store as store_module

        self.patch(store_module, "_MAX_DETAILS", 2)
        self.patch(store_module, "_DETAILS", {})
        details = [{"tool": "a"}, {"tool": "b"}, {"tool": "b", "version": "1"}, {"version": "1", "tool": "b"}, {"tool": "a"}, {}]
        for detail in details * 2:
            self.assertEqual(store_module._detail_json(detail), json.dumps(detail, sort_keys=True))
        self.assertLessEqual(len(store_module._DETAILS), 2)
