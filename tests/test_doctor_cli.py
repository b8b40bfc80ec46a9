"""
Tests for L{smeldr_oauth.doctor.cli}: the subcommand's parsing (through
the admin CLI's parser), reading credentials without ever echoing them,
and the exit status for unreadable files.  Running it against real
servers is in C{tests/test_doctor_proxy.py}.
"""

from __future__ import annotations

import io
import os

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from smeldr_oauth.doctor.cli import ACCESS_TOKEN_ENV, SITE_TOKEN_ENV, CredentialError, read_secret, run
from smeldr_oauth.site.admin import UsageError, parse

SECRET = "s3cr3t-Value_0123456789"


class ParseTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        options = parse(["doctor", "https://example.com/mcp"])
        self.assertEqual(options.kind, "doctor")
        self.assertEqual(options.url, "https://example.com/mcp")
        self.assertEqual((options.keepalive, options.cert_days, options.timeout), (15.0, 14.0, 10.0))
        self.assertFalse(options.json)
        self.assertFalse(options.allow_private)
        self.assertIsNone(options.stream_seconds)

    def test_options(self) -> None:
        options = parse(
            ["doctor", "https://e/mcp", "--json", "--keepalive", "2", "--stream-seconds", "60", "--ca-file", "ca.pem"]
        )
        self.assertEqual((options.json, options.keepalive, options.stream_seconds, options.ca_file), (True, 2.0, 60.0, "ca.pem"))
        self.assertTrue(parse(["doctor", "https://e/mcp", "--allow-private"]).allow_private)

    def test_bad(self) -> None:
        for argv in (["doctor"], ["doctor", "u", "--keepalive", "0"], ["doctor", "u", "--timeout", "x"], ["doctor", "u", "--token", "t"]):
            self.assertRaises(UsageError, parse, argv)

    def test_otherCommandsStillParse(self) -> None:
        self.assertEqual(parse(["token", "list"]).kind, "token")


class SecretTests(SynchronousTestCase):
    def setUp(self) -> None:
        for name in (SITE_TOKEN_ENV, ACCESS_TOKEN_ENV):
            saved = os.environ.pop(name, None)
            if saved is not None:
                self.addCleanup(os.environ.__setitem__, name, saved)

    def file(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_file(self) -> None:
        self.assertEqual(read_secret(self.file(f"  {SECRET}\n"), SITE_TOKEN_ENV, "site token", io.StringIO()), SECRET)

    def test_stdin(self) -> None:
        self.assertEqual(read_secret("-", SITE_TOKEN_ENV, "site token", io.StringIO(SECRET + "\nmore")), SECRET)

    def test_environment(self) -> None:
        self.assertIsNone(read_secret(None, SITE_TOKEN_ENV, "site token", io.StringIO()))
        os.environ[SITE_TOKEN_ENV] = SECRET
        self.addCleanup(os.environ.pop, SITE_TOKEN_ENV)
        self.assertEqual(read_secret(None, SITE_TOKEN_ENV, "site token", io.StringIO()), SECRET)

    def test_refusedWithoutEcho(self) -> None:
        """
        A file that does not hold one token is refused, and the message
        does not repeat what it holds.
        """
        for text in ("", f"{SECRET} {SECRET}", "\n\n"):
            with self.assertRaises(CredentialError) as caught:
                read_secret(self.file(text), SITE_TOKEN_ENV, "site token", io.StringIO())
            if text.strip():
                self.assertNotIn(SECRET, str(caught.exception))
        with self.assertRaises(CredentialError):
            read_secret(self.mktemp(), ACCESS_TOKEN_ENV, "access token", io.StringIO())

    def test_notVisibleASCII(self) -> None:
        """
        A token is visible ASCII: one with a character outside it (typed
        by hand, pasted with a stray one) is refused, from a file, stdin or
        the environment, without repeating it.
        """
        for value in ("t\u00f6k\u20acn", "tok\u00e9n", "tok\x7fen", "tok\x00en"):
            with self.assertRaises(CredentialError) as caught:
                read_secret(self.file(value), ACCESS_TOKEN_ENV, "access token", io.StringIO())
            self.assertIn("does not hold one access token (a token is visible ASCII)", str(caught.exception))
            with self.assertRaises(CredentialError):
                read_secret("-", SITE_TOKEN_ENV, "site token", io.StringIO(value + "\n"))
            if "\x00" in value:
                continue  # no environment variable holds one
            os.environ[SITE_TOKEN_ENV] = value
            self.addCleanup(os.environ.pop, SITE_TOKEN_ENV, None)
            with self.assertRaises(CredentialError) as caught:
                read_secret(None, SITE_TOKEN_ENV, "site token", io.StringIO())
            self.assertEqual(
                str(caught.exception), f"${SITE_TOKEN_ENV} does not hold one site token (a token is visible ASCII)"
            )


class RunTests(SynchronousTestCase):
    def test_unreadableCredential(self) -> None:
        out, err = io.StringIO(), io.StringIO()
        options = parse(["doctor", "https://e/mcp", "--site-token-file", self.mktemp()])
        status = self.successResultOf(run(Clock(), options, out, err, io.StringIO()))
        self.assertEqual(status, 2)
        self.assertIn("cannot read the site token", err.getvalue())
        self.assertEqual(out.getvalue(), "")

    def test_badCAFile(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("not a certificate")
        out, err = io.StringIO(), io.StringIO()
        status = self.successResultOf(run(Clock(), parse(["doctor", "https://e/mcp", "--ca-file", path]), out, err, io.StringIO()))
        self.assertEqual(status, 2)
        self.assertIn("cannot load --ca-file", err.getvalue())

    def test_badURL(self) -> None:
        """
        A URL that is no MCP URL: one failed check, nothing fetched.
        """
        out, err = io.StringIO(), io.StringIO()
        status = self.successResultOf(run(Clock(), parse(["doctor", "http://example.com/mcp"]), out, err, io.StringIO()))
        self.assertEqual(status, 1)
        self.assertIn("✗ url:", out.getvalue())
        self.assertIn("plain http", out.getvalue())
