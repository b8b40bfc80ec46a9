# -*- test-case-name: tests.test_service_lifeline -*-
"""
A child process that ends with the process that started it, however that
one ends (C{kill -9} included): the one place for the mechanisms.

A parent killed without a chance to clean up leaves its children running:
a worker keeps its share of the port, a test server its files, a load
generator its CPU.  Two mechanisms stop them, each where it fits:

  - B{The lifeline pipe} (L{child_pipes}, L{connect_to_parent}), for
    children that are ours and run a reactor: the C{--workers} processes.
    The parent holds the write end of a pipe and never writes; the child
    reads the other end on its reactor.  End of file means the parent is
    gone, and the child stops the way it stops on SIGTERM (its services
    close their ports and pools).  Portable, and it needs nothing in the
    child before its reactor runs.  The same pair of descriptors carries a
    status pipe back to the parent (the worker's C{ready} line).
  - B{The kernel's parent-death signal} (Linux, C{prctl(PR_SET_PDEATHSIG)},
    kept across C{exec}), for programs that cannot watch a pipe: the
    servers, Node and Python clients, Chromium and PostgreSQL the tests
    start, the bench's servers and load generators.  Three ways to ask for
    it: L{die_with_parent} first thing in a Python child; L{preexec} as
    L{subprocess.Popen}'s C{preexec_fn}; L{bound}, a command line that runs
    a few lines of Python (L{LAUNCHER}) which set it and then C{exec} the
    program (same pid, same streams, same signals), for
    C{reactor.spawnProcess}, which has no C{preexec_fn}.

Two limits of the signal, both the kernel's:
  - it comes when the I{thread} that started the child ends: start
    children from the reactor thread (what C{reactor.spawnProcess} does),
    or from a thread that lives as long as they do;
  - it binds one process, not its descendants: a program that starts
    long-lived children of its own must start them bound too
    (L{bound_executable}), or be replaced by what it starts.

Outside Linux the signal is not available: L{bound} returns the command
unchanged and L{die_with_parent} raises L{OSError}.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shlex
import signal
import sys
from collections.abc import Sequence
from typing import Any, Callable, Optional

from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

# --- The lifeline pipe --------------------------------------------------------------------


def child_pipes(lifeline: int, status: int) -> dict[int, str]:
    """
    The C{childFDs} entries (for C{reactor.spawnProcess}) of the two pipes:
    the child reads C{lifeline} (the parent holds the write end and never
    writes), and writes C{status} (the parent reads it).
    """
    return {lifeline: "w", status: "r"}


class _ParentWatch(Protocol):
    """
    The child's end of the pipes: end of file on the lifeline means the
    parent is gone.
    """

    def __init__(self, gone: Callable[[], None]) -> None:
        self.gone = gone

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.gone()


def connect_to_parent(reactor: Any, lifeline: int, status: int, gone: Callable[[], None]) -> Any:
    """
    In the child: watch the lifeline on C{reactor}, and call C{gone} once
    when it ends (the parent is gone, or the returned transport was closed
    with C{loseConnection}).

    @return: A transport whose C{write} goes to the status pipe.
    """
    from twisted.internet.stdio import StandardIO

    return StandardIO(_ParentWatch(gone), stdin=lifeline, stdout=status, reactor=reactor)  # type: ignore[call-arg]


# --- The kernel's parent-death signal -----------------------------------------------------

#: From <linux/prctl.h>.
PR_SET_PDEATHSIG = 1

#: Run as C{python -I -S -c LAUNCHER PARENT_PID PROGRAM ARG...}: die with
#: the parent, then become C{PROGRAM}.  Only the standard library, and
#: C{-I -S} (no site, no environment): it costs a few milliseconds per
#: child.  What L{die_with_parent} does, written out because the launcher
#: cannot import this package.
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
_LAUNCH = ("-I", "-S", "-c", LAUNCHER)

_libc: Optional[Any] = None


def signal_supported() -> bool:
    """
    Whether this platform has the parent-death signal (Linux).
    """
    return sys.platform.startswith("linux")


def _prctl() -> Any:
    # Resolved once, in the parent: between fork and exec the child only
    # calls it.
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    return _libc.prctl


def die_with_parent(parent_pid: int, sig: int = signal.SIGKILL) -> None:
    """
    In a Python child, first thing: ask the kernel to send C{sig} to this
    process when its parent dies; if the parent (C{parent_pid}, the pid it
    had) is already gone, die now.

    @raise OSError: C{prctl} refused (not Linux, or seccomp).
    """
    if _prctl()(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_PDEATHSIG): {os.strerror(errno)}")
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), sig)


def preexec(parent_pid: Optional[int] = None, sig: int = signal.SIGKILL) -> Callable[[], None]:
    """
    A C{preexec_fn} for L{subprocess.Popen}: the child gets C{sig} when
    this process dies.  It runs after C{Popen} switches user (C{user=}),
    which would otherwise clear the setting.

    @param parent_pid: The parent's pid [default: this process's].
    """
    parent = os.getpid() if parent_pid is None else parent_pid
    prctl = _prctl()

    def child() -> None:
        # Between fork and exec: no allocation-heavy work, no exceptions
        # that need the interpreter in good shape.
        prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:
            os.kill(os.getpid(), sig)

    return child


def popen_kwargs() -> dict[str, Any]:
    """
    Keyword arguments for L{subprocess.Popen} and L{subprocess.run}: the
    child gets SIGKILL when this process dies.
    """
    return {"preexec_fn": preexec()}


def bound(argv: Sequence[str]) -> list[str]:
    """
    C{argv} made to die with this process: run the result instead (with
    C{reactor.spawnProcess}, whose executable is its first item, or with
    L{subprocess.Popen}).

    @param argv: The command; its first item is looked up on the child's
        C{PATH} when it has no slash.
    """
    if not signal_supported():
        return list(argv)
    return [sys.executable, *_LAUNCH, str(os.getpid()), *argv]


def spawn_bound(
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


def bound_executable(directory: str, executable: str) -> str:
    """
    Write an executable script into C{directory} that runs C{executable}
    bound to whatever process starts the script: for programs that another
    program starts and that can only be named by a path (selenium starts
    chromedriver, chromedriver starts Chromium).

    The binding is made when the script's shell reads its parent's pid: a
    starter that dies before that (between its C{fork} and the shell's
    first line) leaves the program bound to whoever adopted it.  The
    starters this is for (selenium, chromedriver) wait for their program
    to answer before anything could kill them.

    @return: The script's path; give it where C{executable} was given.
    """
    path = os.path.join(directory, "bound-" + os.path.basename(executable))
    if signal_supported():
        # $PPID: the process that ran the script, which the program must
        # not outlive.
        command = f'exec {shlex.join([sys.executable, *_LAUNCH])} "$PPID" {shlex.quote(executable)} "$@"'
    else:
        command = f'exec {shlex.quote(executable)} "$@"'
    with open(path, "w") as f:
        f.write(f"#!/bin/sh\n{command}\n")
    # Owner only: whoever starts it runs as this user.
    os.chmod(path, 0o700)
    return path
