# -*- test-case-name: tests.test_site_admin -*-
"""
C{smeldr-oauth-admin migrate --from-sqlite OAUTH_DB SITE_DB --database
URL}: copy existing SQLite files into an empty PostgreSQL database in one
transaction (see L{smeldr_oauth.db.copy}).
"""

from __future__ import annotations

from typing import Any

from smeldr_oauth.site.admin.common import Context


def add_parser(kinds: Any) -> None:
    """Add C{migrate} to the admin CLI's subparsers."""
    migrate = kinds.add_parser("migrate", help="copy SQLite databases into an empty PostgreSQL database")
    migrate.set_defaults(command="sqlite")
    migrate.add_argument(
        "--from-sqlite",
        nargs=2,
        required=True,
        metavar=("OAUTH_DB", "SITE_DB"),
        help="the SQLite files to copy (the server's --oauth-db and --site-db)",
    )
    migrate.add_argument("--database", required=True, metavar="URL", help="the PostgreSQL database to copy into")


async def from_sqlite(ctx: Context) -> int:
    from smeldr_oauth.db import open_database
    from smeldr_oauth.db.copy import SourceMissing, TargetNotEmpty, WrongSource, copy_from_sqlite
    from smeldr_oauth.site.posts import SCHEMA as POSTS_SCHEMA
    from smeldr_oauth.site.tokens import SCHEMA as SITE_TOKENS_SCHEMA
    from smeldr_oauth.store.schema import OAUTH_SCHEMA

    oauth_db, site_db = ctx.options.from_sqlite
    target = open_database(ctx.options.database, ctx.reactor)
    try:
        counts = await copy_from_sqlite(
            target,
            [(oauth_db, [OAUTH_SCHEMA]), (site_db, [POSTS_SCHEMA, SITE_TOKENS_SCHEMA])],
            ctx.reactor,
        )
    except (SourceMissing, TargetNotEmpty, WrongSource) as e:
        ctx.complain(str(e))
        return 1
    finally:
        target.close()
    ctx.say(f"Copied {sum(counts.values())} row(s) into {target.describe()}:")
    for table, count in counts.items():
        ctx.say(f"  {table:16} {count}")
    return 0
