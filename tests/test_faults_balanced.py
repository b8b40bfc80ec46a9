"""
Fault tests behind a real load balancer: three C{twist smeldr-oauth
--database …} processes on one PostgreSQL, behind L{tests.haproxy}
(round-robin per request, no stickiness, health checks on C{/healthz},
redispatch of refused connections), while hundreds of OAuth flows are in
flight.

One process is killed with C{kill -9} mid-run.  The flows go on through the
other two (a flow that lost an answer starts again, as a client does);
afterwards every token a client holds still works, no code and no rotated
refresh token can be used a second time (each is tried), and the database
passes L{tests.integrity}'s checks.
"""

from __future__ import annotations

import json
import os
import signal
from typing import Any, Optional
from urllib.parse import parse_qs, urlsplit

import attr
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredSemaphore, gatherResults
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from bench.loadgen import MODERN_VERSION, TOOL, pkce_pair, tools_call_body
from smeldr_oauth.db import open_database
from tests import integrity, postgres
from tests.balanced import startBalanced
from tests.test_store_sqlite import InlineReactor

REDIRECT = "http://127.0.0.1:33418/callback"
#: The flows of the load, and how many run at once.
FLOWS = 200
CONCURRENCY = 40
#: A flow that lost an answer (its process was killed under it) starts
#: again from the registration, at most this many times.
ATTEMPTS = 6
#: Flows finished before the fault.
FAULT_AFTER = 40

#: Limits out of the way: the load comes from one address.
NO_LIMITS = (
    "--registration-limit", "1000000",
    "--paste-limit", "1000000",
    "--token-limit-per-address", "1000000",
    "--token-limit-per-client", "1000000",
)


