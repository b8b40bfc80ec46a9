# -*- test-case-name: tests.test_mcp_jsonrpc -*-
"""
JSON-RPC 2.0 framing for MCP: parsing frames into typed messages and
building every error the MCP layer sends.

This is the one place that knows the wire shape of a JSON-RPC message, so
the session and the transports exchange plain records and never build
error dictionaries by hand.
"""

from __future__ import annotations

import json
from typing import Any, Optional, Union

import attr

from smeldr_oauth.oauth.jsontext import encoder

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603

#: MCP: a resource URI that names nothing.
RESOURCE_NOT_FOUND = -32002
#: MCP 2026-07-28: HTTP routing headers disagree with the body.
HEADER_MISMATCH = -32020
#: MCP 2026-07-28: a client capability the request needs was not declared.
MISSING_CLIENT_CAPABILITY = -32021
#: MCP 2026-07-28: the requested protocol version is not served here.
UNSUPPORTED_PROTOCOL_VERSION = -32022
#: smeldr: a server-to-client request got no answer in time.
REQUEST_TIMEOUT = -32001
#: smeldr: the caller's token lacks a scope the method needs.  Only seen on
#: transports that cannot answer with an HTTP 403 (stdio, a stream).
INSUFFICIENT_SCOPE = -32010
#: smeldr: the request was cancelled or its session ended.
REQUEST_CANCELLED = -32800

JSONValue = Any
RequestId = Union[str, int]


