"""
Tests for L{bench.storeloop}: the store-only refresh loop still runs on the
real store and counts what it says it counts.  Nothing here is timed.
"""

from __future__ import annotations

import io
from contextlib import redirect_stdout

from twisted.trial.unittest import SynchronousTestCase

from bench import storeloop


class StoreLoopTests(SynchronousTestCase):
    def test_rotates_every_chain(self) -> None:
        """
        Every refresh of every chain rotates (the loop raises otherwise),
        each costs some CPU, and each batch writes WAL frames.
        """
        result = storeloop.run(chains=3, batch=2, refreshes=12, directory=self.mktemp_dir())
        self.assertEqual(result["refreshes"], 12.0)
        self.assertGreater(result["cpu_us_per_refresh"], 0.0)
        self.assertGreater(result["wal_frames_per_refresh"], 0.0)

    def test_fewer_frames_in_larger_batches(self) -> None:
        """
        Refreshes grouped in one commit share pages: fewer WAL frames a
        refresh than one commit each (what the loop exists to show).
        """
        alone = storeloop.run(chains=4, batch=1, refreshes=40, directory=self.mktemp_dir())
        grouped = storeloop.run(chains=4, batch=4, refreshes=40, directory=self.mktemp_dir())
        self.assertLess(grouped["wal_frames_per_refresh"], alone["wal_frames_per_refresh"])

    def test_drop_index(self) -> None:
        """
        The what-if of an index less: the loop still runs without it.
        """
        result = storeloop.run(
            chains=2, batch=2, refreshes=8, drop=["access_tokens_expires_at"], directory=self.mktemp_dir()
        )
        self.assertEqual(result["refreshes"], 8.0)

    def test_main_prints_one_line_per_batch_size(self) -> None:
        out = io.StringIO()
        with redirect_stdout(out):
            storeloop.main(["--chains", "2", "--batch", "1,2", "--refreshes", "4"])
        lines = out.getvalue().splitlines()
        self.assertEqual(len(lines), 2)
        self.assertTrue(lines[0].startswith("batch   1:"), lines[0])

    def mktemp_dir(self) -> str:
        import os

        path = self.mktemp()
        os.makedirs(path)
        return path
