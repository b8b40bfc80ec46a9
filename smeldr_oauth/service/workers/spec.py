# -*- test-case-name: tests.test_service_workers -*-
"""
What the command line says about the pool: the C{--workers} value, the
hidden argument a child is started with (L{WorkerSpec}: the descriptors it
inherited), and which options a pool cannot serve.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import attr
from twisted.python import usage

from smeldr_oauth.service.workers.sockets import SHAREABLE, listener_kind

#: The hidden argument a child is started with (always the last one).
WORKER_OPTION = "--smeldr-worker"

#: The first descriptor a child finds its listening sockets at.
FIRST_LISTENING_FD = 3

#: What a child writes on its status pipe once it serves.
READY = b"ready\n"


def worker_count(value: str) -> int:
    """
    The C{--workers} value: a whole number of processes, at least one.
    """
    try:
        number = int(value)
    except ValueError:
        raise usage.UsageError(f"--workers must be a whole number of processes, got {value!r}")
    if number < 1:
        raise usage.UsageError(f"--workers must be at least 1, got {value!r}")
    return number


@attr.s(auto_attribs=True, frozen=True)
class WorkerSpec:
    """
    What a child was given by its parent: the descriptors it inherited.

    @ivar index: The child's place in the pool, C{0} to C{N-1}; a restarted
        child keeps the index of the one it replaces.
    @ivar listening: One listening socket per C{--listen}, in order.
    @ivar lifeline: Read end of a pipe only the parent writes to: end of
        file means the parent is gone.
    @ivar status: Write end of a pipe the parent reads: L{READY} goes there.
    """

    index: int
    listening: tuple[int, ...]
    lifeline: int
    status: int

    @classmethod
    def for_slot(cls, index: int, listeners: int) -> "WorkerSpec":
        """
        The descriptors a child in slot C{index} gets, with C{listeners}
        listening sockets: those from L{FIRST_LISTENING_FD} on, then the
        lifeline, then the status pipe.
        """
        first = FIRST_LISTENING_FD
        return cls(
            index=index,
            listening=tuple(range(first, first + listeners)),
            lifeline=first + listeners,
            status=first + listeners + 1,
        )

    def argument(self) -> str:
        """
        This spec as the hidden command-line argument.
        """
        value = {"index": self.index, "listen": list(self.listening), "lifeline": self.lifeline, "status": self.status}
        return f"{WORKER_OPTION}={json.dumps(value, separators=(',', ':'))}"

    @classmethod
    def parse(cls, value: str) -> "WorkerSpec":
        """
        The spec in L{argument}'s value.

        @raise ValueError: It is not one.
        """
        try:
            data = json.loads(value)
            spec = cls(
                index=_descriptor(data["index"]),
                listening=tuple(_descriptor(fd) for fd in data["listen"]),
                lifeline=_descriptor(data["lifeline"]),
                status=_descriptor(data["status"]),
            )
        except (TypeError, KeyError, ValueError) as e:
            raise ValueError(f"{WORKER_OPTION} is for the worker processes --workers starts ({e})") from None
        return spec


def _descriptor(value: Any) -> int:
    if type(value) is not int or value < 0:
        raise ValueError(f"not a descriptor: {value!r}")
    return value


def take_worker_argument(argv: Sequence[str]) -> tuple[list[str], Optional[WorkerSpec]]:
    """
    Split the hidden L{WORKER_OPTION} off a command line.

    It is not an ordinary option so that C{--help} does not offer it: it is
    only meaningful with the descriptors a parent set up.

    @return: The other arguments, and the spec (C{None} in the parent or a
        single process).
    @raise usage.UsageError: The argument is malformed.
    """
    rest: list[str] = []
    spec = None
    prefix = WORKER_OPTION + "="
    for argument in argv:
        if argument.startswith(prefix):
            try:
                spec = WorkerSpec.parse(argument[len(prefix) :])
            except ValueError as e:
                raise usage.UsageError(str(e))
        else:
            rest.append(argument)
    return rest, spec


def shared_store_problem(options: Mapping[str, Any]) -> Optional[str]:
    """
    Why the store these options select cannot be shared by several worker
    processes, or C{None} when it can.

    The one place that decides it: every store option answers here.
    PostgreSQL (C{--database}) can be shared.  SQLite files (C{--oauth-db},
    C{--site-db}) cannot: one process owns them (one writer at a time, and
    the state that other processes reach through PostgreSQL, such as
    revocations pushed with C{NOTIFY}, would only be polled).
    """
    if options.get("database"):
        return None
    return (
        "--workers above 1 needs --database postgresql://...: the SQLite files "
        "(--oauth-db, --site-db) must be served by one process"
    )


def check_options(options: Mapping[str, Any]) -> None:
    """
    Refuse, in one line, what C{--workers} cannot do with these options.

    @raise usage.UsageError: With the reason.
    """
    if options["workers"] <= 1 or options.get("worker") is not None:
        return
    problem = shared_store_problem(options)
    if problem is not None:
        raise usage.UsageError(problem)
    for description in options["listen"]:
        kind = listener_kind(description)
        if kind is None or kind.kind not in SHAREABLE:
            raise usage.UsageError(f"--listen {description!r} cannot be shared by --workers: use tcp:, tcp6: or ssl:")
