"""
Tests for L{smeldr_oauth.service.collector}: garbage-collection pauses
timed, and the start-up objects frozen out of the collector.
"""

from __future__ import annotations

import gc

from prometheus_client import CollectorRegistry, generate_latest
from twisted.trial.unittest import SynchronousTestCase

from smeldr_oauth.service.collector import YOUNG_THRESHOLD, CollectionPauses, settle


class PausesTests(SynchronousTestCase):
    def test_each_collection_timed(self) -> None:
        now = [10.0]
        pauses = CollectionPauses(timer=lambda: now[0])
        for generation, seconds in ((0, 0.001), (2, 0.5), (2, 0.25), (1, 0.01)):
            pauses._callback("start", {"generation": generation})
            now[0] += seconds
            pauses._callback("stop", {"generation": generation, "collected": 0, "uncollectable": 0})
        self.assertEqual(pauses.count, [1, 1, 2])
        self.assertEqual(pauses.longest[2], 0.5)
        self.assertAlmostEqual(pauses.total[2], 0.75)
        self.assertAlmostEqual(pauses.longest[0], 0.001)

    def test_real_collections(self) -> None:
        pauses = CollectionPauses()
        pauses.install()
        pauses.install()
        self.addCleanup(pauses.uninstall)
        gc.collect()
        self.assertEqual(pauses.count[2], 1)
        self.assertGreater(pauses.longest[2], 0.0)
        pauses.uninstall()
        gc.collect()
        self.assertEqual(pauses.count[2], 1)

    def test_metrics(self) -> None:
        pauses = CollectionPauses()
        pauses.longest[2] = 0.75
        pauses.count[2] = 3
        registry = CollectorRegistry()
        registry.register(pauses)
        page = generate_latest(registry).decode()
        self.assertIn('smeldr_gc_pause_longest_seconds{generation="2"} 0.75', page)
        self.assertIn('smeldr_gc_collections_total{generation="2"} 3.0', page)
        self.assertIn('smeldr_gc_pause_seconds_total{generation="0"} 0.0', page)


class SettleTests(SynchronousTestCase):
    def test_frozen_and_threshold(self) -> None:
        before = gc.get_threshold()

        def restore() -> None:
            gc.unfreeze()
            gc.set_threshold(*before)

        self.addCleanup(restore)
        alive = [object() for _ in range(3)] + [[] for _ in range(3)]
        frozen = gc.get_freeze_count()
        settle()
        self.assertGreater(gc.get_freeze_count(), frozen)
        self.assertEqual(gc.get_threshold(), (YOUNG_THRESHOLD, before[1], before[2]))
        # Frozen objects are out of every generation: a full collection
        # walks only what came after.
        self.assertNotIn(alive[-1], gc.get_objects(generation=2))
