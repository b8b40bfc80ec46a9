"""
Tests for L{smeldr_oauth.doctor.report}: lines, JSON, exit status.
"""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase

from smeldr_oauth.doctor import model
from smeldr_oauth.doctor.report import as_json, exit_status, lines

VERDICTS = [
    model.ok("url", "checking https://example.com/mcp"),
    model.fail("issuer", "issuer 'https://example.com/' is not 'https://example.com'", "Make them identical.", issuer="x"),
    model.skip("stream", "needs a token"),
]


class ReportTests(SynchronousTestCase):
    def test_lines(self) -> None:
        self.assertEqual(
            lines(VERDICTS),
            [
                "✓ url: checking https://example.com/mcp",
                "✗ issuer: issuer 'https://example.com/' is not 'https://example.com'",
                "    fix: Make them identical.",
                "    see: docs/troubleshooting.md#issuer",
                "– stream: needs a token",
                "1 check(s) failed",
            ],
        )
        self.assertEqual(lines(VERDICTS[:1])[-1], "all checks passed")

    def test_controlCharacters(self) -> None:
        """
        Text that came from the server cannot drive the terminal.
        """
        out = "\n".join(lines([model.fail("oidc", "answered \x1b[2J\x07", "fix \x1b]0;x")]))
        self.assertNotIn("\x1b", out)
        self.assertNotIn("\x07", out)

    def test_json(self) -> None:
        document = json.loads(as_json("https://example.com/mcp", VERDICTS))
        self.assertEqual(document["url"], "https://example.com/mcp")
        self.assertFalse(document["ok"])
        self.assertEqual([c["status"] for c in document["checks"]], ["ok", "fail", "skip"])
        self.assertEqual(document["checks"][1]["see"], "docs/troubleshooting.md#issuer")
        self.assertEqual(document["checks"][1]["details"], {"issuer": "x"})
        self.assertTrue(json.loads(as_json("u", VERDICTS[:1]))["ok"])

    def test_exitStatus(self) -> None:
        self.assertEqual(exit_status(VERDICTS), 1)
        self.assertEqual(exit_status([VERDICTS[0], VERDICTS[2]]), 0)
        self.assertEqual(exit_status([]), 0)
