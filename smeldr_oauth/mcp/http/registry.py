# -*- test-case-name: tests.test_mcp_http_registry -*-
"""
The MCP sessions this process serves: their records in an
L{ISessionStore}, their live parts here.

A L{LiveSession} is what one process holds of a session: the
L{ServerSession} with its calls in flight, the session's own stream (the
legacy stream, or the Streamable HTTP C{GET} stream), the POST exchanges
running, the idle timer.  It is made when the session is created, or
rebuilt from the record when a request for a session this process does
not hold arrives (L{SessionRegistry.restore}): with a shared store, any
process serves any Streamable HTTP session.  The session's state changes
(C{initialize}, C{logging/setLevel}, subscriptions, first use) are written
back to the record.

What must reach a session's stream goes through the
L{ISessionDelivery}: a L{LiveSession} is the delivery's sink, and the
session's own outlet (L{DeliveryOutlet}) hands every message to the
delivery (after the L{IEventLog}, for Streamable HTTP), never to a stream
directly.

Sessions are capped per grant and per subject (the caller's least
recently active idle session makes room, else 429) and server-wide (503),
so one token cannot fill the server-wide cap and lock everyone else out;
a session nobody used after C{initialize} lives only
C{new_session_timeout} seconds.

The protocol object of a session comes from a L{SessionFactory}: by
default L{native_sessions} (a L{ServerSession} over an L{MCPApp}); the
OAuth gateway passes one that makes
L{smeldr_oauth.gateway.proxy.GatewaySession}s instead.  Both provide
L{smeldr_oauth.gateway.interfaces.IMCPSession}, which is all the
transports use.
"""

from __future__ import annotations

import math
import secrets
from typing import Any, Callable, Optional

import attr
from twisted.internet.defer import Deferred, fail, gatherResults, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from smeldr_oauth.mcp import jsonrpc
from smeldr_oauth.mcp.app import MCPApp
from smeldr_oauth.mcp.http.errors import from_session_limit, session_not_found
from smeldr_oauth.db.errors import log_failure
from smeldr_oauth.mcp.calls import Outlet, logged
from smeldr_oauth.mcp.session import ServerSession
from smeldr_oauth.mcp.state.interfaces import IEventLog, ISessionDelivery, ISessionSink, ISessionStore
from smeldr_oauth.mcp.state.records import LEGACY, STREAMABLE, SessionLimitReached, SessionLimits, SessionRecord
from smeldr_oauth.mcp.streams import SSEStream
from smeldr_oauth.oauth.model import AccessInfo

log = Logger()


#: Makes the protocol object of one session (keyword arguments: those of
#: L{ServerSession} but the app and the clock); see L{native_sessions}.
SessionFactory = Callable[..., Any]


def native_sessions(app: MCPApp, clock: IReactorTime) -> SessionFactory:
    """The default L{SessionFactory}: L{ServerSession}s serving C{app}'s tools."""

    def make(**kwargs: Any) -> ServerSession:
        return ServerSession(app, clock, **kwargs)

    return make


def _at_once(d: Deferred, then: Callable[..., Any], *args: Any) -> Any:
    """
    C{then(result, *args)}: now, if C{d} has fired (its failure raised),
    else when it fires.
    """
    box: list[Any] = []
    d.addBoth(box.append)
    if not box:
        return d.addCallback(lambda _: _at_once(succeed(box[0]) if not isinstance(box[0], Failure) else fail(box[0]), then, *args))
    result = box[0]
    if isinstance(result, Failure):
        result.raiseException()
    return then(result, *args)


