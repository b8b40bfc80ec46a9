"""
The C{smeldr-oauth} plugin for C{twist} and C{twistd}.

Only the L{ServiceMaker} lives here: options and service wiring are in
L{smeldr_oauth.service.tap}, so importing this file (which C{twist --help}
does for every plugin) stays cheap.
"""

from twisted.application.service import ServiceMaker

smeldrOAuth = ServiceMaker(
    "smeldr-oauth",
    "smeldr_oauth.service.tap",
    "OAuth 2.1 authorization server and MCP server for ChatGPT, Claude and MCP clients",
    "smeldr-oauth",
)
