# -*- test-case-name: tests.test_mcp_calls,tests.test_mcp_session -*-
"""
What one request travels with through the protocol core: who sent it
(L{Principal}), where the messages related to it go (an L{Outlet}), and
everything its handler needs to know (L{Call}).

Transports make principals and outlets; the session makes calls.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, TypeGuard

import attr
from twisted.logger import Logger
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from smeldr_oauth.db.errors import log_failure
from smeldr_oauth.mcp import jsonrpc
from smeldr_oauth.mcp.context import Context

log = Logger()

#: What a caller is told when the database is out of reach: for now.
UNAVAILABLE = "The server's database is unavailable; try again in a moment"


@attr.s(frozen=True, auto_attribs=True)
class Principal:
    """
    Who sent one message: taken from that message's access token (or
    C{"local"} on stdio), so a refreshed token's scopes apply at once.
    """

    subject: str
    client_id: Optional[str]
    scopes: frozenset[str]
    grant_id: Optional[str] = None


class Outlet:
    """
    Where the messages related to one request go.  Transports subclass
    it; the base class drops everything (a transport with no way to
    reach the client, e.g. a plain JSON answer).
    """

    __slots__ = ()

    #: whether server-to-client requests can travel through this outlet.
    can_request = False

    def send(self, message: dict[str, Any]) -> None:
        pass


class CallbackOutlet(Outlet):
    """An outlet that hands every message to a callable."""

    __slots__ = ("_write",)
    can_request = True

    def __init__(self, write: Callable[[dict[str, Any]], None]) -> None:
        self._write = write

    def send(self, message: dict[str, Any]) -> None:
        self._write(message)


@attr.s(auto_attribs=True)
class Call:
    """Everything one request's handler needs to know."""

    request_id: Any
    principal: Principal
    outlet: Optional[Outlet]
    version: str
    modern: bool
    client_capabilities: dict[str, Any]
    log_level: Optional[str]
    progress_token: Any
    context: Optional[Context] = None
    cancelled: bool = False


def log_scope_refusal(what: str, principal: Principal, needed: Sequence[str]) -> None:
    """
    Record that C{principal}'s token lacks a scope among C{needed}: a
    security decision, logged in one format wherever it is made (the HTTP
    front's 403, a gateway session's JSON-RPC error).

    @param what: what was refused (C{"MCP request"}, C{"Gateway call"}).
    """
    log.info(
        "{what} refused: {subject} via {client_id} lacks scopes {scopes}",
        what=what,
        subject=principal.subject,
        client_id=principal.client_id,
        scopes=" ".join(needed),
    )


def logged(message: str) -> Callable[[Failure], None]:
    """
    An errback that logs a failure of the session state (this process's
    or the shared one) with L{log_failure}: the heartbeat meets an outage
    every few seconds while it lasts, and with a traceback each it read as
    a crash (and failed a test that stops the database whenever a beat
    fell in the outage).
    """

    def errback(failure: Failure) -> None:
        log_failure(failure, message)

    return errback


def answer_lost(failure: Failure, message: jsonrpc.Message, send: Callable[[Any], None], where: str) -> None:
    """
    The answer to C{message} could not be made, saved or sent (a bug, the
    database gone): log it now rather than when its L{Deferred} is
    collected, and send a waiting caller an internal error through C{send},
    so that its request does not wait for good.  Used by the transports
    whose answers go out apart from the request (stdio, the legacy stream).
    """
    log_failure(failure, "MCP answer could not be sent on {where}", where=where)
    error = jsonrpc.lost_answer(message)
    if error is not None:
        try:
            send(error)
        except Exception:
            log.failure("MCP error answer could not be sent on {where}", where=where)


def is_deferred(value: object) -> TypeGuard[Deferred[Any]]:
    """
    C{isinstance(value, Deferred)}, for every real L{Deferred} and
    subclass, without the abstract base class's check.

    L{Deferred} is an C{Awaitable}, so C{isinstance} against it goes
    through C{ABCMeta.__instancecheck__} (a Python call, about 200 ns)
    whenever the value is I{not} exactly a L{Deferred}: a C{dict}, an
    answer's bytes, C{None}, which is what most MCP work hands back (SQLite
    on the reactor thread).  Seven such checks a C{tools/call}; the type's
    method resolution order answers the same in a few tens of ns (Twisted
    itself checks C{type(result)} against its list of subclasses).  Only
    a class registered as a virtual subclass of L{Deferred}, which nothing
    does, would be told apart.
    """
    return Deferred in type(value).__mro__


def outcome_now(d: Deferred) -> list[Any]:
    """
    C{[result]} when C{d} has already fired (a failure is then taken out
    of it: the caller answers it), else C{[]} (C{d} is left as it was).

    Most MCP work is done by the time its L{Deferred} comes back (the
    token from the verifier's cache, SQLite on the reactor thread): the
    caller goes on at once instead of chaining another Deferred to it.

    A L{Deferred} that has fired with a value, is not paused (not waiting
    on another one) and is not in the middle of running its callbacks has
    nothing left to do: its C{result} is read directly (the documented
    C{called}, C{paused} and C{result} attributes), without the
    C{addBoth} and the pass through C{_runCallbacks} that cost a
    C{tools/call} about 1% of its CPU, three times per request
    (docs/performance.md, round five).  Anything else (a failure, which
    must be marked handled; a Deferred of uncertain state) goes the long
    way, as before.
    """
    if d.called and not d.paused and not getattr(d, "_runningCallbacks", True):
        result = d.result
        if not (isinstance(result, Failure) or is_deferred(result)):
            return [result]
    box: list[Any] = []
    d.addBoth(_kept, box)
    if box and isinstance(box[0], Failure):
        d.addErrback(_handled)
    return box


def _kept(result: object, box: list[object]) -> object:
    box.append(result)
    return result


def _handled(failure: Failure) -> None:
    return None
