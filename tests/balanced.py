"""
Several C{twist smeldr-oauth --database …} processes on one private
PostgreSQL database behind a real HAProxy (L{tests.haproxy}: round-robin
per request, no stickiness), for the tests of a deployment that scales
out: L{startBalanced}.

What it gives back looks like L{tests.e2e.RunningServer} where clients
and drivers need it (C{issuer}, C{mcpURL}, C{log}, C{annotate}), so that
the end-to-end tests' drivers run through the balancer unchanged.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence
from typing import Any

import attr
from twisted.trial.unittest import TestCase

from tests import e2e, postgres
from tests.haproxy import RunningProxy, reserveFrontend, startHAProxy

#: An access-log line of the server: its method and path.
_ACCESS = re.compile(r'"(GET|POST|DELETE|PUT|HEAD|OPTIONS) (\S+) HTTP/1\.[01]"')


@attr.s(auto_attribs=True)
class Balanced:
    """
    The processes, the balancer, and the database they share.

    @ivar issuer: the balancer's URL, every process's C{--issuer}.
    @ivar url: the PostgreSQL URL.
    """

    issuer: str
    mcpURL: str
    url: str
    servers: list[e2e.RunningServer]
    proxy: RunningProxy

    def log(self) -> str:
        return "".join(f"--- process {n} ---\n{s.log()}" for n, s in enumerate(self.servers))

    def annotate(self, message: str) -> str:
        return self.proxy.annotate(
            message + "".join(f"\n--- process {n} ---\n{s.log()}" for n, s in enumerate(self.servers))
        )

    def requests(self) -> list[list[tuple[str, str]]]:
        """
        The requests each process has answered so far (method, path), from
        its access log.
        """
        return [_ACCESS.findall(s.log()) for s in self.servers]

    async def siteToken(self, reactor: Any, name: str = "e2e") -> str:
        """
        A site token made with the admin command, on the shared database.
        """
        command = [*e2e.adminCommand(), "token", "create", name, "--database", self.url]
        out, err, code = await e2e.runProgram(reactor, command)
        if code != 0 or not out.split():
            raise e2e.ServerFailed(self.annotate(f"{' '.join(command)} exited {code}: {err}"))
        return out.split()[-1]


async def startBalanced(
    testCase: TestCase, reactor: Any, extraArguments: Sequence[str] = (), processes: int = 3, **proxy: Any
) -> Balanced:
    """
    Start C{processes} servers on a fresh database of the test cluster,
    with the balancer's URL as their issuer, and HAProxy in front (its
    knobs in C{proxy}: e.g. C{healthCheck="/healthz"}).  Everything stops
    at the test's cleanup.
    """
    url = postgres.database_url(testCase)
    frontend = reserveFrontend(testCase)
    issuer = frontend.url("http")
    directory = os.path.abspath(testCase.mktemp())
    servers = []
    for n in range(processes):
        port = e2e.freePort()
        where = os.path.join(directory, f"process{n}")
        os.makedirs(where)
        argv = [
            sys.executable, "-m", "twisted", "--log-format=text", "smeldr-oauth",
            "--issuer", issuer,
            "--listen", f"tcp:{port}:interface=127.0.0.1",
            "--database", url,
            "--dev",
            *extraArguments,
        ]
        servers.append(await e2e.launchServer(testCase, reactor, argv, port, issuer, where))
    balancer = await startHAProxy(testCase, reactor, [s.port for s in servers], frontend=frontend, **proxy)
    return Balanced(issuer=issuer, mcpURL=issuer + "/mcp", url=url, servers=servers, proxy=balancer)
