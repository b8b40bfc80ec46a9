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
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from typing import IO, Any, NoReturn

from twisted.internet.defer import Deferred, ensureDeferred

from smeldr_oauth.db.postgres import is_postgres_url
from smeldr_oauth.site.posts import SiteError
from smeldr_oauth.site.stores import open_site

PROG = "smeldr-oauth-admin"
DEFAULT_SITE_DB = "./site.db"
DEFAULT_OAUTH_DB = "./oauth.db"


class UsageError(Exception):
    """
    A bad command line; its message is the one line printed.
    """


class _Parser(argparse.ArgumentParser):
    """
    An argparse parser whose errors raise L{UsageError} rather than
    printing the whole usage and exiting (so that L{main} decides how).
    """

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG, description="Manage smeldr-oauth site tokens and OAuth grants."
    )
    database = _Parser(add_help=False)
    database.add_argument(
        "--database",
        default=None,
        metavar="URL",
        help="PostgreSQL database of the OAuth data and site content (instead of the SQLite files)",
    )
    site_db = _Parser(add_help=False)
    site_db.add_argument(
        "--site-db",
        default=None,
        metavar="PATH",
        help=f"site database (SQLite; default {DEFAULT_SITE_DB})",
    )
    oauth_db = _Parser(add_help=False)
    oauth_db.add_argument(
        "--oauth-db",
        default=None,
        metavar="PATH",
        help=f"OAuth database (SQLite; default {DEFAULT_OAUTH_DB})",
    )

    kinds = parser.add_subparsers(
        dest="kind", metavar="{token,grants,resource-server,migrate,doctor,flows}", parser_class=_Parser
    )
    kinds.required = True
    from smeldr_oauth.doctor import cli as doctor

    doctor.add_parser(kinds)
    from smeldr_oauth.flows import cli as flows

    flows.add_parser(kinds, [oauth_db, database])

    token = kinds.add_parser(
        "token", help="site tokens (what you paste into the consent page)"
    )
    token_cmds = token.add_subparsers(
        dest="command", metavar="{create,list,revoke}", parser_class=_Parser
    )
    token_cmds.required = True
    create = token_cmds.add_parser(
        "create", parents=[site_db, database], help="make a new site token"
    )
    create.add_argument(
        "name", help="who the token is for (the subject of the grants it approves)"
    )
    create.add_argument(
        "--admin",
        action="store_true",
        help="the token also opens the operator's pages (the flow timeline at /oauth/flows)",
    )
    token_cmds.add_parser(
        "list", parents=[site_db, database], help="list site tokens (never their secrets)"
    )
    revoke = token_cmds.add_parser(
        "revoke",
        parents=[site_db, oauth_db, database],
        help="revoke a site token and every grant approved with it",
    )
    revoke.add_argument("token_id", metavar="ID")

    grants = kinds.add_parser("grants", help="OAuth grants (apps you let in)")
    grant_cmds = grants.add_subparsers(
        dest="command", metavar="{list,revoke,revoke-client}", parser_class=_Parser
    )
    grant_cmds.required = True
    listing = grant_cmds.add_parser("list", parents=[oauth_db, database], help="list live grants")
    listing.add_argument(
        "--subject", default=None, help="only grants approved by this token name"
    )
    listing.add_argument(
        "--site-token",
        default=None,
        metavar="ID",
        help="only grants approved with this site token",
    )
    one = grant_cmds.add_parser(
        "revoke", parents=[oauth_db, database], help="revoke one grant and its tokens"
    )
    one.add_argument("grant_id", metavar="GRANT_ID")
    client = grant_cmds.add_parser(
        "revoke-client", parents=[oauth_db, database], help="revoke every live grant of a client"
    )
    client.add_argument("client_id", metavar="CLIENT_ID")

    servers = kinds.add_parser(
        "resource-server", help="resource servers that may introspect tokens (RFC 7662)"
    )
    server_cmds = servers.add_subparsers(dest="command", metavar="{create}", parser_class=_Parser)
    server_cmds.required = True
    server = server_cmds.add_parser(
        "create",
        parents=[oauth_db, database],
        help="make a resource server's credentials (the secret is shown once)",
    )
    server.add_argument("name", help="what it is (shown in logs)")
    server.add_argument(
        "--resource",
        default=None,
        metavar="URL",
        help="the MCP URL it serves: it learns nothing of tokens issued for another [default: any]",
    )

    migrate = kinds.add_parser(
        "migrate", help="copy SQLite databases into an empty PostgreSQL database"
    )
    migrate.set_defaults(command="sqlite")
    migrate.add_argument(
        "--from-sqlite",
        nargs=2,
        required=True,
        metavar=("OAUTH_DB", "SITE_DB"),
        help="the SQLite files to copy (the server's --oauth-db and --site-db)",
    )
    migrate.add_argument(
        "--database", required=True, metavar="URL", help="the PostgreSQL database to copy into"
    )
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


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def _shown(value: object, width: int = 60) -> str:
    """
    A field fit for a terminal: client names come from whoever registered
    the client, so control characters (escape sequences) are replaced and
    the length is capped.
    """
    text = "".join(c if c.isprintable() else "?" for c in str(value))
    return text if len(text) <= width else text[: width - 1] + "…"


