"""
L{smeldr_oauth.flows.recorder}: steps buffered on the logging call,
written in batches on later reactor turns, bounded when the store is slow.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import Logger, LogPublisher
from twisted.trial.unittest import SynchronousTestCase

from smeldr_oauth.flows.recorder import FlowRecorder

T0 = 1_800_000_000.0


class FakeStore:
    """Records batches; answers at once, or when the test says."""

    def __init__(self) -> None:
        self.batches: list[list[Any]] = []
        self.trims: list[Any] = []
        self.pending: list[Deferred[None]] = []
        self.hold = False
        self.broken = False

    def record(self, steps: list[Any], trim: Any = True) -> "Deferred[None]":
        self.batches.append(steps)
        self.trims.append(trim)
        if self.broken:
            return fail(RuntimeError("database is down"))
        if self.hold:
            d: Deferred[None] = Deferred()
            self.pending.append(d)
            return d
        return succeed(None)


def event(n: int = 0) -> dict[str, Any]:
    return {"log_time": T0 + n, "smeldr_event": "mcp_call", "client_id": "c", "grant_id": "g", "tool": f"t{n}"}


class Recording(SynchronousTestCase):
    """
    A started L{FlowRecorder} over a L{FakeStore} on a L{Clock}, stopped
    when the test ends.
    """

    def recorder(self, **kw: Any) -> tuple[FlowRecorder, FakeStore, Clock]:
        store, clock = FakeStore(), Clock()
        recorder = FlowRecorder(store, clock, **kw)
        recorder.start()
        self.addCleanup(recorder.stop)
        return recorder, store, clock


class RecorderTests(Recording):

    def test_nothing_written_on_the_logging_call(self) -> None:
        recorder, store, clock = self.recorder()
        recorder(event())
        self.assertEqual(store.batches, [])
        self.assertEqual(recorder.waiting, 1)
        clock.advance(1)
        self.assertEqual([len(b) for b in store.batches], [1])
        self.assertEqual(store.batches[0][0].detail["tool"], "t0")

    def test_one_write_per_interval(self) -> None:
        recorder, store, clock = self.recorder()
        for n in range(20):
            recorder(event(n))
        clock.advance(1)
        clock.advance(1)
        self.assertEqual([len(b) for b in store.batches], [20])

    def test_other_events_ignored(self) -> None:
        recorder, store, clock = self.recorder()
        recorder({"log_time": T0, "log_format": "hello"})
        recorder({"log_time": T0, "smeldr_event": "rate_limited"})
        self.assertEqual(recorder.waiting, 0)

    def test_full_batch_written_on_the_next_turn(self) -> None:
        recorder, store, clock = self.recorder(batch=5)
        for n in range(5):
            recorder(event(n))
        self.assertEqual(store.batches, [])
        clock.advance(0)
        self.assertEqual([len(b) for b in store.batches], [5])

    def test_slow_store_bounds_the_buffer(self) -> None:
        """
        While a write is under way, new steps wait; past the capacity the
        oldest are dropped and counted: memory stays bounded.
        """
        recorder, store, clock = self.recorder(batch=1000, capacity=10)
        store.hold = True
        recorder(event())
        clock.advance(1)
        self.assertEqual(len(store.pending), 1)
        for n in range(1, 26):
            recorder(event(n))
        clock.advance(1)
        self.assertEqual(len(store.batches), 1)  # the next write waits
        self.assertEqual((recorder.waiting, recorder.dropped), (10, 15))
        store.hold = False
        store.pending[0].callback(None)
        clock.advance(1)
        self.assertEqual([s.detail["tool"] for s in store.batches[1]], [f"t{n}" for n in range(16, 26)])

    def test_store_failure_is_logged_once_and_never_raised(self) -> None:
        recorder, store, clock = self.recorder()
        store.broken = True
        recorder(event())
        clock.advance(1)
        recorder(event(1))
        clock.advance(1)
        self.assertEqual(len(store.batches), 2)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(recorder.waiting, 0)

    def test_stop_writes_what_waits(self) -> None:
        recorder, store, clock = self.recorder()
        recorder(event())
        self.successResultOf(recorder.stop())
        self.assertEqual([len(b) for b in store.batches], [1])

    def test_as_a_log_observer(self) -> None:
        """Fed by a publisher, from a real Logger's event."""
        recorder, store, clock = self.recorder()
        publisher = LogPublisher(recorder)
        Logger(observer=publisher).info("x", smeldr_event="grant_approved", client_id="c", grant_id="g")
        clock.advance(1)
        self.assertEqual(store.batches[0][0].kind, "approved")

    def test_limits_a_few_clients_and_grants_per_write(self) -> None:
        """
        Each write enforces the per-client and per-grant limits (a
        statement each) of at most C{trim_batch} of those written since
        their last one (clients first, each oldest first); the rest on the
        next writes; all on the way out.
        """
        recorder, store, clock = self.recorder(trim_batch=3)
        recorder(event())
        recorder(dict(event(), client_id="d", grant_id="h"))
        recorder(dict(event(), client_id="e", grant_id="i"))
        clock.advance(1)
        recorder(event())
        clock.advance(1)
        recorder(dict(event(), client_id="f", grant_id="j"))
        self.successResultOf(recorder.stop())
        self.assertEqual(
            store.trims,
            [({"c", "d", "e"}, set()), ({"c"}, {"g", "h"}), ({"f"}, {"i", "j"})],
        )

    def test_a_backlog_is_written_in_slices(self) -> None:
        """
        At most C{batch} steps a write, the next slice on the next turn
        (the reactor serves requests between them), until one is not full.
        """
        recorder, store, clock = self.recorder(batch=4)
        store.hold = True
        recorder(event())
        clock.advance(1)
        for n in range(1, 11):
            recorder(event(n))
        sizes = []
        while store.pending:
            store.pending.pop(0).callback(None)
            sizes.append([len(b) for b in store.batches])
            clock.advance(0)
        self.assertEqual(sizes, [[1], [1, 4], [1, 4, 4], [1, 4, 4, 2]])
        self.assertEqual([s.detail["tool"] for b in store.batches[1:] for s in b], [f"t{n}" for n in range(1, 11)])
        self.assertEqual(recorder.waiting, 0)

    def test_stop_writes_the_whole_backlog(self) -> None:
        recorder, store, clock = self.recorder(batch=4)
        for n in range(10):
            recorder(event(n))
        self.successResultOf(recorder.stop())
        self.assertEqual(sum(len(b) for b in store.batches), 10)

    def test_stop_during_a_write_writes_the_rest_after_it(self) -> None:
        recorder, store, clock = self.recorder(batch=4)
        store.hold = True
        for n in range(10):
            recorder(event(n))
        clock.advance(0)
        stopped = recorder.stop()
        self.assertNoResult(stopped)
        store.hold = False
        store.pending[0].callback(None)
        self.successResultOf(stopped)
        self.assertEqual([len(b) for b in store.batches], [4, 6])
        self.assertEqual(clock.getDelayedCalls(), [])


