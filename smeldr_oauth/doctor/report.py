# -*- test-case-name: tests.test_doctor_report -*-
"""
The doctor's output: one line per check (C{✓}, C{✗} with the fix and the
guide's section, C{–} for a check that could not run), or one JSON
document; and the exit status scripts test (0: nothing failed, 1: a
check failed).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from smeldr_oauth.doctor.model import FAIL, OK, Verdict

MARKS = {OK: "✓", FAIL: "✗", "skip": "–"}


def _printable(text: str) -> str:
    """
    Server-supplied text (URLs, error descriptions) on a terminal: no
    control characters, so nothing can rewrite the operator's screen.
    """
    return "".join(c if c.isprintable() else "?" for c in text)


def lines(verdicts: Sequence[Verdict]) -> list[str]:
    """
    The report for a terminal: a line per check, and under a failure its
    fix and where the guide explains it.
    """
    out = []
    for verdict in verdicts:
        out.append(f"{MARKS[verdict.status]} {verdict.check}: {_printable(verdict.summary)}")
        if verdict.status == FAIL:
            out.append(f"    fix: {_printable(verdict.fix)}")
            out.append(f"    see: {verdict.link}")
    failed = sum(1 for v in verdicts if v.status == FAIL)
    out.append(f"{failed} check(s) failed" if failed else "all checks passed")
    return out


def as_json(url: str, verdicts: Sequence[Verdict]) -> str:
    """
    The report for programs: C{{"url", "ok", "checks": [{"check",
    "status", "summary", "fix", "see", "details"}]}}.
    """
    return json.dumps(
        {
            "url": url,
            "ok": exit_status(verdicts) == 0,
            "checks": [
                {
                    "check": v.check,
                    "status": v.status,
                    "summary": v.summary,
                    "fix": v.fix,
                    "see": v.link,
                    "details": dict(v.details),
                }
                for v in verdicts
            ],
        },
        indent=1,
        default=str,
    )


def exit_status(verdicts: Sequence[Verdict]) -> int:
    return 1 if any(v.status == FAIL for v in verdicts) else 0
