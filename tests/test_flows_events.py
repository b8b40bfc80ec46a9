"""
L{smeldr_oauth.flows.events}: which log events become steps, and that only
the allow-listed fields are kept.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from smeldr_oauth.flows import model
from smeldr_oauth.flows.events import step_from_event

T0 = 1_800_000_000.0


class StepFromEventTests(SynchronousTestCase):
    def test_ignored(self) -> None:
        self.assertIsNone(step_from_event({"log_time": T0}))
        self.assertIsNone(step_from_event({"log_time": T0, "smeldr_event": "rate_limited"}))
        # An ordinary request through the site hook is no step.
        self.assertIsNone(step_from_event({"smeldr_event": "http_step", "path": "/mcp", "status": 200}))

    def test_token_issued(self) -> None:
        step = step_from_event(
            {"log_time": T0, "smeldr_event": "token_issued", "grant_type": "refresh_token", "client_id": "c", "grant_id": "g"}
        )
        assert step is not None
        self.assertEqual((step.kind, step.client_id, step.grant_id, step.at), (model.REFRESHED, "c", "g", T0))

    def test_decisions(self) -> None:
        approved = step_from_event({"smeldr_event": "grant_approved", "client_id": "c", "grant_id": "g"})
        denied = step_from_event({"smeldr_event": "grant_denied", "client_id": "c"})
        assert approved is not None and denied is not None
        self.assertEqual((approved.kind, approved.outcome), (model.APPROVED, "approved"))
        self.assertEqual((denied.kind, denied.outcome), (model.APPROVED, "denied"))

    def test_http_kinds(self) -> None:
        def kind(path: str, status: int) -> object:
            step = step_from_event({"log_time": T0, "smeldr_event": "http_step", "path": path, "status": status})
            return None if step is None else (step.kind, step.outcome)

        self.assertEqual(kind("/.well-known/oauth-protected-resource/mcp", 200), (model.DISCOVERY, "ok"))
        self.assertEqual(kind("/.well-known/openid-configuration", 404), (model.DISCOVERY, "404"))
        self.assertEqual(kind("/oauth/authorize", 200), (model.AUTHORIZE, "ok"))
        self.assertEqual(kind("/mcp", 401), (model.MCP_REFUSED, "401"))
        step = step_from_event(
            {"smeldr_event": "http_step", "path": "/oauth/authorize", "status": 302, "error": "invalid_target"}
        )
        assert step is not None
        self.assertEqual((step.kind, step.outcome), (model.AUTHORIZE, "invalid_target"))

    def test_only_allowed_fields_are_kept(self) -> None:
        """
        Whatever else an event carries (a token, a code, a site token a
        careless emitter added) stays out of the step.
        """
        secret = "s3cr3t-value"
        step = step_from_event(
            {
                "log_time": T0,
                "smeldr_event": "token_issued",
                "grant_type": "authorization_code",
                "client_id": "c",
                "access_token": secret,
                "refresh_token": secret,
                "code": secret,
                "code_verifier": secret,
                "client_secret": secret,
                "token": secret,
                "log_format": secret,
            }
        )
        assert step is not None
        self.assertNotIn(secret, repr(step.as_json()))

    def test_values_are_clipped_and_printable(self) -> None:
        step = step_from_event(
            {"log_time": T0, "smeldr_event": "client_registered", "client_id": "x\n" + "y" * 500}
        )
        assert step is not None and step.client_id is not None
        self.assertEqual(len(step.client_id), model.MAX_FIELD)
        self.assertNotIn("\n", step.client_id)


class StepCountTests(SynchronousTestCase):
    def test_count(self) -> None:
        """How many requests a step stands for; anything odd counts as one."""
        from smeldr_oauth.flows.model import Step

        def count(**detail: str) -> int:
            return Step(at=0.0, kind=model.DISCOVERY, detail=detail).count

        self.assertEqual((count(), count(repeats="7")), (1, 7))
        self.assertEqual((count(repeats="x"), count(repeats="0"), count(repeats="-3")), (1, 1, 1))
