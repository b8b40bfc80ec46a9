# -*- test-case-name: tests.test_mcp_state -*-
"""
The three seams between MCP's live, process-local objects and the state a
session needs wherever its next request lands.

  - L{ISessionStore}: session records, and the caps new sessions are
    admitted under.
  - L{ISessionDelivery}: everything that must reach a session's stream
    (notifications, server-to-client requests, legacy POST answers), the
    client's replies to server-to-client requests, state changes and
    ending a session, routed to the processes that hold live parts.
  - L{IEventLog}: the Streamable HTTP resumption log behind
    C{Last-Event-ID}.

Methods that a shared backend must answer from its database return
L{Deferred}s.  The few on the hot path of a request on a local session
(L{ISessionStore.touch}, L{ISessionDelivery.deliver}) return nothing: a
shared backend may batch or coalesce them, and their failures are its own
to log.

The in-process implementations are in L{smeldr_oauth.mcp.state.memory}.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from smeldr_oauth.mcp.jsonrpc import Response
    from smeldr_oauth.mcp.state.records import SessionLimits, SessionRecord


class ISessionStore(Interface):
    """
    Where session records live: one process's memory, or a database every
    process shares.
    """

    def admit(  # type: ignore[misc]
        record: SessionRecord, limits: SessionLimits, is_idle: Callable[[SessionRecord], bool]
    ) -> "Deferred[list[SessionRecord]]":
        """
        Add C{record}, within C{limits}, as one atomic step.

        When the record's grant (L{SessionRecord.grant_key}) or subject
        already holds its cap, the least recently active I{idle} session of
        that bucket makes room (C{is_idle(record)} says which are; a
        session with an open stream or a request in flight is not).

        @param record: a L{SessionRecord}.
        @param limits: a L{SessionLimits}.
        @param is_idle: a callable taking a L{SessionRecord}.
        @return: a L{Deferred} firing with the records removed to make
            room (the caller ends their live parts), or failing with
            L{SessionLimitReached}; then nothing was added or removed.
        """

    def get(session_id: str) -> "Deferred[Optional[SessionRecord]]":  # type: ignore[misc]
        """
        @return: a L{Deferred} firing with the L{SessionRecord} of
            C{session_id} (C{last_active} and C{expires_at} as of the last
            L{touch}), or C{None}.
        """

    def save(record: SessionRecord) -> "Deferred[None]":  # type: ignore[misc]
        """
        Write back a session's state after a change (C{initialize},
        C{logging/setLevel}, subscriptions, first use).  A record that is
        no longer stored (the session ended) is not added again.

        @return: a L{Deferred} firing with C{None}.
        """

    def touch(session_id: str, last_active: float, expires_at: float) -> None:  # type: ignore[misc]
        """
        The session was active: note when, and its new idle deadline.  On
        every request, so it must be cheap; it returns nothing.
        """

    def remove(session_id: str) -> "Deferred[bool]":  # type: ignore[misc]
        """
        @return: a L{Deferred} firing with C{True} if the record was there.
        """

    def remove_grant(grant_id: str) -> "Deferred[list[str]]":  # type: ignore[misc]
        """
        Remove every session created with a token of C{grant_id} (the
        grant was revoked).

        @return: a L{Deferred} firing with the removed session ids.
        """

    def count() -> "Deferred[int]":  # type: ignore[misc]
        """@return: a L{Deferred} firing with the number of sessions."""


class ISessionSink(Interface):
    """
    A session's live parts in one process (the session's own stream, its
    calls in flight), as the delivery sees them.
    """

    def send(data: str, event_id: Optional[int]) -> None:  # type: ignore[misc]
        """
        Write one JSON-RPC message (C{data}, its JSON text) to the
        session's stream if this process holds it; otherwise drop it.

        @param event_id: the message's L{IEventLog} id (Streamable HTTP),
            or C{None} (legacy streams have no ids).
        """

    def end() -> None:  # type: ignore[misc]
        """End the session's live parts here: calls, exchanges, stream."""

    def refresh(record: SessionRecord) -> None:  # type: ignore[misc]
        """
        The session's state changed (C{record} is the new one): take it up,
        unless this sink made the change.
        """


