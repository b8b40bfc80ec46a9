# -*- test-case-name: tests.test_mcp_state -*-
"""
The values that cross the session seams: a session's record, the caps a
new session is admitted under, and the refusal when they are reached.

They are plain values (no live objects, no callables) so that a shared
backend can store them as rows and send them between processes.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Hashable, Iterable, Optional

import attr

#: The two HTTP transports a session can belong to.
STREAMABLE = "streamable"
LEGACY = "legacy"


def _frozen(value: Any) -> frozenset[str]:
    return frozenset(value)


@attr.s(frozen=True, slots=True, auto_attribs=True, kw_only=True)
class SessionRecord:
    """
    What every process needs to know to serve one MCP session.

    The session id is a bearer of nothing by itself (a session answers only
    its owner's tokens) but is still kept out of C{repr}, so a record in a
    log line does not hand out a handle on the session.

    @ivar kind: L{STREAMABLE} or L{LEGACY}.
    @ivar subject: the owner: only tokens of this subject I{and}
        C{client_id} may use the session.
    @ivar grant_id: the grant whose token created it (the per-grant cap,
        revocation).
    @ivar created: when it was created (seconds since the epoch).
    @ivar last_active: the last request or stream activity.
    @ivar expires_at: when it ends unless something happens first; the
        idle timeout (short until the session is C{used}).  A legacy
        session lives as long as its stream: C{inf}.
    @ivar used: the client did something after C{initialize} (a request,
        or opening the GET stream).
    @ivar protocol_version: negotiated by C{initialize}; C{None} before.
    @ivar log_level: set by C{logging/setLevel} (C{info} until then).
    @ivar subscriptions: resource URIs subscribed to.
    @ivar stream_process: as read from a shared store, the process holding
        the session's own stream (L{ISessionDelivery.process_id}), or
        C{None}.  Derived from the delivery's claims, never saved; not part
        of the record's equality.
    """

    session_id: str = attr.ib(repr=False)
    kind: str
    subject: str
    client_id: Optional[str]
    grant_id: Optional[str]
    created: float
    last_active: float
    expires_at: float = math.inf
    used: bool = False
    protocol_version: Optional[str] = None
    client_capabilities: dict[str, Any] = attr.ib(factory=dict, repr=False)
    client_info: dict[str, Any] = attr.ib(factory=dict, repr=False)
    log_level: Optional[str] = "info"
    subscriptions: frozenset[str] = attr.ib(default=frozenset(), converter=_frozen)
    stream_process: Optional[str] = attr.ib(default=None, eq=False)

    @property
    def grant_key(self) -> Hashable:
        """
        The bucket of the per-grant cap: the grant, or for tokens without a
        grant (site tokens) the subject and client.
        """
        if self.grant_id:
            return ("grant", self.grant_id)
        return ("caller", self.subject, self.client_id)

    def owned_by(self, subject: str, client_id: Optional[str]) -> bool:
        return subject == self.subject and client_id == self.client_id

    def to_json(self) -> dict[str, Any]:
        """The record as JSON values (sent between processes)."""
        values = attr.asdict(self, recurse=False)
        values["subscriptions"] = sorted(self.subscriptions)
        return values

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> "SessionRecord":
        """The inverse of L{to_json}."""
        return cls(**values)


@attr.s(frozen=True, slots=True, auto_attribs=True)
class SessionLimits:
    """
    The session caps a new session is admitted under.

    @ivar per_grant: live sessions one grant may hold.
    @ivar per_subject: the same across all the grants of one subject.
    @ivar total: the server-wide last resort.
    """

    per_grant: int = 50
    per_subject: int = 200
    total: int = 10000

    def __attrs_post_init__(self) -> None:
        if min(self.per_grant, self.per_subject, self.total) < 1:
            raise ValueError("session caps must be at least 1")


class SessionLimitReached(Exception):
    """
    A new session cannot be admitted.

    @ivar scope: C{"grant"} or C{"subject"} (every session of that caller
        is busy: the caller waits, 429) or C{"server"} (the server-wide cap:
        503).
    @ivar count: how many sessions held the cap.
    """

    def __init__(self, scope: str, count: int) -> None:
        super().__init__(f"session limit reached ({scope}: {count})")
        self.scope = scope
        self.count = count


def make_room(
    record: SessionRecord,
    limits: SessionLimits,
    grant_bucket: Iterable[SessionRecord],
    subject_bucket: Iterable[SessionRecord],
    total: int,
    is_idle: Callable[[SessionRecord], bool],
) -> list[SessionRecord]:
    """
    The one rule of the session caps, for every L{ISessionStore}: which
    sessions make room for C{record}.

    @param grant_bucket: the current records of C{record}'s grant bucket.
    @param subject_bucket: those of its subject.
    @param total: how many sessions the server holds.
    @param is_idle: says which sessions may be ended.
    @return: the records to remove (least recently active idle ones first).
    @raise SessionLimitReached: no room can be made; nothing is to be
        removed.
    """
    victims: dict[str, SessionRecord] = {}
    for scope, bucket, cap in (
        ("grant", list(grant_bucket), limits.per_grant),
        ("subject", list(subject_bucket), limits.per_subject),
    ):
        while bucket and len(bucket) - sum(1 for r in bucket if r.session_id in victims) >= cap:
            idle = [r for r in bucket if r.session_id not in victims and is_idle(r)]
            if not idle:
                raise SessionLimitReached(scope, len(bucket))
            victim = min(idle, key=lambda r: r.last_active)
            victims[victim.session_id] = victim
    if total - len(victims) >= limits.total:
        raise SessionLimitReached("server", total)
    return list(victims.values())
