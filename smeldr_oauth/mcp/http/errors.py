# -*- test-case-name: tests.test_mcp_http -*-
"""
Every status the MCP endpoints answer with, and the one place that maps
MCP's refusals to them.

Refusals are raised as the site's L{HTTPError} carrying their JSON body
(a JSON-RPC error, or RFC 6750's for bearer tokens) and extra headers; the
site's error path (L{smeldr_oauth.web.errors}) writes them, in the routes'
JSON-RPC dialect.  An L{AuthFailure} or a L{SessionLimitReached} becomes
one here.  JSON-RPC answers that travel as plain JSON get their status
from L{answer_status}: 200, except the C{insufficient_scope} step-up (403
with a challenge) and the 2026-07-28 error statuses.

Statuses, for a reader looking for one:

  - 202: notifications and responses only (nothing to answer); legacy
    C{POST /mcp/message} (the answer travels on the stream);
  - 204: C{DELETE}, C{OPTIONS};
  - 400: malformed JSON, headers or session ids, a missing session id, an
    unsupported C{MCP-Protocol-Version}, batches where none are allowed,
    2026-07-28 envelope errors;
  - 401 / 403: no, bad or expired token / a token without a needed scope
    (both with C{WWW-Authenticate}), and a forbidden C{Origin} (403);
  - 404: an unknown, ended or someone else's session (the same answer for
    all three), an ended session's pending POST, a 2026-07-28 unknown
    method;
  - 405, 406, 413, 415: method, C{Accept}, body size, C{Content-Type};
  - 429: every session of the caller is busy (with C{Retry-After});
  - 500: a bug (logged; the body says nothing);
  - 503: the token verifier cannot answer, or the server-wide session cap.
"""

from __future__ import annotations

import math
from typing import Any

from twisted.internet.defer import CancelledError
from twisted.python.failure import Failure

from smeldr_oauth.mcp import jsonrpc
from smeldr_oauth.mcp.auth import AuthFailure, Challenger
from smeldr_oauth.mcp.jsonrpc import JSONRPCError
from smeldr_oauth.mcp.state.records import SessionLimitReached
from smeldr_oauth.web.errors import HTTPError

#: 2026-07-28 error codes and the HTTP status they travel with.
MODERN_STATUS = {
    jsonrpc.PARSE_ERROR: 400,
    jsonrpc.INVALID_REQUEST: 400,
    jsonrpc.INVALID_PARAMS: 400,
    jsonrpc.HEADER_MISMATCH: 400,
    jsonrpc.MISSING_CLIENT_CAPABILITY: 400,
    jsonrpc.UNSUPPORTED_PROTOCOL_VERSION: 400,
    jsonrpc.METHOD_NOT_FOUND: 404,
}


def rpc_error(
    status: int, code: int, message: str, data: Any = None, msg_id: Any = None, headers: tuple = ()
) -> HTTPError:
    """A refusal whose body is a JSON-RPC error."""
    return HTTPError(
        status,
        "invalid_request" if status < 500 else "server_error",
        message,
        headers=headers,
        body=jsonrpc.error_response(msg_id, JSONRPCError(code, message, data)),
    )


def bad_request(message: str, data: Any = None) -> HTTPError:
    return rpc_error(400, jsonrpc.INVALID_REQUEST, message, data)


def session_not_found() -> HTTPError:
    return rpc_error(404, jsonrpc.INVALID_REQUEST, "Session not found")


def modern_refusal(msg_id: Any, error: JSONRPCError) -> HTTPError:
    """A 2026-07-28 request refused before it ran, with that revision's status."""
    return rpc_error(MODERN_STATUS.get(error.code, 400), error.code, error.message, error.data, msg_id)


def invalid_frame(error: JSONRPCError, msg_id: Any = None) -> HTTPError:
    """A body that is not a usable JSON-RPC frame: 400 with the JSON-RPC error."""
    return rpc_error(400, error.code, error.message, error.data, msg_id)


def from_auth_failure(failure: AuthFailure) -> HTTPError:
    """
    A bearer-token refusal: RFC 6750's body and challenge (401, 403), or
    503 when the verifier could not answer.
    """
    if failure.status == 503:
        headers = (("Retry-After", str(failure.retry_after)),) if failure.retry_after is not None else ()
        return rpc_error(503, jsonrpc.INTERNAL_ERROR, "Authorization temporarily unavailable", headers=headers)
    body = {"error": failure.error or "unauthorized", "error_description": "Authorization required"}
    if failure.status == 403:
        body["error_description"] = "The access token lacks a required scope"
    elif failure.error == "invalid_token":
        body["error_description"] = "The access token is invalid or expired"
    elif failure.error == "invalid_request":
        body["error_description"] = "Malformed Authorization header"
    headers = (("WWW-Authenticate", failure.challenge),) if failure.challenge else ()
    return HTTPError(failure.status, body["error"], body["error_description"], headers=headers, body=body)


def from_session_limit(error: SessionLimitReached, retry_after: float) -> HTTPError:
    """
    A caller whose sessions are all busy waits (429, C{Retry-After}); the
    server-wide cap is the server's problem (503).
    """
    if error.scope == "server":
        return rpc_error(503, jsonrpc.INTERNAL_ERROR, "Too many sessions")
    return rpc_error(
        429, jsonrpc.INTERNAL_ERROR, "Too many sessions", headers=(("Retry-After", str(int(math.ceil(retry_after)))),)
    )


def answer_status(response: dict[str, Any], modern: bool, challenger: Challenger) -> tuple[int, dict[str, str]]:
    """
    The status (and extra headers) of one JSON-RPC answer sent as plain
    JSON: a C{tools/call} refused for scope becomes the 403 step-up a
    client knows how to follow; 2026-07-28 errors carry their status.
    """
    error = response.get("error") or {}
    if error.get("code") == jsonrpc.INSUFFICIENT_SCOPE:
        scope = (error.get("data") or {}).get("scope", "")
        failure = challenger.insufficient_scope(tuple(scope.split()))
        return 403, {"WWW-Authenticate": failure.challenge}
    if modern and error:
        code = error.get("code")
        return (MODERN_STATUS.get(code, 200) if isinstance(code, int) else 200), {}
    return 200, {}


def refused(failure: Failure) -> Any:
    """
    The errback of every MCP route: a bearer-token refusal becomes its
    L{HTTPError} (the site's error path writes every L{HTTPError}); a
    cancelled route (the client went away) answers nothing.  A plain
    function, not a closure: an idle stream holds it for as long as it is
    open.
    """
    if failure.check(AuthFailure):
        raise from_auth_failure(failure.value)  # type: ignore[arg-type]
    if failure.check(CancelledError):
        return None
    return failure
