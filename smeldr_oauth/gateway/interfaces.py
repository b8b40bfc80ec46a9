"""
The seams of the gateway, as narrow zope interfaces.

Bytes move in a channel (L{IUpstreamChannel}: a process's pipes, HTTP
requests); the MCP client protocol above it (L{smeldr_oauth.gateway.client})
is the channel's L{IChannelReceiver}, and hands what the upstream says on
its own initiative to an L{IUpstreamHandler} (the link that routes it to
downstream sessions).  L{IMCPSession} is what the MCP front already calls
on its native L{smeldr_oauth.mcp.session.ServerSession}; the gateway's
session provides the same, so the front serves either.
"""

from __future__ import annotations

from typing import Any

from zope.interface import Attribute, Interface


class IChannelReceiver(Interface):
    """What a channel delivers to."""

    def messageReceived(message: Any, related: Any) -> None:
        """
        One parsed JSON-RPC message from the upstream.

        @param message: a L{smeldr_oauth.mcp.jsonrpc.Message}.
        @param related: the id of the gateway's own request this message
            belongs to, when the transport says so (it came on that
            request's HTTP response stream), else C{None}.
        """

    def channelLost(reason: str, detail: str) -> None:
        """
        The channel ended (process exited, HTTP session gone).

        @param reason: one of L{smeldr_oauth.gateway.errors.REASONS}.
        @param detail: a short, client-safe sentence.
        """


class IUpstreamChannel(Interface):
    """One connection to an upstream MCP server: a process, or an HTTP session."""

    pid = Attribute("The upstream process's id, or None (HTTP).")

    def start(receiver: IChannelReceiver) -> Any:
        """
        Open the channel (spawn the process; for the legacy SSE transport,
        open the stream and learn the message endpoint).

        @return: a L{Deferred} firing when messages can be sent; it fails
            with L{smeldr_oauth.mcp.jsonrpc.JSONRPCError}.
        """

    def send(message: dict, identity: Any) -> Any:
        """
        Send one message.

        @param identity: the L{smeldr_oauth.mcp.session.Principal} the
            message is sent for (HTTP upstreams may receive it in identity
            headers), or C{None}.
        @return: a L{Deferred} firing when the exchange is over: at once for
            a pipe; for HTTP, when the response (and any stream) has been
            delivered to the receiver.  It fails with a C{JSONRPCError} when
            the message could not be delivered or the exchange ended without
            the answer to a request.  Cancelling it abandons the exchange.
        """

    def negotiated(version: str) -> None:
        """The handshake settled on C{version} (HTTP sends it in a header from now on)."""

    def close() -> Any:
        """
        End the channel (stop the process, end the HTTP session).

        @return: a L{Deferred} firing when it has ended.
        """


class IUpstreamHandler(Interface):
    """Where an upstream client hands what the upstream says unasked."""

    def upstreamNotification(notification: Any, context: Any) -> None:
        """
        A notification (logging, list changes, resource updates, progress
        with its token already mapped back to the caller's).

        @param context: the context of the gateway request it belongs to
            (see L{smeldr_oauth.gateway.client.UpstreamClient.request}), or
            C{None} when it belongs to none that is known.
        """

    def upstreamRequest(request: Any, context: Any) -> Any:
        """
        A server-to-client request (sampling, elicitation, roots).

        @return: a L{Deferred} firing with the result, or failing with a
            C{JSONRPCError}; cancelled when the upstream cancels the request.
        """

    def upstreamLost(reason: str, detail: str) -> None:
        """The connection ended; calls in flight have already failed."""


class IMCPSession(Interface):
    """
    One downstream MCP conversation, as the HTTP and stdio fronts drive it.
    L{smeldr_oauth.mcp.session.ServerSession} (native tools) and
    L{smeldr_oauth.gateway.proxy.GatewaySession} (an upstream) both provide it.
    """

    session_id = Attribute("The transport's session id, or None.")
    initialized = Attribute("Whether the initialize handshake is done.")
    busy = Attribute("Whether a request is in flight (the session must not be evicted).")
    allows_batch = Attribute("Whether JSON-RPC batches are allowed at the negotiated version.")

    def handle(message: Any, principal: Any, outlet: Any) -> Any:
        """
        Process one parsed message.

        @return: a L{Deferred} firing with the response dict, or C{None};
            it never fails.
        """

    def missing_scopes(message: Any, principal: Any) -> Any:
        """
        The scopes C{message} needs when C{principal} lacks some (for a 403
        before dispatch), else C{None}.
        """

    def close() -> None:
        """End the session: cancel what runs, fail what waits for the client."""


class IDownstream(Interface):
    """
    A downstream session as a link sees it: where the upstream's messages
    go.  L{smeldr_oauth.gateway.proxy.GatewaySession} provides it.
    """

    initialized = Attribute("Whether the downstream handshake is done.")
    log_level = Attribute("The level the client chose with logging/setLevel, or None.")

    def deliver(notification: Any, outlet: Any) -> None:
        """
        Send a notification to the client: through C{outlet} (the stream of
        the request it belongs to) when given and still open, else through
        the session's own channel.
        """

    def can_answer(capability: str, params: Any) -> bool:
        """Whether the client declared what a server-to-client request needs."""

    def client_request(method: str, params: Any, outlet: Any) -> Any:
        """
        Send a request to the client.

        @return: a cancellable L{Deferred} with the client's result, failing
            with a C{JSONRPCError}.
        """