class ISessionDelivery(Interface):
    """
    Routes what must reach a session to the process holding its live
    parts.  In one process that is a dictionary lookup; with a shared
    backend, a notification to the process holding the stream.
    """

    process_id = Attribute(
        "This process's name among those sharing the sessions (a string),"
        " or None when one process holds everything."
    )

    def attach(session_id: str, sink: "ISessionSink") -> None:  # type: ignore[misc]
        """C{sink} (an L{ISessionSink}) holds live parts of C{session_id} here."""

    def detach(session_id: str, sink: "ISessionSink") -> None:  # type: ignore[misc]
        """C{sink} no longer does (it ended, or this process let go)."""

    def stream_held(session_id: str, held: bool) -> None:  # type: ignore[misc]
        """
        A sink here opened (C{held}) or lost the session's own stream: the
        stream's holder is the one process a session's caps count as busy
        and whose death ends a legacy session.  Opening it moves the claim
        here from any other process.
        """

    def share_changes(  # type: ignore[misc]
        here: Callable[[str, str, frozenset[str]], None],
    ) -> Optional[Callable[[str, str], None]]:
        """
        Relay the application's changes (C{("resource", uri)} updated,
        C{("list", kind)} changed) between the processes sharing sessions.

        @param here: called with C{(change, value, skip)} for each change
            made by another process; C{skip} holds the sessions that
            process has live copies of (those told the client already).
        @return: what to call with each change made here; C{None} in one
            process (nothing to relay).
        """

    def deliver(session_id: str, data: str, event_id: Optional[int] = None) -> None:  # type: ignore[misc]
        """
        Hand one JSON-RPC message to every sink of C{session_id}, wherever
        it is; the one holding the stream writes it.  Nothing attached:
        the message is dropped (a Streamable HTTP message is still in the
        L{IEventLog} for the next C{GET}).
        """

    def deliver_logged(session_id: str, data: str, events: "IEventLog") -> "Deferred[int]":  # type: ignore[misc]
        """
        Append C{data} to C{events} (a Streamable HTTP message, kept for
        resumption), then L{deliver} it with the new event's id, as
        C{events.append} followed by L{deliver} would; fires with the id.
        A backend on the log's own database may do both in one statement.
        """

    def end(session_id: str) -> None:  # type: ignore[misc]
        """End the live parts of C{session_id} wherever they are."""

    def settled(session_id: str) -> "Deferred[None]":  # type: ignore[misc]
        """
        @return: a L{Deferred} firing once what was handed over for
            C{session_id} so far has reached the other processes (at once
            in one process).
        """

    def refresh(session_id: str, record: SessionRecord) -> None:  # type: ignore[misc]
        """
        C{record} (a state change: C{initialize}, C{logging/setLevel},
        subscriptions) was saved: every live copy of the session takes it
        up, so a log level set through one process applies to the calls
        another one runs.
        """

    def expect_reply(  # type: ignore[misc]
        session_id: str, request_id: str, resolve: Callable[[Response], None]
    ) -> None:
        """
        This process sent the server-to-client request C{request_id} and
        waits for the answer: C{resolve(response)} (a
        L{smeldr_oauth.mcp.jsonrpc.Response}) when it comes, whichever
        process receives it.
        """

    def forget_reply(session_id: str, request_id: str) -> None:  # type: ignore[misc]
        """Stop waiting (answered, timed out, cancelled, session ended)."""

    def route_reply(session_id: str, response: Response) -> bool:  # type: ignore[misc]
        """
        The client answered a server-to-client request: hand C{response}
        to whoever L{expect_reply}'d it.

        @return: C{False} when nobody waits for it (locally known: unknown
            or late replies are only logged).
        """


class IEventLog(Interface):
    """
    The messages sent on each Streamable HTTP session's own channel, with
    increasing ids, so that a client reconnecting with C{Last-Event-ID}
    (or just reconnecting) gets what it missed.  Bounded per session: the
    oldest entries go first.
    """

    limit = Attribute("How many events each session keeps.")

    def append(session_id: str, data: str) -> "Deferred[int]":  # type: ignore[misc]
        """
        @return: a L{Deferred} firing with the new event's id (ids of one
            session increase; appends fire in the order they were made).
        """

    def replay(  # type: ignore[misc]
        session_id: str, after: Optional[int] = None
    ) -> "Deferred[list[tuple[int, str]]]":
        """
        @param after: an event id (the client's C{Last-Event-ID}); C{None}
            means after the last event L{delivered}.
        @return: a L{Deferred} firing with the C{(event_id, data)} pairs
            still kept after it, oldest first.
        """

    def delivered(session_id: str, event_id: int) -> None:  # type: ignore[misc]
        """C{event_id} reached the client's stream."""

    def forget(session_id: str) -> None:  # type: ignore[misc]
        """The session ended: drop its events."""
