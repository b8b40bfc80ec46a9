"""
Tests for L{smeldr_oauth.gateway.link} and L{smeldr_oauth.gateway.pool}:
isolation, limits, idle stop, crashes and restarts with backoff, routing of
what the upstream sends unasked.  On a L{Clock}, with in-process upstreams.
"""

from __future__ import annotations

from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from smeldr_oauth.gateway import errors
from smeldr_oauth.gateway.config import Limits
from smeldr_oauth.gateway.link import STABLE_AFTER
from smeldr_oauth.mcp.calls import Principal
from tests.gateway_fakes import RecordingOutlet
from tests.test_gateway_proxy import ALICE, BOB, Harness, text

CAROL = Principal("carol", "client-c", frozenset({"mcp"}), "grant-c")


class IsolationTests(SynchronousTestCase):
    def test_user(self) -> None:
        """One instance per subject; a user's sessions share it; owners are subjects only."""
        h = Harness()
        a1, _ = h.session(ALICE)
        a2, _ = h.session(ALICE)
        b, _ = h.session(BOB)
        self.assertEqual(len(h.channels), 2)
        self.assertEqual([c.owner for c in h.channels], [Principal("alice", None, frozenset(), None), Principal("bob", None, frozenset(), None)])
        h.call_tool(a2, ALICE, "echo", {"text": "from a2"})
        h.call_tool(b, BOB, "echo", {"text": "from b"})
        self.assertIn("from a2", str(h.channels[0].sent))
        self.assertNotIn("from b", str(h.channels[0].sent))
        self.assertNotIn("from a2", str(h.channels[1].sent))
        self.assertEqual(h.gateway.pool.live(), 2)

    def test_session(self) -> None:
        h = Harness(isolation="session")
        a1, _ = h.session(ALICE)
        a2, _ = h.session(ALICE)
        self.assertEqual(len(h.channels), 2)
        a1.close()
        self.assertTrue(h.channels[0].closed)
        self.assertFalse(h.channels[1].closed)
        self.assertEqual(h.gateway.pool.live(), 1)
        self.assertEqual(len(h.gateway.pool.links), 1)

    def test_shared(self) -> None:
        h = Harness(isolation="shared")
        a, a_out = h.session(ALICE)
        b, b_out = h.session(BOB)
        self.assertEqual(len(h.channels), 1)
        self.assertIsNone(h.channels[0].owner)
        # The identity still travels with each call.
        h.call_tool(b, BOB, "echo", {"text": "x"})
        self.assertEqual(h.channels[0].sent[-1][1], BOB)
        # Unattributed log lines are not guessed across users: dropped.
        h.answer(a, ALICE, "logging/setLevel", {"level": "debug"})
        h.channels[0].push({"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "info", "data": "whose?"}})
        self.assertNotIn("whose?", str(a_out.messages) + str(b_out.messages))
        # ... nor server requests: with nothing to attribute them to, they fail.
        answer = self.successResultOf(h.call_tool(a, ALICE, "ask", {"question": "?"}))
        self.assertTrue(answer["result"]["isError"])
        self.assertEqual(a_out.requests() + b_out.requests(), [])
        # Lists changing is news for everybody.
        h.app.notify_list_changed("prompts")
        self.assertIn("notifications/prompts/list_changed", a_out.methods())
        self.assertIn("notifications/prompts/list_changed", b_out.methods())

    def test_server_request_goes_to_a_session_that_can_answer(self) -> None:
        """Under per-user isolation an unattributed request finds the user's capable session."""
        h = Harness()
        plain, plain_out = h.session(ALICE, capabilities={})
        able, able_out = h.session(ALICE)
        d = h.call_tool(plain, ALICE, "ask", {"question": "?"})
        (request,) = able_out.requests()
        self.assertEqual(plain_out.requests(), [])
        h.respond(able, ALICE, request["id"], {"role": "assistant", "content": {"type": "text", "text": "y"}, "model": "m"})
        self.assertEqual(text(self.successResultOf(d)), "model said: y")


class CallTests(SynchronousTestCase):
    def test_call_on_a_running_instance(self) -> None:
        """
        A call on a running instance goes to it at once, without a Deferred
        of the instance from L{Link.ensure} to chain through (a step fewer
        per relayed call); its answer, the link's bookkeeping and a
        cancellation upstream are those of any call.
        """
        h = Harness()
        a, _ = h.session(ALICE)
        link = a.link
        assert link is not None
        self.patch(link, "ensure", lambda: self.fail("a running instance was waited for"))
        h.clock.advance(7)
        self.assertEqual(text(self.successResultOf(h.call_tool(a, ALICE, "echo", {"text": "now"}))), "now")
        self.assertEqual((link.calls, link.last_active), ({}, h.clock.seconds()))
        d = h.call_tool(a, ALICE, "never", msg_id="c1")
        self.assertEqual(len(link.calls), 1)
        h.notify(a, ALICE, "notifications/cancelled", {"requestId": "c1"})
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(h.channels[0].sent[-1][0]["method"], "notifications/cancelled")
        self.assertEqual(link.calls, {})


class LimitTests(SynchronousTestCase):
    def test_idle_instance_is_evicted_for_a_new_one(self) -> None:
        h = Harness(limits=Limits(max_instances=1))
        a, _ = h.session(ALICE)
        b, _ = h.session(BOB)
        self.assertTrue(h.channels[0].closed)
        self.assertEqual(h.gateway.pool.live(), 1)
        # Alice's session gets a fresh instance on its next call (evicting Bob's, idle now).
        self.assertEqual(text(self.successResultOf(h.call_tool(a, ALICE, "echo", {"text": "back"}))), "back")
        self.assertEqual(len(h.channels), 3)

    def test_busy_instances_are_not_evicted(self) -> None:
        h = Harness(limits=Limits(max_instances=1))
        a, _ = h.session(ALICE)
        h.call_tool(a, ALICE, "never")
        session = h.gateway.session()
        answer = h.answer(session, BOB, "initialize", {"protocolVersion": "2025-11-25"})
        self.assertEqual(answer["error"]["data"], {"upstream": "loop", "reason": "capacity"})
        self.assertEqual(h.gateway.metrics.refused, 1)
        self.assertFalse(h.channels[0].closed)

    def test_idle_stop(self) -> None:
        h = Harness(limits=Limits(idle_timeout=60))
        a, _ = h.session(ALICE)
        h.clock.advance(30)
        self.successResultOf(h.call_tool(a, ALICE, "echo", {"text": "x"}))
        h.clock.advance(59)
        self.assertFalse(h.channels[0].closed)
        h.clock.advance(1)
        self.assertTrue(h.channels[0].closed)
        self.assertEqual(h.gateway.pool.live(), 0)
        # The session lives on and gets a new instance when it calls again.
        self.assertEqual(text(self.successResultOf(h.call_tool(a, ALICE, "echo", {"text": "y"}))), "y")
        self.assertEqual(len(h.channels), 2)

    def test_busy_or_subscribed_instances_stay(self) -> None:
        h = Harness(limits=Limits(idle_timeout=60))
        a, _ = h.session(ALICE)
        d = h.call_tool(a, ALICE, "slow", {"steps": 100})
        h.clock.pump([1] * 90)
        self.assertFalse(h.channels[0].closed)
        h.clock.pump([1] * 10)
        self.successResultOf(d)
        h.answer(a, ALICE, "resources/subscribe", {"uri": "memo://one"})
        h.clock.pump([30] * 10)
        self.assertFalse(h.channels[0].closed)
        h.answer(a, ALICE, "resources/unsubscribe", {"uri": "memo://one"})
        h.clock.pump([30] * 3)
        self.assertTrue(h.channels[0].closed)

    def test_forgotten_links(self) -> None:
        h = Harness(limits=Limits(idle_timeout=10))
        for i in range(5):
            session, _ = h.session(Principal(f"user{i}", None, frozenset(), None))
            session.close()
        h.clock.advance(10)
        self.assertEqual(h.gateway.pool.links, {})

    def test_link_with_sessions_is_kept(self) -> None:
        """
        An instance that crashed leaves its link idle; while a session is
        still attached the pool keeps that link (the session calls through
        it again), and drops it when the last session ends.
        """
        h = Harness()
        a1, _ = h.session(ALICE)
        a2, _ = h.session(ALICE)
        h.channels[0].crash()
        a1.close()
        self.assertEqual(list(h.gateway.pool.links.values()), [a2.link])
        a2.close()
        self.assertEqual(h.gateway.pool.links, {})

    def test_stop(self) -> None:
        h = Harness()
        h.session(ALICE)
        h.session(BOB)
        self.successResultOf(h.gateway.stop())
        self.assertTrue(all(c.closed for c in h.channels))
        self.assertEqual(h.gateway.pool.live(), 0)


class CrashTests(SynchronousTestCase):
    def test_crash_mid_call(self) -> None:
        h = Harness()
        a, outlet = h.session(ALICE)
        d = h.call_tool(a, ALICE, "never")
        h.channels[0].crash("its process was killed by signal 9")
        answer = self.successResultOf(d)
        self.assertEqual(
            answer["error"],
            {
                "code": errors.UPSTREAM_UNAVAILABLE,
                "message": "Upstream unavailable: its process was killed by signal 9",
                "data": {"upstream": "loop", "reason": "exited"},
            },
        )
        notice = [m for m in outlet.messages if m.get("method") == "notifications/message"][-1]
        self.assertEqual(notice["params"]["level"], "error")
        self.assertIn("will be restarted", notice["params"]["data"]["error"])
        # The next call works, on a fresh instance.
        self.assertEqual(text(self.successResultOf(h.call_tool(a, ALICE, "echo", {"text": "again"}))), "again")
        self.assertEqual(len(h.channels), 2)
        metrics = h.gateway.metrics
        self.assertEqual((metrics.crashes, metrics.restarts, metrics.started), (1, 1, 2))

    def test_instance_events(self) -> None:
        """
        An instance's life is logged as events that name the upstream and
        the process, each with its C{smeldr_event}.
        """
        h = Harness()
        with capturedLogs() as events:
            a, _ = h.session(ALICE)
            h.channels[0].crash("its process was killed by signal 9")
            self.successResultOf(h.call_tool(a, ALICE, "echo", {"text": "again"}))
            self.successResultOf(h.gateway.stop())
        lifecycle = [e for e in events if str(e.get("smeldr_event", "")).startswith("gateway_instance_")]
        self.assertEqual(
            [(e["smeldr_event"], e["log_level"].name, formatEvent(e)) for e in lifecycle],
            [
                ("gateway_instance_started", "info", "Upstream loop instance [None] ready at 2025-11-25"),
                (
                    "gateway_instance_crashed",
                    "warn",
                    "Upstream loop instance [None] ended: its process was killed by signal 9",
                ),
                ("gateway_instance_started", "info", "Upstream loop instance [None] ready at 2025-11-25"),
                ("gateway_instance_stopped", "info", "Upstream loop instance [None] stopped: gateway shutting down"),
            ],
        )

    def test_backoff_after_quick_crashes(self) -> None:
        h = Harness(limits=Limits(restart_backoff=2, restart_backoff_max=5))
        a, _ = h.session(ALICE)
        h.channels[-1].crash()
        self.successResultOf(h.call_tool(a, ALICE, "echo", {"text": "1"}))
        h.channels[-1].crash()
        refused = self.successResultOf(h.call_tool(a, ALICE, "echo", {"text": "2"}))
        self.assertEqual(refused["error"]["data"]["reason"], "restarting")
        self.assertIn("retry in 2s", refused["error"]["message"])
        h.clock.advance(2)
        self.successResultOf(h.call_tool(a, ALICE, "echo", {"text": "3"}))
        h.channels[-1].crash()
        h.clock.advance(3.9)
        self.assertEqual(self.successResultOf(h.call_tool(a, ALICE, "echo", {"text": "4"}))["error"]["data"]["reason"], "restarting")
        h.clock.advance(0.1)
        self.successResultOf(h.call_tool(a, ALICE, "echo", {"text": "5"}))
        h.channels[-1].crash()
        h.clock.advance(5)  # capped at restart_backoff_max
        self.assertIn("result", self.successResultOf(h.call_tool(a, ALICE, "echo", {"text": "6"})))

    def test_stable_run_resets_the_backoff(self) -> None:
        h = Harness(limits=Limits(restart_backoff=10, idle_timeout=1000))
        a, _ = h.session(ALICE)
        h.channels[-1].crash()
        self.successResultOf(h.call_tool(a, ALICE, "echo", {"text": "1"}))
        h.clock.advance(STABLE_AFTER)
        h.channels[-1].crash()
        self.assertIn("result", self.successResultOf(h.call_tool(a, ALICE, "echo", {"text": "2"})))

    def test_subscriptions_come_back(self) -> None:
        h = Harness()
        a, outlet = h.session(ALICE)
        h.answer(a, ALICE, "logging/setLevel", {"level": "warning"})
        h.answer(a, ALICE, "resources/subscribe", {"uri": "memo://one"})
        h.channels[0].crash()
        h.clock.advance(0)
        self.assertEqual(len(h.channels), 2)  # restarted at once: someone is subscribed
        fresh = h.channels[1]
        self.assertEqual(fresh.session.subscriptions, frozenset({"memo://one"}))
        self.assertEqual(fresh.session.log_level, "warning")
        h.app.notify_resource_updated("memo://one")
        self.assertEqual(outlet.methods()[-1], "notifications/resources/updated")

    def test_start_failure(self) -> None:
        h = Harness()
        a, _ = h.session(ALICE)
        h.channels[0].crash()
        original = h.gateway.pool.connector

        def broken(owner: object) -> object:
            channel = original(owner)
            channel.fail_start = True  # type: ignore[attr-defined]
            return channel

        h.gateway.pool.connector = broken
        answer = self.successResultOf(h.call_tool(a, ALICE, "echo", {"text": "x"}))
        self.assertEqual(answer["error"]["data"]["reason"], "start_failed")
        refused = self.successResultOf(h.call_tool(a, ALICE, "echo", {"text": "x"}))
        self.assertEqual(refused["error"]["data"]["reason"], "restarting")
        h.gateway.pool.connector = original
        h.clock.advance(1)
        self.assertIn("result", self.successResultOf(h.call_tool(a, ALICE, "echo", {"text": "x"})))


class FloodTests(SynchronousTestCase):
    def test_notifications_are_bounded(self) -> None:
        h = Harness(limits=Limits(notification_rate=10, notification_burst=20))
        a, outlet = h.session(ALICE)
        for i in range(50_000):
            h.channels[0].push({"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "info", "data": i}})
        logged = [m for m in outlet.messages if m.get("method") == "notifications/message"]
        self.assertEqual(len(logged), 20)
        self.assertEqual(h.gateway.metrics.dropped_notifications, 49_980)
        link = next(iter(h.gateway.pool.links.values()))
        self.assertEqual(link.gate.pending, 0)  # type: ignore[union-attr]
        # Once the flood stops the budget returns.
        h.clock.advance(1)
        h.channels[0].push({"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "info", "data": "after"}})
        self.assertEqual(outlet.messages[-1]["params"]["data"], "after")

    def test_progress_after_the_answer_is_not_sent(self) -> None:
        h = Harness(limits=Limits(notification_rate=0.5, notification_burst=1))
        a, _ = h.session(ALICE)
        post = RecordingOutlet()
        h.channels[0].push({"jsonrpc": "2.0", "method": "notifications/tools/list_changed"})  # spends the burst
        d = h.request(a, ALICE, "tools/call", {"name": "slow", "arguments": {"steps": 1}, "_meta": {"progressToken": "t"}}, outlet=post)
        h.clock.advance(1)
        self.successResultOf(d)  # answered while its progress waits for the bucket
        h.clock.advance(5)
        self.assertEqual(post.messages, [])
