# -*- test-case-name: tests.test_flows_patterns -*-
"""
The known ways a connector fails, recognised in a timeline.

Each recogniser is a pure function of one client's (or one grant's) steps,
oldest first, and a L{Context} (now, the resource this server issues
tokens for, the access token lifetime); it returns the L{Finding}s it
sees.  Each finding names a section of C{docs/troubleshooting.md}, where
the operator reads what causes it and what to change.
"""

from __future__ import annotations

import time
from typing import Callable, Optional, Sequence

import attr

from smeldr_oauth.flows import model
from smeldr_oauth.flows.model import Step
from smeldr_oauth.oauth.urls import canonical_resource

#: Where the findings' sections live.
DOCS = "docs/troubleshooting.md"

NEVER_USED = "token-issued-but-never-used"
NO_REFRESH = "no-refresh-after-expiry"
RESOURCE_MISMATCH = "resource-mismatch"
ROOT_METADATA_ONLY = "root-metadata-probes-only"
CHALLENGE_LOST = "www-authenticate-not-reaching-the-client"
STREAM_CUT = "stream-cut-after-n-seconds"

#: A token unused for this long after it was issued is "never used".
NEVER_USED_AFTER = 60.0
#: Streams closed within this many seconds of each other's lifetime are
#: taken to be cut by one timeout.
STREAM_SLACK = 1.5
#: Shorter streams are ordinary reconnects, not a proxy's timeout.
MIN_STREAM_CUT = 2.0

PROTECTED_RESOURCE = "/.well-known/oauth-protected-resource"
AUTHORIZATION_SERVER = "/.well-known/oauth-authorization-server"
ROOT_PATHS = frozenset({PROTECTED_RESOURCE, AUTHORIZATION_SERVER, "/.well-known/openid-configuration"})


@attr.s(frozen=True, auto_attribs=True)
class Context:
    """
    What the recognisers compare steps with.

    @ivar now: the time the timeline is read.
    @ivar resource: the resource this server's tokens are for.
    @ivar access_ttl: seconds an access token lives.
    @ivar grace: seconds after a token is issued before "never used".
    """

    now: float
    resource: Optional[str] = None
    access_ttl: float = 3600.0
    grace: float = NEVER_USED_AFTER


@attr.s(frozen=True, auto_attribs=True)
class Finding:
    """
    A named pattern seen in a timeline.

    @ivar name: the section's anchor in C{docs/troubleshooting.md}.
    @ivar message: what happened (and what did not), in one line.
    @ivar at: the time of the step the finding is about.
    """

    name: str
    message: str
    at: float

    @property
    def link(self) -> str:
        return f"{DOCS}#{self.name}"

    def as_json(self) -> dict[str, object]:
        return {"name": self.name, "message": self.message, "at": self.at, "link": self.link}


def clock_time(at: float) -> str:
    """C{HH:MM:SS} in UTC."""
    return time.strftime("%H:%M:%S", time.gmtime(at))


def _issued(steps: Sequence[Step]) -> dict[str, Step]:
    """The latest token issue of each grant."""
    latest: dict[str, Step] = {}
    for step in steps:
        if step.kind in (model.CODE_EXCHANGED, model.REFRESHED) and step.grant_id is not None:
            latest[step.grant_id] = step
    return latest


def _used_since(steps: Sequence[Step], grant_id: str, since: float) -> list[Step]:
    return [s for s in steps if s.kind in model.MCP_USE and s.grant_id == grant_id and s.at >= since]


def _revoked(steps: Sequence[Step], grant_id: str, since: float) -> bool:
    return any(s.kind == model.REVOKED and s.grant_id == grant_id and s.at >= since for s in steps)


def never_used(steps: Sequence[Step], context: Context) -> list[Finding]:
    """
    A token was issued and no MCP request with the grant's token came
    after it (the assistant's "could not connect" after a completed OAuth
    flow).
    """
    found = []
    for grant_id, issue in _issued(steps).items():
        if context.now - issue.at < context.grace or _revoked(steps, grant_id, issue.at):
            continue
        if any(s.kind in model.MCP_USE and s.grant_id == grant_id for s in steps):
            continue
        found.append(
            Finding(
                NEVER_USED,
                f"token issued {clock_time(issue.at)}; no MCP request with this grant's token since"
                f" (grant {grant_id})",
                issue.at,
            )
        )
    return found


def no_refresh(steps: Sequence[Step], context: Context) -> list[Finding]:
    """
    A client used its access token, the token expired, and no refresh
    came: the client will fail at its next call (or has fallen back to a
    new authorization).
    """
    found = []
    for grant_id, issue in _issued(steps).items():
        expired = issue.at + context.access_ttl
        if expired > context.now or _revoked(steps, grant_id, issue.at):
            continue
        if not _used_since(steps, grant_id, issue.at):
            continue  # never_used says it better
        found.append(
            Finding(
                NO_REFRESH,
                f"access token expired {clock_time(expired)}; no refresh attempted since (grant {grant_id})",
                expired,
            )
        )
    return found