def discovery(n: int = 0, address: str = "10.0.0.1", status: int = 200) -> dict[str, Any]:
    return {
        "log_time": T0 + n / 1000,
        "smeldr_event": "http_step",
        "method": "GET",
        "path": "/.well-known/oauth-authorization-server",
        "status": status,
        "address": address,
        "client_id": "",
        "resource": "",
        "challenge": None,
    }


def refreshed(n: int = 0, client_id: str = "c", grant_id: str = "g") -> dict[str, Any]:
    return {
        "log_time": T0 + n / 1000,
        "smeldr_event": "token_issued",
        "grant_type": "refresh_token",
        "client_id": client_id,
        "grant_id": grant_id,
    }


class RepeatTests(Recording):
    """
    Identical C{http_step}s waiting for one write are kept once, counted:
    a metadata poller costs a dictionary look-up per request, not a row.
    """

    def test_identical_requests_make_one_step(self) -> None:
        recorder, store, clock = self.recorder()
        for n in range(5):
            recorder(discovery(n))
        recorder(discovery(5, status=404))
        recorder(discovery(6, address="10.0.0.2"))
        recorder(discovery(7))
        self.assertEqual(recorder.waiting, 3)
        clock.advance(1)
        [batch] = store.batches
        self.assertEqual(
            [(s.address, s.outcome, s.count, s.at) for s in batch],
            [("10.0.0.1", "ok", 6, T0), ("10.0.0.1", "404", 1, T0 + 0.005), ("10.0.0.2", "ok", 1, T0 + 0.006)],
        )
        self.assertEqual(batch[0].detail["repeats"], "6")
        self.assertNotIn("repeats", batch[1].detail)

    def test_repeats_counted_per_write(self) -> None:
        """The next write starts counting again: a step per write at most."""
        recorder, store, clock = self.recorder()
        recorder(discovery(0))
        recorder(discovery(1))
        clock.advance(1)
        recorder(discovery(2))
        clock.advance(1)
        self.assertEqual([[s.count for s in b] for b in store.batches], [[2], [1]])

    def test_refreshes_of_one_grant_make_one_step(self) -> None:
        """
        A rotation chain's token issues waiting for one write are one
        C{refreshed} step with their number; another grant's, or another
        client's, are steps of their own.
        """
        recorder, store, clock = self.recorder()
        for n in range(4):
            recorder(refreshed(n))
        recorder(refreshed(4, grant_id="g2"))
        recorder(refreshed(5, client_id="c2"))
        recorder(refreshed(6))
        self.assertEqual(recorder.waiting, 3)
        clock.advance(1)
        [batch] = store.batches
        self.assertEqual(
            [(s.kind, s.client_id, s.grant_id, s.count, s.at) for s in batch],
            [
                ("refreshed", "c", "g", 5, T0),
                ("refreshed", "c", "g2", 1, T0 + 0.004),
                ("refreshed", "c2", "g", 1, T0 + 0.005),
            ],
        )

    def test_code_exchanges_are_not_coalesced(self) -> None:
        """Only the refresh grant's token issues are counted together."""
        recorder, store, clock = self.recorder()
        for n in range(2):
            recorder(dict(refreshed(n), grant_type="authorization_code"))
        clock.advance(1)
        self.assertEqual([(s.kind, s.count) for s in store.batches[0]], [("code_exchanged", 1)] * 2)

    def test_a_refresh_is_not_counted_with_a_request(self) -> None:
        """The events' names are part of what makes a step the same."""
        recorder, store, clock = self.recorder()
        recorder(refreshed(0))
        recorder(dict(refreshed(1), smeldr_event="http_step"))
        self.assertEqual(recorder.waiting, 2)

    def test_protocol_events_are_never_coalesced(self) -> None:
        """
        Beside the site's per-request hook only refreshes are: every grant,
        code exchange, refusal and call is its own step.
        """
        recorder, store, clock = self.recorder()
        for _ in range(3):
            recorder(event())
        clock.advance(1)
        self.assertEqual([s.count for s in store.batches[0]], [1, 1, 1])

    def test_repeats_of_a_dropped_step_are_dropped_with_it(self) -> None:
        recorder, store, clock = self.recorder(batch=1000, capacity=2)
        store.hold = True
        recorder(event())
        clock.advance(1)
        for n in range(4):
            recorder(discovery(n))
        recorder(event(1))
        recorder(event(2))  # pushes the discovery step (4 requests) out
        recorder(discovery(9))  # counted anew; pushes event(1) out
        self.assertEqual((recorder.waiting, recorder.dropped), (2, 5))
        store.pending[0].callback(None)
        store.hold = False
        clock.advance(1)
        self.assertEqual([(s.kind, s.count) for s in store.batches[1]], [("mcp_call", 1), ("discovery", 1)])

    def test_unhashable_fields_are_not_coalesced(self) -> None:
        recorder, store, clock = self.recorder()
        recorder(dict(discovery(), resource=["x"]))
        recorder(dict(discovery(), resource=["x"]))
        clock.advance(1)
        self.assertEqual(len(store.batches[0]), 2)


