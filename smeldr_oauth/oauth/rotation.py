# -*- test-case-name: tests.test_oauth_rotation -*-
"""
The refresh-token rotation decision, as a pure function.

Every refresh rotates: the presented token is spent and a new one (one
generation higher) replaces it.  Presenting a spent token again is the
signature of a stolen token (RFC 9700 section 4.14.2), so it revokes the
whole grant; but real clients refresh in parallel (two tabs, or Claude.ai's
workers racing on one stored token), and the loser of that race presents a
token the winner has just spent.  Logging such a user out would be a bug, so
a token of the generation just before the live one, spent less than C{grace}
seconds ago, is let through once more: it yields a I{sibling} of the live
generation instead of a new generation.  Siblings are capped so that the
grace window cannot be turned into an unbounded token fountain, and when one
sibling is rotated the unused others are revoked.  Presenting one of those
within C{grace} seconds of that revocation is the same race one step later
(Claude.ai refreshes r0 twice, gets a and b, rotates a, then uses b): it is
refused without ending the grant.  Presenting one later counts as reuse.

The stores (L{smeldr_oauth.store.sqlite}, L{smeldr_oauth.store.memory})
load the facts inside one transaction, call L{decide}, and apply the
L{RotationDecision}; keeping the decision here means both stores share one
policy and it can be tested with plain values.
"""

from __future__ import annotations

from typing import Optional

import attr

from smeldr_oauth.oauth.model import Grant, RefreshToken

#: How many tokens one generation may hold: the rotated one plus the
#: siblings handed out during its predecessor's grace window.
MAX_SIBLINGS = 4

#: Seconds within which a grant's use (C{last_used_at}) is not recorded
#: again by a refresh: the same minute's resolution the access-token
#: verifier records a use with (L{smeldr_oauth.oauth.verifier.TOUCH_INTERVAL}).
#: Its readers are the connected-apps page and C{list_grants} (a time shown
#: to the minute) and the purge, which only removes a grant with no token
#: left and no use for days; a refresh that skips the write saves an
#: C{UPDATE} of the grant's row and its page in the commit.
USE_RESOLUTION = 60.0

UNKNOWN = "unknown"
REVOKED = "revoked"
REUSED = "reused"
EXPIRED = "expired"
INVALID_SCOPE = "invalid_scope"
ROTATED = "rotated"
GRACE = "grace"
GRACE_EXHAUSTED = "grace_exhausted"
SUPERSEDED = "superseded"


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class RotationDecision:
    """
    What a store must do for one refresh request.

    @ivar status: one of the statuses of
        L{smeldr_oauth.oauth.interfaces.RefreshRedemption}.
    @ivar revoke_grant: end the grant and all its tokens (on reuse).
    @ivar mark_used: spend the presented token (on rotation).
    @ivar revoke_unused_siblings: revoke the other unused tokens of the
        presented token's generation (on rotation), so that only one branch
        of a parallel refresh survives.
    @ivar new_generation: the generation of the refresh token to store, or
        C{None} when no token is issued.
    @ivar access_scopes: the scopes of the new access token (narrowed on
        request).
    @ivar refresh_scopes: the scopes of the new refresh token: always the
        grant's, so that narrowing one access token does not narrow the
        grant for good.
    @ivar record_use: set the grant's C{last_used_at} to now (tokens are
        issued and the grant's last recorded use is not within
        L{USE_RESOLUTION} seconds before now).
    """

    status: str
    revoke_grant: bool = False
    mark_used: bool = False
    revoke_unused_siblings: bool = False
    new_generation: Optional[int] = None
    access_scopes: tuple[str, ...] = ()
    refresh_scopes: tuple[str, ...] = ()
    record_use: bool = False

    @property
    def issues_tokens(self) -> bool:
        """
        Whether the store must insert a new access and refresh token.
        """
        return self.new_generation is not None


def use_recorded(grant: Grant, now: float) -> bool:
    """
    Whether C{grant}'s last recorded use is recent enough (within
    L{USE_RESOLUTION} seconds before C{now}) to stand for a use at C{now}.
    A time in the future (a clock stepped back) does not count.
    """
    used = grant.last_used_at
    return used is not None and 0 <= now - used < USE_RESOLUTION


def narrow_scopes(
    granted: tuple[str, ...], requested: Optional[tuple[str, ...]]
) -> Optional[tuple[str, ...]]:
    """
    The scopes of a refreshed access token, or C{None} when the request asks
    for a scope the grant does not hold (RFC 6749 section 6).

    An absent or empty request means "the same scopes as the grant";
    duplicates are dropped and the request's order is kept.
    """
    if not requested:
        return granted
    allowed = set(granted)
    narrowed: list[str] = []
    for scope in requested:
        if scope not in allowed:
            return None
        if scope not in narrowed:
            narrowed.append(scope)
    return tuple(narrowed)


