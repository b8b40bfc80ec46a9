# -*- test-case-name: tests.test_lifetime -*-
"""
Child processes that die with the process that started them, however it
ends: the one way every program the tests start (C{twist} servers, Node and
Python clients, pip, chromedriver and its Chromium) is started.

A run interrupted half-way (Ctrl-C, a cancelled CI job, C{kill -9} of trial)
runs no cleanup, and a server left behind keeps its port, its files and, on
a shared machine, its CPU. So the kernel does the job: the command is run
through a few lines of Python (L{LAUNCHER}) that ask Linux to SIGKILL the
process when its parent dies (C{PR_SET_PDEATHSIG}, kept across C{exec}) and
then C{exec} the real program, which keeps the pid, the standard streams and
every signal a test sends it.

Two limits, both of the kernel feature:
  - The signal comes when the I{thread} that started the child ends. Start
    children from the reactor thread (what C{reactor.spawnProcess} does), or
    from a thread that lives as long as they do: Twisted's thread pool keeps
    its threads until the reactor stops.
  - It binds one process, not its descendants. A program that starts
    long-lived children of its own must start them bound too (chromedriver
    gets a bound Chromium: L{boundExecutable}), or be replaced by what it
    starts (C{node} on mcp-remote's script rather than C{npx}, which forks).

Outside Linux commands are returned unchanged.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Sequence
from typing import Any, Optional

#: Run as C{python -c LAUNCHER PARENT_PID PROGRAM ARG...}: die with the
#: parent, then become C{PROGRAM}. Only the standard library, and C{-I -S}
#: (no site, no environment): it costs a few milliseconds per child.
LAUNCHER = """\
import ctypes, os, signal, sys
PR_SET_PDEATHSIG = 1
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
    sys.stderr.write("lifetime: prctl: %s\\n" % os.strerror(ctypes.get_errno()))
    os._exit(126)
if os.getppid() != int(sys.argv[1]):
    # The parent died before the prctl: nothing would ever signal us.
    os._exit(125)
try:
    os.execvp(sys.argv[2], sys.argv[2:])
except OSError as e:
    sys.stderr.write("lifetime: cannot run %s: %s\\n" % (sys.argv[2], e.strerror))
    os._exit(127)
"""

#: The interpreter options the launcher runs with.
_PYTHON = ("-I", "-S", "-c", LAUNCHER)


def _supported() -> bool:
    return sys.platform.startswith("linux")


def bound(argv: Sequence[str]) -> list[str]:
    """
    C{argv} made to die with this process: run the result instead (with
    C{reactor.spawnProcess}, whose executable is its first item, or with
    L{subprocess.Popen}).

    @param argv: The command; its first item is looked up on the child's
        C{PATH} when it has no slash.
    """
    if not _supported():
        return list(argv)
    return [sys.executable, *_PYTHON, str(os.getpid()), *argv]


def spawnBound(
    reactor: Any,
    protocol: Any,
    argv: Sequence[str],
    env: Optional[dict[str, str]] = None,
    path: Optional[str] = None,
) -> Any:
    """
    C{reactor.spawnProcess(protocol, argv[0], argv, env, path)}, bound to
    this process: see L{bound}.

    @return: The process transport (its pid is the program's).
    """
    command = bound(argv)
    return reactor.spawnProcess(protocol, command[0], command, env=env, path=path)


def boundExecutable(directory: str, executable: str) -> str:
    """
    Write an executable script into C{directory} that runs C{executable}
    bound to whatever process starts the script: for programs that another
    program starts and that can only be named by a path (selenium starts
    chromedriver, chromedriver starts Chromium).

    @return: The script's path; give it where C{executable} was given.
    """
    path = os.path.join(directory, "bound-" + os.path.basename(executable))
    if _supported():
        # $PPID: the process that ran the script, which the program must
        # not outlive.
        command = (
            f"exec {shlex.join([sys.executable, *_PYTHON])} \"$PPID\" {shlex.quote(executable)} \"$@\""
        )
    else:
        command = f"exec {shlex.quote(executable)} \"$@\""
    with open(path, "w") as f:
        f.write(f"#!/bin/sh\n{command}\n")
    os.chmod(path, 0o755)
    return path
