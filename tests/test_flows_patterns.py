"""
L{smeldr_oauth.flows.patterns}: each known failure recognised in a crafted
timeline, and not in the timeline of a flow that went well.
"""

from __future__ import annotations

import re

from twisted.trial.unittest import SynchronousTestCase

from smeldr_oauth.flows import model, patterns
from smeldr_oauth.flows.model import Step
from smeldr_oauth.flows.patterns import Context, recognise

T0 = 1_800_000_000.0
RESOURCE = "https://mcp.example/mcp"
CONTEXT = Context(now=T0 + 500, resource=RESOURCE, access_ttl=300)


def healthy() -> list[Step]:
    """A flow that went well: discovery to tool call, refreshed in time."""
    return [
        Step(at=T0, kind=model.DISCOVERY, address="a", detail={"path": "/.well-known/oauth-protected-resource/mcp"}),
        Step(at=T0 + 1, kind=model.DISCOVERY, address="a", detail={"path": "/.well-known/oauth-authorization-server"}),
        Step(at=T0 + 2, kind=model.REGISTERED, client_id="c", address="a"),
        Step(at=T0 + 3, kind=model.AUTHORIZE, client_id="c", detail={"resource": RESOURCE}),
        Step(at=T0 + 9, kind=model.APPROVED, client_id="c", grant_id="g"),
        Step(at=T0 + 10, kind=model.CODE_EXCHANGED, client_id="c", grant_id="g"),
        Step(at=T0 + 11, kind=model.MCP_INITIALIZE, client_id="c", grant_id="g"),
        Step(at=T0 + 12, kind=model.MCP_CALL, client_id="c", grant_id="g"),
        Step(at=T0 + 290, kind=model.REFRESHED, client_id="c", grant_id="g"),
        Step(at=T0 + 291, kind=model.MCP_CALL, client_id="c", grant_id="g"),
    ]


