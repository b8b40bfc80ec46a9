"""
Tests for L{smeldr_oauth.service.affinity} and C{--pin-cpus}: the CPU each
worker takes, the option's refusal where it cannot work, and real
C{twist smeldr-oauth} workers on PostgreSQL whose every thread (the
database pool's included) runs on its own CPU.
"""

from __future__ import annotations

import io
import json
import os
import sys

from twisted.trial.unittest import SynchronousTestCase, TestCase

from smeldr_oauth.service import affinity, tap
from tests import postgres
from tests.test_conformance import httpClient
from tests.supervised import twist_workers
from tests.test_service_tap import parse


def allowed_cpus(pid: int) -> dict[int, str]:
    """
    Each thread of process C{pid}: the CPUs it may run on, as Linux lists
    them (C{Cpus_allowed_list}, e.g. C{"1"} or C{"0-1"}).
    """
    found = {}
    for name in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{name}/status") as f:
                for line in f:
                    if line.startswith("Cpus_allowed_list:"):
                        found[int(name)] = line.split(":", 1)[1].strip()
        except FileNotFoundError:
            pass  # a thread that ended meanwhile
    return found


class CpuForTests(SynchronousTestCase):
    def test_in_order_modulo(self) -> None:
        """
        Worker C{i} takes the C{i}-th allowed CPU in order, and a pool
        larger than the CPUs shares them evenly.
        """
        self.assertEqual([affinity.cpu_for(i, {1, 0}) for i in range(5)], [0, 1, 0, 1, 0])
        self.assertEqual([affinity.cpu_for(i, [7, 2, 5]) for i in range(4)], [2, 5, 7, 2])
        self.assertEqual(affinity.cpu_for(3, {4}), 4)


class OptionsTests(SynchronousTestCase):
    def test_off_by_default(self) -> None:
        self.assertFalse(parse("--issuer", "https://a.example")["pin-cpus"])
        self.assertTrue(parse("--issuer", "https://a.example", "--pin-cpus")["pin-cpus"])

    def test_refused_where_unavailable(self) -> None:
        """
        Where threads cannot be pinned (not Linux), the option is a usage
        error, not a server that silently runs unpinned.
        """
        self.patch(affinity, "available", lambda: False)
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        with self.assertRaises(SystemExit) as raised:
            tap.Options().parseOptions(["--issuer", "https://a.example", "--pin-cpus"])
        self.assertEqual(raised.exception.code, 2)
        self.assertEqual(stderr.getvalue(), "smeldr-oauth: error: --pin-cpus needs Linux (sched_setaffinity)\n")


class PinnedWorkersTests(TestCase):
    """
    Two real C{twist smeldr-oauth --pin-cpus} workers on one PostgreSQL
    database, under a L{Supervisor} here.
    """

    timeout = 120

    async def test_every_thread_pinned(self) -> None:
        """
        Each worker's every thread, the database pool's started after the
        pin included (a registration uses them), runs only on the CPU the
        worker's index gives it, and the worker says so in its log.
        """
        supervised = await twist_workers(
            self, 2, ["--issuer", "http://127.0.0.1:1", "--database", postgres.database_url(self), "--pin-cpus"]
        )
        supervisor = supervised.supervisor
        port = supervised.port()
        client = httpClient(self)
        for _ in range(4):
            response = await client.post(
                f"http://127.0.0.1:{port}/oauth/register",
                json.dumps({"redirect_uris": ["http://127.0.0.1:9/cb"], "token_endpoint_auth_method": "none"}).encode(),
                headers={"Content-Type": ["application/json"]},
            )
            self.assertEqual(response.code, 201, await response.content())
            await response.content()
        mine = os.sched_getaffinity(0)
        for index, pid in enumerate(supervisor.pids()):
            assert pid is not None
            threads = allowed_cpus(pid)
            # The reactor's thread, and the database pool's.
            self.assertGreater(len(threads), 1, threads)
            expected = str(affinity.cpu_for(index, mine))
            self.assertEqual(set(threads.values()), {expected}, (index, threads))
            self.assertIn(f"pinned to CPU {expected}", supervised.log())
        await supervisor.stopService()
        self.assertNotIn("Traceback", supervised.log())
