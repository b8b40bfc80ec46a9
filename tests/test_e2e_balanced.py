"""
The real clients' end-to-end tests again, through a real load balancer:
three C{twist smeldr-oauth --database …} processes on one PostgreSQL
behind HAProxy, round-robin per request with no stickiness
(L{tests.balanced}), so that every flow's requests are spread over the
processes.  Each test of the single-server suites runs unchanged but for
the server it is given; each driver run must have reached at least two of
the processes (from their access logs).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor

from tests import test_e2e_python_sdk as python_sdk
from tests.balanced import Balanced, startBalanced
from tests.e2e import checkDriver


class BalancedMixin:
    """
    Replaces a client test case's single server by L{startBalanced}'s.
    """

    timeout = 240

    async def serve(self, *extraArguments: str) -> tuple[Balanced, str]:
        balanced = await startBalanced(self, reactor, extraArguments)  # type: ignore[arg-type]
        return balanced, await balanced.siteToken(reactor)

    def assertSpread(self, server: Balanced, before: list[int], what: str) -> None:
        """
        The requests since C{before} (counts per process) reached at least
        two processes.
        """
        after = [len(r) for r in server.requests()]
        touched = [n for n, (b, a) in enumerate(zip(before, after)) if a > b]
        self.assertGreaterEqual(  # type: ignore[attr-defined]
            len(touched), 2, server.annotate(f"{what} reached only processes {touched}")
        )


class PythonSDKBalancedTests(BalancedMixin, python_sdk.PythonSDKTests):
    """
    The official Python SDK (2.x), both transports, dynamic registration
    and client metadata documents, refresh and revoke-then-recover.
    """

    async def drive(self, server: Any, siteToken: str, *arguments: str) -> dict[str, Any]:
        before = [len(r) for r in server.requests()]
        report, out, err, code = await self.runDriver(server, siteToken, *arguments)
        report = checkDriver(self, server, arguments, report, out, err, code)
        self.assertSpread(server, before, " ".join(arguments) or "the flow")
        return report
