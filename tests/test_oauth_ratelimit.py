"""
Tests for L{smeldr_oauth.oauth.ratelimit}.
"""

from __future__ import annotations

from hypothesis import given, strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from smeldr_oauth.oauth.ratelimit import RateLimiter, bucket_key


class BucketKeyTests(SynchronousTestCase):
    def test_ipv4_own_bucket(self) -> None:
        self.assertEqual(bucket_key("192.0.2.1"), "192.0.2.1")
        self.assertNotEqual(bucket_key("192.0.2.1"), bucket_key("192.0.2.2"))

    def test_ipv6_per_64(self) -> None:
        """
        Every address of one /64 shares a bucket, however it is written;
        the next /64 is another bucket.
        """
        a = bucket_key("2001:db8:1:2::1")
        self.assertEqual(a, "2001:db8:1:2::/64")
        self.assertEqual(bucket_key("2001:db8:1:2:ffff:ffff:ffff:ffff"), a)
        self.assertEqual(bucket_key("2001:DB8:1:2:0:0:0:9"), a)
        self.assertEqual(bucket_key("2001:db8:1:2::1%eth0"), a)
        self.assertNotEqual(bucket_key("2001:db8:1:3::1"), a)

    def test_ipv4_mapped(self) -> None:
        self.assertEqual(bucket_key("::ffff:192.0.2.1"), "192.0.2.1")

    def test_not_an_address(self) -> None:
        for value in ("unknown", "", "/tmp/socket", "host.example"):
            self.assertEqual(bucket_key(value), value)

    @given(st.text(max_size=60))
    def test_never_raises(self, value: str) -> None:
        self.assertIsInstance(bucket_key(value), str)

    @given(st.ip_addresses(v=6))
    def test_ipv6_keys_are_networks(self, ip: object) -> None:
        key = bucket_key(str(ip))
        self.assertTrue(key.endswith("/64") or "." in key, key)


class RateLimiterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.limiter = RateLimiter(self.clock, 3)

    def test_hit_until_empty(self) -> None:
        self.assertEqual([self.limiter.hit("a") for _ in range(4)], [True, True, True, False])
        self.assertEqual(self.limiter.retry_after("a"), 20)
        self.assertTrue(self.limiter.hit("b"))

    def test_refills(self) -> None:
        for _ in range(3):
            self.limiter.hit("a")
        self.clock.advance(20)
        self.assertTrue(self.limiter.hit("a"))
        self.assertFalse(self.limiter.hit("a"))

    def test_refund(self) -> None:
        """
        A refunded hit is as if it never happened; refunds never lift a
        bucket above its capacity.
        """
        for _ in range(3):
            self.assertTrue(self.limiter.hit("a"))
        self.limiter.refund("a")
        self.assertTrue(self.limiter.hit("a"))
        self.assertFalse(self.limiter.hit("a"))
        for _ in range(10):
            self.limiter.refund("b")
        self.assertEqual([self.limiter.hit("b") for _ in range(4)], [True, True, True, False])

    def test_reserve_then_refund_bounds_parallel_attempts(self) -> None:
        """
        Spending before a slow check lets at most the capacity through,
        however many checks are in flight at once.
        """
        admitted = [self.limiter.hit("a") for _ in range(60)]
        self.assertEqual(admitted.count(True), 3)

    def test_ipv6_neighbours_share(self) -> None:
        for n in range(3):
            self.assertTrue(self.limiter.hit(f"2001:db8::{n + 1}"))
        self.assertFalse(self.limiter.hit("2001:db8::ffff"))
        self.assertTrue(self.limiter.hit("2001:db8:0:1::1"))

    def test_bounded_keys(self) -> None:
        limiter = RateLimiter(self.clock, 1, max_keys=2)
        for key in ("a", "b", "c"):
            limiter.hit(key)
        # "a" was forgotten: it starts with a full bucket again.
        self.assertTrue(limiter.hit("a"))

    def test_spend_updates_bucket_in_place(self) -> None:
        """
        A spend on a key already tracked changes its bucket where it is
        rather than storing a new one (the cache's C{__setitem__} was a
        third of a spend, two of them a token request), and the bucket
        says what was spent.
        """
        self.limiter.hit("a")
        bucket = self.limiter._buckets["a"]
        self.clock.advance(1)
        self.assertTrue(self.limiter.hit("a"))
        self.assertIs(self.limiter._buckets["a"], bucket)
        # Three a minute: one spent, a twentieth refilled, one spent.
        self.assertAlmostEqual(bucket[0], 1.05)
        self.assertEqual(bucket[1], self.clock.seconds())

    def test_spend_keeps_key_recent(self) -> None:
        """
        A spend on a tracked key makes it the most recently seen, though
        its bucket is updated in place: the key forgotten next is another.
        """
        limiter = RateLimiter(self.clock, 1, max_keys=2)
        limiter.hit("a")
        limiter.hit("b")
        self.assertFalse(limiter.hit("a"))
        limiter.hit("c")
        # "b" was forgotten, not "a": "a" is still refused, "b" starts full.
        self.assertFalse(limiter.hit("a"))
        self.assertTrue(limiter.hit("b"))

    def test_retry_after(self) -> None:
        """
        How long until the next event is allowed: a bucket of 3 a minute
        refills one event every 20 seconds.
        """
        self.assertEqual(self.limiter.retry_after("a"), 1)
        for _ in range(3):
            self.limiter.hit("a")
        self.assertEqual(self.limiter.retry_after("a"), 20)
        self.clock.advance(15)
        self.assertEqual(self.limiter.retry_after("a"), 5)

    def test_window(self) -> None:
        limiter = RateLimiter(self.clock, 2, window=10.0)
        self.assertEqual([limiter.hit("a") for _ in range(3)], [True, True, False])
        self.clock.advance(5)
        self.assertEqual([limiter.hit("a") for _ in range(2)], [True, False])