class JunkFloodTests(SynchronousTestCase):
    def test_a_poller_does_not_push_other_steps_out(self) -> None:
        """
        Ten thousand metadata requests from one address, through a real
        store that keeps 50 steps, beside one client's approval: both are
        kept, the requests as a few counted steps.
        """
        from smeldr_oauth.flows.store import FlowStore, Retention

        clock = Clock()
        clock.advance(T0)
        store = FlowStore.in_memory(clock, Retention(total=50))
        self.addCleanup(store.close)
        recorder = FlowRecorder(store, clock, batch=200)
        recorder.start()
        self.addCleanup(recorder.stop)
        recorder({"log_time": T0, "smeldr_event": "grant_approved", "client_id": "c", "grant_id": "g"})
        for n in range(10_000):
            recorder(discovery(n))
            if n % 1000 == 0:
                clock.advance(0.25)
        clock.advance(1)
        steps = self.successResultOf(store.timeline(last=100))
        self.assertIn("approved", [s.kind for s in steps])
        self.assertEqual(sum(s.count for s in steps if s.kind == "discovery"), 10_000)
        self.assertLessEqual(len(steps), 12)


    def test_flood_of_junk_clients_stays_bounded(self) -> None:
        """
        Thousands of registrations, invented client_id values at the
        authorization endpoint and bogus tokens from as many addresses, fed
        through the recorder into a real store: the buffer never holds more
        than its capacity, the table never more than its total.
        """
        from smeldr_oauth.flows.store import FlowStore, Retention

        clock = Clock()
        clock.advance(T0)
        store = FlowStore.in_memory(clock, Retention(total=500))
        self.addCleanup(store.close)
        recorder = FlowRecorder(store, clock, batch=200, capacity=1000)
        recorder.start()
        self.addCleanup(recorder.stop)
        for n in range(6000):
            kind = n % 3
            if kind == 0:
                event = {"smeldr_event": "client_registered", "client_id": f"junk-{n}", "address": f"10.0.{n // 250}.{n % 250}"}
            elif kind == 1:
                event = {"smeldr_event": "http_step", "path": "/oauth/authorize", "status": 400, "client_id": f"https://junk{n}.example/c"}
            else:
                event = {"smeldr_event": "http_step", "path": "/mcp", "status": 401, "challenge": "yes", "address": f"10.1.{n // 250}.{n % 250}"}
            recorder(dict(event, log_time=T0 + n / 1000))
            self.assertLessEqual(recorder.waiting, 1000)
            if n % 100 == 0:
                clock.advance(0)
        clock.advance(1)
        self.assertEqual(recorder.waiting, 0)
        self.assertLessEqual(self.successResultOf(store.count()), 500)
        self.assertLessEqual(len(self.successResultOf(store.clients(10_000))), 500)