class FlowFailed(Exception):
    """
    A step of a flow did not get its answer.

    @ivar retry_after: seconds the server (or the balancer) asked to wait.
    """

    def __init__(self, message: str, retry_after: Optional[float] = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@attr.s(auto_attribs=True)
class Flow:
    """
    What one client ended up holding, and what it used and must not be
    able to use again.
    """

    client_id: str
    code: str
    verifier: str
    rotated_refresh: str
    access_token: str
    refresh_token: str


class BalancedFaultTests(TestCase):
    """
    The load and the checks; subclasses choose the fault.
    """

    timeout = 600

    async def start(self) -> None:
        balanced = await startBalanced(
            self, reactor, ("--refresh-grace", "1", *NO_LIMITS), healthCheck="/healthz", checkInterval=0.2
        )
        self.url, self.issuer, self.servers, self.proxy = balanced.url, balanced.issuer, balanced.servers, balanced.proxy
        self.site_token = await balanced.siteToken(reactor, "alice")
        pool = HTTPConnectionPool(reactor)
        pool.maxPersistentPerHost = CONCURRENCY
        self.addCleanup(pool.closeCachedConnections)
        self.http = treq.client.HTTPClient(Agent(reactor, pool=pool))

    async def call(self, method: str, path: str, expect: int, **kwargs: Any) -> Any:
        try:
            response = await self.http.request(method, self.issuer + path, allow_redirects=False, **kwargs)
            body = await response.content()
        except Exception as e:
            raise FlowFailed(f"{path}: {e!r}") from e
        if response.code != expect:
            wait = None
            if response.code == 503:
                # The server's Retry-After, or a second when the balancer
                # has no server to offer (its own 503 says nothing).
                wait = float((response.headers.getRawHeaders("retry-after") or ["1"])[0])
            raise FlowFailed(f"{path}: {response.code} {body[:200]!r}", wait)
        return response, body

    async def form(self, path: str, expect: int, **fields: str) -> Any:
        return await self.call("POST", path, expect, data=fields)

    async def token(self, expect: int, **fields: str) -> Any:
        _, body = await self.form("/oauth/token", expect, **fields)
        return json.loads(body)

    async def tool(self, access_token: str, expect: int = 200) -> None:
        headers = {
            "Authorization": [f"Bearer {access_token}"],
            "Content-Type": ["application/json"],
            "Accept": ["application/json, text/event-stream"],
            "MCP-Protocol-Version": [MODERN_VERSION],
            "Mcp-Method": ["tools/call"],
            "Mcp-Name": [TOOL],
        }
        _, body = await self.call("POST", "/mcp", expect, data=tools_call_body(1, True), headers=headers)
        if expect == 200 and "result" not in json.loads(body):
            raise FlowFailed(f"tools/call: {body[:200]!r}")

    async def one_flow(self) -> Flow:
        """
        Registration, consent with the site token, code exchange, one
        refresh, one tool call with the refreshed token.
        """
        _, body = await self.call(
            "POST", "/oauth/register", 201,
            json={"redirect_uris": [REDIRECT], "token_endpoint_auth_method": "none", "client_name": "load"},
        )
        client_id = json.loads(body)["client_id"]
        verifier, challenge = pkce_pair()
        response, _ = await self.form(
            "/oauth/authorize", 303,
            response_type="code", client_id=client_id, redirect_uri=REDIRECT,
            scope="read write offline_access", code_challenge=challenge, code_challenge_method="S256",
            resource=self.issuer + "/mcp", decision="approve", site_token=self.site_token,
        )
        location = response.headers.getRawHeaders("location")[0]
        query = parse_qs(urlsplit(location).query)
        if "code" not in query:
            raise FlowFailed(f"authorize: {location}")
        code = query["code"][0]
        first = await self.token(
            200, grant_type="authorization_code", code=code, code_verifier=verifier, client_id=client_id,
            redirect_uri=REDIRECT,
        )
        second = await self.token(
            200, grant_type="refresh_token", refresh_token=first["refresh_token"], client_id=client_id
        )
        await self.tool(second["access_token"])
        return Flow(client_id, code, verifier, first["refresh_token"], second["access_token"], second["refresh_token"])

    async def flow(self) -> Flow:
        for _ in range(ATTEMPTS):
            try:
                flow = await self.one_flow()
            except FlowFailed as e:
                self.failures.append(str(e))
                if e.retry_after is not None:
                    await deferLater(reactor, e.retry_after, lambda: None)
                continue
            self.finished.append(flow)
            if len(self.finished) == FAULT_AFTER:
                self.faults.append(Deferred.fromCoroutine(self.fault()))
            return flow
        raise FlowFailed(f"{ATTEMPTS} attempts failed: {self.failures[-ATTEMPTS:]}")

    async def fault(self) -> None:
        raise NotImplementedError()

    async def load(self) -> list[Flow]:
        """
        Run L{FLOWS} flows, L{CONCURRENCY} at a time, with L{fault} once
        L{FAULT_AFTER} have finished; then check what the clients hold,
        and the database.
        """
        await self.start()
        self.finished: list[Flow] = []
        self.failures: list[str] = []
        self.faults: list[Deferred[None]] = []
        limit = DeferredSemaphore(CONCURRENCY)
        flows = await gatherResults(
            [limit.run(lambda: Deferred.fromCoroutine(self.flow())) for _ in range(FLOWS)], consumeErrors=True
        )
        await gatherResults(self.faults)
        self.assertEqual((len(flows), len(self.faults)), (FLOWS, 1))
        for server in self.servers:
            self.assertIn('"POST /oauth/token', server.log(), server.annotate("a process served no token request"))

        # Every token a client holds works, through the two processes left.
        for flow in flows:
            await self.tool(flow.access_token)
        # A rotated refresh token is refused once its grace second is over
        # (and its grant revoked, as a replay); a code, always.
        await deferLater(reactor, 1.1, lambda: None)
        for flow in flows:
            await self.token(400, grant_type="refresh_token", refresh_token=flow.rotated_refresh,
                             client_id=flow.client_id)
            await self.token(
                400, grant_type="authorization_code", code=flow.code, code_verifier=flow.verifier,
                client_id=flow.client_id, redirect_uri=REDIRECT,
            )
        # The replays revoked the grants, in whichever process took them;
        # every process heard (LISTEN/NOTIFY) and refuses the tokens.
        for flow in flows:
            await self.tool(flow.access_token, expect=401)

        database = open_database(self.url, InlineReactor(), threads=0)
        self.addCleanup(database.close)
        problems = await integrity.problems(database, reactor.seconds())
        self.assertEqual(problems, [], self.proxy.annotate("integrity"))
        return flows


class KillTests(BalancedFaultTests):
    async def fault(self) -> None:
        """
        C{kill -9} of one of the three processes.
        """
        victim = self.servers[1]
        self.served_before_kill = victim.log().count('"POST /oauth/token')
        os.kill(victim._process.pid, signal.SIGKILL)

    async def test_kill_one_of_three(self) -> None:
        """
        The flows go on through the two processes left: the balancer's
        health checks take the dead one out, and a connection it refuses
        is sent to another.
        """
        await self.load()
        victim = self.servers[1]
        self.assertFalse(victim.isRunning())
        self.assertGreater(self.served_before_kill, 0, victim.annotate("the killed process served nothing"))


class DatabaseRestartTests(BalancedFaultTests):
    async def fault(self) -> None:
        """
        PostgreSQL stopped for a second, then started again.  The blocking
        stop runs in a thread, so the load goes on meanwhile; the start
        runs on this one, the server's parent thread (it is bound to die
        with it: C{PR_SET_PDEATHSIG} follows the thread).
        """
        cluster = postgres.cluster()
        self.addCleanup(cluster.start)
        await deferToThread(cluster.stop)
        self.outage_failures = len(self.failures)
        await deferLater(reactor, 1.0, lambda: None)
        cluster.start()

    async def test_restart_database(self) -> None:
        """
        Requests during the outage get 503 (with C{Retry-After}, from the
        servers; or the balancer's own while every health check fails);
        clients that wait and try again finish their flows; the servers
        recover by themselves.
        """
        await self.load()
        self.assertTrue(all(server.isRunning() for server in self.servers))
        self.assertTrue(any(" 503 " in f for f in self.failures), self.failures[:10])
