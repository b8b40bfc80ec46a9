# -*- test-case-name: tests.test_mcp_session -*-
"""
The protocol versions this server speaks and the rules of the 2026-07-28
per-request envelope: which versions exist, which methods that revision
removed, which results carry cache hints, and how its HTTP routing headers
must agree with the body.

Revisions are dates, so code elsewhere that needs "this revision or later"
compares the strings (C{version >= "2025-06-18"}).
"""

from __future__ import annotations

import base64
import binascii
from typing import Any, Optional

import attr

from smeldr_oauth.mcp import jsonrpc
from smeldr_oauth.mcp.context import LOG_LEVELS
from smeldr_oauth.mcp.jsonrpc import JSONRPCError, Message, Notification, Request

SESSION_VERSIONS = ("2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05")
MODERN_VERSIONS = ("2026-07-28",)
#: Every version this server speaks, newest first.
SUPPORTED_VERSIONS = MODERN_VERSIONS + SESSION_VERSIONS
LATEST_SESSION_VERSION = SESSION_VERSIONS[0]
BATCH_VERSIONS = ("2025-03-26",)

PROTOCOL_VERSION_KEY = "io.modelcontextprotocol/protocolVersion"
CLIENT_CAPABILITIES_KEY = "io.modelcontextprotocol/clientCapabilities"
CLIENT_INFO_KEY = "io.modelcontextprotocol/clientInfo"
LOG_LEVEL_KEY = "io.modelcontextprotocol/logLevel"
SERVER_INFO_KEY = "io.modelcontextprotocol/serverInfo"

#: Methods the 2026-07-28 revision removed; they answer "method not found".
REMOVED_IN_MODERN = frozenset(
    {"initialize", "ping", "logging/setLevel", "resources/subscribe", "resources/unsubscribe"}
)
#: 2026-07-28 results of these carry cache hints (C{ttlMs}, C{cacheScope}).
CACHEABLE = frozenset(
    {"prompts/list", "resources/list", "resources/read", "resources/templates/list", "server/discover", "tools/list"}
)
#: 2026-07-28: the body field mirrored by the C{Mcp-Name} header.
NAME_BEARING = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}


def is_modern_request(message: Message) -> bool:
    """
    Whether a request uses the 2026-07-28 per-request envelope (its
    C{_meta} names a protocol version), whatever that version is.
    """
    if not isinstance(message, (Request, Notification)):
        return False
    meta = message.params.get("_meta")
    return isinstance(meta, dict) and PROTOCOL_VERSION_KEY in meta


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Envelope:
    """
    What a 2026-07-28 request says about its sender in C{params._meta}.

    @ivar log_level: the level of log notifications it wants (C{None}:
        none at all).
    """

    version: str
    capabilities: dict[str, Any]
    log_level: Optional[str]


def check_envelope(message: Request) -> Envelope:
    """
    The validation ladder of the 2026-07-28 revision, first failure wins:
    one place for the native session and the gateway's.

    @raise JSONRPCError: invalid params (no C{_meta}, a missing key, a
        value of the wrong type, an unknown log level), an unsupported
        version, or "method not found" for a method the revision removed.
    """
    meta = message.params.get("_meta")
    if not isinstance(meta, dict):
        raise jsonrpc.invalid_params("params._meta must carry the protocol version and client capabilities")
    missing = [k for k in (PROTOCOL_VERSION_KEY, CLIENT_CAPABILITIES_KEY) if k not in meta]
    if missing:
        raise jsonrpc.invalid_params("params._meta is missing " + ", ".join(missing))
    version = meta[PROTOCOL_VERSION_KEY]
    if not isinstance(version, str):
        raise jsonrpc.invalid_params("protocol version must be a string")
    if version not in MODERN_VERSIONS:
        raise jsonrpc.unsupported_version(version, MODERN_VERSIONS)
    capabilities = meta[CLIENT_CAPABILITIES_KEY]
    if not isinstance(capabilities, dict):
        raise jsonrpc.invalid_params("client capabilities must be an object")
    level = meta.get(LOG_LEVEL_KEY)
    if level is not None and level not in LOG_LEVELS:
        raise jsonrpc.invalid_params("unknown log level")
    if message.method in REMOVED_IN_MODERN:
        raise jsonrpc.method_not_found(message.method)
    return Envelope(version, capabilities, level)


def _decode_header_value(value: Optional[str]) -> Optional[str]:
    # Mcp-Name may carry non-ASCII values as =?base64?...?=.
    if value is None or not (value.startswith("=?base64?") and value.endswith("?=")):
        return value
    payload = value[len("=?base64?") : -2]
    try:
        decoded = base64.b64decode(payload, validate=True)
        if base64.b64encode(decoded).decode("ascii") != payload:
            return None
        return decoded.decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None


def check_modern_headers(request: Request, headers: dict[str, Optional[str]]) -> None:
    """
    The 2026-07-28 HTTP rule that routing headers agree with the body
    (C{MCP-Protocol-Version}, C{Mcp-Method}, C{Mcp-Name}), so that a gateway
    which routed on the headers routed what is actually executed.

    @param headers: lower-case header names to values (C{None}: absent).
    @raise JSONRPCError: C{HEADER_MISMATCH}.
    """
    meta = request.params.get("_meta")
    version = meta.get(PROTOCOL_VERSION_KEY) if isinstance(meta, dict) else None
    if headers.get("mcp-protocol-version") is None or headers.get("mcp-protocol-version") != version:
        raise JSONRPCError(jsonrpc.HEADER_MISMATCH, "MCP-Protocol-Version header does not match _meta")
    if headers.get("mcp-method") != request.method:
        raise JSONRPCError(jsonrpc.HEADER_MISMATCH, "Mcp-Method header does not match the method")
    key = NAME_BEARING.get(request.method)
    if key is not None:
        body_value = request.params.get(key)
        if body_value is not None and _decode_header_value(headers.get("mcp-name")) != body_value:
            raise JSONRPCError(jsonrpc.HEADER_MISMATCH, f"Mcp-Name header does not match {key}")
