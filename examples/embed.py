"""
Add OAuth-protected MCP tools to an existing Klein site.

    python examples/embed.py            # then point an MCP client at http://127.0.0.1:8080/mcp

The consent form accepts the site token "let-me-in" (use your own check).
"""

import sys

from klein import Klein
from twisted.internet import endpoints, reactor
from twisted.logger import globalLogBeginner, textFileLogObserver
from smeldr_oauth import CIMDResolver, Config, MCPApp, OAuthServer, SQLiteStore, mount
from smeldr_oauth.web import SmeldrSite

app = Klein()


@app.route("/")
def home(request):
    return b"My site"


tools = MCPApp(name="example", version="1.0")


@tools.tool(scopes=("read",), description="Say hello.")
def hello(name: str) -> str:
    return f"Hello, {name}!"


def wire(reactor, issuer: str, oauth_db: str = "./oauth.db") -> OAuthServer:
    """
    The seed's four steps: store, server, tools, mount.
    """
    # 1. The token store: its own SQLite file, not your content database.
    store = SQLiteStore(oauth_db, reactor)
    # 2. The authorization server.  verify_bearer checks what the user pastes
    #    into the consent form: return True, a subject string, or an Approval.
    oauth = OAuthServer(
        Config(issuer=issuer, verify_bearer=lambda token: token == "let-me-in" and "owner"),
        store,
        reactor,
        cimd=CIMDResolver(reactor),
    )
    # 3 and 4. Mount the OAuth endpoints and the MCP tools they protect.
    mount(app, oauth, tools, reactor=reactor)
    return oauth


def main(listen: str = "tcp:8080:interface=127.0.0.1", issuer: str = "http://127.0.0.1:8080") -> None:
    wire(reactor, issuer)
    # SmeldrSite caps request bodies and refuses unroutable requests (/%ff)
    # before routing; a plain twisted.web Site works too, without those.
    endpoints.serverFromString(reactor, listen).listen(SmeldrSite(app.resource()))
    reactor.run()


if __name__ == "__main__":
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    main(*sys.argv[1:])
