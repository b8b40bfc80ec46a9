# -*- test-case-name: tests.test_service_workers -*-
"""
C{--workers N}: one C{twist smeldr-oauth} on every core.

The usual Twisted way (the "Using Processes" HOWTO and the web server's
"multiple processes" recipe): the parent creates the listening sockets, and
N children each C{adoptStreamPort} the inherited descriptors.  The kernel
hands every connection to whichever child accepts it first; no
C{SO_REUSEPORT} and no proxy in between.

One module per side of it:

  - L{spec<smeldr_oauth.service.workers.spec>}: the C{--workers} value,
    the options a pool refuses, and the hidden argument (L{WorkerSpec})
    that tells a child which descriptors it inherited;
  - L{sockets<smeldr_oauth.service.workers.sockets>}: what a C{--listen}
    description listens on, the parent's never-accepting sockets, a
    child's one-at-a-time accepting;
  - L{supervisor<smeldr_oauth.service.workers.supervisor>}: the parent
    (L{Supervisor}) and its start-up and restart policy;
  - L{child<smeldr_oauth.service.workers.child>}: a child's side
    (L{WorkerListeners}): adopt, say C{ready}, stop when the parent is
    gone (the lifeline: L{smeldr_oauth.service.lifeline});
  - L{stopping<smeldr_oauth.service.workers.stopping>}: stop once,
    whatever signals arrive; exit 1 when the pool could not start;
  - L{twist<smeldr_oauth.service.workers.twist>}: the services
    C{twist smeldr-oauth} runs in the parent and in a child, metrics
    included.
"""

from smeldr_oauth.service.workers.child import WorkerListeners
from smeldr_oauth.service.workers.sockets import (
    SHAREABLE,
    ListenerKind,
    accept_one_at_a_time,
    listener_kind,
    open_shared_listeners,
)
from smeldr_oauth.service.workers.spec import (
    FIRST_LISTENING_FD,
    READY,
    WORKER_OPTION,
    WorkerSpec,
    check_options,
    shared_store_problem,
    take_worker_argument,
    worker_count,
)
from smeldr_oauth.service.workers.stopping import exit_with_failure, ignore_repeated_stop_signals, stop_reactor
from smeldr_oauth.service.workers.supervisor import Supervisor, describe_exit
from smeldr_oauth.service.workers.twist import serve_as_worker, supervise, twist_command

__all__ = [
    "FIRST_LISTENING_FD",
    "READY",
    "SHAREABLE",
    "WORKER_OPTION",
    "ListenerKind",
    "Supervisor",
    "WorkerListeners",
    "WorkerSpec",
    "accept_one_at_a_time",
    "check_options",
    "describe_exit",
    "exit_with_failure",
    "ignore_repeated_stop_signals",
    "listener_kind",
    "open_shared_listeners",
    "serve_as_worker",
    "shared_store_problem",
    "stop_reactor",
    "supervise",
    "take_worker_argument",
    "twist_command",
    "worker_count",
]
