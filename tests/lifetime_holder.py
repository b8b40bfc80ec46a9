"""
Not part of the suite (trial collects only C{test_*} modules): the trial
module that L{tests.test_lifetime} runs in a child trial process and kills
with SIGKILL while it holds one child of each kind the suite starts: a
C{twist smeldr-oauth} server, a Node program, chromedriver and Chromium.
"""

from __future__ import annotations

import os
import shutil
import sys

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.e2e import runProgram, startServer
from tests.test_browser_pages import Browser

#: What the holder prints once everything runs.
HOLDING = "HOLDING"


class Holder(TestCase):
    timeout = 600

    async def test_hold(self) -> None:
        """
        Start the children the way the suite does, say so, and wait to be
        killed.
        """
        await startServer(self, reactor)
        node = shutil.which("node")
        assert node is not None
        # An idle Node program, started as the client drivers are.
        Deferred.fromCoroutine(runProgram(reactor, [node, "-e", "setInterval(() => {}, 1000)"], timeout=600))
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        browser = await deferToThread(Browser.start, os.path.join(directory, "chromedriver.log"))
        self.addCleanup(deferToThread, browser.quit)
        sys.stdout.write(f"\n{HOLDING}\n")
        sys.stdout.flush()
        await Deferred()
