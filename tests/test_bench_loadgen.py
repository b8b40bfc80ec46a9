"""
Tests for L{bench.loadgen}'s CPU accounting: what the bench's per-operation
CPU figures are made of.  Nothing here is timed.
"""

from __future__ import annotations

import os
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

from bench import loadgen

#: A child that spends about this much CPU, then exits.
_BURN = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass\n"


class DatabaseCPUTests(SynchronousTestCase):
    def test_children_that_exited_count(self) -> None:
        """
        L{loadgen.database_cpu} counts the CPU of children the process has
        already reaped (a PostgreSQL server's short-lived workers), which
        L{loadgen.process_cpu} (live children only) does not.
        """
        me = os.getpid()
        before, before_live = loadgen.database_cpu(me), loadgen.process_cpu(me)
        subprocess.run([sys.executable, "-c", _BURN], check=True, timeout=60)
        spent = loadgen.database_cpu(me) - before
        self.assertGreaterEqual(spent, 0.25)
        # This process itself spent little meanwhile: the child's CPU is
        # what database_cpu found.
        self.assertLess(loadgen.process_cpu(me) - before_live, spent - 0.2)
