"""
The default site that C{twist smeldr-oauth} serves: posts (read and written
through MCP tools), the site tokens that approve OAuth consent, and the
admin CLI.  The MCP tools live in L{smeldr_oauth.site.tools}, imported on
its own so that the stores do not depend on the MCP layer; the posts'
records and errors in L{smeldr_oauth.site.posts}.
"""

from smeldr_oauth.site.posts import PostStore, SiteError
from smeldr_oauth.site.stores import SiteStores, open_site
from smeldr_oauth.site.tokens import SiteToken, SiteTokenStore, TokenNotFound

__all__ = [
    "PostStore",
    "SiteError",
    "SiteStores",
    "SiteToken",
    "SiteTokenStore",
    "TokenNotFound",
    "open_site",
]
