# -*- test-case-name: tests.test_site_admin -*-
"""
C{smeldr-oauth-admin grants list|revoke|revoke-client} and
C{resource-server create}: the OAuth store's records an operator manages by
hand, the apps let in and the resource servers that may introspect.
"""

from __future__ import annotations

from typing import Any

from smeldr_oauth.site.admin.common import Context, DatabaseOptions, Parser, close, shown, when


def add_parsers(kinds: Any, dbs: DatabaseOptions) -> None:
    """Add C{grants} and C{resource-server} to the admin CLI's subparsers."""
    parents = [dbs.oauth_db, dbs.database]
    grants = kinds.add_parser("grants", help="OAuth grants (apps you let in)")
    commands = grants.add_subparsers(dest="command", metavar="{list,revoke,revoke-client}", parser_class=Parser)
    commands.required = True
    listing = commands.add_parser("list", parents=parents, help="list live grants")
    listing.add_argument("--subject", default=None, help="only grants approved by this token name")
    listing.add_argument("--site-token", default=None, metavar="ID", help="only grants approved with this site token")
    one = commands.add_parser("revoke", parents=parents, help="revoke one grant and its tokens")
    one.add_argument("grant_id", metavar="GRANT_ID")
    client = commands.add_parser("revoke-client", parents=parents, help="revoke every live grant of a client")
    client.add_argument("client_id", metavar="CLIENT_ID")

    servers = kinds.add_parser("resource-server", help="resource servers that may introspect tokens (RFC 7662)")
    server_commands = servers.add_subparsers(dest="command", metavar="{create}", parser_class=Parser)
    server_commands.required = True
    server = server_commands.add_parser(
        "create", parents=parents, help="make a resource server's credentials (the secret is shown once)"
    )
    server.add_argument("name", help="what it is (shown in logs)")
    server.add_argument(
        "--resource",
        default=None,
        metavar="URL",
        help="the MCP URL it serves: it learns nothing of tokens issued for another [default: any]",
    )


async def list_grants(ctx: Context) -> int:
    if ctx.missing("oauth"):
        return 1
    store = ctx.oauth_store()
    try:
        grants = await store.list_grants(subject=ctx.options.subject, site_token_id=ctx.options.site_token)
    finally:
        close(store)
    if not grants:
        ctx.say("No live grants.")
        return 0
    ctx.say(f"{'GRANT':32}  {'CREATED':20}  {'LAST USED':20}  {'SUBJECT':16}  {'SCOPES':16}  CLIENT")
    for g in grants:
        client = shown(g.client_id, 200)
        if g.client_name:
            client = f"{shown(g.client_name)} ({client})"
        ctx.say(
            f"{shown(g.grant_id):32}  {when(g.created_at):20}  {when(g.last_used_at):20}"
            f"  {shown(g.subject, 40):16}  {shown(' '.join(g.scopes)):16}  {client}"
        )
    return 0


async def revoke(ctx: Context) -> int:
    if ctx.missing("oauth"):
        return 1
    store = ctx.oauth_store()
    try:
        ended = await store.revoke_grant(ctx.options.grant_id, ctx.now())
    finally:
        close(store)
    if not ended:
        ctx.complain(f"no live grant {ctx.options.grant_id}")
        return 1
    ctx.say(f"Grant {ctx.options.grant_id} revoked.")
    return 0


async def revoke_client(ctx: Context) -> int:
    if ctx.missing("oauth"):
        return 1
    client_id = ctx.options.client_id
    store = ctx.oauth_store()
    try:
        revoked = []
        for grant in await store.list_grants():
            if grant.client_id == client_id and await store.revoke_grant(grant.grant_id, ctx.now()):
                revoked.append(grant.grant_id)
    finally:
        close(store)
    ctx.revoked(revoked, f"of client {client_id}")
    return 0


async def create_resource_server(ctx: Context) -> int:
    from smeldr_oauth.oauth.introspection import new_resource_server

    if ctx.missing("oauth"):
        return 1
    try:
        client, secret = new_resource_server(ctx.options.name, ctx.options.resource, ctx.now())
    except ValueError as e:
        ctx.complain(str(e))
        return 1
    store = ctx.oauth_store()
    try:
        await store.save_client(client)
    finally:
        close(store)
    ctx.say(f"Resource server {shown(client.client_name)} created; its secret is shown only now.")
    ctx.say(f"client_id:     {client.client_id}")
    ctx.say(f"client_secret: {secret}")
    return 0
