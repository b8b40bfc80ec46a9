"""Tests for L{smeldr_oauth.mcp.auth}: bearer parsing and challenges."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from smeldr_oauth.mcp.auth import AuthFailure, Challenger, bearer_token, verify

C = Challenger("https://x/.well-known/oauth-protected-resource/mcp", "read write")


class BearerTests(SynchronousTestCase):
    def test_good(self) -> None:
        self.assertEqual(bearer_token([b"Bearer abc.DEF-_~+/=="], C), "abc.DEF-_~+/==")
        self.assertEqual(bearer_token([b"bearer abc"], C), "abc")

    def test_missing(self) -> None:
        for value in (None, [], [b"Basic abc"]):
            with self.assertRaises(AuthFailure) as caught:
                bearer_token(value, C)
            self.assertEqual(caught.exception.status, 401)
            self.assertEqual(
                caught.exception.challenge,
                'Bearer resource_metadata="https://x/.well-known/oauth-protected-resource/mcp", scope="read write"',
            )

    def test_malformed(self) -> None:
        for value in ([b"Bearer "], [b"Bearer a b"], [b"Bearer \xff"], [b"Bearer " + b"a" * 5000]):
            with self.assertRaises(AuthFailure) as caught:
                bearer_token(value, C)
            self.assertIn('error="invalid_token"', caught.exception.challenge)
        with self.assertRaises(AuthFailure) as caught:
            bearer_token([b"Bearer a", b"Bearer b"], C)
        self.assertEqual(caught.exception.status, 400)

    def test_quoting(self) -> None:
        challenge = Challenger('https://x/"evil"', "a").insufficient_scope(("s",)).challenge
        self.assertIn('resource_metadata="https://x/\\"evil\\""', challenge)


class VerifyTests(SynchronousTestCase):
    def test_unknown_token(self) -> None:
        class V:
            def verify_access_token(self, token: str) -> None:
                return None

        failure = self.failureResultOf(verify(V(), "t", C, Clock()), AuthFailure)
        self.assertEqual(failure.value.status, 401)
