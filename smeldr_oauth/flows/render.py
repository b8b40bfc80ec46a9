# -*- test-case-name: tests.test_flows_render -*-
"""
A timeline for people (a table with the missing step marked) and for
scripts (JSON); the admin command and the operator's page both use these.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

from smeldr_oauth.flows.model import LABELS, Step
from smeldr_oauth.flows.patterns import Finding


def when(at: float) -> str:
    """A step's time, UTC, to the second."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(at))


def detail_text(step: Step) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(step.detail.items()))


def short(value: object, width: int) -> str:
    text = "" if value is None else str(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def table(steps: Sequence[Step], findings: Sequence[Finding]) -> list[str]:
    """
    The timeline as lines: one per step, then one per finding, each
    finding marked C{✗} with its section of the troubleshooting guide.
    """
    if not steps:
        return ["no steps recorded"]
    lines = [f"{'time (UTC)':19}  {'step':18}  {'outcome':14}  {'client':24}  {'grant':12}  detail"]
    for step in steps:
        lines.append(
            f"{when(step.at):19}  {LABELS.get(step.kind, step.kind):18}  {short(step.outcome, 14):14}  "
            f"{short(step.client_id or '-', 24):24}  {short(step.grant_id or '-', 12):12}  "
            f"{detail_text(step)}"
        )
    for finding in findings:
        lines.append(f"✗ {finding.message}")
        lines.append(f"  see {finding.link}")
    return lines


def document(steps: Sequence[Step], findings: Sequence[Finding]) -> dict[str, Any]:
    """The timeline as one JSON document."""
    return {"steps": [s.as_json() for s in steps], "findings": [f.as_json() for f in findings]}
