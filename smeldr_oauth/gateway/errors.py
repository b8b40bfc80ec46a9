# -*- test-case-name: tests.test_gateway_client -*-
"""
The JSON-RPC errors the gateway itself sends downstream, built in one place.

Errors the upstream answered with travel through unchanged (see
L{from_upstream}); these are the ones that mean "the gateway could not get an
answer": the upstream is not running, not answering, or refused more work.
Their messages and data are safe to show a client: they never carry a
command line, an environment value, a credential or the upstream's stderr.

The log events about an instance (started, stopped, crashed, broke the
protocol) are built here too, by L{instance_event}: the same rule, what
the gateway says about an upstream, in one place.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.logger import Logger, LogLevel

from smeldr_oauth.mcp import jsonrpc
from smeldr_oauth.mcp.jsonrpc import JSONRPCError

#: The upstream could not serve the call: not started, exited, restarting,
#: at its instance limit, too busy, or its connection failed.  C{data.reason}
#: says which (one of L{REASONS}), so the HTTP front can pick a status.
UPSTREAM_UNAVAILABLE = -32030

#: Values of C{data.reason} in an L{UPSTREAM_UNAVAILABLE} error.
REASONS = frozenset(
    {
        "start_failed",  # spawn or initialize failed
        "exited",  # the process ended (or the HTTP session was lost) mid-call
        "restarting",  # waiting out the restart backoff
        "capacity",  # the instance limit is reached and nothing idle can go
        "busy",  # too many calls in flight on this instance
        "stopped",  # stopped by the gateway (idle, shutdown)
        "protocol",  # the upstream broke the protocol (oversized or bad frames)
        "http",  # an HTTP upstream answered with an error status or failed
    }
)


def instance_event(
    logger: Logger, level: LogLevel, text: str, *, upstream: str, pid: Optional[int], event: str, **fields: Any
) -> None:
    """
    Log an event about one upstream instance.  Every such event names its
    upstream and its process (C{pid}; C{None} for an HTTP session), so the
    lines of one instance can be followed, and carries its C{smeldr_event};
    like the errors, never a credential, an environment value or a
    command's arguments.

    @param text: what happened, after C{"Upstream {upstream} instance
        [{pid}] "}; C{{field}} formats name C{fields}.
    """
    logger.emit(level, "Upstream {upstream} instance [{pid}] " + text, upstream=upstream, pid=pid, smeldr_event=event, **fields)


def unavailable(upstream: str, reason: str, detail: str) -> JSONRPCError:
    """
    The upstream could not serve the call.

    @param upstream: the upstream's configured name (C{""} for the single
        unnamed one).
    @param reason: one of L{REASONS}.
    @param detail: a short, client-safe sentence.
    """
    assert reason in REASONS, reason
    return JSONRPCError(
        UPSTREAM_UNAVAILABLE,
        f"Upstream unavailable: {detail}",
        {"upstream": upstream, "reason": reason},
    )


def timed_out(upstream: str, seconds: float) -> JSONRPCError:
    """
    The upstream did not answer within the request timeout (and was told
    with C{notifications/cancelled}).
    """
    return JSONRPCError(
        jsonrpc.REQUEST_TIMEOUT,
        "The upstream did not answer in time",
        {"upstream": upstream, "timeout": seconds},
    )


def from_upstream(error: Any) -> JSONRPCError:
    """
    The upstream's own error object, checked for shape and cut to a sane
    size, to pass on to the downstream caller.
    """
    return jsonrpc.peer_error(error, "Upstream error")


def missing_capability(capability: str) -> JSONRPCError:
    """A server-to-client request needs a capability no client session declared."""
    return JSONRPCError(
        jsonrpc.MISSING_CLIENT_CAPABILITY,
        f"No client session can answer: the {capability!r} capability was not declared",
        {"requiredCapabilities": [capability]},
    )
