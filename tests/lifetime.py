# -*- test-case-name: tests.test_lifetime -*-
"""
Child processes that die with the process that started them, however it
ends: the one way every program the tests start (C{twist} servers, Node and
Python clients, pip, chromedriver and its Chromium) is started.

A run interrupted half-way (Ctrl-C, a cancelled CI job, C{kill -9} of trial)
runs no cleanup, and a server left behind keeps its port, its files and, on
a shared machine, its CPU.  So the kernel does the job, with the mechanism
the server's own processes share (L{smeldr_oauth.service.lifeline}: the
parent-death signal, through a launcher that then C{exec}s the program, so
that it keeps the pid, the standard streams and every signal a test sends
it).  Its limits are written there: start children from the reactor thread,
and bind what a program starts (L{boundExecutable}) or run what it would
start (C{node} on mcp-remote's script rather than C{npx}, which forks).

Here only the names the tests use.
"""

from __future__ import annotations

from smeldr_oauth.service.lifeline import LAUNCHER, bound, bound_executable, spawn_bound

__all__ = ["LAUNCHER", "bound", "boundExecutable", "spawnBound"]

#: L{smeldr_oauth.service.lifeline.spawn_bound}.
spawnBound = spawn_bound

#: L{smeldr_oauth.service.lifeline.bound_executable}.
boundExecutable = bound_executable
