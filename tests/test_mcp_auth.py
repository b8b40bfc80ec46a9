"""Tests for L{smeldr_oauth.mcp.auth}: bearer parsing and challenges."""

from __future__ import annotations

from typing import Any, Callable

import attr
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from smeldr_oauth.db.errors import StoreUnavailable
from smeldr_oauth.mcp.auth import AuthFailure, BearerAuth, Challenger, Credential, bearer_token, verify
from smeldr_oauth.oauth.model import AccessInfo

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


def _info(expires_at: float) -> AccessInfo:
    return AccessInfo(
        subject="alice",
        client_id="c1",
        scopes=frozenset({"read"}),
        resource="https://x/mcp",
        grant_id="g1",
        expires_at=expires_at,
    )


class CredentialTests(SynchronousTestCase):
    """
    L{BearerAuth.credential} answers at once when the verifier does, and
    exactly as L{BearerAuth.authenticate} would, whatever the verifier says.
    """

    def _auth(self, answer: Callable[[], Any], clock: Clock) -> BearerAuth:
        class V:
            def verify_access_token(self, token: str) -> Any:
                return answer()

        return BearerAuth(V(), C, clock, audience="https://x/mcp")  # type: ignore[arg-type]

    def _request(self, value: bytes = b"Bearer tok") -> Any:
        request = DummyRequest([b"mcp"])
        request.requestHeaders.setRawHeaders(b"authorization", [value])
        return request

    def _settle(self, run: Callable[[Any], Any], request: Any) -> tuple[str, Any]:
        """C{("now", credential)}, C{("later", ...)} or C{("refused", (status, error))}."""
        try:
            found = run(request)
        except AuthFailure as e:
            return ("refused", (e.status, e.error, e.challenge))
        if isinstance(found, Deferred):
            results: list[Any] = []
            found.addBoth(results.append)
            if not results:
                return ("pending", found)
            if isinstance(results[0], Failure):
                refusal = results[0].value
                return ("refused", (refusal.status, refusal.error, refusal.challenge))
            return ("now", results[0])
        return ("now", found)

    def test_same_answer_as_authenticate(self) -> None:
        good = _info(2000.0)
        answers: dict[str, Callable[[], Any]] = {
            "cached": lambda: succeed(good),
            "unknown": lambda: succeed(None),
            "expired": lambda: succeed(attr.evolve(good, expires_at=1000.0)),
            "other resource": lambda: succeed(attr.evolve(good, resource="https://y/mcp")),
            "store down": lambda: fail(StoreUnavailable("down")),
            "verifier broken": lambda: fail(ZeroDivisionError()),
            "verifier raises": lambda: 1 / 0,
            # A verifier that answers with a plain value, not a Deferred
            # (verify() has always taken that, through maybeDeferred).
            "plain answer": lambda: good,
            "plain refusal": lambda: None,
        }
        for name, answer in answers.items():
            clock = Clock()
            clock.advance(1500)
            auth = self._auth(answer, clock)
            fast = self._settle(auth.credential, self._request())
            slow = self._settle(auth.authenticate, self._request())
            self.assertEqual(fast, slow, name)
            self.assertNotEqual(fast[0], "pending", name)
        self.flushLoggedErrors(ZeroDivisionError)
        # A refused header never reaches the verifier.
        auth = self._auth(lambda: succeed(good), Clock())
        self.assertEqual(self._settle(auth.credential, self._request(b"Basic x"))[0], "refused")

    def test_known_now_is_no_deferred(self) -> None:
        good = _info(0.0)
        found = self._auth(lambda: succeed(good), Clock()).credential(self._request())
        assert isinstance(found, Credential)
        self.assertEqual((found.info, found.token), (good, "tok"))

    def test_looked_up_later(self) -> None:
        good = _info(0.0)
        for value, expected in ((good, Credential), (None, AuthFailure)):
            waiting: Deferred[Any] = Deferred()
            found = self._auth(lambda waiting=waiting: waiting, Clock()).credential(self._request())  # type: ignore[misc]
            assert isinstance(found, Deferred)
            self.assertNoResult(found)
            waiting.callback(value)
            if expected is Credential:
                self.assertEqual(self.successResultOf(found).info, good)
            else:
                self.assertEqual(self.failureResultOf(found, AuthFailure).value.status, 401)