class SpendNowTests(SynchronousTestCase):
    """
    L{spend_now}: L{spend} decided at once for a limiter in memory, and
    handed on as a L{Deferred} for any other.
    """

    def test_in_memory(self) -> None:
        """
        An in-memory limiter spends at once (nothing to await), then
        refuses at once: L{RateLimited} with the retry time, logged as a
        security event.
        """
        from twisted.logger import capturedLogs

        from smeldr_oauth.oauth.errors import RateLimited
        from smeldr_oauth.oauth.ratelimit import spend_now

        limiter = RateLimiter(Clock(), 1, window=60.0)
        self.assertIsNone(spend_now(limiter, "10.0.0.1", "token", "token request"))
        with capturedLogs() as events:
            refused = self.assertRaises(RateLimited, spend_now, limiter, "10.0.0.1", "token", "token request")
        self.assertEqual(refused.retry_after, 60)
        self.assertEqual([e.get("smeldr_event") for e in events], ["rate_limited"])
        self.assertEqual(events[0]["endpoint"], "token")
        # Another key has its own bucket.
        self.assertIsNone(spend_now(limiter, "10.0.0.2", "token", "token request"))

    def test_answers_later(self) -> None:
        """
        Any other limiter (a shared one) answers through L{spend}'s
        L{Deferred}, refusals included.
        """
        from twisted.internet.defer import Deferred

        from smeldr_oauth.oauth.errors import RateLimited
        from smeldr_oauth.oauth.ratelimit import spend_now

        answers: list[Deferred[object]] = []

        class Later:
            def take(self, key: str) -> Deferred[object]:
                answers.append(Deferred())
                return answers[-1]

        d = spend_now(Later(), "k", "token", "token request")  # type: ignore[arg-type]
        assert d is not None
        self.assertNoResult(d)
        answers[0].callback(None)
        self.assertIsNone(self.successResultOf(d))
        d = spend_now(Later(), "k", "token", "token request")  # type: ignore[arg-type]
        assert d is not None
        answers[1].callback(7)
        self.assertEqual(self.failureResultOf(d, RateLimited).value.retry_after, 7)