class PatternTests(SynchronousTestCase):
    def names(self, steps: list[Step], context: Context = CONTEXT) -> list[str]:
        return [f.name for f in recognise(steps, context)]

    def test_healthy_flow_has_no_finding(self) -> None:
        self.assertEqual(self.names(healthy()), [])

    def test_never_used(self) -> None:
        steps = healthy()[:6]
        [finding] = recognise(steps, CONTEXT)
        self.assertEqual(finding.name, patterns.NEVER_USED)
        self.assertIn("token issued 08:00:10; no MCP request with this grant's token since", finding.message)

    def test_never_used_waits_a_minute(self) -> None:
        self.assertEqual(self.names(healthy()[:6], Context(now=T0 + 30, resource=RESOURCE)), [])

    def test_never_used_not_for_a_revoked_grant(self) -> None:
        steps = healthy()[:6] + [Step(at=T0 + 20, kind=model.REVOKED, grant_id="g")]
        self.assertEqual(self.names(steps), [])

    def test_no_refresh_after_expiry(self) -> None:
        steps = healthy()[:8]
        [finding] = recognise(steps, CONTEXT)
        self.assertEqual(finding.name, patterns.NO_REFRESH)
        self.assertIn("access token expired 08:05:10; no refresh attempted since", finding.message)

    def test_no_refresh_not_before_expiry(self) -> None:
        self.assertEqual(self.names(healthy()[:8], Context(now=T0 + 200, resource=RESOURCE, access_ttl=300)), [])

    def test_resource_mismatch_names_both_values(self) -> None:
        other = RESOURCE.replace("https:", "http:")
        steps = [Step(at=T0, kind=model.AUTHORIZE, client_id="c", outcome="invalid_target", detail={"resource": other})]
        [finding] = recognise(steps, CONTEXT)
        self.assertEqual(finding.name, patterns.RESOURCE_MISMATCH)
        self.assertIn(repr(other), finding.message)
        self.assertIn(repr(RESOURCE), finding.message)

    def test_resource_differing_as_the_server_accepts_is_no_mismatch(self) -> None:
        """A trailing slash, an upper-case host: the server takes them."""
        for asked in (RESOURCE + "/", RESOURCE.replace("mcp.example", "MCP.example")):
            steps = [Step(at=T0, kind=model.AUTHORIZE, client_id="c", detail={"resource": asked})]
            self.assertEqual(self.names(steps), [], asked)

    def test_resource_mismatch_at_the_token_endpoint(self) -> None:
        steps = [Step(at=T0, kind=model.TOKEN_REFUSED, client_id="c", outcome="invalid_target")]
        self.assertEqual(self.names(steps), [patterns.RESOURCE_MISMATCH])

    def test_root_metadata_only(self) -> None:
        steps = [
            Step(at=T0, kind=model.DISCOVERY, address="a", detail={"path": "/.well-known/oauth-protected-resource"}),
            Step(at=T0 + 1, kind=model.DISCOVERY, address="a", detail={"path": "/.well-known/oauth-authorization-server"}),
        ]
        [finding] = recognise(steps, CONTEXT)
        self.assertEqual(finding.name, patterns.ROOT_METADATA_ONLY)

    def test_challenge_lost(self) -> None:
        steps = [
            Step(at=T0 + i, kind=model.MCP_REFUSED, address="a", outcome="401", detail={"path": "/mcp", "challenge": "no"})
            for i in range(3)
        ]
        [finding] = recognise(steps, CONTEXT)
        self.assertEqual(finding.name, patterns.CHALLENGE_LOST)
        self.assertIn("3 of them without WWW-Authenticate", finding.message)

    def test_challenge_lost_counts_repeated_requests(self) -> None:
        """
        The recorder keeps identical refusals once with their count
        (L{Step.count}): three refusals in one step are three.
        """
        steps = [
            Step(at=T0, kind=model.MCP_REFUSED, address="a", outcome="401", detail={"challenge": "no", "repeats": "3"})
        ]
        [finding] = recognise(steps, CONTEXT)
        self.assertEqual(finding.name, patterns.CHALLENGE_LOST)
        self.assertIn("3 requests answered 401 (3 of them without WWW-Authenticate)", finding.message)

    def test_challenge_followed_is_not_lost(self) -> None:
        steps = [
            Step(at=T0, kind=model.MCP_REFUSED, address="a", outcome="401", detail={"challenge": "yes"}),
            Step(at=T0 + 1, kind=model.DISCOVERY, address="a", detail={"path": "/.well-known/oauth-protected-resource/mcp"}),
            Step(at=T0 + 2, kind=model.MCP_REFUSED, address="a", outcome="401", detail={"challenge": "yes"}),
        ]
        self.assertEqual(self.names(steps), [])

    def test_stream_cut(self) -> None:
        steps = healthy() + [
            Step(at=T0 + 100 + 61 * i, kind=model.STREAM_CLOSED, client_id="c", grant_id="g", detail={"seconds": s})
            for i, s in enumerate(["60.0", "60.4", "2.0", "59.8"])
        ]
        [finding] = recognise(steps, CONTEXT)
        self.assertEqual(finding.name, patterns.STREAM_CUT)
        self.assertIn("3 event streams closed after about 60 seconds", finding.message)

    def test_streams_of_varied_lengths_are_not_cut(self) -> None:
        steps = healthy() + [
            Step(at=T0 + 100 + i, kind=model.STREAM_CLOSED, client_id="c", grant_id="g", detail={"seconds": s})
            for i, s in enumerate(["12", "95", "300"])
        ]
        self.assertEqual(self.names(steps), [])

    def test_every_finding_has_a_section_in_the_troubleshooting_guide(self) -> None:
        """Each name is the anchor of a heading of docs/troubleshooting.md."""
        import os

        path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "troubleshooting.md")
        with open(path, encoding="utf-8") as f:
            headings = [line.lstrip("#").strip() for line in f if line.startswith("#")]
        anchors = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-") for h in headings}
        for name in (
            patterns.NEVER_USED,
            patterns.NO_REFRESH,
            patterns.RESOURCE_MISMATCH,
            patterns.ROOT_METADATA_ONLY,
            patterns.CHALLENGE_LOST,
            patterns.STREAM_CUT,
        ):
            self.assertIn(name, anchors)
