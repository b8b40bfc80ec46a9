"""
An MCP server built with the official Python SDK (the C{mcp} package) that
accepts smeldr-oauth's tokens by asking its RFC 7662 introspection endpoint.

1. Give the server its credentials (the secret is shown once):

       smeldr-oauth-admin resource-server create notes --resource http://127.0.0.1:9000/mcp

2. Run smeldr-oauth with that URL as its resource, and this server:

       twist smeldr-oauth --issuer http://127.0.0.1:8080 --resource http://127.0.0.1:9000/mcp --dev
       SMELDR_ISSUER=http://127.0.0.1:8080 SMELDR_CLIENT_ID=rs-… SMELDR_CLIENT_SECRET=… \\
           python examples/introspection_server.py --port 9000

An MCP client pointed at http://127.0.0.1:9000/mcp is sent (RFC 9728) to
smeldr-oauth, authorizes there (our consent page), and comes back with a
token this server checks on every request.  Nothing is cached, so a
revoked token is refused at once; a busy server may cache answers for a
few seconds, accepting that a revoked token works that long.

With C{--port 0} it picks a free port and prints C{PORT <n>} (the tests do
this).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket

import httpx2
import uvicorn
from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.auth.provider import AccessToken, TokenVerifier
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import MCPServer


class IntrospectionVerifier(TokenVerifier):
    """
    The SDK's C{TokenVerifier}, by RFC 7662: POST the token with this
    server's own credentials (C{client_secret_basic}); anything but an
    active token for I{this} resource is no token.
    """

    def __init__(self, endpoint: str, client_id: str, client_secret: str, resource: str) -> None:
        self.endpoint = endpoint
        self.auth = (client_id, client_secret)
        self.resource = resource
        self.http = httpx2.AsyncClient(timeout=10.0)

    async def verify_token(self, token: str) -> AccessToken | None:
        try:
            response = await self.http.post(self.endpoint, data={"token": token}, auth=self.auth)
        except httpx2.HTTPError:
            return None
        if response.status_code != 200:
            return None
        answer = response.json()
        # RFC 8707: smeldr-oauth binds each token to one resource; refuse
        # tokens for another even when this server's credentials could
        # see every resource.
        if not answer.get("active") or answer.get("aud") != self.resource:
            return None
        return AccessToken(
            token=token,
            client_id=answer["client_id"],
            scopes=answer.get("scope", "").split(),
            expires_at=answer.get("exp"),
            resource=answer.get("aud"),
            subject=answer.get("sub"),
            claims={"iss": answer.get("iss")},
        )


def build(issuer: str, resource: str, client_id: str, client_secret: str) -> MCPServer:
    """The MCP server, protected by smeldr-oauth at C{issuer}."""
    # smeldr-oauth advertises the endpoint in its metadata; it is fixed
    # under the issuer, so no discovery round trip is needed here.
    verifier = IntrospectionVerifier(issuer + "/oauth/introspect", client_id, client_secret, resource)
    server = MCPServer(
        "introspection-example",
        token_verifier=verifier,
        auth=AuthSettings(issuer_url=issuer, resource_server_url=resource, validate_token_resource=True),
    )

    @server.tool()
    def whoami() -> str:
        """Who the token says you are."""
        token = get_access_token()
        return f"{token.subject} via {token.client_id}" if token else "nobody"

    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=9000)
    options = parser.parse_args()
    issuer = os.environ["SMELDR_ISSUER"].rstrip("/")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", options.port))
    sock.listen(128)
    port = sock.getsockname()[1]
    resource = f"http://127.0.0.1:{port}/mcp"
    server = build(issuer, resource, os.environ["SMELDR_CLIENT_ID"], os.environ["SMELDR_CLIENT_SECRET"])
    print(f"PORT {port}", flush=True)
    config = uvicorn.Config(server.streamable_http_app(), log_level="warning", lifespan="on")
    asyncio.run(uvicorn.Server(config).serve(sockets=[sock]))


if __name__ == "__main__":
    main()
