"""
The OAuth gateway's upstream side: MCP servers that already exist (a stdio
command, an HTTP endpoint) reached through smeldr-oauth, with our
authorization in front of them.

One concern per module:

  - L{config <smeldr_oauth.gateway.config>}: the configuration's records;
    L{configfile <smeldr_oauth.gateway.configfile>}: C{--upstream} options
    and the TOML file, validated into them;
  - L{scopes <smeldr_oauth.gateway.scopes>}: glob patterns mapping tools,
    resources and prompts to OAuth scopes;
  - L{client <smeldr_oauth.gateway.client>}: the MCP I{client} side of one
    upstream connection (handshake, id remapping, timeouts, cancellation);
  - L{stdio <smeldr_oauth.gateway.stdio>} and L{http
    <smeldr_oauth.gateway.http>}: the byte-moving channels under it, with
    L{sse <smeldr_oauth.gateway.sse>} decoding event streams;
  - L{flow <smeldr_oauth.gateway.flow>}: the bounded-rate policy for what
    an upstream pushes;
  - L{link <smeldr_oauth.gateway.link>}: one upstream instance shared by the
    downstream sessions of one isolation key (routing, restarts);
  - L{pool <smeldr_oauth.gateway.pool>}: every instance of one upstream
    (limits, idle stop);
  - L{proxy <smeldr_oauth.gateway.proxy>}: the transport-independent core
    the MCP front calls (L{Gateway}, L{GatewaySession});
  - L{metrics <smeldr_oauth.gateway.metrics>}: counters per upstream.
"""

from smeldr_oauth.gateway.config import GatewayConfig, UpstreamConfig
from smeldr_oauth.gateway.proxy import Gateway, GatewaySession

__all__ = ["Gateway", "GatewaySession", "GatewayConfig", "UpstreamConfig"]
