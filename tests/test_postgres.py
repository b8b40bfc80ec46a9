"""
Tests for L{tests.postgres}, the private PostgreSQL cluster every
PostgreSQL test runs on: its log must be whole when the cluster stops.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from tests import postgres
from tests.prerequisites import require


class ClusterLogTests(SynchronousTestCase):
    def test_stop_keeps_the_last_lines(self) -> None:
        """
        L{postgres.Cluster.stop} returns once the server's last lines (its
        shutdown) are in the log file, and closes the file: at the test
        process's exit the cluster is stopped and its log closed, and a
        thread still copying wrote to the closed file (a C{ValueError}
        traceback after the suite's result) and lost the lines.  A
        restart gets a log file of its own, the old one closed.
        """
        bindir = postgres.find_bindir()
        require(None if bindir else "PostgreSQL (initdb, postgres) is not installed", postgres.INSTALL)
        assert bindir is not None
        cluster = postgres.Cluster(bindir)
        self.addCleanup(cluster.destroy)
        cluster.start()
        first = cluster._log
        assert first is not None
        cluster.restart()
        self.assertTrue(first.closed)
        second = cluster._log
        assert second is not None
        cluster.stop()
        self.assertTrue(second.closed)
        self.assertEqual(cluster.log_tail().count("database system is shut down"), 2)