def resource_mismatch(steps: Sequence[Step], context: Context) -> list[Finding]:
    """
    The client asked for a C{resource} that is not ours (http for https,
    another host name or path).  Compared as the server compares them
    (L{canonical_resource}: a trailing slash or a default port is no
    mismatch, the server accepts those).
    """
    if not context.resource:
        return []
    ours = canonical_resource(context.resource)
    for step in reversed(steps):
        asked = step.detail.get("resource")
        if (
            step.kind in (model.AUTHORIZE, model.TOKEN_REFUSED)
            and asked
            and canonical_resource(asked) != ours
        ):
            return [
                Finding(
                    RESOURCE_MISMATCH,
                    f"client asked for resource {asked!r}; this server's resource is {context.resource!r}",
                    step.at,
                )
            ]
        if step.kind == model.TOKEN_REFUSED and step.outcome == "invalid_target":
            return [
                Finding(
                    RESOURCE_MISMATCH,
                    f"token request refused with invalid_target; this server's resource is {context.resource!r}",
                    step.at,
                )
            ]
    return []


def root_metadata_only(steps: Sequence[Step], context: Context) -> list[Finding]:
    """
    The client fetched only the root well-known URLs, never the
    path-inserted ones a resource with a path has (RFC 9728 section 3.1),
    and the flow went no further than discovery.
    """
    paths = [s.detail.get("path", "") for s in steps if s.kind == model.DISCOVERY]
    if not paths or any(s.kind in (model.CODE_EXCHANGED, model.REFRESHED) for s in steps):
        return []
    if any(p not in ROOT_PATHS for p in paths):
        return []
    first = next(s for s in steps if s.kind == model.DISCOVERY)
    return [
        Finding(
            ROOT_METADATA_ONLY,
            "only the root metadata URLs were requested (" + ", ".join(sorted(set(paths))) + ");"
            " never the resource's own path",
            first.at,
        )
    ]


def challenge_lost(steps: Sequence[Step], context: Context) -> list[Finding]:
    """
    Requests keep getting 401 and the client never fetches the protected
    resource metadata the challenge points to: the C{WWW-Authenticate}
    header is not reaching it (a proxy answering 401 itself, or dropping
    the header), or the 401 left without one.
    """
    refused = [s for s in steps if s.kind == model.MCP_REFUSED and s.outcome == "401"]
    # A step may stand for several identical refusals (Step.count).
    times = sum(s.count for s in refused)
    if times < 2:
        return []
    first = refused[0]
    fetched = any(
        s.kind == model.DISCOVERY and s.detail.get("path", "").startswith(PROTECTED_RESOURCE) and s.at >= first.at
        for s in steps
    )
    if fetched:
        return []
    bare = sum(s.count for s in refused if s.detail.get("challenge") == "no")
    how = f"{bare} of them without WWW-Authenticate" if bare else "each with WWW-Authenticate when it left this server"
    return [
        Finding(
            CHALLENGE_LOST,
            f"{times} requests answered 401 ({how}); the protected resource metadata was never fetched after",
            first.at,
        )
    ]


def stream_cut(steps: Sequence[Step], context: Context) -> list[Finding]:
    """
    Event streams keep ending after the same number of seconds: a proxy
    or load balancer in between times them out.
    """
    durations = []
    for step in steps:
        if step.kind != model.STREAM_CLOSED:
            continue
        try:
            durations.append((float(step.detail.get("seconds", "")), step.at))
        except ValueError:
            continue
    long_enough = [(d, at) for d, at in durations if d >= MIN_STREAM_CUT]
    for seconds, at in reversed(long_enough):
        same = [d for d, _ in long_enough if abs(d - seconds) <= STREAM_SLACK]
        if len(same) >= 2:
            return [
                Finding(
                    STREAM_CUT,
                    f"{len(same)} event streams closed after about {round(seconds)} seconds each:"
                    " something in between times them out",
                    at,
                )
            ]
    return []


RECOGNISERS: tuple[Callable[[Sequence[Step], Context], list[Finding]], ...] = (
    resource_mismatch,
    root_metadata_only,
    challenge_lost,
    never_used,
    no_refresh,
    stream_cut,
)


def recognise(steps: Sequence[Step], context: Context) -> list[Finding]:
    """Every finding of every recogniser, in the order a flow meets them."""
    found: list[Finding] = []
    for recogniser in RECOGNISERS:
        found.extend(recogniser(steps, context))
    return found
