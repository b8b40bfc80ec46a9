"""
Tests for L{smeldr_oauth.oauth.expiring}.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from smeldr_oauth.oauth.expiring import ExpiringDict


class ExpiringDictTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.d: ExpiringDict[str, int] = ExpiringDict(3, 10.0, timer=self.clock.seconds)

    def test_expires(self) -> None:
        self.d["a"] = 1
        self.clock.advance(9.5)
        self.assertEqual(self.d["a"], 1)
        self.assertIn("a", self.d)
        self.assertEqual(self.d.get("a"), 1)
        self.clock.advance(0.5)
        self.assertRaises(KeyError, lambda: self.d["a"])
        self.assertNotIn("a", self.d)
        self.assertIsNone(self.d.get("a"))
        self.assertEqual(len(self.d), 0)

    def test_set_again_restarts(self) -> None:
        self.d["a"] = 1
        self.clock.advance(6)
        self.d["b"] = 2
        self.d["a"] = 3
        self.clock.advance(6)
        self.assertEqual(self.d["a"], 3)
        self.assertEqual(self.d["b"], 2)
        self.assertEqual(self.d.items(), [("b", 2), ("a", 3)])

    def test_full_evicts_oldest_set(self) -> None:
        for i, key in enumerate("abc"):
            self.d[key] = i
        self.assertEqual(self.d["a"], 0)  # read: still the oldest set
        self.d["d"] = 3
        self.assertNotIn("a", self.d)
        self.assertEqual(sorted(self.d), ["b", "c", "d"])
        self.assertEqual(len(self.d), 3)

    def test_insert_drops_expired(self) -> None:
        self.d["a"] = 1
        self.d["b"] = 2
        self.clock.advance(5)
        self.d["c"] = 3
        self.clock.advance(5)
        self.d["d"] = 4
        self.assertEqual(len(self.d), 2)
        self.assertEqual(self.d.items(), [("c", 3), ("d", 4)])

    def test_pop_and_clear(self) -> None:
        self.d["a"] = 1
        self.d["b"] = 2
        self.assertEqual(self.d.pop("a"), 1)
        self.assertEqual(self.d.pop("a", None), None)
        self.assertRaises(KeyError, self.d.pop, "a")
        self.clock.advance(10)
        self.assertEqual(self.d.pop("b", "gone"), "gone")
        self.assertEqual(len(self.d), 0)
        self.d["c"] = 3
        self.d.clear()
        self.assertNotIn("c", self.d)

    def test_maxsize(self) -> None:
        self.assertRaises(ValueError, ExpiringDict, 0, 1.0, self.clock.seconds)

    @given(
        st.lists(
            st.one_of(
                st.tuples(st.just("set"), st.integers(0, 5)),
                st.tuples(st.just("get"), st.integers(0, 5)),
                st.tuples(st.just("pop"), st.integers(0, 5)),
                st.tuples(st.just("wait"), st.sampled_from([0.5, 3.0, 9.9, 10.0])),
            ),
            max_size=60,
        )
    )
    def test_as_a_model(self, ops: list[tuple[str, float]]) -> None:
        """
        Against a plain model: an entry is there for C{ttl} seconds after
        it was last set, unless more than C{maxsize} were set after it
        while it lived.
        """
        clock = Clock()
        d: ExpiringDict[int, int] = ExpiringDict(3, 10.0, timer=clock.seconds)
        model: dict[int, tuple[float, int]] = {}  # key -> (set at, value), in set order
        for n, (op, arg) in enumerate(ops):
            now = clock.seconds()
            live = {k: v for k, v in model.items() if now < v[0] + 10.0}
            if op == "set":
                key = int(arg)
                live.pop(key, None)
                while len(live) >= 3:
                    del live[next(iter(live))]
                live[key] = (now, n)
                d[key] = n
            elif op == "get":
                key = int(arg)
                self.assertEqual(d.get(key), live[key][1] if key in live else None)
            elif op == "pop":
                key = int(arg)
                expected = live.pop(key)[1] if key in live else None
                self.assertEqual(d.pop(key, None), expected)
            else:
                clock.advance(arg)
            model = live
            now = clock.seconds()
            self.assertEqual(d.items(), [(k, v[1]) for k, v in model.items() if now < v[0] + 10.0])
