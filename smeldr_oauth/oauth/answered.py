# -*- test-case-name: tests.test_oauth_server -*-
"""
What the store's answer to a token request's spend means, whoever still
waits for it.

A client that leaves cancels its request, not the store's call that spends
its code or refresh token, whose effects stand anyway: a spent token, a
grant revoked for a replay.  So what must follow those effects runs on the
store's answer (L{kept}), not in the request's coroutine, which a hang-up
ends at its next C{await}:

  - a replayed code or reused refresh token (the store has revoked the
    grant in the same transaction) is logged and the caches are told
    (L{_spent_again}); seen over a real socket on PostgreSQL, a client
    that hung up at once had its grant revoked with no log line, and this
    process's cache kept accepting the grant's access tokens;
  - a refresh token rotated for another client than its own is a stolen
    one: its grant is revoked (L{_stolen}).  Checked after the request's
    await, a thief that hung up left the grant alive (and the theft
    unlogged), its owner's next refresh then taken for a reuse at best.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from smeldr_oauth.oauth import rotation
from smeldr_oauth.oauth.revocation import GrantEvents
from smeldr_oauth.oauth.text import loggable

log = Logger()

#: The statuses of L{smeldr_oauth.oauth.interfaces.CodeRedemption}.
CODE_OK = "ok"
CODE_REPLAYED = "replayed"

#: A refresh's statuses that hand out tokens of the grant.
_ISSUED = (rotation.ROTATED, rotation.GRACE)


def kept(
    stored: "Deferred[Any]",
    events: GrantEvents,
    store: Any = None,
    client_id: Optional[str] = None,
    now: float = 0.0,
) -> "Deferred[Any]":
    """
    What a token request awaits of the store call C{stored} that spends
    its code or refresh token: a client that leaves cancels this, not
    C{stored}.

    @param store: with C{client_id}, a refresh's: the store that revokes
        the grant of a token rotated for another client than
        C{client_id}, at C{now}; the answer then waits for the revocation
        (and the request is refused whether or not it succeeded).
    """
    waiter: Deferred[Any] = Deferred()
    stored.addBoth(_answered, waiter, events, store, client_id, now)
    return waiter


def _answered(
    result: Any, waiter: "Deferred[Any]", events: GrantEvents, store: Any, client_id: Optional[str], now: float
) -> None:
    # One callback: the wait costs 14,000 instructions more than the
    # store's Deferred alone, 20,000 with two (callgrind, a bare loop).
    if not isinstance(result, Failure):
        _spent_again(result, events)
        if client_id is not None:
            revoking = _stolen(result, client_id, store, events, now)
            if revoking is not None:
                revoking.addBoth(_revoked, waiter, result)
                return
    if not waiter.called:
        waiter.callback(result)


def _spent_again(result: Any, events: GrantEvents) -> None:
    """
    A single-use credential presented a second time (a replayed code, a
    reused refresh token; RFC 9700 section 4.14.2 and OAuth 2.1 section
    4.1.3), seen in the store's C{result}: the store has already revoked
    the grant in the same transaction; this says so in the log and tells
    the caches the grant is gone.

    @param result: a code's redemption, a refresh token's, or the carried
        refresh's C{(spend, redemption)}.
    """
    redemption = result[1] if isinstance(result, tuple) else result
    status = getattr(redemption, "status", None)
    if status == CODE_REPLAYED:
        how, credential, event, spent = "replayed", "authorization code", "code_replay", redemption.code
    elif status == rotation.REUSED:
        how, credential, event, spent = "reused", "refresh token", "refresh_reuse", redemption.grant
    else:
        return
    log.warn(
        "{how} {credential} refused: grant {grant_id} revoked",
        how=how,
        credential=credential,
        grant_id=spent.grant_id,
        client_id=loggable(spent.client_id),
        smeldr_event=event,
    )
    events.grant_revoked(spent.grant_id)


def _stolen(result: Any, client_id: str, store: Any, events: GrantEvents, now: float) -> "Optional[Deferred[Any]]":
    """
    A refresh token rotated for a client other than its grant's: a stolen
    one (RFC 9700 section 4.14.2).  The grant is ended rather than the
    request just refused: the revocation, its log line and the caches
    told, or C{None} when C{result} is no such rotation.
    """
    redemption = result[1] if isinstance(result, tuple) else result
    if getattr(redemption, "status", None) not in _ISSUED or redemption.grant.client_id == client_id:
        return None
    grant = redemption.grant

    def revoked(ignored: object) -> None:
        events.grant_revoked(grant.grant_id)
        log.warn(
            "refresh token of client {owner} presented by {client_id}: grant {grant_id} revoked",
            owner=loggable(grant.client_id),
            client_id=loggable(client_id),
            grant_id=grant.grant_id,
            smeldr_event="refresh_wrong_client",
        )

    revoking: Deferred[Any] = store.revoke_grant(grant.grant_id, now)
    return revoking.addCallback(revoked)


def _revoked(outcome: Any, waiter: "Deferred[Any]", result: Any) -> None:
    # The answer waits for the revocation.  One that failed (a database
    # outage) is one warning line: the request is refused all the same
    # (the token is another client's), and the owner's next refresh finds
    # its token spent.
    if isinstance(outcome, Failure):
        log.warn(
            "a stolen refresh token's grant was not revoked: {error}",
            error=outcome.getErrorMessage(),
            smeldr_event="refresh_wrong_client_failed",
        )
    if not waiter.called:
        waiter.callback(result)
