"""
Processes the bench starts die with it, even when it is killed with
C{SIGKILL} and has no chance to clean up.

Linux delivers a chosen signal to a process when its parent dies
(C{prctl(PR_SET_PDEATHSIG)}); the setting survives C{exec}, so a server
started with L{popen_kwargs} or a worker that calls L{die_with_parent}
first thing is killed by the kernel the moment the bench goes, whatever
killed it.  The setting is made in the child, between C{fork} and C{exec};
a parent that died before that point is caught by comparing C{getppid()}
with the pid the parent had.

The signal follows the parent I{thread}, not the process: start children
from the thread that lives as long as the run (the bench has one).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
from typing import Any, Callable, Optional

#: From <linux/prctl.h>.
PR_SET_PDEATHSIG = 1

_libc: Optional[Any] = None


def _prctl() -> Any:
    # Resolved once, in the parent: between fork and exec the child only
    # calls it.
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    return _libc.prctl


def die_with_parent(parent_pid: int, sig: int = signal.SIGKILL) -> None:
    """
    Ask the kernel to send C{sig} to this process when its parent dies; if
    the parent (C{parent_pid}) is already gone, die now.

    @raise OSError: when C{prctl} refuses (not Linux, or seccomp).
    """
    if _prctl()(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_PDEATHSIG): {os.strerror(errno)}")
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), sig)


def preexec(parent_pid: Optional[int] = None) -> Callable[[], None]:
    """A C{preexec_fn} for L{subprocess.Popen}: the child dies with this process."""
    parent = os.getpid() if parent_pid is None else parent_pid
    prctl = _prctl()

    def child() -> None:
        # Between fork and exec: no allocation-heavy work, no exceptions
        # that need the interpreter in good shape.
        prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)

    return child


def popen_kwargs() -> dict[str, Any]:
    """Keyword arguments for L{subprocess.Popen} and L{subprocess.run}."""
    return {"preexec_fn": preexec()}
