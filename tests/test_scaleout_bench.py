"""
Short runs of the PostgreSQL benchmarks so that they cannot rot: C{python
-m bench.crossprocess} (cross-process delivery) and C{python -m bench
--database} (the HTTP rows on PostgreSQL, with the database's own CPU):
real processes on the real PostgreSQL of L{tests.postgres}, numbers
printed.  Nothing here is timed.
"""

from __future__ import annotations

import json
import os
import socket
import sys

from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from bench import loadgen, servers
from tests import postgres
from tests.e2e import runProgram

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class DatabaseBenchTests(TestCase):
    timeout = 240

    async def test_refresh_reports_the_database_cpu(self) -> None:
        """
        C{python -m bench --database URL} on a PostgreSQL server of this
        machine measures the server's CPU per refresh and the database's
        (its postmaster's processes, L{bench.loadgen.database_cpu}) over
        the same window, in the JSON and in the printed line.
        """
        url = postgres.database_url(self)
        output = os.path.abspath(self.mktemp())
        out, err, code = await runProgram(
            reactor,
            [sys.executable, "-m", "bench", "--smoke", "--only", "refresh", "--database", url, "--output", output],
            timeout=220,
            path=CHECKOUT,
        )
        self.assertEqual(code, 0, err)
        with open(output) as f:
            rows = {r["name"]: r for r in json.load(f)["http"]}
        refresh = rows["refresh_rotation"]
        self.assertGreater(refresh["ops"], 0, refresh)
        self.assertGreater(refresh["database_cpu"], 0, refresh)
        self.assertGreater(refresh["database_us_per_op"], 0, refresh)
        # The floor does not use the database: nothing is claimed for it.
        self.assertNotIn("database_cpu", rows["floor"])
        line = next(line for line in out.splitlines() if line.strip().startswith("refresh_rotation"))
        self.assertIn(" db ", line)


class FlowServerTests(SynchronousTestCase):
    """
    The server the bench's full flow runs against (L{servers.start_smeldr})
    on PostgreSQL, where a paste's check is a round trip to the database.
    """

    #: Twice the default paste limit (30 a minute).
    PASTES = 60

    def test_simultaneous_pastes_from_one_address(self) -> None:
        """
        Pastes of the right site token sent at the same instant from one
        address are all approved: the full flow's users all paste from
        127.0.0.1 when a run starts, and a paste counts against the paste
        limit until its check comes back, so under the default limit the
        pastes past the 30th were refused (429) and those users' flows
        were lost (docs/performance.md, round eight).
        """
        url = postgres.database_url(self)
        server = servers.start_smeldr(("--database", url))
        self.addCleanup(server.stop)
        site_token = servers.create_site_token(server)
        client_id = servers.register_client(server)
        _, challenge = loadgen.pkce_pair()
        body = loadgen.form(
            response_type="code",
            client_id=client_id,
            redirect_uri=servers.REDIRECT_URI,
            scope="read",
            code_challenge=challenge,
            code_challenge_method="S256",
            resource=server.resource,
            decision="approve",
            site_token=site_token,
        )
        request = loadgen.build(
            "POST",
            "/oauth/authorize",
            f"127.0.0.1:{server.port}",
            {"Content-Type": "application/x-www-form-urlencoded", "Connection": "close"},
            body,
        )
        connections = [socket.create_connection(("127.0.0.1", server.port), timeout=60) for _ in range(self.PASTES)]
        for connection in connections:
            self.addCleanup(connection.close)
        # Every request is written before any answer is read: all of them
        # are in flight together.
        for connection in connections:
            connection.sendall(request)
        statuses = []
        for connection in connections:
            head = b""
            while b"\r\n" not in head:
                chunk = connection.recv(4096)
                if not chunk:
                    break
                head += chunk
            statuses.append(int(head[9:12]))
        self.assertEqual(statuses, [303] * self.PASTES)


class CrossProcessBenchTests(TestCase):
    timeout = 120

    async def test_rows(self) -> None:
        url = postgres.database_url(self)
        out, err, code = await runProgram(
            reactor,
            [sys.executable, "-m", "bench.crossprocess", "--database", url, "--seconds", "0.3", "--sessions", "1", "3"],
            timeout=100,
            path=CHECKOUT,
        )
        self.assertEqual(code, 0, err)
        rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        figures = [r for r in rows if "path" in r]
        self.assertEqual([(r["sessions"], r["path"]) for r in figures], [(1, "A -> A"), (1, "B -> A"), (3, "A -> A"), (3, "B -> A")])
        for r in figures:
            self.assertGreater(r["messages"], 0, r)
            self.assertGreater(r["p99_ms"], 0, r)
        self.assertEqual([r["sessions"] for r in rows if "p99_vs_same_process" in r], [1, 3])
        self.assertEqual({r["load"] for r in figures}, {"closed"})

    async def test_openLoop(self) -> None:
        """
        C{--rate}: each session sends on a fixed schedule; the row says so,
        and reports the CPU of both servers per message.
        """
        url = postgres.database_url(self)
        out, err, code = await runProgram(
            reactor,
            [sys.executable, "-m", "bench.crossprocess", "--database", url, "--seconds", "0.5", "--sessions", "2", "--rate", "10"],
            timeout=100,
            path=CHECKOUT,
        )
        self.assertEqual(code, 0, err)
        figures = [r for r in (json.loads(line) for line in out.splitlines() if line.startswith("{")) if "path" in r]
        self.assertEqual([r["path"] for r in figures], ["A -> A", "B -> A"])
        for r in figures:
            self.assertEqual(r["load"], "10/s per session")
            # Two sessions, ten a second each, for half a second.
            self.assertEqual(r["messages"], 10, r)
            self.assertIn("a_us_per_msg", r)
            self.assertIn("b_us_per_msg", r)

    async def test_seam(self) -> None:
        """C{--seam N}: the three ways a logged message reaches A, twice each."""
        url = postgres.database_url(self)
        out, err, code = await runProgram(
            reactor,
            [sys.executable, "-m", "bench.crossprocess", "--database", url, "--seam", "5"],
            timeout=100,
            path=CHECKOUT,
        )
        self.assertEqual(code, 0, err)
        rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        self.assertEqual([r["seam"] for r in rows], ["pooled", "route-only", "deliver_logged"] * 2)
        for r in rows:
            self.assertEqual(r["messages"], 5)
            self.assertGreater(r["p99_ms"], 0, r)
