# -*- test-case-name: tests.test_site_admin -*-
"""
C{smeldr-oauth-admin token create|list|revoke}: the site tokens people
paste into the consent page.  Revoking one also revokes every grant
approved with it, in the OAuth store.
"""

from __future__ import annotations

import os
from typing import Any

from smeldr_oauth.site.admin.common import Context, DatabaseOptions, Parser, close, shown, when
from smeldr_oauth.site.stores import open_site


def add_parser(kinds: Any, dbs: DatabaseOptions) -> None:
    """Add C{token} and its commands to the admin CLI's subparsers."""
    token = kinds.add_parser("token", help="site tokens (what you paste into the consent page)")
    commands = token.add_subparsers(dest="command", metavar="{create,list,revoke}", parser_class=Parser)
    commands.required = True
    create_ = commands.add_parser("create", parents=[dbs.site_db, dbs.database], help="make a new site token")
    create_.add_argument("name", help="who the token is for (the subject of the grants it approves)")
    create_.add_argument(
        "--admin",
        action="store_true",
        help="the token also opens the operator's pages (the flow timeline at /oauth/flows)",
    )
    commands.add_parser("list", parents=[dbs.site_db, dbs.database], help="list site tokens (never their secrets)")
    revoke_ = commands.add_parser(
        "revoke",
        parents=[dbs.site_db, dbs.oauth_db, dbs.database],
        help="revoke a site token and every grant approved with it",
    )
    revoke_.add_argument("token_id", metavar="ID")


async def create(ctx: Context) -> int:
    options = ctx.options
    site = open_site(ctx.site_location, ctx.reactor)
    try:
        token_id, plaintext = await site.tokens.create(options.name, admin=options.admin)
    finally:
        site.close()
    # The token alone on stdout (so TOKEN=$(... token create NAME) works);
    # the words for the human on stderr, which stays on the terminal.
    ctx.err.write(
        f"Site token {token_id} created for {options.name.strip()!r}"
        f"{' (admin)' if options.admin else ''}.\n"
        "This token will not be shown again: copy it now and keep it somewhere safe.\n"
    )
    ctx.say(plaintext)
    return 0


async def list_tokens(ctx: Context) -> int:
    if ctx.missing("site"):
        return 1
    site = open_site(ctx.site_location, ctx.reactor)
    try:
        tokens = await site.tokens.list()
    finally:
        site.close()
    if not tokens:
        ctx.say("No site tokens. Make one with: token create NAME")
        return 0
    ctx.say(f"{'ID':32}  {'STATUS':7}  {'CREATED':20}  {'LAST USED':20}  NAME")
    for t in tokens:
        status = ("admin" if t.admin else "active") if t.active else "revoked"
        ctx.say(f"{t.id:32}  {status:7}  {when(t.created_at):20}  {when(t.last_used_at):20}  {shown(t.name, 100)}")
    return 0


async def revoke(ctx: Context) -> int:
    token_id = ctx.options.token_id
    if ctx.missing("site"):
        return 1
    site = open_site(ctx.site_location, ctx.reactor)
    try:
        changed = await site.tokens.revoke(token_id)
    finally:
        site.close()
    ctx.say(f"Site token {token_id} {'revoked' if changed else 'was already revoked'}.")
    # Grants are revoked even if the token already was: re-running the
    # command finishes a revocation whose grant step failed.
    if ctx.options.database is None and not os.path.exists(ctx.options.oauth_db):
        ctx.complain(
            f"warning: no OAuth database at {ctx.options.oauth_db}, so no grants were revoked;"
            " if the server uses another file, re-run with --oauth-db PATH"
        )
        return 0
    store = ctx.oauth_store()
    try:
        grant_ids = await store.revoke_grants_of_site_token(token_id, ctx.now())
    finally:
        close(store)
    ctx.revoked(grant_ids, "approved with it")
    return 0
