"""
smeldr-oauth: an OAuth 2.1 authorization server and MCP server on Twisted.

The library API, in the seed's four steps::

    store = SQLiteStore("./oauth.db", reactor)                        # 1. the token store
    oauth = OAuthServer(Config(issuer=..., verify_bearer=...),        # 2. the server
                        store, reactor, cimd=CIMDResolver(reactor))
    tools = MCPApp(name="my-site", version="1.0")                     # 3. your MCP tools
    mount(app, oauth, tools, reactor=reactor)                         # 4. every endpoint

See docs/library.md.
"""

from smeldr_oauth.mcp.app import Context, MCPApp, ToolError
from smeldr_oauth.oauth.cimd import CIMDResolver
from smeldr_oauth.oauth.config import Config
from smeldr_oauth.oauth.model import AccessInfo, Approval
from smeldr_oauth.oauth.server import OAuthServer
from smeldr_oauth.service.wiring import mount
from smeldr_oauth.oauth.interfaces import IOAuthStore  # noqa: F401 (public, kept out of __all__ so pydoctor documents it where it lives)
from smeldr_oauth.store.memory import MemoryStore
from smeldr_oauth.store.sqlite import SQLiteStore

__all__ = [
    "AccessInfo",
    "Approval",
    "CIMDResolver",
    "Config",
    "Context",
    "MCPApp",
    "MemoryStore",
    "OAuthServer",
    "SQLiteStore",
    "ToolError",
    "mount",
]
