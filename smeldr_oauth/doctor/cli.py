# -*- test-case-name: tests.test_doctor_cli -*-
"""
C{smeldr-oauth-admin doctor URL}: the subcommand's options and its run.

Credentials (optional; without them the flow, session and stream checks
are reported as not run):

  - C{--site-token-file PATH} (C{-} for stdin) or C{$SMELDR_SITE_TOKEN}: a
    site token; the doctor registers a client, approves it with the token
    on the consent page, gets an access token, and revokes it at the end;
  - C{--access-token-file PATH} (C{-} for stdin) or
    C{$SMELDR_ACCESS_TOKEN}: an access token for the MCP URL, used as it is
    (for servers without dynamic registration, or not smeldr-oauth).

Never on the command line (where C{ps} and shell history show it), never
printed, sent only to the MCP URL's own origin.  A token is visible ASCII
(RFC 6750's C{b64token} is a part of it; the server's tokens are
URL-safe base64): anything else is refused up front, before a request
carries it (a character outside Latin-1 cannot be a header value at all).

Where the doctor may connect: L{smeldr_oauth.doctor.guard} (public
addresses, and the given URL's own host; C{--allow-private} for a
deployment over several private hosts).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import IO, Any, Optional

from twisted.internet.defer import Deferred, ensureDeferred

SITE_TOKEN_ENV = "SMELDR_SITE_TOKEN"
ACCESS_TOKEN_ENV = "SMELDR_ACCESS_TOKEN"


class CredentialError(Exception):
    """
    A credential could not be read; the message names the source, never
    the value.
    """


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """
    Add C{doctor} to an argparse subparsers object (the admin CLI's).
    """
    doctor: argparse.ArgumentParser = commands.add_parser(
        "doctor",
        help="check a deployment from outside, as ChatGPT and Claude.ai see it",
        description="Check a deployment from outside, as ChatGPT, Claude.ai and the MCP SDKs see it. "
        "Exit status 0 when no check failed, 1 when one did.",
    )
    doctor.add_argument("url", metavar="URL", help="the MCP URL people paste, e.g. https://example.com/mcp")
    doctor.add_argument("--json", action="store_true", help="print one JSON document instead of lines")
    doctor.add_argument(
        "--site-token-file",
        metavar="PATH",
        help=f"read a site token from PATH (- for stdin; or set ${SITE_TOKEN_ENV}) and run a real "
        "OAuth flow with it, revoked at the end",
    )
    doctor.add_argument(
        "--access-token-file",
        metavar="PATH",
        help=f"read an access token for URL from PATH (- for stdin; or set ${ACCESS_TOKEN_ENV})",
    )
    doctor.add_argument(
        "--keepalive",
        type=_positive,
        default=15.0,
        metavar="SECONDS",
        help="the server's keepalive interval (its --keepalive) [default: %(default)s]",
    )
    doctor.add_argument(
        "--stream-seconds",
        type=_positive,
        default=None,
        metavar="SECONDS",
        help="how long to watch the event stream [default and least: one keepalive interval and a "
        "margin]; longer catches proxies that cut long responses",
    )
    doctor.add_argument(
        "--cert-days",
        type=_positive,
        default=14.0,
        metavar="DAYS",
        help="fail when the certificate expires sooner [default: %(default)s]",
    )
    doctor.add_argument(
        "--ca-file",
        metavar="PEM",
        help="trust only this CA instead of the system's (a private CA; tests)",
    )
    doctor.add_argument(
        "--allow-private",
        action="store_true",
        help="let the doctor connect to loopback and private addresses other than the URL's own host (a "
        "deployment whose authorization server is on another internal host); by default only "
        "public addresses and the URL's own host",
    )
    doctor.add_argument(
        "--timeout", type=_positive, default=10.0, metavar="SECONDS", help="per request [default: %(default)s]"
    )
    return doctor


def _positive(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}")
    if not number > 0:
        raise argparse.ArgumentTypeError(f"must be positive: {value!r}")
    return number


def read_secret(path: Optional[str], env: str, what: str, stdin: IO[str]) -> Optional[str]:
    """
    A credential from a file, stdin (C{-}) or the environment; C{None}
    when none is given.

    @raise CredentialError: the file cannot be read, or does not hold one
        token (visible ASCII).
    """
    if path is None:
        value = os.environ.get(env, "").strip()
        if value and not _visible_ascii(value):
            raise CredentialError(f"${env} does not hold one {what} (a token is visible ASCII)")
        return value or None
    try:
        if path == "-":
            text = stdin.readline()
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise CredentialError(f"cannot read the {what} from {path}: {type(e).__name__}")
    value = text.strip()
    if not _visible_ascii(value):
        raise CredentialError(f"{path} does not hold one {what} (a token is visible ASCII)")
    return value


def _visible_ascii(value: str) -> bool:
    return bool(value) and all("\x21" <= c <= "\x7e" for c in value)


async def _doctor(reactor: Any, options: argparse.Namespace, out: IO[str], err: IO[str], stdin: IO[str]) -> int:
    # Imported here: the admin CLI builds this parser for every command,
    # and only this one needs an HTTP client.
    from smeldr_oauth.doctor import report
    from smeldr_oauth.doctor.fetch import guarded_fetcher, load_trust_root
    from smeldr_oauth.doctor.guard import guard_for
    from smeldr_oauth.doctor.run import DoctorOptions, diagnose

    try:
        site_token = read_secret(options.site_token_file, SITE_TOKEN_ENV, "site token", stdin)
        access_token = read_secret(options.access_token_file, ACCESS_TOKEN_ENV, "access token", stdin)
        trust_root = load_trust_root(options.ca_file)
    except CredentialError as e:
        err.write(f"doctor: {e}\n")
        return 2
    except Exception as e:
        err.write(f"doctor: cannot load --ca-file {options.ca_file}: {type(e).__name__}\n")
        return 2
    guard = await guard_for(reactor, options.url, options.timeout, options.allow_private)
    fetcher = guarded_fetcher(reactor, trust_root, options.timeout, guard)
    try:
        verdicts = await diagnose(
            fetcher,
            DoctorOptions(
                url=options.url,
                keepalive=options.keepalive,
                stream_seconds=options.stream_seconds,
                min_cert_days=options.cert_days,
                site_token=site_token,
                access_token=access_token,
            ),
        )
    except Exception as e:  # noqa: BLE001 - one line, no traceback (which could show a token)
        err.write(f"doctor: failed: {type(e).__name__}\n")
        return 1
    if options.json:
        out.write(report.as_json(options.url, verdicts) + "\n")
    else:
        for line in report.lines(verdicts):
            out.write(line + "\n")
    return report.exit_status(verdicts)


def run(
    reactor: Any,
    options: argparse.Namespace,
    out: Optional[IO[str]] = None,
    err: Optional[IO[str]] = None,
    stdin: Optional[IO[str]] = None,
) -> "Deferred[int]":
    """
    Run a parsed C{doctor} command line.

    @return: fires with the exit status: 0 no check failed, 1 one did, 2 a
        credential or CA file could not be read.
    """
    return ensureDeferred(_doctor(reactor, options, out or sys.stdout, err or sys.stderr, stdin or sys.stdin))