@implementer(ISessionSink)
class LiveSession:
    """
    One session's live parts in this process.

    Slotted, and the set of exchanges in flight is made on first use: a
    legacy session idling behind its stream is held by the thousand.

    @ivar record: the session's record as this process last wrote or read it.
    @ivar used: the client did something after C{initialize}; until then
        the short idle timeout applies.
    """

    __slots__ = (
        "record",
        "protocol",
        "_stream",
        "exchanges",
        "idle",
        "used",
        "last_active",
        "saving",
        "held",
        "sent_upto",
        "_registry",
    )

    def __init__(self, registry: "SessionRegistry", record: SessionRecord) -> None:
        self._registry = registry
        self.record = record
        self.protocol: ServerSession = None  # type: ignore[assignment]  # set by the registry
        self._stream: Optional[SSEStream] = None
        self.exchanges: Optional[set[Any]] = None
        self.idle: Optional[IDelayedCall] = None
        self.used = record.used
        self.last_active = record.last_active
        # The last state change being saved and announced, until it is.
        self.saving: Optional[Deferred] = None
        # While a reopened stream replays the log: the events arriving
        # meanwhile.  Then the highest event id the stream has.
        self.held: Optional[list[tuple[int, str]]] = None
        self.sent_upto = 0

    @property
    def session_id(self) -> str:
        return self.record.session_id

    @property
    def stream(self) -> Optional[SSEStream]:
        """The session's own stream, if this process holds it."""
        return self._stream

    @stream.setter
    def stream(self, stream: Optional[SSEStream]) -> None:
        had, self._stream = self._stream is not None, stream
        if had != (stream is not None):
            # With a shared backend, the other processes learn who holds it.
            self._registry.delivery.stream_held(self.record.session_id, stream is not None)

    @property
    def kind(self) -> str:
        return self.record.kind

    def add_exchange(self, exchange: Any) -> None:
        if self.exchanges is None:
            self.exchanges = set()
        self.exchanges.add(exchange)

    def discard_exchange(self, exchange: Any) -> None:
        if self.exchanges is not None:
            self.exchanges.discard(exchange)

    @property
    def is_idle(self) -> bool:
        """
        No open stream and nothing in flight: ending it interrupts nothing
        (the client gets a 404 on its next request and starts over).
        """
        return (self.stream is None or self.stream.closed) and not self.exchanges and not self.protocol.busy

    def stream_closed(self, stream: SSEStream) -> None:
        """
        The session's own stream ended: a legacy session ends with it; a
        Streamable HTTP session stays, for the client's next GET.
        """
        if self.record.kind == LEGACY:
            self._registry.end(self)
            return
        if self.stream is stream:
            self.stream = None
        self._registry.touch(self)

    # ISessionSink

    def send(self, data: str, event_id: Optional[int]) -> None:
        stream = self.stream
        if stream is None or stream.closed:
            return
        if event_id is not None:
            if self.held is not None:
                self.held.append((event_id, data))
                return
            if event_id <= self.sent_upto:
                # Replayed already, or a late copy routed from another
                # process: a stream's events only go forward.
                return
            self.sent_upto = event_id
        stream.send(data, event="message", event_id=None if event_id is None else str(event_id))
        if event_id is not None:
            self._registry.events.delivered(self.record.session_id, event_id)

    def end(self) -> None:
        self._registry.release(self)

    def replaying(self) -> None:
        """A new stream: events wait until L{replayed}."""
        self.held = []
        self.sent_upto = 0

    def replayed(self, missed: list[tuple[int, str]]) -> None:
        """Send the events the client missed, then those that waited."""
        held, self.held = self.held or [], None
        for event_id, data in sorted(dict(missed + held).items()):
            self.send(data, event_id)

    def refresh(self, record: SessionRecord) -> None:
        if record is not self.record:  # else this copy made the change
            self.adopt(record)

    def adopt(self, record: SessionRecord) -> None:
        """Take up the session's state from C{record}."""
        self.record = record
        self.used = record.used
        self.protocol.resume(
            protocol_version=record.protocol_version,
            client_capabilities=record.client_capabilities,
            client_info=record.client_info,
            log_level=record.log_level,
            subscriptions=record.subscriptions,
        )


class DeliveryOutlet(Outlet):
    """
    A session's own channel to the client (notifications unrelated to a
    request, server-to-client requests, legacy answers): through the
    event log (Streamable HTTP, for resumption) to the delivery.
    """

    __slots__ = ("_delivery", "_events", "_session_id")
    can_request = True

    def __init__(self, registry: "SessionRegistry", record: SessionRecord) -> None:
        self._delivery = registry.delivery
        self._events = registry.events if record.kind == STREAMABLE else None
        self._session_id = record.session_id

    def send(self, message: dict[str, Any]) -> None:
        data = jsonrpc.encode(message).decode("utf-8")
        if self._events is None:
            self._delivery.deliver(self._session_id, data)
            return
        self._delivery.deliver_logged(self._session_id, data, self._events).addErrback(
            logged("MCP message could not be logged for resumption")
        )


