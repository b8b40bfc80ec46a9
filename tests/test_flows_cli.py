"""
C{smeldr-oauth-admin flows} (L{smeldr_oauth.flows.cli}) against a SQLite
file and a PostgreSQL database holding recorded steps.
"""

from __future__ import annotations

import io
import json
import os
import time


from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from smeldr_oauth.db import open_database
from smeldr_oauth.flows import model, patterns
from smeldr_oauth.flows.model import Step
from smeldr_oauth.flows.store import FlowStore
from smeldr_oauth.site.admin import parse, run
from tests import postgres


def steps(now: float) -> list[Step]:
    return [
        Step(at=now - 600, kind=model.DISCOVERY, address="10.0.0.1", detail={"path": "/.well-known/oauth-protected-resource/mcp"}),
        Step(at=now - 599, kind=model.REGISTERED, client_id="c1", address="10.0.0.1"),
        Step(at=now - 598, kind=model.AUTHORIZE, client_id="c1", address="10.0.0.1", detail={"resource": "https://x/mcp"}),
        Step(at=now - 590, kind=model.APPROVED, client_id="c1", grant_id="g1"),
        Step(at=now - 589, kind=model.CODE_EXCHANGED, client_id="c1", grant_id="g1"),
        Step(at=now - 100, kind=model.REGISTERED, client_id="c2", address="10.0.0.2"),
        Step(at=now - 99, kind=model.AUTHORIZE, client_id="c2", address="10.0.0.2", outcome="400", detail={"resource": "https://y/mcp"}),
    ]


class FlowsCommandMixin:
    location: str

    def store_location(self) -> str:
        raise NotImplementedError

    async def admin(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        status = await run(reactor, parse(["flows", *argv, *self.where]), out, err)
        return status, out.getvalue(), err.getvalue()

    async def fill(self) -> None:
        store = FlowStore(open_database(self.location, reactor), reactor)
        try:
            await store.record(steps(time.time()))
        finally:
            store.close()

    async def test_one_client_with_the_missing_step_marked(self) -> None:
        await self.fill()
        status, out, err = await self.admin("--client", "c1")
        self.assertEqual((status, err), (0, ""))  # type: ignore[attr-defined]
        lines = out.splitlines()
        self.assertIn("step", lines[0])  # type: ignore[attr-defined]
        self.assertEqual(  # type: ignore[attr-defined]
            [line.split()[2] for line in lines[1:5]], ["discovery", "registration", "authorization", "decision"]
        )
        self.assertRegex(out, r"✗ token issued \d\d:\d\d:\d\d; no MCP request with this grant's token since \(grant g1\)")  # type: ignore[attr-defined]
        self.assertIn(f"see docs/troubleshooting.md#{patterns.NEVER_USED}", out)  # type: ignore[attr-defined]
        self.assertNotIn("c2", out)  # type: ignore[attr-defined]

    async def test_everyone_as_json(self) -> None:
        await self.fill()
        status, out, _ = await self.admin("--json", "--resource", "https://x/mcp", "--last", "5")
        self.assertEqual(status, 0)  # type: ignore[attr-defined]
        document = json.loads(out)
        self.assertEqual(len(document["steps"]), 5)  # type: ignore[attr-defined]
        names = {f["name"] for f in document["findings"]}
        self.assertEqual(names, {patterns.NEVER_USED, patterns.RESOURCE_MISMATCH})  # type: ignore[attr-defined]
        mismatch = next(f for f in document["findings"] if f["name"] == patterns.RESOURCE_MISMATCH)
        self.assertIn("'https://y/mcp'", mismatch["message"])  # type: ignore[attr-defined]

    async def test_grant(self) -> None:
        await self.fill()
        status, out, _ = await self.admin("--grant", "g1", "--json")
        self.assertEqual(  # type: ignore[attr-defined]
            [s["kind"] for s in json.loads(out)["steps"]],
            [model.REGISTERED, model.AUTHORIZE, model.APPROVED, model.CODE_EXCHANGED],
        )


class SQLiteFlowsCommandTests(FlowsCommandMixin, TestCase):
    def setUp(self) -> None:
        os.makedirs(self.mktemp())
        self.location = os.path.join(self.mktemp() + ".db")
        self.where = ["--oauth-db", self.location]

    def test_bad_count(self) -> None:
        from smeldr_oauth.site.admin.common import UsageError

        for value in ("0", "-5", str(2**63), "many"):
            with self.assertRaises(UsageError) as caught:  # type: ignore[attr-defined]
                parse(["flows", "--last", value, *self.where])
            self.assertIn("--last", str(caught.exception))  # type: ignore[attr-defined]

    def test_bad_seconds(self) -> None:
        """
        The lifetimes are finite seconds, not negative: C{nan} failed the
        command with a bare C{ValueError}, a negative C{--access-ttl} read
        every token as expired.
        """
        from smeldr_oauth.site.admin.common import UsageError

        for option in ("--access-ttl", "--grace"):
            for value in ("nan", "inf", "-inf", "1e309", "-5", str(2**31), "soon"):
                with self.assertRaises(UsageError) as caught:  # type: ignore[attr-defined]
                    parse(["flows", f"{option}={value}", *self.where])
                self.assertIn(option, str(caught.exception))  # type: ignore[attr-defined]
            self.assertEqual(getattr(parse(["flows", option, "0.5", *self.where]), option[2:].replace("-", "_")), 0.5)

    async def test_missing_database(self) -> None:
        os.remove(self.location) if os.path.exists(self.location) else None
        status, _, err = await self.admin()
        self.assertEqual(status, 1)
        self.assertIn("no oauth database", err)


class PostgresFlowsCommandTests(FlowsCommandMixin, TestCase):
    def setUp(self) -> None:
        self.location = postgres.database_url(self)
        self.where = ["--database", self.location]


