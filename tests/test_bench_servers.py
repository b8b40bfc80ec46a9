"""
Tests for L{bench.servers}: how long the bench waits for a server to
listen.
"""

from __future__ import annotations

import subprocess
import sys
import threading

from twisted.trial.unittest import SynchronousTestCase

from bench import servers

#: Listens on the port it is given once a line arrives on its stdin; spends
#: no CPU while it waits (as a server start on a busy box waits for a core).
_LISTENER = (
    "import socket, sys\n"
    "sys.stdin.readline()\n"
    "s = socket.socket(); s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen()\n"
    "sys.stdin.readline()\n"
)


class WaitListeningTests(SynchronousTestCase):
    def test_budgetInTheServersCPU(self) -> None:
        """
        L{servers._wait_listening}'s budget is the server's CPU seconds: a
        server that listens only after more wall-clock seconds than the
        budget, having spent less than it, is found.
        """
        port = servers.free_port()
        process = subprocess.Popen(
            [sys.executable, "-c", _LISTENER, str(port)], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL
        )
        self.addCleanup(process.wait)
        self.addCleanup(process.kill)
        assert process.stdin is not None
        stdin = process.stdin
        self.addCleanup(stdin.close)
        # The interpreter's start is about 0.05 s of CPU: well inside 0.3.
        go = threading.Timer(1.0, lambda: (stdin.write(b"listen\n"), stdin.flush()))
        go.start()
        self.addCleanup(go.join)
        servers._wait_listening(port, process, self.mktemp(), timeout=0.3)
