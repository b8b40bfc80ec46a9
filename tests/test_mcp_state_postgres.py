"""
Tests for L{smeldr_oauth.mcp.state.postgres}: the contract mixins of
L{tests.test_mcp_state}, unchanged, against the real PostgreSQL server of
L{tests.postgres}; then what only a shared backend does: two processes
(two databases objects, each with its own pool and listening connection)
routing messages, replies and stream claims, and leases running out.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from smeldr_oauth.db import open_database
from smeldr_oauth.mcp.jsonrpc import Response
from smeldr_oauth.mcp.state import LEGACY, SessionLimitReached, SessionLimits
from smeldr_oauth.mcp.state.postgres import (
    SESSIONS_SCHEMA,
    PostgresDelivery,
    PostgresEventLog,
    PostgresSessionState,
    PostgresSessionStore,
)
from tests import postgres
from tests.test_mcp_state import DeliveryContract, EventLogContract, RecordingSink, SessionStoreContract, all_idle, record


class PostgresBase(TestCase):
    def setUp(self) -> None:
        self.url = postgres.database_url(self)
        self.db = self.database()
        self.clock = Clock()
        self.starting: list[Deferred[None]] = []

    def database(self) -> Any:
        db = open_database(self.url, reactor, threads=2)
        self.addCleanup(db.close)
        return db

    def process(self, db: Any = None, **kw: Any) -> PostgresDelivery:
        """A started delivery (standing for one process)."""
        delivery = PostgresDelivery(db or self.db, self.clock, **kw)
        self.starting.append(delivery.start())
        self.addCleanup(delivery.stop)
        return delivery


class PostgresSessionStoreTests(SessionStoreContract, PostgresBase):
    def make_store(self) -> PostgresSessionStore:
        return PostgresSessionStore(self.db, self.clock)


class PostgresEventLogTests(EventLogContract, PostgresBase):
    def make_log(self, limit: int) -> PostgresEventLog:
        return PostgresEventLog(self.db, self.clock, limit)


class PostgresDeliveryTests(DeliveryContract, PostgresBase):
    def make_delivery(self) -> PostgresDelivery:
        return self.process()


class Inbox(RecordingSink):
    """A sink whose next message can be waited for (no polling)."""

    def __init__(self) -> None:
        super().__init__()
        self._waiting: list[tuple[int, Deferred[None]]] = []

    def _check(self) -> None:
        count = len(self.sent) + self.ended + len(self.refreshed)
        ready = [d for want, d in self._waiting if count >= want]
        self._waiting = [(want, d) for want, d in self._waiting if count < want]
        for d in ready:
            d.callback(None)

    def until(self, count: int) -> "Deferred[None]":
        d: Deferred[None] = Deferred()
        self._waiting.append((count, d))
        self._check()
        return d

    def send(self, data: str, event_id: Optional[int]) -> None:
        super().send(data, event_id)
        self._check()

    def end(self) -> None:
        super().end()
        self._check()

    def refresh(self, r: Any) -> None:
        super().refresh(r)
        self._check()


class TwoProcessDeliveryTests(PostgresBase):
    """Process A and process B, each with its own pool and listener."""

    async def setUp(self) -> None:  # type: ignore[override]
        super().setUp()
        self.a = self.process()
        self.b = self.process(self.database())
        for started in self.starting:
            await started

    async def settle(self) -> None:
        """Wait until the claims and messages made so far are written."""
        for delivery in (self.a, self.b):
            await delivery.settled()

    async def test_deliver_end_refresh_reach_the_other_process(self) -> None:
        on_a = Inbox()
        self.a.attach("s", on_a)
        self.a.stream_held("s", True)
        self.b.attach("s", RecordingSink())
        await self.settle()
        self.b.deliver("s", '{"x":1}', 7)
        await on_a.until(1)
        self.assertEqual(on_a.sent, [('{"x":1}', 7)])
        changed = record("s", log_level="error", subscriptions={"u://1"})
        self.b.refresh("s", changed)
        await on_a.until(2)
        self.assertEqual(on_a.refreshed, [changed])
        self.b.end("s")
        await on_a.until(3)
        self.assertEqual(on_a.ended, 1)
        await self.settle()
        self.assertEqual((self.b.routed_out, self.a.routed_in), (3, 3))
        self.assertEqual(len(self.a.latencies), 3)

    async def test_routed_on_the_listening_connection(self) -> None:
        """
        A message that fits a notification is routed by one statement on
        the sender's listening connection, not through its pool; if that
        connection goes before the answer, and while it is down, through
        the pool, in order.
        """
        on_a = Inbox()
        self.a.attach("s", on_a)
        self.a.stream_held("s", True)
        self.b.attach("s", RecordingSink())
        await self.settle()
        self.b.deliver("s", "one")
        await on_a.until(1)
        # Its answer too, so that nothing is in flight when the connection goes.
        await self.b.settled()
        self.assertNotIn("mcp_sessions.route", self.b._db.transaction_stats())

        def pooled() -> int:
            stats = self.b._db.transaction_stats().get("mcp_sessions.route")
            return 0 if stats is None else stats.count

        listener = self.b._listener
        # Sent on the listening connection, which goes before the answer:
        # the pool sends it again (the server may have run it: at least once).
        self.b.deliver("s", "two")
        listener._lost(ConnectionError("test: gone"))
        await on_a.until(2)
        await self.b.settled()
        self.assertEqual(pooled(), 1)
        # Down: through the pool from the start.
        if listener.connected:
            # It came back already (a slow pool on a loaded machine).
            listener._lost(ConnectionError("test: gone again"))
        self.b.deliver("s", "three")
        await self.b.settled()
        self.assertEqual(pooled(), 2)
        await listener.when_connected()
        self.b.deliver("s", "four")
        await self.b.settled()
        self.assertEqual(pooled(), 2)
        count = len(on_a.sent)
        while [d for d, _ in on_a.sent][-1:] != ["four"]:
            count += 1
            await on_a.until(count)
        received = [d for d, _ in on_a.sent]
        self.assertEqual(sorted(set(received)), ["four", "one", "three", "two"])
        self.assertEqual([d for i, d in enumerate(received) if d not in received[:i]], ["one", "two", "three", "four"])

    async def test_logged_on_the_listening_connection(self) -> None:
        """
        A Streamable HTTP message is logged by one statement on the
        sender's listening connection, then routed to the stream's holder
        by another: it reaches A with its event id, is in the shared log,
        and B's pool ran neither the append nor the routing; while that
        connection is down, both go through the pool.
        """
        on_a, on_b = Inbox(), Inbox()
        self.a.attach("s", on_a)
        self.a.stream_held("s", True)
        self.b.attach("s", on_b)
        await self.settle()
        events = PostgresEventLog(self.b._db, self.clock, 2)
        first = await self.b.deliver_logged("s", '{"n":1}', events)
        second = await self.b.deliver_logged("s", '{"n":2}', events)
        await on_a.until(2)
        self.assertEqual(on_a.sent, [('{"n":1}', first), ('{"n":2}', second)])
        self.assertEqual(on_b.sent, on_a.sent)
        self.assertEqual(second, first + 1)
        await self.b.settled()
        self.assertEqual(self.b.routed_out, 2)
        stats = self.b._db.transaction_stats()
        self.assertNotIn("mcp_events.append", stats)
        self.assertNotIn("mcp_sessions.route", stats)
        # Bounded as before.
        third = await self.b.deliver_logged("s", '{"n":3}', events)
        self.assertEqual(await events.replay("s", 0), [(second, '{"n":2}'), (third, '{"n":3}')])
        await on_a.until(3)
        # Nothing in flight when the connection goes (else it is sent again).
        await self.b.settled()
        self.b._listener._lost(ConnectionError("test: gone"))
        fourth = await self.b.deliver_logged("s", '{"n":4}', events)
        await on_a.until(4)
        self.assertEqual(on_a.sent[-1], ('{"n":4}', fourth))
        self.assertEqual(self.b._db.transaction_stats()["mcp_events.append"].count, 1)

    async def test_large_message_through_the_payload_table(self) -> None:
        on_a = Inbox()
        self.a.attach("s", on_a)
        self.a.stream_held("s", True)
        self.b.attach("s", RecordingSink())
        await self.settle()
        big = '"' + "x" * 20000 + '"'
        self.b.deliver("s", big, None)
        self.b.deliver("s", "small", None)
        await on_a.until(2)
        self.assertEqual([d for d, _ in on_a.sent], [big, "small"])

    async def test_not_held_there_not_sent(self) -> None:
        """
        Nothing goes to a process without the session; a message for the
        stream goes only to the process holding it, while an end reaches
        every copy.
        """
        self.a.attach("s", Inbox())
        await self.settle()
        self.a.deliver("s", "x")
        await self.settle()
        self.assertEqual(self.a.routed_out, 0)
        on_b = Inbox()
        self.b.attach("s", on_b)
        await self.settle()
        self.a.deliver("s", "for the stream")
        self.a.end("s")
        await on_b.until(1)
        await self.settle()
        self.assertEqual((on_b.sent, on_b.ended, self.a.routed_out), ([], 1, 1))

    async def test_reply_reaches_the_waiting_process(self) -> None:
        got: list[Response] = []
        self.a.attach("s", Inbox())
        self.b.attach("s", Inbox())
        await self.settle()
        done: Deferred[None] = Deferred()
        self.a.expect_reply("s", "srv-1", lambda r: (got.append(r), done.callback(None)))
        self.assertFalse(self.b.route_reply("s", Response("srv-1", {"ok": 1})))
        await done
        self.assertEqual(got, [Response("srv-1", {"ok": 1})])

    async def test_stream_claim_moves_and_caps_see_it(self) -> None:
        store = PostgresSessionStore(self.db, self.clock)
        await store.admit(record("s"), SessionLimits(), all_idle)
        self.a.attach("s", Inbox())
        self.a.stream_held("s", True)
        await self.settle()
        self.assertEqual((await store.get("s")).stream_process, self.a.process_id)
        # A stream held anywhere makes the session busy for the caps.
        with self.assertRaises(SessionLimitReached):
            await store.admit(record("t"), SessionLimits(per_grant=1), all_idle)
        self.b.attach("s", Inbox())
        self.b.stream_held("s", True)
        await self.settle()
        self.assertEqual((await store.get("s")).stream_process, self.b.process_id)
        self.assertEqual(self.b.streams_taken_over, 1)
        self.b.stream_held("s", False)
        await self.settle()
        self.assertIsNone((await store.get("s")).stream_process)
        victims = await store.admit(record("t"), SessionLimits(per_grant=1), all_idle)
        self.assertEqual([v.session_id for v in victims], ["s"])

    async def test_dead_process_is_reaped(self) -> None:
        """
        B stops beating (killed): once its lease ran out, A's heartbeat
        removes its claims and ends the legacy sessions whose stream it
        held; Streamable HTTP records stay.
        """
        store = PostgresSessionStore(self.db, self.clock)
        await store.admit(record("legacy", kind=LEGACY), SessionLimits(), all_idle)
        await store.admit(record("stream"), SessionLimits(), all_idle)
        for session_id in ("legacy", "stream"):
            self.b.attach(session_id, Inbox())
            self.b.stream_held(session_id, True)
        # A holds a copy of the legacy session (it served a POST).
        copy = Inbox()
        self.a.attach("legacy", copy)
        await self.settle()
        await self.a._beat()
        self.assertEqual(self.a.processes_reaped, 0)
        await self.db.write(SESSIONS_SCHEMA, _age, self.b.process_id)
        await self.a._beat()
        self.assertEqual((self.a.processes_reaped, self.a.legacy_sessions_reaped), (1, 1))
        self.assertIsNone(await store.get("legacy"))
        self.assertEqual(copy.ended, 1)
        self.assertIsNone((await store.get("stream")).stream_process)
        # B was only stalled: its next beat registers it again, with its claims.
        await self.b._beat()
        await self.settle()
        self.assertEqual((await store.get("stream")).stream_process, self.b.process_id)


class StopTests(PostgresBase):
    async def test_stop_waits_for_the_beat_running(self) -> None:
        """
        A beat running when the process stops (here its L{on_heartbeat}
        hook, the purge, not finished) finishes before the process leaves:
        it would otherwise write after the leave, or on a closed database.
        """
        delivery = PostgresDelivery(self.db, self.clock)
        await delivery.start()
        hooked: Deferred[None] = Deferred()
        purging: Deferred[None] = Deferred()

        def hook() -> Deferred[None]:
            hooked.callback(None)
            return purging

        delivery.on_heartbeat = hook
        self.clock.advance(delivery.heartbeat)
        await hooked
        dispatched: list[Optional[str]] = []
        write = self.db.write

        def recorded(*args: Any, **kw: Any) -> Any:
            dispatched.append(kw.get("name"))
            return write(*args, **kw)

        self.patch(self.db, "write", recorded)
        stopping = delivery.stop()
        self.assertEqual(dispatched, [])
        purging.callback(None)
        await stopping
        self.assertEqual(dispatched, ["mcp_processes.leave"])


def _age(txn: Any, process_id: str) -> None:
    txn.execute(
        "UPDATE mcp_processes SET heartbeat_at = now() - interval '1 hour' WHERE process_id = ?", (process_id,)
    )


class ReplayAfterClaimTests(PostgresBase):
    async def test_replay_waits_for_the_claim(self) -> None:
        """
        The log is read only once this process's claims on the session are
        written: an event committed before the claim is in what is read,
        one committed after it is routed here.  L{PostgresSessionState}
        wires the two.
        """
        events = PostgresEventLog(self.db, self.clock)
        await events.append("s", "one")
        gate: Deferred[None] = Deferred()
        asked: list[str] = []

        def claims(session_id: str) -> "Deferred[None]":
            asked.append(session_id)
            return gate

        events.claims_settled = claims
        replayed = events.replay("s", 0)
        self.assertEqual(asked, ["s"])
        self.assertNotIn("mcp_events.replay", self.db.transaction_stats())
        self.assertFalse(replayed.called)
        gate.callback(None)
        self.assertEqual([data for _, data in await replayed], ["one"])
        state = PostgresSessionState(self.db, self.clock)
        self.assertEqual(state.events.claims_settled, state.delivery.settled)


class PurgeTests(PostgresBase):
    """
    The purge, run by the test itself: the heartbeat (which also purges)
    is set beyond every C{clock.advance} here, so no purge of its own runs
    beside the one awaited (one did, with C{advance(100)} past a 5 s
    heartbeat, and the test's purge could answer 0 before the beat's
    counted the record it removed).
    """

    def state(self, **kw: Any) -> PostgresSessionState:
        state = PostgresSessionState(self.db, self.clock, heartbeat=10_000, **kw)
        self.addCleanup(state.stop)
        return state

    async def admitted(self, state: PostgresSessionState) -> None:
        await state.delivery.start()
        limits = SessionLimits()
        await state.store.admit(record("old", expires_at=50.0), limits, all_idle)
        await state.store.admit(record("held", expires_at=50.0), limits, all_idle)
        await state.store.admit(record("new", expires_at=500.0), limits, all_idle)
        await state.events.append("old", "x")
        state.delivery.attach("held", Inbox())
        await state.delivery.settled()
        self.clock.advance(100)

    async def test_expired_unheld_records_and_their_events_go(self) -> None:
        state = self.state()
        await self.admitted(state)
        await state._purge()
        self.assertEqual(state.purged, 1)
        self.assertEqual(state.figures()["purged"], 1)
        self.assertIsNone(await state.store.get("old"))
        self.assertIsNotNone(await state.store.get("held"))
        self.assertEqual(await state.events.replay("old", 0), [])

    async def test_heartbeat_purges(self) -> None:
        state = self.state()
        await self.admitted(state)
        await state.delivery._beat()
        self.assertEqual(state.purged, 1)
        self.assertIsNone(await state.store.get("old"))

    async def test_activity_noted_here_keeps_its_record(self) -> None:
        """
        A record whose stored expiry passed, but which this process used
        since (activity not yet written, L{PostgresSessionStore.touch}),
        is not purged: the activity is written first, as C{get} here
        already reports it.
        """
        store = PostgresSessionStore(self.db, self.clock, touch_interval=10_000)
        await store.admit(record("s", last_active=40.0, expires_at=50.0), SessionLimits(), all_idle)
        self.clock.advance(100)
        store.touch("s", 99.0, 500.0)
        self.assertEqual(await store.purge(100.0), 0)
        self.assertEqual(await store.count(), 1)


class ConcurrentAdmissionTests(PostgresBase):
    async def test_caps_hold_across_processes(self) -> None:
        """
        Two processes (two pools) admitting sessions of one grant at once,
        none of them idle: exactly the cap is admitted, the rest refused.
        """
        from twisted.internet.defer import DeferredList

        stores = [PostgresSessionStore(self.db, self.clock), PostgresSessionStore(self.database(), self.clock)]
        limits = SessionLimits(per_grant=5)
        attempts = [
            stores[n % 2].admit(record(f"s{n}"), limits, lambda r: False) for n in range(16)
        ]
        results = await DeferredList(attempts, consumeErrors=True)
        admitted = [ok for ok, _ in results if ok]
        refused = [value for ok, value in results if not ok]
        self.assertEqual((len(admitted), len(refused)), (5, 11))
        for failure in refused:
            failure.trap(SessionLimitReached)
        self.assertEqual(await stores[1].count(), 5)
