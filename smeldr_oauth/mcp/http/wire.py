# -*- test-case-name: tests.test_mcp_http -*-
"""
Reading what an MCP client sent: single-valued headers read defensively
(bytes 0x80-0xFF, repeats: a 400, never a 500), C{Accept} parsed by
Werkzeug's parser, the body size and media type checked, the JSON-RPC frame
parsed.
"""

from __future__ import annotations

from typing import Any, Optional

from werkzeug.datastructures import MIMEAccept
from werkzeug.http import parse_accept_header

from smeldr_oauth.mcp import jsonrpc
from smeldr_oauth.mcp.http.errors import MCPHTTPError, bad_request, rpc_error
from smeldr_oauth.mcp.jsonrpc import JSONRPCError, Message
from smeldr_oauth.mcp.versions import SUPPORTED_VERSIONS


def header(request: Any, name: bytes) -> Optional[str]:
    """
    The one value of header C{name}, stripped, or C{None}.

    @raise MCPHTTPError: 400 when it is repeated or not ASCII (HTTP allows
        bytes 0x80-0xFF in a value; none of the headers read here may carry
        them).
    """
    values = request.requestHeaders.getRawHeaders(name)
    if not values:
        return None
    if len(values) > 1:
        raise bad_request(f"Repeated {name.decode()} header")
    try:
        return values[0].decode("ascii").strip()
    except UnicodeDecodeError:
        raise bad_request(f"Malformed {name.decode()} header")


def accepts(request: Any) -> tuple[bool, bool]:
    """
    (JSON acceptable, SSE acceptable) from the C{Accept} header; a type
    with C{q=0} is refused, as RFC 9110 says.
    """
    accept = parse_accept_header(header(request, b"accept") or "*/*", MIMEAccept)
    return accept.quality("application/json") > 0, accept.quality("text/event-stream") > 0


def check_version(request: Any) -> Optional[str]:
    """
    @raise MCPHTTPError: 400 for an C{MCP-Protocol-Version} this server
        does not speak.
    """
    version = header(request, b"mcp-protocol-version")
    if version is not None and version not in SUPPORTED_VERSIONS:
        raise bad_request("Unsupported MCP-Protocol-Version", {"supported": list(SUPPORTED_VERSIONS), "requested": version[:64]})
    return version


def check_length(request: Any, max_body: int) -> None:
    """
    Refuse a body that is or will be too large (413) before anything is
    done with it: what the request class stopped storing, or what
    C{Content-Length} announces.
    """
    if getattr(request, "body_too_large", False):
        raise rpc_error(413, jsonrpc.INVALID_REQUEST, "Request body too large")
    length = header(request, b"content-length")
    if length is not None:
        try:
            if int(length) > max_body:
                raise rpc_error(413, jsonrpc.INVALID_REQUEST, "Request body too large")
        except ValueError:
            raise bad_request("Bad Content-Length")


def read_frame(request: Any, max_body: int) -> tuple[bool, list[Message]]:
    """
    The body as one JSON-RPC frame: C{(is_batch, messages)}.

    @raise MCPHTTPError: 415 (not JSON), 413 (too large), 400 (not a frame).
    """
    content_type = (header(request, b"content-type") or "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise rpc_error(415, jsonrpc.INVALID_REQUEST, "Content-Type must be application/json")
    request.content.seek(0)
    body = request.content.read(max_body + 1)
    if len(body) > max_body or getattr(request, "body_too_large", False):
        raise rpc_error(413, jsonrpc.INVALID_REQUEST, "Request body too large")
    try:
        return jsonrpc.parse_frame(body)
    except JSONRPCError as error:
        raise MCPHTTPError(400, jsonrpc.error_response(None, error))
