# -*- test-case-name: tests.test_doctor_checks -*-
"""
The records the doctor's checks work on: what one HTTP exchange showed
(L{Fetched}), what a check concluded (L{Verdict}), and where the
troubleshooting guide explains each check (L{SECTIONS}).

Records hold plain values only, so every check is a pure function that a
test can feed crafted inputs.
"""

from __future__ import annotations

import json
import re
from typing import Any, Mapping, Optional

import attr

#: A check passed, failed, or could not run (e.g. no credentials for it).
OK = "ok"
FAIL = "fail"
SKIP = "skip"

#: The guide the fixes point to.
GUIDE = "docs/troubleshooting.md"

#: Each check's section in L{GUIDE} (its heading, below "Doctor checks").
#: One place: the report links here and a test checks every heading exists.
SECTIONS: Mapping[str, str] = {
    "url": "The MCP URL",
    "tls": "TLS certificate",
    "prm-path": "Protected resource metadata",
    "prm-root": "Protected resource metadata",
    "resource": "Resource identifier",
    "as-metadata": "Authorization server metadata",
    "issuer": "Issuer",
    "as-fields": "Metadata fields clients need",
    "oidc": "OpenID configuration",
    "challenge": "The 401 challenge",
    "cors": "CORS on discovery",
    "forwarded": "Forwarded headers",
    "clock": "Clock",
    "flow": "Authorization flow",
    "session": "MCP sessions",
    "stream": "Event stream delivery",
}


def anchor(title: str) -> str:
    """
    The anchor Sphinx (MyST, C{myst_heading_anchors}) and GitHub give a
    heading: lower case, punctuation dropped, spaces to hyphens.
    """
    text = re.sub(r"[^\w\- ]", "", title.strip().lower())
    return text.replace(" ", "-")


def section_link(check: str) -> str:
    """
    Where the guide explains C{check}: C{docs/troubleshooting.md#anchor}.
    """
    return f"{GUIDE}#{anchor(SECTIONS[check])}"


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class Fetched:
    """
    What one HTTP exchange showed.

    @ivar url: the URL asked for (after redirects: where the answer came
        from, see C{final_url}).
    @ivar status: the status code; C{None} when no answer came (then
        C{error} says why).
    @ivar headers: header values by lower-case name.
    @ivar body: the body, capped by the fetcher.
    @ivar error: why there was no answer (refused, timed out, TLS).
    @ivar final_url: where the answer came from after redirects.
    @ivar received_at: the local time (POSIX seconds) the answer arrived,
        for the clock check.
    """

    url: str
    status: Optional[int] = None
    headers: Mapping[str, tuple[str, ...]] = attr.ib(factory=dict)
    body: bytes = b""
    error: Optional[str] = None
    final_url: Optional[str] = None
    received_at: Optional[float] = None

    def header(self, name: str) -> Optional[str]:
        """
        The first value of header C{name}, or C{None}.
        """
        values = self.headers.get(name.lower())
        return values[0] if values else None

    def media_type(self) -> str:
        return (self.header("content-type") or "").split(";", 1)[0].strip().lower()

    def json_object(self) -> tuple[Optional[dict[str, Any]], Optional[str]]:
        """
        The body as a JSON object, or C{None} and why it is not one.
        """
        try:
            value = json.loads(self.body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            return None, f"the body is not JSON ({describe_body(self)})"
        if not isinstance(value, dict):
            return None, "the body is JSON but not an object"
        return value, None

    def answered(self) -> str:
        """
        A short account of the answer for a message: C{"404 text/html"},
        or the error.
        """
        if self.status is None:
            return self.error or "no answer"
        kind = self.media_type() or "no content type"
        return f"{self.status} {kind}"


def describe_body(fetched: Fetched, width: int = 60) -> str:
    """
    The start of a body, printable, for a message about a document that is
    not what it should be (an HTML error page, a proxy's text).  Only used
    for public documents: never for token endpoint answers.
    """
    text = fetched.body[:width * 2].decode("utf-8", "replace")
    text = " ".join(text.split())
    text = "".join(c if c.isprintable() else "?" for c in text)
    if not text:
        return "empty"
    return repr(text[:width] + ("…" if len(text) > width else ""))


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class Verdict:
    """
    What one check concluded: one line of the report.

    @ivar check: the check's name (a key of L{SECTIONS}).
    @ivar status: L{OK}, L{FAIL} or L{SKIP}.
    @ivar summary: one line saying what was seen.
    @ivar fix: for a failure, what to change.
    @ivar details: plain values for C{--json} (never a secret).
    """

    check: str
    status: str
    summary: str
    fix: str = ""
    details: Mapping[str, Any] = attr.ib(factory=dict)

    @property
    def ok(self) -> bool:
        return self.status != FAIL

    @property
    def link(self) -> str:
        return section_link(self.check)


def ok(check: str, summary: str, **details: Any) -> Verdict:
    return Verdict(check=check, status=OK, summary=summary, details=details)


def fail(check: str, summary: str, fix: str, **details: Any) -> Verdict:
    return Verdict(check=check, status=FAIL, summary=summary, fix=fix, details=details)


def skip(check: str, summary: str, **details: Any) -> Verdict:
    return Verdict(check=check, status=SKIP, summary=summary, details=details)