def decide(
    *,
    token: Optional[RefreshToken],
    token_revoked: bool,
    token_revoked_at: Optional[float] = None,
    grant: Optional[Grant],
    live_generation: int,
    live_siblings: int,
    now: float,
    grace: float,
    requested_scopes: Optional[tuple[str, ...]],
    max_siblings: int = MAX_SIBLINGS,
) -> RotationDecision:
    """
    Decide what presenting C{token} at C{now} does.

    The checks run in this order, and the order is the policy:

      1. no such token (or grant): C{"unknown"};
      2. the grant has ended: C{"revoked"};
      3. an unspent token revoked on its own (a sibling superseded when
         another sibling rotated: the stores revoke tokens singly for no
         other reason), revoked at most C{grace} seconds from C{now}:
         C{"superseded"}, refused without ending the grant, because it is
         the loser of a parallel refresh, not a thief;
      4. the token was revoked on its own (a superseded sibling), or is
         spent and not eligible for grace, or is an unspent token of an
         old generation (which the rotation rules never leave behind):
         C{"reused"}, and the grant is revoked.  This comes before expiry
         and scope checks because a replayed token is a theft signal
         whatever else is wrong with the request;
      5. the token's idle lifetime is over: C{"expired"};
      6. the request asks for scopes beyond the grant: C{"invalid_scope"};
      7. a spent token of the generation just before the live one, spent at
         most C{grace} seconds from C{now} (before it, or after it by a
         request that started later): C{"grace"}, a sibling of the live
         generation is issued, unless the live generation already holds
         C{max_siblings} tokens: then C{"grace_exhausted"}, refused
         without ending the grant;
      8. otherwise (an unspent token of the live generation): C{"rotated"}.

    @param token: the presented token as stored, or C{None} if unknown.
    @param token_revoked: whether the token itself carries a revocation.
    @param token_revoked_at: when it was revoked, if it was (and known).
    @param grant: the token's grant, or C{None} if missing.
    @param live_generation: the highest generation stored for the grant.
    @param live_siblings: how many tokens the live generation holds.
    @param grace: the grace window in seconds (0 disables grace).
    @param requested_scopes: the C{scope} parameter of the request, split,
        or C{None} when absent.
    """
    if token is None or grant is None:
        return RotationDecision(status=UNKNOWN)
    if grant.revoked_at is not None:
        return RotationDecision(status=REVOKED)

    # Within the window either way: a request reads its clock when it
    # starts, and a parallel one that started later may have spent (or
    # superseded) the token first (two workers, or batches that commit
    # out of arrival order): the same race, not a theft.
    in_window = (
        grace > 0
        and token.used_at is not None
        and not token_revoked
        and token.generation == live_generation - 1
        and abs(now - token.used_at) <= grace
    )
    superseded = (
        grace > 0
        and token_revoked
        and token_revoked_at is not None
        and token.used_at is None
        and abs(now - token_revoked_at) <= grace
    )
    if superseded:
        return RotationDecision(status=SUPERSEDED)
    stale_unspent = token.used_at is None and token.generation != live_generation
    if token_revoked or stale_unspent or (token.used_at is not None and not in_window):
        return RotationDecision(status=REUSED, revoke_grant=True)
    if in_window and live_siblings >= max_siblings:
        # Yet another replay inside the window: refuse it, but do not end
        # the grant.  A client firing many parallel refreshes (Claude.ai
        # does) must not log its user out; the cap only bounds how many
        # live branches one grace window can create.
        return RotationDecision(status=GRACE_EXHAUSTED)
    in_grace = in_window

    if now >= token.expires_at:
        return RotationDecision(status=EXPIRED)

    access_scopes = narrow_scopes(grant.scopes, requested_scopes)
    if access_scopes is None:
        return RotationDecision(status=INVALID_SCOPE)

    if in_grace:
        return RotationDecision(
            status=GRACE,
            new_generation=live_generation,
            access_scopes=access_scopes,
            refresh_scopes=grant.scopes,
            record_use=not use_recorded(grant, now),
        )
    return RotationDecision(
        status=ROTATED,
        mark_used=True,
        revoke_unused_siblings=True,
        new_generation=token.generation + 1,
        access_scopes=access_scopes,
        refresh_scopes=grant.scopes,
        record_use=not use_recorded(grant, now),
    )
