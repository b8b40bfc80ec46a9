"""
Tests for L{smeldr_oauth.oauth.rotation}: the refresh policy with plain
values, no store.
"""

from __future__ import annotations

from typing import Any, Optional

import attr
from twisted.trial.unittest import SynchronousTestCase

from smeldr_oauth.oauth.model import Grant, RefreshToken
from smeldr_oauth.oauth.rotation import (
    MAX_SIBLINGS,
    USE_RESOLUTION,
    RotationDecision,
    decide,
    narrow_scopes,
    use_recorded,
)

NOW = 1_000_000.0
GRACE = 10.0
SCOPES = ("read", "write")

GRANT = Grant(
    grant_id="g",
    client_id="c",
    subject="alice",
    scopes=SCOPES,
    resource="https://example.com/mcp",
    created_at=0.0,
)
TOKEN = RefreshToken(
    token_hash="h",
    grant_id="g",
    scopes=SCOPES,
    generation=3,
    created_at=NOW - 100,
    expires_at=NOW + 100,
)


def run(
    token: Optional[RefreshToken] = TOKEN,
    grant: Optional[Grant] = GRANT,
    live_generation: int = 3,
    live_siblings: int = 1,
    token_revoked: bool = False,
    requested_scopes: Optional[tuple[str, ...]] = None,
    grace: float = GRACE,
    now: float = NOW,
) -> RotationDecision:
    return decide(
        token=token,
        token_revoked=token_revoked,
        grant=grant,
        live_generation=live_generation,
        live_siblings=live_siblings,
        now=now,
        grace=grace,
        requested_scopes=requested_scopes,
    )


def spent(ago: float, generation: int = 2) -> RefreshToken:
    return attr.evolve(TOKEN, generation=generation, used_at=NOW - ago)


REUSED = RotationDecision(status="reused", revoke_grant=True)


class DecideTests(SynchronousTestCase):
    """
    Tests for L{decide}.
    """

    def test_rotated(self) -> None:
        self.assertEqual(
            run(),
            RotationDecision(
                status="rotated",
                mark_used=True,
                revoke_unused_siblings=True,
                new_generation=4,
                access_scopes=SCOPES,
                refresh_scopes=SCOPES,
                record_use=True,
            ),
        )
        self.assertTrue(run().issues_tokens)

    def test_use_recorded_once_a_minute(self) -> None:
        """
        A rotation or a grace sibling records the grant's use unless its
        last recorded use is less than L{USE_RESOLUTION} seconds old; a
        recorded use in the future (a clock stepped back) is recorded again.
        """
        for used, record in (
            (None, True),
            (NOW, False),
            (NOW - USE_RESOLUTION + 1, False),
            (NOW - USE_RESOLUTION, True),
            (NOW - 3600, True),
            (NOW + 1, True),
        ):
            grant = attr.evolve(GRANT, last_used_at=used)
            self.assertEqual(use_recorded(grant, NOW), not record, used)
            self.assertEqual(run(grant=grant).record_use, record, used)
            self.assertEqual(run(grant=grant, token=spent(1)).record_use, record, used)

    def test_no_use_recorded_without_tokens(self) -> None:
        """
        A refresh that issues nothing records no use.
        """
        for decision in (
            run(token=spent(1000)),
            run(requested_scopes=("admin",)),
            run(token=attr.evolve(TOKEN, expires_at=NOW)),
        ):
            self.assertFalse(decision.issues_tokens)
            self.assertFalse(decision.record_use, decision)

    def test_rotated_narrowed(self) -> None:
        """
        Narrowing applies to the access token, never to the refresh token.
        """
        decision = run(requested_scopes=("write",))
        self.assertEqual((decision.access_scopes, decision.refresh_scopes), (("write",), SCOPES))

    def test_unknown(self) -> None:
        self.assertEqual(run(token=None), RotationDecision(status="unknown"))
        self.assertEqual(run(grant=None), RotationDecision(status="unknown"))

    def test_revoked_grant(self) -> None:
        """
        A revoked grant wins over every other verdict, reuse included
        (there is nothing left to revoke).
        """
        revoked = attr.evolve(GRANT, revoked_at=NOW - 1)
        self.assertEqual(run(grant=revoked), RotationDecision(status="revoked"))
        self.assertEqual(
            run(grant=revoked, token=spent(1000), token_revoked=True),
            RotationDecision(status="revoked"),
        )

    def test_expired(self) -> None:
        self.assertEqual(run(now=TOKEN.expires_at), RotationDecision(status="expired"))
        self.assertFalse(run(now=TOKEN.expires_at).issues_tokens)

    def test_invalid_scope(self) -> None:
        self.assertEqual(run(requested_scopes=("read", "admin")), RotationDecision(status="invalid_scope"))

    def test_grace(self) -> None:
        """
        The previous generation, spent within the window, yields a sibling
        of the live generation and spends nothing more.
        """
        for ago in (0.0, GRACE / 2, GRACE):
            self.assertEqual(
                run(token=spent(ago)),
                RotationDecision(
                    status="grace",
                    new_generation=3,
                    access_scopes=SCOPES,
                    refresh_scopes=SCOPES,
                    record_use=True,
                ),
            )

    def test_grace_invalid_scope(self) -> None:
        self.assertEqual(
            run(token=spent(1), requested_scopes=("admin",)),
            RotationDecision(status="invalid_scope"),
        )

    def test_after_grace(self) -> None:
        self.assertEqual(run(token=spent(GRACE + 0.001)), REUSED)

    def test_grace_disabled(self) -> None:
        self.assertEqual(run(token=spent(0), grace=0), REUSED)

    def test_spent_in_the_future(self) -> None:
        """
        A spend up to C{grace} after C{now} is a parallel request that
        started later and spent first (two workers): grace, as before it;
        further (a clock stepped back a long way) is not.
        """
        self.assertEqual(run(token=spent(-0.005)).status, "grace")
        self.assertEqual(run(token=spent(-GRACE)).status, "grace")
        self.assertEqual(run(token=spent(-GRACE - 0.001)), REUSED)

    def test_sibling_cap(self) -> None:
        self.assertEqual(run(token=spent(1), live_siblings=MAX_SIBLINGS - 1).status, "grace")
        decision = run(token=spent(1), live_siblings=MAX_SIBLINGS)
        self.assertEqual(decision.status, "grace_exhausted")
        self.assertFalse(decision.revoke_grant)
        self.assertIsNone(decision.new_generation)

    def test_older_generation(self) -> None:
        self.assertEqual(run(token=spent(1, generation=1)), REUSED)

    def test_spent_live_generation(self) -> None:
        """
        A spent token of the live generation is reuse (its successor must
        have been deleted; nothing legitimate presents it).
        """
        self.assertEqual(run(token=spent(1, generation=3)), REUSED)

    def test_revoked_sibling(self) -> None:
        """
        An unspent token revoked because a sibling was rotated is reuse.
        """
        self.assertEqual(run(token=attr.evolve(TOKEN, generation=2), token_revoked=True), REUSED)
        self.assertEqual(run(token_revoked=True), REUSED)

    def test_stale_unspent(self) -> None:
        self.assertEqual(run(token=attr.evolve(TOKEN, generation=1)), REUSED)

    def test_reuse_before_expiry_and_scope(self) -> None:
        """
        Reuse is detected even when the request is also expired or asks for
        too much: a replay is a theft signal whatever else is wrong.
        """
        old = attr.evolve(spent(1000), expires_at=NOW - 1)
        self.assertEqual(run(token=old, requested_scopes=("admin",)), REUSED)


