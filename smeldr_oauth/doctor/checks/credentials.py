# -*- test-case-name: tests.test_doctor_checks -*-
"""
The checks that need the operator's site token: one MCP session kept
across requests (whatever a balancer does), and a real OAuth flow.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import attr

from smeldr_oauth.doctor.model import Verdict, fail, ok, skip


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class SessionProbe:
    """
    Requests made on one MCP session after its C{initialize}.

    @ivar statuses: the status of each request that named the session.
    @ivar session_id_given: the server gave a session id at all.
    """

    statuses: tuple[Optional[int], ...]
    session_id_given: bool


def check_session(probe: Optional[SessionProbe], reason: str = "") -> Verdict:
    """
    Requests on one session keep working, wherever a balancer sends them:
    the most reported MCP deployment fault is "session not found" behind a
    load balancer that spreads a session's requests over processes that do
    not share sessions.
    """
    if probe is None:
        return skip("session", reason or "needs a token (see --site-token-file)")
    if not probe.session_id_given:
        return ok("session", "the server is stateless (no Mcp-Session-Id)")
    good = sum(1 for s in probe.statuses if s is not None and 200 <= s < 300)
    if good == len(probe.statuses):
        return ok("session", f"{good} requests on one session all answered")
    lost = [s for s in probe.statuses if s == 404]
    if lost:
        return fail(
            "session",
            f"{len(lost)} of {len(probe.statuses)} requests on one session answered 404 (session not found)",
            "Requests of one session reach processes that do not share sessions: share them "
            "(smeldr-oauth on PostgreSQL), or make the balancer sticky on Mcp-Session-Id.",
            statuses=list(probe.statuses),
        )
    return fail(
        "session",
        f"requests on one session answered {', '.join(str(s) for s in probe.statuses)}",
        "Look at the server log for these requests.",
        statuses=list(probe.statuses),
    )


def check_flow(steps: Sequence[tuple[str, bool, str]], reason: str = "") -> Verdict:
    """
    The OAuth flow the doctor ran with the operator's site token.

    @param steps: (step, succeeded, what was seen) in order; the flow stops
        at the first failed step.
    """
    if not steps:
        return skip("flow", reason or "not run: give a site token (--site-token-file) to run a real flow")
    for step, good, seen in steps:
        if not good:
            return fail(
                "flow",
                f"{step}: {seen}",
                "Run the same flow with a client (see the section) and read the server log at that step.",
                step=step,
            )
    return ok("flow", ", ".join(step for step, _, _ in steps))
