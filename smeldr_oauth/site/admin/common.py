# -*- test-case-name: tests.test_site_admin -*-
"""
What every C{smeldr-oauth-admin} subcommand shares: the parser that raises
rather than exits, the database options, and the L{Context} a command runs
in (where it writes, which databases it opens, what time it is).
"""

from __future__ import annotations

import argparse
import os
import time
from typing import IO, Any, NoReturn

import attr

PROG = "smeldr-oauth-admin"
DEFAULT_SITE_DB = "./site.db"
DEFAULT_OAUTH_DB = "./oauth.db"


class UsageError(Exception):
    """
    A bad command line; its message is the one line printed.
    """


class Parser(argparse.ArgumentParser):
    """
    An argparse parser whose errors raise L{UsageError} rather than
    printing the whole usage and exiting (so that C{main} decides how).
    """

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class DatabaseOptions:
    """
    The parent parsers naming the databases, for the subcommands to share:
    C{--database} (PostgreSQL, both databases in one), else the SQLite
    files C{--site-db} and C{--oauth-db}.
    """

    database: argparse.ArgumentParser
    site_db: argparse.ArgumentParser
    oauth_db: argparse.ArgumentParser


def _option(flag: str, metavar: str, help: str) -> argparse.ArgumentParser:
    """A parent parser with the one option C{flag}, default C{None}."""
    parent = Parser(add_help=False)
    parent.add_argument(flag, default=None, metavar=metavar, help=help)
    return parent


def database_options() -> DatabaseOptions:
    return DatabaseOptions(
        database=_option(
            "--database", "URL", "PostgreSQL database of the OAuth data and site content (instead of the SQLite files)"
        ),
        site_db=_option("--site-db", "PATH", f"site database (SQLite; default {DEFAULT_SITE_DB})"),
        oauth_db=_option("--oauth-db", "PATH", f"OAuth database (SQLite; default {DEFAULT_OAUTH_DB})"),
    )


def when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def shown(value: object, width: int = 60) -> str:
    """
    A field fit for a terminal: client names come from whoever registered
    the client, so control characters (escape sequences) are replaced and
    the length is capped.
    """
    text = "".join(c if c.isprintable() else "?" for c in str(value))
    return text if len(text) <= width else text[: width - 1] + "…"


def open_oauth_store(location: str, reactor: Any) -> Any:
    """
    The OAuth store at C{location} (a SQLite path or a PostgreSQL URL),
    imported late so that the token commands work even where it is
    unavailable.
    """
    from smeldr_oauth.store import open_store

    return open_store(location, reactor)


def close(store: Any) -> None:
    closing = getattr(store, "close", None)
    if closing is not None:
        closing()


class Context:
    """
    What a subcommand runs with: the reactor, the parsed options, and the
    two streams (the result on C{out}, complaints on C{err}).
    """

    def __init__(self, reactor: Any, options: argparse.Namespace, out: IO[str], err: IO[str]) -> None:
        self.reactor = reactor
        self.options = options
        self.out = out
        self.err = err

    def say(self, line: str) -> None:
        self.out.write(line + "\n")

    def complain(self, line: str) -> None:
        self.err.write(f"{PROG}: {line}\n")

    def now(self) -> float:
        return float(self.reactor.seconds())

    @property
    def site_location(self) -> str:
        return str(self.options.database or self.options.site_db)

    @property
    def oauth_location(self) -> str:
        return str(self.options.database or self.options.oauth_db)

    def revoked(self, grant_ids: list[str], whose: str) -> None:
        """Say which grants a command revoked, one id a line."""
        self.say(f"Revoked {len(grant_ids)} grant(s) {whose}.")
        for grant_id in grant_ids:
            self.say(f"  {grant_id}")

    def oauth_store(self) -> Any:
        """
        The OAuth store the options name (L{open_oauth_store}, looked up
        at each call so that a test can put a stand-in there).
        """
        return open_oauth_store(self.oauth_location, self.reactor)

    def missing(self, what: str) -> bool:
        """
        Whether the SQLite file of C{what} (C{"site"} or C{"oauth"}) is
        missing (a PostgreSQL database is never "missing": it is checked by
        connecting).
        """
        if self.options.database is not None:
            return False
        path = getattr(self.options, f"{what}_db")
        if os.path.exists(path):
            return False
        self.complain(f"no {what} database at {path} (use --{what}-db PATH or --database URL)")
        return True
