"""
The default site that C{twist smeldr-oauth} serves: posts (read and written
through MCP tools), the site tokens that approve OAuth consent, and the
admin CLI.  The MCP tools live in L{smeldr_oauth.site.tools}, imported on
its own so that the stores do not depend on the MCP layer.
"""

from smeldr_oauth.site.posts import (
    InvalidCursor,
    InvalidQuery,
    Post,
    PostNotFound,
    PostPage,
    PostStore,
    SearchHit,
    SiteError,
    SlugTaken,
    ValidationError,
)
from smeldr_oauth.site.stores import SiteStores, open_site
from smeldr_oauth.site.tokens import SiteToken, SiteTokenStore, TokenNotFound

__all__ = [
    "InvalidCursor",
    "InvalidQuery",
    "Post",
    "PostNotFound",
    "PostPage",
    "PostStore",
    "SearchHit",
    "SiteError",
    "SiteStores",
    "SiteToken",
    "SiteTokenStore",
    "SlugTaken",
    "TokenNotFound",
    "ValidationError",
    "open_site",
]
