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

import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import deferLater

from tests import test_e2e_mcp_remote as mcp_remote
from tests import test_e2e_python_sdk as python_sdk
from tests import test_e2e_typescript_sdk as typescript_sdk
from tests.balanced import Balanced, startBalanced
from tests.e2e import checkDriver


#: The drivers wait this long after a revocation before they probe the
#: revoked token: a revocation reaches every process pushed over
#: LISTEN/NOTIFY (measured in milliseconds; the documented bound is one
#: second, docs/deployment.md), so a probe the instant the revoke is
#: answered may land on a process not told yet, and one 0.2 s later must be
#: refused wherever it lands.  Not the whole second: the TypeScript SDK
#: reopens a stream the revocation closed after one second, and a probe
#: that late would race that reconnection's own recovery.
REVOKE_SETTLE_SECONDS = "0.2"
#: The variable both drivers read (tests/clients/python_sdk_client.py,
#: tests/node/ts_sdk_client.mjs).
REVOKE_SETTLE = "SMELDR_REVOKE_SETTLE_SECONDS"


class BalancedMixin:
    """
    Replaces a client test case's single server by L{startBalanced}'s.
    """

    timeout = 240

    async def serve(self, *extraArguments: str) -> tuple[Balanced, str]:
        os.environ[REVOKE_SETTLE] = REVOKE_SETTLE_SECONDS
        self.addCleanup(os.environ.pop, REVOKE_SETTLE, None)  # type: ignore[attr-defined]
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


class WholeTestSpread(BalancedMixin):
    """
    For suites that record a matrix row per test: no row (the
    single-server run records it), and the whole test's requests must have
    reached two processes or more.
    """

    async def serve(self, *extraArguments: str) -> tuple[Balanced, str]:
        self.balanced, siteToken = await super().serve(*extraArguments)
        return self.balanced, siteToken

    async def matrix(self, transport: str, identity: str, case: str, body: Any) -> None:
        await body()
        self.assertSpread(self.balanced, [0] * len(self.balanced.servers), f"{transport} {identity} {case}")


class TypeScriptSDKBalancedTests(WholeTestSpread, typescript_sdk.TypeScriptSDKTests):
    """
    The official TypeScript SDK, both transports, DCR and CIMD, refresh
    and revocations.
    """




class MCPRemoteBalancedTests(WholeTestSpread, mcp_remote.MCPRemoteTests):
    """
    mcp-remote's sign-in and proxying, both transports, DCR and CIMD.
    """

    async def revoke(self, server: Any, accessToken: str) -> None:
        """
        Revoke as the single-server test does, then wait what the drivers
        wait (L{REVOKE_SETTLE_SECONDS}) before mcp-remote's next call probes
        the token on whichever process the balancer picks.
        """
        await super().revoke(server, accessToken)
        await deferLater(reactor, float(REVOKE_SETTLE_SECONDS), lambda: None)
