"""
Tests for L{smeldr_oauth.service.lifeline}: the lifeline pipe over real
pipes on the reactor, and the parent-death signal over real processes
killed with SIGKILL.

The launcher (L{lifeline.bound}) is tested where the suite relies on it,
C{tests/test_lifetime.py}; the workers' use of the pipe in
C{tests/test_service_workers.py} (a C{kill -9} of C{twist}).
"""

from __future__ import annotations

import os
import signal
import sys

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase, TestCase

from smeldr_oauth.service import lifeline
from tests.e2e import CHECKOUT, runProgram, subprocessEnvironment
from tests.test_lifetime import orphaned


class ChildPipesTests(SynchronousTestCase):
    def test_directions(self) -> None:
        """
        The child reads its lifeline and writes its status: the parent
        writes (never, in fact) to the first and reads the second.
        """
        self.assertEqual(lifeline.child_pipes(5, 6), {5: "w", 6: "r"})


class ConnectToParentTests(TestCase):
    """
    The child's side of the pipes, on the real reactor.
    """

    def pipes(self) -> tuple[int, int, int, int]:
        lifeline_read, lifeline_write = os.pipe()
        status_read, status_write = os.pipe()
        # The child's two ends belong to the transport; the parent's are
        # closed once, by the test or after it (a second close could hit a
        # descriptor number the reactor has taken again).
        self._open = {lifeline_write, status_read}
        self.addCleanup(lambda: [self.close(fd) for fd in list(self._open)])
        return lifeline_read, lifeline_write, status_read, status_write

    def close(self, fd: int) -> None:
        self._open.discard(fd)
        os.close(fd)

    async def test_parentGone(self) -> None:
        """
        End of file on the lifeline calls C{gone}, once; what the child
        wrote before reaches the status pipe.
        """
        lifeline_read, lifeline_write, status_read, status_write = self.pipes()
        gone: Deferred[None] = Deferred()
        transport = lifeline.connect_to_parent(reactor, lifeline_read, status_write, lambda: gone.callback(None))
        transport.write(b"ready\n")
        self.close(lifeline_write)
        await gone
        self.assertEqual(os.read(status_read, 100), b"ready\n")

    async def test_childStops(self) -> None:
        """
        A child that stops on its own closes its ends: C{gone} is called
        then too (the worker knows it was stopping, and ignores it).
        """
        lifeline_read, lifeline_write, status_read, status_write = self.pipes()
        gone: Deferred[None] = Deferred()
        transport = lifeline.connect_to_parent(reactor, lifeline_read, status_write, lambda: gone.callback(None))
        transport.loseConnection()
        await gone


class ParentDeathSignalTests(TestCase):
    """
    A parent killed with SIGKILL takes along the child that asked for the
    signal, whichever way it asked.
    """

    timeout = 60

    def setUp(self) -> None:
        if not lifeline.signal_supported():
            self.fail("the parent-death signal is Linux's: run the suite on Linux")

    async def orphaned(self, child: str) -> dict[int, str]:
        """
        Run a parent that starts C{child} (Python code that sets C{child}
        to a L{subprocess.Popen}), kill it with SIGKILL: what is left.
        """
        parent = (
            "import os, subprocess, sys\n"
            "from smeldr_oauth.service import lifeline\n"
            f"{child}\n"
            "print(child.pid, flush=True)\n"
            "sys.stdin.read()\n"
        )
        return await orphaned(self, parent)

    async def test_preexec(self) -> None:
        """
        L{lifeline.popen_kwargs} (a C{preexec_fn}), as the bench starts its
        servers.
        """
        left = await self.orphaned("child = subprocess.Popen(['sleep', '600'], **lifeline.popen_kwargs())")
        self.assertEqual(left, {})

    async def test_dieWithParent(self) -> None:
        """
        L{lifeline.die_with_parent} first thing in a Python child, as the
        bench's load generators do.
        """
        code = (
            "import os, sys, time; from smeldr_oauth.service import lifeline; "
            "lifeline.die_with_parent(int(sys.argv[1])); print('set', flush=True); time.sleep(600)"
        )
        left = await self.orphaned(
            f"child = subprocess.Popen([sys.executable, '-c', {code!r}, str(os.getpid())],"
            " stdout=subprocess.PIPE); child.stdout.readline()"
        )
        self.assertEqual(left, {})

    async def test_parentAlreadyGone(self) -> None:
        """
        A child whose parent died before it asked (its parent pid is not
        the one it was given) dies at once, with the signal it asked for.
        """
        code = (
            "import os, signal; from smeldr_oauth.service import lifeline; "
            "lifeline.die_with_parent(os.getppid() + 1000000, signal.SIGTERM); print('alive')"
        )
        env = subprocessEnvironment()
        env["PYTHONPATH"] = CHECKOUT
        out, err, status = await runProgram(reactor, [sys.executable, "-c", code], env=env)
        self.assertEqual((out, status), ("", -signal.SIGTERM), err)


class BoundExecutableTests(TestCase):
    """
    L{lifeline.bound_executable}: a script that runs a program bound to
    whoever starts the script (selenium starts chromedriver so).
    """

    async def test_runsTheProgram(self) -> None:
        """
        The script runs the program with the arguments it was given (the
        launcher C{exec}s it: same streams, same exit status), and only its
        owner may run it.
        """
        directory = self.mktemp()
        os.mkdir(directory)
        script = lifeline.bound_executable(directory, sys.executable)
        self.assertEqual(os.path.basename(script), "bound-" + os.path.basename(sys.executable))
        self.assertEqual(os.stat(script).st_mode & 0o777, 0o700)
        out, err, status = await runProgram(reactor, [script, "-c", "import sys; print(sys.argv[1:]); sys.exit(3)", "a b"])
        self.assertEqual((out, status), ("['a b']\n", 3), err)

    async def test_diesWithItsStarter(self) -> None:
        """
        What the script runs dies with the process that ran the script.
        """
        directory = self.mktemp()
        os.mkdir(directory)
        script = lifeline.bound_executable(directory, "sleep")
        # The parent says it started the child once the child is bound
        # (the launcher has become sleep): a starter killed before the
        # script's shell read $PPID leaves nothing to bind to (see
        # bound_executable), and under load the test's SIGKILL could come
        # that early.
        parent = (
            "import os, subprocess, sys\n"
            f"child = subprocess.Popen([{script!r}, '600'])\n"
            "while open(f'/proc/{child.pid}/comm').read().strip() != 'sleep':\n"
            "    os.sched_yield()\n"
            "print(child.pid, flush=True)\n"
            "sys.stdin.read()\n"
        )
        left = await orphaned(self, parent)
        self.assertEqual(left, {})