def _open_oauth_store(location: str, reactor: Any) -> Any:
    """
    The OAuth store at C{location} (a SQLite path or a PostgreSQL URL),
    imported late so that the token commands work even where it is
    unavailable.
    """
    from smeldr_oauth.store import open_store

    return open_store(location, reactor)


def _close(store: Any) -> None:
    close = getattr(store, "close", None)
    if close is not None:
        close()


class _Commands:
    def __init__(
        self, reactor: Any, options: argparse.Namespace, out: IO[str], err: IO[str]
    ) -> None:
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

    async def token_create(self) -> int:
        site = open_site(self.site_location, self.reactor)
        try:
            token_id, plaintext = await site.tokens.create(self.options.name, admin=self.options.admin)
        finally:
            site.close()
        # The token alone on stdout (so TOKEN=$(... token create NAME) works);
        # the words for the human on stderr, which stays on the terminal.
        self.err.write(
            f"Site token {token_id} created for {self.options.name.strip()!r}"
            f"{' (admin)' if self.options.admin else ''}.\n"
            "This token will not be shown again: copy it now and keep it somewhere safe.\n"
        )
        self.say(plaintext)
        return 0

    async def token_list(self) -> int:
        if self.missing("site"):
            return 1
        site = open_site(self.site_location, self.reactor)
        try:
            tokens = await site.tokens.list()
        finally:
            site.close()
        if not tokens:
            self.say("No site tokens. Make one with: token create NAME")
            return 0
        self.say(f"{'ID':32}  {'STATUS':7}  {'CREATED':20}  {'LAST USED':20}  NAME")
        for t in tokens:
            status = ("admin" if t.admin else "active") if t.active else "revoked"
            self.say(
                f"{t.id:32}  {status:7}  {_when(t.created_at):20}"
                f"  {_when(t.last_used_at):20}  {_shown(t.name, 100)}"
            )
        return 0

    async def token_revoke(self) -> int:
        token_id = self.options.token_id
        if self.missing("site"):
            return 1
        site = open_site(self.site_location, self.reactor)
        try:
            changed = await site.tokens.revoke(token_id)
        finally:
            site.close()
        self.say(
            f"Site token {token_id} {'revoked' if changed else 'was already revoked'}."
        )
        # Grants are revoked even if the token already was: re-running the
        # command finishes a revocation whose grant step failed.
        if self.options.database is None and not os.path.exists(self.options.oauth_db):
            self.complain(
                f"warning: no OAuth database at {self.options.oauth_db}, so no grants were revoked;"
                " if the server uses another file, re-run with --oauth-db PATH"
            )
            return 0
        store = _open_oauth_store(self.oauth_location, self.reactor)
        try:
            grant_ids = await store.revoke_grants_of_site_token(token_id, self.now())
        finally:
            _close(store)
        self.say(f"Revoked {len(grant_ids)} grant(s) approved with it.")
        for grant_id in grant_ids:
            self.say(f"  {grant_id}")
        return 0

    async def grants_list(self) -> int:
        if self.missing("oauth"):
            return 1
        store = _open_oauth_store(self.oauth_location, self.reactor)
        try:
            grants = await store.list_grants(
                subject=self.options.subject, site_token_id=self.options.site_token
            )
        finally:
            _close(store)
        if not grants:
            self.say("No live grants.")
            return 0
        self.say(
            f"{'GRANT':32}  {'CREATED':20}  {'LAST USED':20}  {'SUBJECT':16}  {'SCOPES':16}  CLIENT"
        )
        for g in grants:
            client = _shown(g.client_id, 200)
            if g.client_name:
                client = f"{_shown(g.client_name)} ({client})"
            self.say(
                f"{_shown(g.grant_id):32}  {_when(g.created_at):20}  {_when(g.last_used_at):20}"
                f"  {_shown(g.subject, 40):16}  {_shown(' '.join(g.scopes)):16}  {client}"
            )
        return 0

    async def grants_revoke(self) -> int:
        if self.missing("oauth"):
            return 1
        store = _open_oauth_store(self.oauth_location, self.reactor)
        try:
            ended = await store.revoke_grant(self.options.grant_id, self.now())
        finally:
            _close(store)
        if not ended:
            self.complain(f"no live grant {self.options.grant_id}")
            return 1
        self.say(f"Grant {self.options.grant_id} revoked.")
        return 0

    async def grants_revoke_client(self) -> int:
        if self.missing("oauth"):
            return 1
        client_id = self.options.client_id
        store = _open_oauth_store(self.oauth_location, self.reactor)
        try:
            grants = await store.list_grants()
            revoked = []
            for grant in grants:
                if grant.client_id == client_id and await store.revoke_grant(
                    grant.grant_id, self.now()
                ):
                    revoked.append(grant.grant_id)
        finally:
            _close(store)
        self.say(f"Revoked {len(revoked)} grant(s) of client {client_id}.")
        for grant_id in revoked:
            self.say(f"  {grant_id}")
        return 0

    async def resource_server_create(self) -> int:
        from smeldr_oauth.oauth.introspection import new_resource_server

        if self.missing("oauth"):
            return 1
        try:
            client, secret = new_resource_server(self.options.name, self.options.resource, self.now())
        except ValueError as e:
            self.complain(str(e))
            return 1
        store = _open_oauth_store(self.oauth_location, self.reactor)
        try:
            await store.save_client(client)
        finally:
            _close(store)
        self.say(f"Resource server {_shown(client.client_name)} created; its secret is shown only now.")
        self.say(f"client_id:     {client.client_id}")
        self.say(f"client_secret: {secret}")
        return 0

    async def flows_show(self) -> int:
        if self.missing("oauth"):
            return 1
        from smeldr_oauth.flows import cli as flows

        return await flows.show(self.reactor, self.options, self.oauth_location, self.out)

    async def migrate_sqlite(self) -> int:
        from smeldr_oauth.db import open_database
        from smeldr_oauth.db.copy import SourceMissing, TargetNotEmpty, copy_from_sqlite
        from smeldr_oauth.site.posts import SCHEMA as POSTS_SCHEMA
        from smeldr_oauth.site.tokens import SCHEMA as SITE_TOKENS_SCHEMA
        from smeldr_oauth.store.schema import OAUTH_SCHEMA

        oauth_db, site_db = self.options.from_sqlite
        target = open_database(self.options.database, self.reactor)
        try:
            counts = await copy_from_sqlite(
                target,
                [(oauth_db, [OAUTH_SCHEMA]), (site_db, [POSTS_SCHEMA, SITE_TOKENS_SCHEMA])],
                self.reactor,
            )
        except (SourceMissing, TargetNotEmpty) as e:
            self.complain(str(e))
            return 1
        finally:
            target.close()
        self.say(f"Copied {sum(counts.values())} row(s) into {target.describe()}:")
        for table, count in counts.items():
            self.say(f"  {table:16} {count}")
        return 0


async def _dispatch(commands: _Commands) -> int:
    options = commands.options
    name = f"{options.kind}_{options.command}".replace("-", "_")
    try:
        result: int = await getattr(commands, name)()
        return result
    except SiteError as e:
        commands.complain(str(e))
        return 1
    except Exception as e:  # noqa: BLE001 - reported in one line, see below
        # A database that is locked, unreachable, corrupt or too new: one
        # line, no traceback (the message comes from the database layer,
        # which never puts a password in it).
        commands.complain(f"failed: {type(e).__name__}: {e}")
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
    commands = _Commands(reactor, options, out or sys.stdout, err or sys.stderr)
    return ensureDeferred(_dispatch(commands))


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


if __name__ == "__main__":  # pragma: no cover
    main()
