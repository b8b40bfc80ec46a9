"""
SIGTERM on a real C{twist smeldr-oauth} process: it stops accepting, ends
its SSE streams cleanly (the stream's HTTP response completes rather than
being cut), closes its database pools and exits.
"""

from __future__ import annotations


import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from tests import e2e
from tests.test_conformance import httpClient, obtainAccessToken


class ShutdownTests(TestCase):
    timeout = 60

    async def test_sigterm_ends_streams_cleanly(self) -> None:
        server = await e2e.startServer(self, reactor, ["--keepalive", "1"])
        siteToken = await e2e.createSiteToken(reactor, server, "shutdown")
        http = httpClient(self)
        token = await obtainAccessToken(http, server, siteToken)

        response = await http.get(
            server.mcpURL,
            headers={"Authorization": f"Bearer {token}", "Accept": "text/event-stream"},
            unbuffered=True,
        )
        self.assertEqual(response.code, 200, server.annotate("legacy SSE GET"))
        received: list[bytes] = []
        first: Deferred[None] = Deferred()

        def collect(data: bytes) -> None:
            received.append(data)
            if not first.called:
                first.callback(None)

        done = treq.collect(response, collect)
        await first
        self.assertIn(b"event: endpoint", b"".join(received))

        server._process.signalProcess("TERM")
        # The stream's response must complete, not fail mid-body.
        await done
        await server._collector.ended
        # twist re-raises the signal once the reactor has stopped cleanly, so
        # the conventional "terminated by SIGTERM" status is the clean one.
        self.assertIn(server._collector.status(), (0, -15), server.annotate("exit status after SIGTERM"))
        log = server.log()
        self.assertIn("Main loop terminated", log)
        self.assertNotIn("Traceback", log, server.annotate("traceback at shutdown"))
        self.assertIn("Received SIGTERM", log)
        self.assertNotIn(token, log)
        self.assertNotIn(siteToken, log)

        # Nothing listens any more.
        from twisted.internet.error import ConnectionRefusedError

        with self.assertRaises(ConnectionRefusedError):
            await treq.get(server.issuer + "/healthz")
        await deferLater(reactor, 0, lambda: None)