class SessionRegistry:
    """
    Creates, finds, rebuilds, touches and ends this process's sessions.

    @param idle_timeout: a Streamable HTTP session with no request and no
        open stream for this long is ended.
    @param new_session_timeout: the idle timeout of a session that saw
        nothing after C{initialize}.
    @param session_factory: makes each session's protocol object (default
        L{native_sessions} of C{app}).
    """

    def __init__(
        self,
        app: Optional[MCPApp],
        clock: IReactorTime,
        *,
        store: ISessionStore,
        delivery: ISessionDelivery,
        events: IEventLog,
        limits: SessionLimits,
        idle_timeout: float = 3600.0,
        new_session_timeout: float = 60.0,
        request_timeout: float = 300.0,
        session_factory: Optional[SessionFactory] = None,
    ) -> None:
        self.app = app
        self.clock = clock
        if session_factory is None:
            assert app is not None, "an MCPApp or a session factory is needed"
            session_factory = native_sessions(app, clock)
        self.make_session = session_factory
        self.store = store
        self.delivery = delivery
        self.events = events
        self.limits = limits
        self.idle_timeout = idle_timeout
        self.new_session_timeout = min(new_session_timeout, idle_timeout)
        self.request_timeout = request_timeout
        self._live: dict[str, LiveSession] = {}
        # One bound method for every session (idle sessions are many).
        self._on_change = self._protocol_changed
        relay = delivery.share_changes(self._changed_elsewhere)
        if relay is not None and app is not None:
            app.change_observers.append(relay)

    def __len__(self) -> int:
        return len(self._live)

    def live_sessions(self) -> list[LiveSession]:
        return list(self._live.values())

    # -- finding ---------------------------------------------------------------

    def local(self, session_id: str, info: AccessInfo, kind: str) -> Optional[LiveSession]:
        """
        The session if this process holds it, C{None} if it does not.

        @raise HTTPError: 404 when it is held here but is of another
            transport or someone else's.
        """
        live = self._live.get(session_id)
        if live is None:
            return None
        self._check(live.record, info, kind)
        return live

    def restore(self, session_id: str, info: AccessInfo, kind: str) -> "Deferred[LiveSession]":
        """
        Rebuild the live parts of a session this process does not hold from
        its record.

        @return: a L{Deferred} firing with the L{LiveSession}, or failing
            with 404 (no such session, another transport, someone else's).
        """

        def found(record: Optional[SessionRecord]) -> LiveSession:
            if record is None:
                raise session_not_found()
            self._check(record, info, kind)
            live = self._live.get(session_id)
            if live is None:
                live = self._bring_up(record)
                live.adopt(record)
                log.info("MCP session taken up from its record")
            return live

        return self.store.get(session_id).addCallback(found)

    def use(self, session_id: str, info: AccessInfo, kind: str, then: Callable[..., Any], *args: Any) -> Any:
        """
        C{then(live, *args)} with the session: at once when it is held
        here, else once it is restored.
        """
        live = self.local(session_id, info, kind)
        if live is not None:
            return then(live, *args)
        return self.restore(session_id, info, kind).addCallback(then, *args)

    def _check(self, record: SessionRecord, info: AccessInfo, kind: str) -> None:
        if record.kind != kind or not record.owned_by(info.subject, info.client_id):
            if not record.owned_by(info.subject, info.client_id):
                log.warn(
                    "MCP session used by a caller that does not own it: {subject} via {client_id}",
                    subject=info.subject,
                    client_id=info.client_id,
                )
            raise session_not_found()

    # -- creating ----------------------------------------------------------------

    def create(self, kind: str, info: AccessInfo, then: Callable[..., Any], *args: Any) -> Any:
        """
        C{then(live, *args)} with a new session for the caller of C{info},
        within the caps: at once when the store answers at once (the
        in-process store does), so that a stream's Deferred is not left
        chained behind the store's for as long as the stream is open.

        A legacy session is born with its stream here (the C{GET} that
        opens the stream creates it), and C{then} (which announces the
        message endpoint) runs once that claim is in the shared store: a
        client that POSTs to another process the moment it learns the
        endpoint must find where to send the answer.  (A claim still on its
        way when the answer was routed lost the answer: the legacy rows of
        the two-worker bench hung on it.)

        @raise HTTPError: (or a L{Deferred} failing with it) 429, every
            session of the caller is busy; 503, the server-wide cap.
        """
        admitted = self._admit(kind, info)
        if kind == LEGACY:
            admitted = admitted.addCallback(self._stream_claimed)
        return _at_once(admitted, then, *args)

    def _stream_claimed(self, live: LiveSession) -> "Deferred[LiveSession]":
        self.delivery.stream_held(live.session_id, True)
        return self.delivery.settled(live.session_id).addCallback(lambda _: live)

    def _admit(self, kind: str, info: AccessInfo) -> "Deferred[LiveSession]":
        now = self.clock.seconds()
        record = SessionRecord(
            session_id=secrets.token_urlsafe(32),
            kind=kind,
            subject=info.subject,
            client_id=info.client_id,
            grant_id=info.grant_id,
            created=now,
            last_active=now,
            expires_at=now + self.new_session_timeout if kind == STREAMABLE else math.inf,
        )

        def admitted(victims: list[SessionRecord]) -> LiveSession:
            for victim in victims:
                log.info(
                    "MCP session limit reached for {subject} via {client_id}: oldest idle session ended",
                    subject=info.subject,
                    client_id=info.client_id,
                )
                self._ended(victim.session_id)
            live = self._bring_up(record)
            log.debug(
                "MCP session opened ({transport})",
                transport=kind,
                client_id=info.client_id,
                grant_id=info.grant_id,
                smeldr_event="mcp_session",
            )
            return live

        def refused(failure: Failure) -> LiveSession:
            failure.trap(SessionLimitReached)
            error: SessionLimitReached = failure.value  # type: ignore[assignment]
            if error.scope == "server":
                log.warn("MCP session limit of the server reached ({count} sessions)", count=error.count)
            else:
                log.info(
                    "MCP session refused: {subject} via {client_id} has {count} busy sessions",
                    subject=info.subject,
                    client_id=info.client_id,
                    count=error.count,
                )
            raise from_session_limit(error, self.new_session_timeout)

        return self.store.admit(record, self.limits, self._is_idle).addCallbacks(admitted, refused)

    def _bring_up(self, record: SessionRecord) -> LiveSession:
        live = LiveSession(self, record)
        live.protocol = self.make_session(
            session_id=record.session_id,
            default_outlet=DeliveryOutlet(self, record),
            request_timeout=self.request_timeout,
            delivery=self.delivery,
            on_change=self._on_change,
        )
        self._live[record.session_id] = live
        self.delivery.attach(record.session_id, live)
        self._arm(live)
        return live

    def stateless(self) -> Any:
        """A throwaway protocol object for one 2026-07-28 stateless request."""
        return self.make_session(modern_only=True, request_timeout=self.request_timeout)

    def _is_idle(self, record: SessionRecord) -> bool:
        live = self._live.get(record.session_id)
        # A session held by no process here has nothing running here.
        return live.is_idle if live is not None else True

    # -- activity ---------------------------------------------------------------

    def touch(self, live: LiveSession, used: bool = False) -> None:
        """
        The client did something with the session (C{used}: something
        that counts as using it, not a mere notification).
        """
        if used and not live.used:
            live.used = True
            self._save(live)
        self._arm(live)

    def _timeout(self, live: LiveSession) -> float:
        return self.idle_timeout if live.used else self.new_session_timeout

    def _arm(self, live: LiveSession) -> None:
        """
        Push the session's idle deadline to C{timeout} from now.

        The timer is not moved on every request (a cancel and a new
        delayed call, the reactor's heap reordered, each time): one that
        is due no later than the new deadline is left to fire, and
        L{_expire} sets it again for what remains.  Only a deadline that
        came nearer (the short timeout of a new session) replaces it.
        """
        now = live.last_active = self.clock.seconds()
        if live.kind != STREAMABLE:
            self.store.touch(live.session_id, now, math.inf)
            return
        timeout = self._timeout(live)
        deadline = now + timeout
        idle = live.idle
        if idle is None or not idle.active() or idle.getTime() > deadline:
            if idle is not None and idle.active():
                idle.cancel()
            live.idle = self.clock.callLater(timeout, self._expire, live)
        self.store.touch(live.session_id, now, deadline)

    def _changed_elsewhere(self, change: str, value: str, skip: frozenset[str]) -> None:
        """
        Another process changed what the application serves: the sessions
        whose stream is here and which that process did not tell hear it.
        """
        for live in list(self._live.values()):
            if live.session_id in skip or live.stream is None or live.stream.closed:
                continue
            if change == "resource":
                live.protocol.resource_updated(value)
            elif change == "list" and value in ("tools", "resources", "prompts"):
                live.protocol.list_changed(value)

    def _protocol_changed(self, protocol: ServerSession) -> None:
        live = self._live.get(protocol.session_id or "")
        if live is not None and live.protocol is protocol:
            self._save(live)

    def _save(self, live: LiveSession) -> None:
        """Write the session's state back to its record."""
        protocol = live.protocol
        live.record = attr.evolve(
            live.record,
            used=live.used,
            last_active=live.last_active,
            protocol_version=protocol.protocol_version,
            client_capabilities=protocol.client_capabilities,
            client_info=protocol.client_info,
            log_level=protocol.log_level,
            subscriptions=protocol.subscriptions,
        )
        saved = self.store.save(live.record)
        self.delivery.refresh(live.session_id, live.record)
        both = gatherResults([saved, self.delivery.settled(live.session_id)], consumeErrors=True)
        if both.called:
            # The in-process seams: saved already.
            both.addErrback(logged("MCP session state could not be saved"))
            return
        live.saving = both

        def done(result: Any) -> None:
            if live.saving is both:
                live.saving = None
            if isinstance(result, Failure):
                log_failure(result, "MCP session state could not be saved")

        both.addBoth(done)

    def when_saved(self, live: LiveSession, result: Any) -> Any:
        """
        C{result} (an answer, or a L{Deferred} of one), held until the
        state changes it made are saved and announced: the client's next
        request may land on another process, which must find them.
        """

        def hold(body: Any) -> Any:
            saving = live.saving
            if saving is None:
                return body
            waiter: Deferred = Deferred()

            def fire(outcome: Any) -> Any:
                waiter.callback(body)
                return outcome

            saving.addBoth(fire)
            return waiter

        if isinstance(result, Deferred):
            return result.addCallback(hold)
        return hold(result)

    def _expire(self, live: LiveSession) -> None:
        live.idle = None
        remaining = live.last_active + self._timeout(live) - self.clock.seconds()
        if remaining > 0:
            # Used since the timer was set (see _arm): not due yet.
            live.idle = self.clock.callLater(remaining, self._expire, live)
            return
        if not live.is_idle:
            self._arm(live)
            return

        def check(record: Optional[SessionRecord]) -> None:
            if self._live.get(live.session_id) is not live or not live.is_idle:
                return
            if record is not None and (
                record.last_active > live.last_active
                or record.stream_process not in (None, self.delivery.process_id)
            ):
                # Used through another process meanwhile, or its stream is
                # open there: only this process's copy goes.
                self.release(live)
                return
            log.info("MCP session idle; ended")
            self.end(live)

        self.store.get(live.session_id).addCallback(check).addErrback(logged("MCP session expiry failed"))

    # -- ending -------------------------------------------------------------------

    def end(self, live: LiveSession) -> "Deferred[None]":
        """
        End a session for good, wherever its live parts are: here at once,
        elsewhere once its record is gone (so that no process takes it up
        again meanwhile).

        @return: a L{Deferred} firing when the record is gone.
        """
        session_id = live.session_id

        def removed(_: object) -> None:
            self._ended(session_id)

        d: Deferred[None] = self.store.remove(session_id).addErrback(
            logged("MCP session record could not be removed")
        ).addCallback(removed)
        # Not attached (any more): the delivery cannot reach it.
        self.release(live)
        return d

    def _ended(self, session_id: str) -> None:
        """The record is gone: forget the events, end the live parts."""
        self.events.forget(session_id)
        self.delivery.end(session_id)

    def release(self, live: LiveSession) -> None:
        """
        End this process's live parts of a session (its record stays):
        cancel its calls and exchanges, close its stream.
        """
        if self._live.get(live.session_id) is not live:
            return
        del self._live[live.session_id]
        self.delivery.detach(live.session_id, live)
        if live.idle is not None and live.idle.active():
            live.idle.cancel()
        live.idle = None
        for exchange in list(live.exchanges or ()):
            exchange.end()
        live.protocol.close()
        if live.stream is not None:
            live.stream.close()

    def close_grant(self, grant_id: str) -> None:
        """End every session created with a token of C{grant_id}."""

        def removed(session_ids: list[str]) -> None:
            for session_id in session_ids:
                self._ended(session_id)

        self.store.remove_grant(grant_id).addCallback(removed).addErrback(
            logged("MCP sessions of a revoked grant could not be ended")
        )
        for live in list(self._live.values()):
            if live.record.grant_id == grant_id:
                self.release(live)

    def shutdown(self) -> None:
        """
        Let go of every live session: legacy sessions end with their
        stream; Streamable HTTP records stay for another process (or this
        one, restarted, with a shared store) to take up.
        """
        for live in list(self._live.values()):
            if live.kind == LEGACY:
                self.end(live)
            else:
                self.release(live)

