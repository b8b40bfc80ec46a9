# -*- test-case-name: tests.test_doctor_checks -*-
"""
The address itself: the URL given, the server certificate the TLS handshake
showed, and the server's clock (the certificate's dates, token lifetimes
and log lines are read against it).
"""

from __future__ import annotations

import datetime
import email.utils
from collections.abc import Sequence
from typing import Optional

import attr

from smeldr_oauth.doctor.model import Fetched, Verdict, fail, ok, skip


#: Clock difference beyond which the clock check fails, in seconds.  The
#: server checks client metadata documents' TLS certificates and its own
#: token lifetimes against its clock, and people read its logs next to the
#: clients'; a minute is far beyond what NTP leaves.
MAX_CLOCK_SKEW = 60.0

_RENEW = (
    "Renew the certificate (and make sure renewal runs on its own: certbot's timer, your "
    "platform's managed certificates)."
)


def check_url(problem: Optional[str], mcp_url: str) -> Verdict:
    """
    @param problem: what is wrong with the URL (from
        L{parse_mcp_url<smeldr_oauth.doctor.discovery.parse_mcp_url>}), or
        C{None}.
    """
    if problem is not None:
        return fail(
            "url",
            problem,
            "Give the URL you paste into ChatGPT or Claude.ai: https://<your host>/mcp.",
            url=mcp_url,
        )
    return ok("url", f"checking {mcp_url}", url=mcp_url)


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class Certificate:
    """
    The server certificate as the TLS handshake showed it.

    @ivar error: why the handshake or verification failed, else C{None}.
    @ivar not_before: the start of validity (POSIX seconds).
    @ivar not_after: the end of validity (POSIX seconds).
    @ivar subject: its subject, for the message.
    @ivar issuer: its issuer, for the message.
    """

    error: Optional[str] = None
    not_before: Optional[float] = None
    not_after: Optional[float] = None
    subject: str = ""
    issuer: str = ""


def check_tls(certificate: Optional[Certificate], now: float, min_days: float) -> Verdict:
    """
    The certificate is trusted, valid for the host, and valid for at least
    C{min_days} more days.

    @param certificate: C{None} for an http URL (loopback development).
    """
    if certificate is None:
        return skip("tls", "not https (loopback development): no certificate to check")
    if certificate.error is not None:
        if certificate.not_after is not None and certificate.not_after < now:
            # OpenSSL says only "verify failed"; the dates say why.
            return fail(
                "tls",
                f"the certificate expired on {_utc(certificate.not_after)} ({certificate.error})",
                _RENEW,
                error=certificate.error,
            )
        return fail(
            "tls",
            f"TLS failed: {certificate.error}",
            "Serve a certificate from a public CA (e.g. Let's Encrypt) that names this host, with its "
            "intermediate certificates; the assistants do not accept self-signed ones.",
            error=certificate.error,
        )
    details = {"subject": certificate.subject, "issuer": certificate.issuer, "not_after": certificate.not_after}
    if certificate.not_before is not None and certificate.not_before > now:
        return fail(
            "tls",
            f"the certificate is not valid yet (from {_utc(certificate.not_before)})",
            "Check the server's clock and the certificate's dates.",
            **details,
        )
    if certificate.not_after is None:
        return fail("tls", "the certificate has no end date", "Serve a well-formed certificate.", **details)
    days = (certificate.not_after - now) / 86400
    if days < 0:
        return fail(
            "tls",
            f"the certificate expired on {_utc(certificate.not_after)}",
            _RENEW,
            **details,
        )
    if days < min_days:
        return fail(
            "tls",
            f"the certificate expires in {days:.1f} days ({_utc(certificate.not_after)})",
            f"Renew it now; automatic renewal should have happened by {min_days:g} days before expiry.",
            **details,
        )
    return ok("tls", f"certificate valid for {days:.0f} more days, issued by {certificate.issuer}", **details)


def _utc(stamp: float) -> str:
    return datetime.datetime.fromtimestamp(stamp, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def check_clock(answers: Sequence[Fetched], max_skew: float = MAX_CLOCK_SKEW) -> Verdict:
    """
    The server's C{Date} headers agree with this machine's clock.  C{Date}
    has one-second resolution and each answer took some time to arrive,
    so the difference is measured against the time it was received and
    only the smallest one counts.
    """
    skews = []
    for fetched in answers:
        value = fetched.header("date")
        if value is None or fetched.received_at is None:
            continue
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            continue
        if when.tzinfo is None:
            when = when.replace(tzinfo=datetime.timezone.utc)
        skews.append(when.timestamp() - fetched.received_at)
    if not skews:
        return skip("clock", "no Date header in any answer")
    skew = min(skews, key=abs)
    if abs(skew) > max_skew:
        direction = "ahead of" if skew > 0 else "behind"
        return fail(
            "clock",
            f"the server's clock is {abs(skew):.0f} s {direction} this machine's",
            "Run NTP (chrony, systemd-timesyncd) on the server (and on this machine, if it is the one "
            "that is wrong).",
            skew=skew,
        )
    return ok("clock", f"clock within {max(abs(skew), 1.0):.0f} s of this machine's", skew=skew)
