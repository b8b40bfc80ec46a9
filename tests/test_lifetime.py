"""
Tests for L{tests.lifetime}: a test run killed with SIGKILL leaves no
server, client or browser running.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import sys
from typing import Any, Optional

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from tests import lifetime
from tests.e2e import CHECKOUT, runProgram, subprocessEnvironment
from tests.lifetime_holder import HOLDING
from tests.prerequisites import require
from tests.test_browser_pages import requireBrowser

#: The variable that marks every process of one run (children inherit it).
MARK = "SMELDR_LIFETIME_MARK"


def marked(mark: str) -> dict[int, str]:
    """
    Every live process (not a zombie) whose environment carries C{mark}:
    its pid and command line.
    """
    found = {}
    needle = f"{MARK}={mark}".encode()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{name}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
            with open(f"/proc/{name}/cmdline", "rb") as f:
                command = f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
        except OSError:
            continue
        if state not in (b"Z", b"X"):
            found[int(name)] = command
    return found


def killMarked(mark: str) -> None:
    """
    Kill whatever a failed test left behind, so that a failure does not
    leave the processes it is about.
    """
    for pid in marked(mark):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


async def waitUntilMarked(mark: str, pid: int, timeout: float = 15.0) -> dict[int, str]:
    """
    Wait until process C{pid} is seen carrying C{mark}, or C{timeout}
    seconds have passed; give back every process seen carrying it.  A
    process in the middle of an C{execve} (a launcher becoming its program)
    shows an empty C{/proc/PID/environ} for a moment, so one look can miss
    a process that is there (seen once in CI: the child's pid absent, its
    parent present).
    """
    deadline = reactor.seconds() + timeout
    found = marked(mark)
    while pid not in found and reactor.seconds() < deadline:
        await deferLater(reactor, 0.05, lambda: None)
        found = marked(mark)
    return found


async def waitUntilGone(mark: str, timeout: float = 15.0) -> dict[int, str]:
    """
    Wait until no process carries C{mark}, or C{timeout} seconds have
    passed (the kernel's signal and the exit take a moment); give back what
    is left.
    """
    deadline = reactor.seconds() + timeout
    left = marked(mark)
    while left and reactor.seconds() < deadline:
        await deferLater(reactor, 0.1, lambda: None)
        left = marked(mark)
    return left


class _Watcher(ProcessProtocol):
    """
    Fire L{holding} when the child prints L{HOLDING}, L{ended} when it ends.
    """

    def __init__(self) -> None:
        self.output = b""
        self.holding: Deferred[None] = Deferred()
        self.ended: Deferred[None] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data
        if HOLDING.encode() in self.output and not self.holding.called:
            self.holding.callback(None)

    def errReceived(self, data: bytes) -> None:
        self.output += data

    def processEnded(self, reason: Failure) -> None:
        if not self.holding.called:
            self.holding.errback(
                AssertionError(f"ended before holding: {reason.value}\n{self.output.decode('utf-8', 'replace')}")
            )
        self.ended.callback(None)


class DiesWithTheTestProcessTests(TestCase):
    """
    A child trial starts children as the suite does, and is killed with
    SIGKILL: no cleanup of its runs, yet none of its children is left.
    """

    timeout = 120

    def setUp(self) -> None:
        requireBrowser()
        require(None if shutil.which("node") else "node is not on PATH", "apt-get install nodejs npm (Node >= 20)")

    async def test_killedTrialLeavesNothing(self) -> None:
        mark = secrets.token_hex(8)
        self.addCleanup(killMarked, mark)
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        env = subprocessEnvironment()
        env[MARK] = mark
        command = [
            sys.executable,
            "-m",
            "twisted.trial",
            f"--temp-directory={os.path.join(directory, '_trial_temp')}",
            "tests.lifetime_holder",
        ]
        watcher = _Watcher()
        trial = lifetime.spawnBound(reactor, watcher, command, env=env, path=CHECKOUT)
        await watcher.holding

        running = marked(mark)
        commands = "\n".join(f"{pid}: {line}" for pid, line in sorted(running.items()))
        self.assertIn(trial.pid, running, commands)
        for part in ("smeldr-oauth", "setInterval", "chromedriver", "--headless"):
            self.assertTrue([line for line in running.values() if part in line], f"no {part!r} in:\n{commands}")

        os.kill(trial.pid, signal.SIGKILL)
        await watcher.ended
        left = await waitUntilGone(mark)
        self.assertEqual(
            left,
            {},
            "left running after kill -9 of trial:\n" + "\n".join(f"{pid}: {line}" for pid, line in left.items()),
        )


class BoundTests(TestCase):
    """
    What L{lifetime.bound} keeps of the program: it I{is} the program.
    """

    async def test_sameProcess(self) -> None:
        """
        The launcher execs the program: same pid, same exit status, same
        output.
        """
        out, err, status = await runProgram(reactor, ["/bin/sh", "-c", "echo $PPID; exit 3"])
        self.assertEqual((status, err), (3, ""))
        self.assertEqual(int(out), os.getpid())

    async def test_notFound(self) -> None:
        out, err, status = await runProgram(reactor, ["/nonexistent/program"])
        self.assertEqual(status, 127)
        self.assertIn("cannot run /nonexistent/program", err)

    async def test_popenChildDiesWithItsParent(self) -> None:
        """
        L{lifetime.bound} with L{subprocess.Popen} (what C{bench/} uses): a
        parent killed with SIGKILL takes its child along.
        """
        parent = (
            "import subprocess, sys\n"
            "from tests.lifetime import bound\n"
            "child = subprocess.Popen(bound(['sleep', '600']))\n"
            "print(child.pid, flush=True)\n"
            "sys.stdin.read()\n"
        )
        left = await orphaned(self, parent, lifetime.spawnBound)
        self.assertEqual(left, {})


async def orphaned(case: TestCase, parent: str, spawn: Any = None) -> dict[int, str]:
    """
    Run C{parent} (Python code that starts a child, prints its pid, then
    reads its standard input), kill it with SIGKILL once the child is
    running, and give back what is left of the run.

    @param spawn: Starts the parent, called as L{lifetime.spawnBound}
        [default: C{reactor.spawnProcess}].
    """
    mark = secrets.token_hex(8)
    case.addCleanup(killMarked, mark)
    env = subprocessEnvironment()
    env[MARK] = mark
    env["PYTHONPATH"] = CHECKOUT
    watcher = _PidReader()
    argv = [sys.executable, "-c", parent]
    if spawn is None:
        process = reactor.spawnProcess(watcher, argv[0], argv, env=env)
    else:
        process = spawn(reactor, watcher, argv, env=env)
    child = await watcher.pid
    case.assertIn(child, await waitUntilMarked(mark, child))
    os.kill(process.pid, signal.SIGKILL)
    await watcher.ended
    return await waitUntilGone(mark)


class _PidReader(ProcessProtocol):
    """
    Fire L{pid} with the first line the child prints, as a number.
    """

    def __init__(self) -> None:
        self.buffer = b""
        self.pid: Deferred[int] = Deferred()
        self.ended: Deferred[None] = Deferred()
        self.reason: Optional[Failure] = None

    def outReceived(self, data: bytes) -> None:
        self.buffer += data
        if b"\n" in self.buffer and not self.pid.called:
            self.pid.callback(int(self.buffer.split(b"\n", 1)[0]))

    def processEnded(self, reason: Failure) -> None:
        if not self.pid.called:
            self.pid.errback(reason)
        self.ended.callback(None)
