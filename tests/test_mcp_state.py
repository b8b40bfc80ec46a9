"""
Tests for L{smeldr_oauth.mcp.state}: the session seams and their
in-process implementations.

The C{*Contract} mixins state what every implementation must do, with
C{await} so that one whose Deferreds fire later (a database) runs the same
tests: subclass one with a C{make_*} method, as the memory classes below do.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import attr
from twisted.trial.unittest import TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from smeldr_oauth.mcp.jsonrpc import Response
from smeldr_oauth.mcp.state import (
    LEGACY,
    STREAMABLE,
    IEventLog,
    ISessionDelivery,
    ISessionSink,
    ISessionStore,
    SessionLimitReached,
    SessionLimits,
    SessionRecord,
)
from smeldr_oauth.mcp.state.memory import LocalDelivery, MemoryEventLog, MemorySessionStore


def record(
    session_id: str,
    subject: str = "alice",
    client_id: Optional[str] = "c1",
    grant_id: Optional[str] = "g1",
    last_active: float = 100.0,
    **kw: Any,
) -> SessionRecord:
    return SessionRecord(
        session_id=session_id,
        kind=kw.pop("kind", STREAMABLE),
        subject=subject,
        client_id=client_id,
        grant_id=grant_id,
        created=last_active,
        last_active=last_active,
        **kw,
    )


def all_idle(_: SessionRecord) -> bool:
    return True


class RecordTests(TestCase):
    def test_grant_key(self) -> None:
        self.assertEqual(record("a").grant_key, ("grant", "g1"))
        self.assertEqual(record("a", grant_id=None).grant_key, ("caller", "alice", "c1"))

    def test_owner(self) -> None:
        r = record("a")
        self.assertTrue(r.owned_by("alice", "c1"))
        self.assertFalse(r.owned_by("alice", "c2"))
        self.assertFalse(r.owned_by("bob", "c1"))

    def test_session_id_not_in_repr(self) -> None:
        self.assertNotIn("secret-id", repr(record("secret-id", kind=LEGACY)))

    def test_limits_at_least_one(self) -> None:
        self.assertRaises(ValueError, SessionLimits, 0, 1, 1)


class SessionStoreContract:
    """What every L{ISessionStore} does."""

    def make_store(self) -> Any:
        raise NotImplementedError

    async def test_interface(self) -> None:
        verifyObject(ISessionStore, self.make_store())

    async def test_admit_get_save_remove(self) -> None:
        store = self.make_store()
        self.assertEqual(await store.admit(record("a"), SessionLimits(), all_idle), [])
        self.assertEqual(await store.count(), 1)
        found = await store.get("a")
        self.assertEqual(found, record("a"))
        changed = attr.evolve(found, protocol_version="2025-06-18", log_level="error", subscriptions={"x://1"})
        await store.save(changed)
        self.assertEqual(await store.get("a"), changed)
        self.assertIs(await store.remove("a"), True)
        self.assertIs(await store.remove("a"), False)
        self.assertIsNone(await store.get("a"))
        # A record saved after its session ended is not stored again.
        await store.save(changed)
        self.assertIsNone(await store.get("a"))

    async def test_touch(self) -> None:
        store = self.make_store()
        await store.admit(record("a"), SessionLimits(), all_idle)
        self.assertIsNone(store.touch("a", 150.0, 210.0))
        store.touch("unknown", 1.0, 2.0)
        found = await store.get("a")
        self.assertEqual((found.last_active, found.expires_at), (150.0, 210.0))
        self.assertIsNone(await store.get("unknown"))

    async def test_grant_cap_evicts_least_recently_active_idle(self) -> None:
        store = self.make_store()
        limits = SessionLimits(per_grant=2)
        await store.admit(record("old", last_active=1), limits, all_idle)
        await store.admit(record("new", last_active=2), limits, all_idle)
        store.touch("old", 5.0, math.inf)
        victims = await store.admit(record("third", last_active=6), limits, all_idle)
        self.assertEqual([v.session_id for v in victims], ["new"])
        self.assertIsNone(await store.get("new"))
        self.assertEqual(await store.count(), 2)

    async def test_busy_sessions_are_not_evicted(self) -> None:
        store = self.make_store()
        limits = SessionLimits(per_grant=2)
        await store.admit(record("busy", last_active=1), limits, all_idle)
        await store.admit(record("idle", last_active=2), limits, all_idle)

        def idle(r: SessionRecord) -> bool:
            return r.session_id != "busy"

        victims = await store.admit(record("c", last_active=3), limits, idle)
        self.assertEqual([v.session_id for v in victims], ["idle"])
        with self.assertRaises(SessionLimitReached) as caught:
            await store.admit(record("d"), limits, lambda r: False)
        self.assertEqual((caught.exception.scope, caught.exception.count), ("grant", 2))
        self.assertEqual(await store.count(), 2)

    async def test_subject_cap_across_grants(self) -> None:
        store = self.make_store()
        limits = SessionLimits(per_grant=5, per_subject=2)
        await store.admit(record("a", grant_id="g1"), limits, all_idle)
        await store.admit(record("b", grant_id="g2"), limits, all_idle)
        with self.assertRaises(SessionLimitReached) as caught:
            await store.admit(record("c", grant_id="g3"), limits, lambda r: False)
        self.assertEqual(caught.exception.scope, "subject")
        # Another subject is not affected.
        await store.admit(record("d", subject="bob", grant_id="g9"), limits, lambda r: False)

    async def test_refusal_changes_nothing(self) -> None:
        """
        When the grant could make room but the subject is then still full
        of busy sessions, the refusal evicts nothing: the store is left as
        it was.
        """
        store = self.make_store()
        roomy = SessionLimits(per_grant=1, per_subject=3)
        await store.admit(record("g1-idle", grant_id="g1"), roomy, all_idle)
        await store.admit(record("g2-busy", grant_id="g2"), roomy, all_idle)
        await store.admit(record("g3-busy", grant_id="g3"), roomy, all_idle)

        def idle(r: SessionRecord) -> bool:
            return r.session_id == "g1-idle"

        with self.assertRaises(SessionLimitReached) as caught:
            await store.admit(record("g1-new", grant_id="g1"), SessionLimits(per_grant=1, per_subject=2), idle)
        self.assertEqual(caught.exception.scope, "subject")
        self.assertIsNotNone(await store.get("g1-idle"))
        self.assertIsNone(await store.get("g1-new"))
        self.assertEqual(await store.count(), 3)

    async def test_server_cap(self) -> None:
        store = self.make_store()
        limits = SessionLimits(per_grant=10, per_subject=10, total=2)
        await store.admit(record("a", subject="s1", grant_id="g1"), limits, all_idle)
        await store.admit(record("b", subject="s2", grant_id="g2"), limits, all_idle)
        with self.assertRaises(SessionLimitReached) as caught:
            await store.admit(record("c", subject="s3", grant_id="g3"), limits, all_idle)
        self.assertEqual((caught.exception.scope, caught.exception.count), ("server", 2))

    async def test_remove_grant(self) -> None:
        store = self.make_store()
        for sid, grant in (("a", "g1"), ("b", "g1"), ("c", "g2")):
            await store.admit(record(sid, grant_id=grant), SessionLimits(), all_idle)
        self.assertEqual(sorted(await store.remove_grant("g1")), ["a", "b"])
        self.assertEqual(await store.remove_grant("g1"), [])
        self.assertEqual(await store.count(), 1)
        # The grant's bucket is empty again: its cap counts from zero.
        await store.admit(record("d", grant_id="g1"), SessionLimits(per_grant=1), lambda r: False)


class MemorySessionStoreTests(SessionStoreContract, TestCase):
    def make_store(self) -> MemorySessionStore:
        return MemorySessionStore()


@implementer(ISessionSink)
class RecordingSink:
    def __init__(self) -> None:
        self.sent: list[tuple[str, Optional[int]]] = []
        self.ended = 0
        self.refreshed: list[SessionRecord] = []

    def send(self, data: str, event_id: Optional[int]) -> None:
        self.sent.append((data, event_id))

    def end(self) -> None:
        self.ended += 1

    def refresh(self, record: SessionRecord) -> None:
        self.refreshed.append(record)


class DeliveryContract:
    """What every L{ISessionDelivery} does."""

    def make_delivery(self) -> Any:
        raise NotImplementedError

    async def test_interface(self) -> None:
        verifyObject(ISessionDelivery, self.make_delivery())
        verifyObject(ISessionSink, RecordingSink())

    async def test_deliver_to_every_sink(self) -> None:
        delivery = self.make_delivery()
        one, two = RecordingSink(), RecordingSink()
        delivery.deliver("s", "dropped")
        delivery.attach("s", one)
        delivery.attach("s", one)
        delivery.deliver("s", "a", 1)
        delivery.attach("s", two)
        delivery.deliver("s", "b")
        delivery.deliver("other", "c")
        self.assertEqual(one.sent, [("a", 1), ("b", None)])
        self.assertEqual(two.sent, [("b", None)])
        delivery.detach("s", one)
        delivery.deliver("s", "d")
        self.assertEqual(len(one.sent), 2)
        self.assertEqual(two.sent[-1], ("d", None))
        delivery.refresh("s", record("s"))
        self.assertEqual((one.refreshed, two.refreshed), ([], [record("s")]))
        delivery.end("s")
        self.assertEqual((one.ended, two.ended), (0, 1))
        delivery.detach("s", two)
        delivery.end("s")
        self.assertEqual(two.ended, 1)

    async def test_replies(self) -> None:
        delivery = self.make_delivery()
        got: list[Response] = []
        delivery.expect_reply("s", "srv-1", got.append)
        self.assertFalse(delivery.route_reply("other", Response("srv-1", {})))
        self.assertTrue(delivery.route_reply("s", Response("srv-1", {"ok": 1})))
        self.assertEqual(got, [Response("srv-1", {"ok": 1})])
        # Answered once: a second answer finds nobody.
        self.assertFalse(delivery.route_reply("s", Response("srv-1", {})))
        delivery.expect_reply("s", "srv-2", got.append)
        delivery.forget_reply("s", "srv-2")
        self.assertFalse(delivery.route_reply("s", Response("srv-2", {})))
        self.assertEqual(len(got), 1)


class LocalDeliveryTests(DeliveryContract, TestCase):
    def make_delivery(self) -> LocalDelivery:
        return LocalDelivery()

    def test_attached_count(self) -> None:
        delivery = LocalDelivery()
        sink = RecordingSink()
        delivery.attach("s", sink)
        self.assertEqual(delivery.attached, 1)
        delivery.detach("s", sink)
        self.assertEqual(delivery.attached, 0)


class EventLogContract:
    """What every L{IEventLog} does."""

    def make_log(self, limit: int) -> Any:
        raise NotImplementedError

    async def test_interface(self) -> None:
        verifyObject(IEventLog, self.make_log(4))

    async def test_append_replay_delivered(self) -> None:
        log = self.make_log(4)
        self.assertEqual(await log.replay("s"), [])
        ids = [await log.append("s", f"m{i}") for i in range(3)]
        self.assertEqual(ids, [1, 2, 3])
        self.assertEqual(await log.replay("s"), [(1, "m0"), (2, "m1"), (3, "m2")])
        log.delivered("s", 2)
        self.assertEqual(await log.replay("s"), [(3, "m2")])
        self.assertEqual(await log.replay("s", 1), [(2, "m1"), (3, "m2")])
        # Delivered never goes backwards.
        log.delivered("s", 1)
        self.assertEqual(await log.replay("s"), [(3, "m2")])
        self.assertEqual(await log.replay("other"), [])

    async def test_bounded(self) -> None:
        log = self.make_log(2)
        for i in range(5):
            await log.append("s", str(i))
        self.assertEqual(await log.replay("s", 0), [(4, "3"), (5, "4")])

    async def test_forget(self) -> None:
        log = self.make_log(2)
        await log.append("s", "x")
        log.forget("s")
        self.assertEqual(await log.replay("s", 0), [])


class MemoryEventLogTests(EventLogContract, TestCase):
    def make_log(self, limit: int) -> MemoryEventLog:
        return MemoryEventLog(limit)

