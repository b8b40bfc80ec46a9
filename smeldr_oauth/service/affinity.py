# -*- test-case-name: tests.test_service_affinity -*-
"""
C{--pin-cpus}: each serving process, all its threads, on one CPU.

Why: a process's Python runs on one core at a time whatever its threads
(the GIL), but on PostgreSQL a worker has more than one thread that wants
it: the reactor's, and the database pool's (adbapi), which build a
batch's statements and read its answers.  Left to the scheduler, they run
on different cores and hand the interpreter over between them, its hot
state moving from one core's cache to the other's at every hand-off, and
the worker's instructions cost more: on the 2-core bench box a refresh
on PostgreSQL cost the reactor thread alone about what SQLite's whole
refresh costs (C{docs/performance.md}, "Round fourteen").  Pinned, the
hand-offs happen on one core, and PostgreSQL's backends and the other
workers have the other cores to themselves.

Off by default, as nginx's C{worker_cpu_affinity} and HAProxy's C{cpu-map}
are: on a host whose cores are shared with other busy processes (or a
container limited to part of a core) a pinned process cannot move away
from a busy core.  Worker C{i} takes the C{i}-th of the CPUs the process
may run on (C{sched_getaffinity}, which honours a container's cpuset),
modulo their number; a single process takes the first.  Linux only.
"""

from __future__ import annotations

import os
from typing import Iterable

#: Where Linux lists a process's threads.
TASKS = "/proc/self/task"


def available() -> bool:
    """
    Whether this platform can pin a process's threads (Linux's
    C{sched_setaffinity} on each thread id).
    """
    return hasattr(os, "sched_setaffinity") and os.path.isdir(TASKS)


def cpu_for(index: int, allowed: Iterable[int]) -> int:
    """
    The CPU worker C{index} takes: the C{index}-th of C{allowed} in order,
    modulo their number (a pool larger than the CPUs shares them evenly).
    """
    cpus = sorted(allowed)
    return cpus[index % len(cpus)]


def pin(index: int, tasks: str = TASKS) -> int:
    """
    Pin this process's every thread to L{cpu_for}C{(index, ...)}, and
    return that CPU.

    Each thread is pinned on its own (Linux's affinity is a thread's); a
    thread started afterwards inherits its creator's, so calling this
    before the reactor runs (before the database pool starts its threads)
    covers the process for its life.
    """
    cpu = cpu_for(index, os.sched_getaffinity(0))
    for name in os.listdir(tasks):
        try:
            os.sched_setaffinity(int(name), {cpu})
        except ProcessLookupError:
            pass  # a thread that ended meanwhile
    return cpu
