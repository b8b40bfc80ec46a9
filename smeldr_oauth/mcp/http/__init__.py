"""
The MCP endpoints over HTTP, protected by OAuth bearer tokens: Streamable
HTTP and the legacy HTTP+SSE transport on one resource (L{MCPHTTP}).

One module per concern:

  - L{resource}: L{MCPHTTP}, the parts put together and mounted on Klein;
  - L{streamable}, L{legacy}: the two transports;
  - L{exchange}: one POST answered as JSON or as an SSE stream;
  - L{registry}: this process's sessions (records in an
    L{smeldr_oauth.mcp.state.ISessionStore}, live parts here);
  - L{streamauth}: every stream and the token that keeps it open;
  - L{cors}: browser origins and C{OPTIONS};
  - L{wire}: reading headers, C{Accept} and the body (on the site's
    readers, L{smeldr_oauth.web});
  - L{errors}: every status, and MCP's refusals as the site's errors.
"""

from smeldr_oauth.mcp.http.resource import MCPHTTP

__all__ = ["MCPHTTP"]
