"""
Tests for the end-to-end helpers of L{tests.e2e}: how long they wait for a
server to listen.
"""

from __future__ import annotations

import os

from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests import e2e


class WaitForListeningTests(TestCase):
    async def test_budgetInTheServersCPU(self) -> None:
        """
        Given the server's CPU seconds (C{spent}), the budget counts those:
        a server that has spent none of it is waited for past the budget's
        wall-clock seconds (a loaded box's slow start) and found once it
        listens.
        """
        port = e2e.freePort()

        def listen() -> None:
            listening = reactor.listenTCP(port, Factory.forProtocol(Protocol), interface="127.0.0.1")
            self.addCleanup(listening.stopListening)

        # Listening starts five budgets later.
        reactor.callLater(0.5, listen)
        await e2e.waitForListening(reactor, port, lambda: True, timeout=0.1, interval=0.05, spent=lambda: 0.0)

    async def test_budgetSpent(self) -> None:
        """
        A server that has used up its CPU budget without listening fails
        at once, saying so.
        """
        port = e2e.freePort()
        with self.assertRaises(e2e.ServerFailed) as caught:
            await e2e.waitForListening(reactor, port, lambda: True, timeout=1.0, spent=lambda: 1.5)
        self.assertIn("of the server's CPU", str(caught.exception))

    async def test_wallClockWithoutSpent(self) -> None:
        """
        Without C{spent} the budget is wall-clock seconds (programs that
        are not the server: an upstream, a proxy).
        """
        port = e2e.freePort()
        with self.assertRaises(e2e.ServerFailed) as caught:
            await e2e.waitForListening(reactor, port, lambda: True, timeout=0.1, interval=0.05)
        self.assertIn("within 0.1s", str(caught.exception))


class ProcessCPUTests(SynchronousTestCase):
    def test_thisProcess(self) -> None:
        """
        L{e2e.processCPU} reads a live process's CPU seconds (its own and
        its reaped children's); a process that is not there has used none.
        """
        times = os.times()
        mine = times.user + times.system + times.children_user + times.children_system
        self.assertAlmostEqual(e2e.processCPU(os.getpid()), mine, delta=0.1)
        self.assertEqual(e2e.processCPU(2**22 + 1), 0.0)
