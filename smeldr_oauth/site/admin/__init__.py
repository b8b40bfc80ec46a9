# -*- test-case-name: tests.test_site_admin -*-
"""
C{smeldr-oauth-admin}: manage site tokens and the OAuth grants made with them::

    smeldr-oauth-admin token create NAME [--site-db PATH | --database URL]   # the token alone on stdout
    smeldr-oauth-admin token list [--site-db PATH | --database URL]
    smeldr-oauth-admin token revoke ID [--site-db PATH --oauth-db PATH | --database URL]
    smeldr-oauth-admin grants list [--oauth-db PATH | --database URL] [--subject NAME] [--site-token ID]
    smeldr-oauth-admin grants revoke GRANT_ID [--oauth-db PATH | --database URL]
    smeldr-oauth-admin grants revoke-client CLIENT_ID [--oauth-db PATH | --database URL]
    smeldr-oauth-admin resource-server create NAME [--resource URL] [--oauth-db PATH | --database URL]
    smeldr-oauth-admin migrate --from-sqlite OAUTH_DB SITE_DB --database URL
    smeldr-oauth-admin doctor URL [--json] [--site-token-file PATH]  # see smeldr_oauth.doctor

C{--database postgresql://...} names the one PostgreSQL database holding
both the OAuth data and the site content; without it, the two SQLite files.

Revoking a site token also revokes every grant approved with it: an app
that was let in with a leaked token must lose its access, not only the
token its future approvals.  Both databases may be in use by a running
server at the same time (SQLite: WAL and a busy timeout; PostgreSQL: row
locks), and a running server hears of the revocations (pushed on
PostgreSQL, polled on SQLite).

C{migrate} copies existing SQLite files into an empty PostgreSQL database
in one transaction: see L{smeldr_oauth.db.copy}.

Arguments are parsed before the reactor starts, so a bad command line costs
one line on stderr and exit status 2; L{run} does the work once it runs.

This module is the command itself (the parser put together, the dispatch,
C{main}); each group of subcommands is its own module with its parser and
its work: L{tokens}, L{grants} (and resource servers), L{migrate}, and
L{smeldr_oauth.doctor.cli} and L{smeldr_oauth.flows.cli} from their
packages.  L{common} holds what they share.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import IO, Any, NoReturn

from twisted.internet.defer import Deferred, ensureDeferred

from smeldr_oauth.db.postgres import is_postgres_url
from smeldr_oauth.site.admin import grants, migrate, tokens
from smeldr_oauth.site.admin.common import (
    DEFAULT_OAUTH_DB,
    DEFAULT_SITE_DB,
    PROG,
    Context,
    Parser,
    UsageError,
    database_options,
)
from smeldr_oauth.site.posts import SiteError

__all__ = ["PROG", "UsageError", "main", "parse", "run"]


def _parser() -> argparse.ArgumentParser:
    parser = Parser(prog=PROG, description="Manage smeldr-oauth site tokens and OAuth grants.")
    dbs = database_options()
    kinds = parser.add_subparsers(
        dest="kind", metavar="{token,grants,resource-server,migrate,doctor,flows}", parser_class=Parser
    )
    kinds.required = True
    from smeldr_oauth.doctor import cli as doctor

    doctor.add_parser(kinds)
    from smeldr_oauth.flows import cli as flows

    flows.add_parser(kinds, [dbs.oauth_db, dbs.database])
    tokens.add_parser(kinds, dbs)
    grants.add_parsers(kinds, dbs)
    migrate.add_parser(kinds)
    return parser


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """
    @raise UsageError: a bad command line.
    """
    options = _parser().parse_args(list(argv))
    database = getattr(options, "database", None)
    if database is not None and not is_postgres_url(database):
        raise UsageError(f"{PROG}: --database must be a postgresql:// URL")
    for name, default in (("site_db", DEFAULT_SITE_DB), ("oauth_db", DEFAULT_OAUTH_DB)):
        if not hasattr(options, name):
            continue
        if database is not None and getattr(options, name) is not None:
            flag = "--" + name.replace("_", "-")
            raise UsageError(f"{PROG}: {flag} and --database name different databases; give one")
        if getattr(options, name) is None:
            setattr(options, name, default)
    return options


async def _flows(ctx: Context) -> int:
    if ctx.missing("oauth"):
        return 1
    from smeldr_oauth.flows import cli as flows

    return await flows.show(ctx.reactor, ctx.options, ctx.oauth_location, ctx.out)


#: (kind, command) to the work; C{doctor} runs apart (see L{run}).
COMMANDS: dict[tuple[str, str], Callable[[Context], Awaitable[int]]] = {
    ("token", "create"): tokens.create,
    ("token", "list"): tokens.list_tokens,
    ("token", "revoke"): tokens.revoke,
    ("grants", "list"): grants.list_grants,
    ("grants", "revoke"): grants.revoke,
    ("grants", "revoke-client"): grants.revoke_client,
    ("resource-server", "create"): grants.create_resource_server,
    ("flows", "show"): _flows,
    ("migrate", "sqlite"): migrate.from_sqlite,
}


async def _dispatch(ctx: Context) -> int:
    try:
        return await COMMANDS[ctx.options.kind, ctx.options.command](ctx)
    except SiteError as e:
        ctx.complain(str(e))
        return 1
    except Exception as e:  # noqa: BLE001 - reported in one line, see below
        # A database that is locked, unreachable, corrupt or too new: one
        # line, no traceback (the message comes from the database layer,
        # which never puts a password in it).
        ctx.complain(f"failed: {type(e).__name__}: {e}")
        return 1


def run(
    reactor: Any,
    options: argparse.Namespace,
    out: IO[str] | None = None,
    err: IO[str] | None = None,
) -> Deferred[int]:
    """
    Carry out a parsed command line.

    @return: a Deferred firing with the exit status: 0 done, 1 refused (an
        unknown id, a missing database).
    """
    if options.kind == "doctor":
        from smeldr_oauth.doctor import cli as doctor

        return doctor.run(reactor, options, out, err)
    ctx = Context(reactor, options, out or sys.stdout, err or sys.stderr)
    return ensureDeferred(_dispatch(ctx))


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """
    The C{smeldr-oauth-admin} console script.
    """
    from twisted.internet.task import react

    args = sys.argv[1:] if argv is None else list(argv)
    try:
        options = parse(args)
    except UsageError as e:
        sys.stderr.write(f"{e}\n")
        raise SystemExit(2)

    async def work(reactor: Any) -> None:
        status = await run(reactor, options)
        if status:
            raise SystemExit(status)

    react(lambda reactor: ensureDeferred(work(reactor)))