class NarrowScopesTests(SynchronousTestCase):
    """
    Tests for L{narrow_scopes}.
    """

    def test_absent(self) -> None:
        self.assertEqual(narrow_scopes(SCOPES, None), SCOPES)
        self.assertEqual(narrow_scopes(SCOPES, ()), SCOPES)

    def test_subset(self) -> None:
        self.assertEqual(narrow_scopes(SCOPES, ("write", "read", "write")), ("write", "read"))

    def test_beyond(self) -> None:
        self.assertIsNone(narrow_scopes(SCOPES, ("read", "admin")))
        self.assertIsNone(narrow_scopes((), ("read",)))

    def test_exhaustive_small(self) -> None:
        """
        For every request over a small alphabet, the result is C{None}
        exactly when the request leaves the grant, and otherwise a
        duplicate-free subset.
        """
        from itertools import product

        alphabet = ("a", "b", "c")
        for size in range(4):
            for requested in product(alphabet, repeat=size):
                result: Any = narrow_scopes(("a", "b"), requested)
                if not requested:
                    self.assertEqual(result, ("a", "b"))
                elif set(requested) <= {"a", "b"}:
                    self.assertEqual(set(result), set(requested))
                    self.assertEqual(len(result), len(set(result)))
                else:
                    self.assertIsNone(result)


class SupersededTests(SynchronousTestCase):
    """
    A sibling revoked because another sibling rotated, presented again
    (the Claude.ai pattern: refresh r0 twice, rotate one result, use the
    other).
    """

    def decide(self, revoked_ago: float, grace: float = GRACE, **kw: Any) -> RotationDecision:
        token = attr.evolve(TOKEN, generation=2)
        return decide(
            token=kw.get("token", token),
            token_revoked=True,
            token_revoked_at=NOW - revoked_ago,
            grant=kw.get("grant", GRANT),
            live_generation=3,
            live_siblings=1,
            now=NOW,
            grace=grace,
            requested_scopes=None,
        )

    def test_inside_window(self) -> None:
        for ago in (0, 1, GRACE):
            self.assertEqual(self.decide(ago), RotationDecision(status="superseded"), ago)

    def test_outside_window_is_reuse(self) -> None:
        self.assertEqual(self.decide(GRACE + 0.001), REUSED)

    def test_future_revocation(self) -> None:
        """
        A revocation up to C{grace} after C{now} is a parallel request that
        started later and rotated the other sibling first (two workers):
        superseded, as before it; further (a clock stepped back a long
        way) is not trusted to excuse anything.
        """
        for ago in (-0.005, -1, -GRACE):
            self.assertEqual(self.decide(ago), RotationDecision(status="superseded"), ago)
        self.assertEqual(self.decide(-GRACE - 0.001), REUSED)

    def test_grace_off(self) -> None:
        self.assertEqual(self.decide(0, grace=0), REUSED)

    def test_spent_and_revoked_is_reuse(self) -> None:
        """
        Only an unused sibling can be a race's loser.
        """
        token = attr.evolve(TOKEN, generation=2, used_at=NOW - 1)
        self.assertEqual(self.decide(1, token=token), REUSED)

    def test_unknown_revocation_time_is_reuse(self) -> None:
        decision = decide(
            token=attr.evolve(TOKEN, generation=2),
            token_revoked=True,
            grant=GRANT,
            live_generation=3,
            live_siblings=1,
            now=NOW,
            grace=GRACE,
            requested_scopes=None,
        )
        self.assertEqual(decision, REUSED)

    def test_revoked_grant_first(self) -> None:
        grant = attr.evolve(GRANT, revoked_at=NOW - 1)
        self.assertEqual(self.decide(1, grant=grant).status, "revoked")

    def test_changes_nothing(self) -> None:
        decision = self.decide(1)
        self.assertFalse(decision.revoke_grant or decision.mark_used or decision.revoke_unused_siblings)
        self.assertFalse(decision.issues_tokens)
