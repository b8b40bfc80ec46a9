"""
Processes the bench starts die with it, even when it is killed with
C{SIGKILL} and has no chance to clean up: a server started with
L{popen_kwargs}, or a worker that calls L{die_with_parent} first thing.

The mechanism (Linux's parent-death signal) and its limits are the
server's own: L{smeldr_oauth.service.lifeline}.
"""

from smeldr_oauth.service.lifeline import PR_SET_PDEATHSIG, die_with_parent, popen_kwargs, preexec

__all__ = ["PR_SET_PDEATHSIG", "die_with_parent", "popen_kwargs", "preexec"]