class JSONRPCError(Exception):
    """
    An error to report to the peer as a JSON-RPC error object.

    @ivar code: the JSON-RPC error code.
    @ivar message: a short, client-safe description (never a traceback).
    @ivar data: optional structured detail, also client-safe.
    """

    def __init__(self, code: int, message: str, data: JSONValue = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data

    def as_json(self) -> dict[str, JSONValue]:
        error: dict[str, JSONValue] = {"code": self.code, "message": self.message}
        if self.data is not None:
            error["data"] = self.data
        return error


class InsufficientScope(JSONRPCError):
    """
    The caller's token does not carry every scope the request needs.  HTTP
    transports turn it into a 403 with an C{insufficient_scope} challenge
    when they still can; elsewhere it travels as a JSON-RPC error.

    @ivar scopes: the scopes the request needs (all of them, so a client
        can ask for exactly that set when it steps up).
    """

    def __init__(self, scopes: tuple[str, ...]) -> None:
        self.scopes = tuple(scopes)
        super().__init__(
            INSUFFICIENT_SCOPE,
            "Insufficient scope",
            {"error": "insufficient_scope", "scope": " ".join(self.scopes)},
        )


def parse_error(detail: str = "Parse error") -> JSONRPCError:
    return JSONRPCError(PARSE_ERROR, detail)


def invalid_request(detail: str = "Invalid Request") -> JSONRPCError:
    return JSONRPCError(INVALID_REQUEST, detail)


def method_not_found(method: str) -> JSONRPCError:
    # The method name is echoed back only as data, truncated, so that a
    # hostile name cannot make the error message huge.
    return JSONRPCError(METHOD_NOT_FOUND, "Method not found", {"method": method[:200]})


def invalid_params(detail: str = "Invalid params") -> JSONRPCError:
    return JSONRPCError(INVALID_PARAMS, detail)


def internal_error() -> JSONRPCError:
    return JSONRPCError(INTERNAL_ERROR, "Internal error")


def peer_error(error: object, fallback: str) -> JSONRPCError:
    """
    The error object a peer answered one of our requests with, checked for
    shape and cut to a sane size, as an exception to pass on: a client's
    answer to a server-to-client request, an upstream's answer to the
    gateway.

    @param fallback: the message when the peer gave none.
    """
    if not isinstance(error, dict):
        return JSONRPCError(INTERNAL_ERROR, fallback)
    code, message = error.get("code"), error.get("message")
    if not isinstance(code, int) or isinstance(code, bool):
        code = INTERNAL_ERROR
    if not isinstance(message, str):
        message = fallback
    return JSONRPCError(code, message[:500], error.get("data"))


def unsupported_version(requested: object, supported: tuple[str, ...]) -> JSONRPCError:
    return JSONRPCError(
        UNSUPPORTED_PROTOCOL_VERSION,
        "Unsupported protocol version",
        {"supported": list(supported), "requested": str(requested)[:64]},
    )


@attr.s(frozen=True, auto_attribs=True)
class Request:
    """A call that expects an answer."""

    id: RequestId
    method: str
    params: dict[str, JSONValue]


@attr.s(frozen=True, auto_attribs=True)
class Notification:
    """A call that expects no answer."""

    method: str
    params: dict[str, JSONValue]


@attr.s(frozen=True, auto_attribs=True)
class Response:
    """
    The peer's answer to one of our own requests (server-to-client calls
    such as C{sampling/createMessage}).  Exactly one of C{result} and
    C{error} is meaningful; C{error} is C{None} on success.
    """

    id: RequestId
    result: JSONValue = None
    error: Optional[dict[str, JSONValue]] = None


@attr.s(frozen=True, auto_attribs=True)
class Invalid:
    """
    A member of a frame that is not a valid message.  It is kept (rather
    than raised) so that the rest of a batch is still served, and so the
    error can carry the member's id when one could be read.
    """

    id: Optional[RequestId]
    error: JSONRPCError


Message = Union[Request, Notification, Response, Invalid]


def _valid_id(value: object) -> bool:
    # bool is an int subclass but not a valid id; floats are allowed by
    # JSON-RPC but discouraged, and MCP says string or integer.
    return (isinstance(value, str) and len(value) <= 256) or (
        isinstance(value, int) and not isinstance(value, bool)
    )


def parse_message(obj: object) -> Message:
    """
    Classify one decoded JSON value as a request, notification, response,
    or an invalid member.
    """
    if not isinstance(obj, dict):
        return Invalid(None, invalid_request("Message must be an object"))
    raw_id = obj.get("id", None)
    msg_id: Optional[RequestId] = raw_id if _valid_id(raw_id) else None
    if obj.get("jsonrpc") != "2.0":
        return Invalid(msg_id, invalid_request('"jsonrpc" must be "2.0"'))
    if "method" in obj:
        method = obj["method"]
        if not isinstance(method, str) or not method:
            return Invalid(msg_id, invalid_request('"method" must be a string'))
        params = obj.get("params", {})
        if params is None:
            params = {}
        if not isinstance(params, dict):
            # JSON-RPC allows positional params, MCP never uses them.
            return Invalid(msg_id, invalid_params('"params" must be an object'))
        if "id" not in obj:
            return Notification(method, params)
        if not _valid_id(raw_id):
            return Invalid(None, invalid_request('"id" must be a string or an integer'))
        return Request(raw_id, method, params)  # type: ignore[arg-type]  # _valid_id checked it
    if "result" in obj or "error" in obj:
        if not _valid_id(raw_id):
            return Invalid(None, invalid_request("Response without a valid id"))
        error = obj.get("error")
        if error is not None and not isinstance(error, dict):
            return Invalid(msg_id, invalid_request('"error" must be an object'))
        return Response(raw_id, obj.get("result"), error)  # type: ignore[arg-type]  # _valid_id checked it
    return Invalid(msg_id, invalid_request("Neither a request nor a response"))


def parse_frame(body: bytes) -> tuple[bool, list[Message]]:
    """
    Decode one transport frame (an HTTP body, a stdio line).

    @return: C{(is_batch, messages)}.
    @raise JSONRPCError: C{PARSE_ERROR} for bytes that are not UTF-8 JSON,
        C{INVALID_REQUEST} for an empty batch.
    """
    try:
        text = body.decode("utf-8")
        decoded = _DECODER.decode(text)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise parse_error()
    if isinstance(decoded, list):
        if not decoded:
            raise invalid_request("Empty batch")
        return True, [parse_message(item) for item in decoded]
    return False, [parse_message(decoded)]


def _reject_constant(name: str) -> None:
    # NaN and Infinity are not JSON.
    raise ValueError(name)


# One decoder and one encoder for every frame: C{json.loads} and
# C{json.dumps} given any option build a new one (and its scanner) per
# call, which was a third of their cost for a tools/call's frames.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
# The encoders are made once too, without JSONEncoder.encode's set-up per
# call (see smeldr_oauth.oauth.jsontext).
_ENCODER = encoder(ensure_ascii=False)
#: For the rare message that has no UTF-8 (see L{encode}).
_ASCII_ENCODER = encoder()


def result_response(msg_id: RequestId, result: JSONValue) -> dict[str, JSONValue]:
    return {"jsonrpc": "2.0", "id": msg_id, "result": result}


def error_response(msg_id: Optional[RequestId], error: JSONRPCError) -> dict[str, JSONValue]:
    return {"jsonrpc": "2.0", "id": msg_id, "error": error.as_json()}


def lost_answer(message: Message) -> Optional[dict[str, JSONValue]]:
    """
    What to send when the answer to C{message} could not be made or sent
    (a bug): an internal error for a request, so its caller does not wait
    for good; nothing for anything else, which expects no answer.
    """
    if isinstance(message, Request):
        return error_response(message.id, internal_error())
    return None


def notification(method: str, params: Optional[dict[str, JSONValue]] = None) -> dict[str, JSONValue]:
    message: dict[str, JSONValue] = {"jsonrpc": "2.0", "method": method}
    if params is not None:
        message["params"] = params
    return message


def request(msg_id: RequestId, method: str, params: Optional[dict[str, JSONValue]] = None) -> dict[str, JSONValue]:
    message = notification(method, params)
    message["id"] = msg_id
    return message


def encode(message: JSONValue) -> bytes:
    """
    Compact UTF-8 JSON, one line (stdio frames must not contain newlines).

    A lone surrogate (JSON lets a client send C{"\\ud800"}, and a tool may
    echo it back) has no UTF-8: such a message is sent with every
    non-ASCII character escaped, which is the same JSON, rather than an
    error that would leave the request without an answer.
    """
    text = _ENCODER(message)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return _ASCII_ENCODER(message).encode("ascii")
