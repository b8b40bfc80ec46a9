# -*- test-case-name: tests.test_oauth_server -*-
"""
Request parameters as RFC 6749 wants them read: each at most once, none
empty or oversized, unknown ones ignored.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Optional

from smeldr_oauth.oauth import errors

#: Longest parameter value accepted.
MAX_PARAM = 2048

#: Longest C{state} sent back to a client.
MAX_STATE = 1024

#: Longest access token worth looking up: ours are 55 characters (43 before
#: their time stamp, L{smeldr_oauth.oauth.secrets.new_secrets}).
MAX_TOKEN = 512

#: The authorization request's parameters that may appear at most once
#: (RFC 6749 section 3.1).  C{resource} is checked on its own: RFC 8707
#: allows several, and this server refuses more than one as invalid_target.
AUTHORIZE_PARAMS = (
    "response_type",
    "client_id",
    "redirect_uri",
    "scope",
    "state",
    "code_challenge",
    "code_challenge_method",
    "prompt",
    "response_mode",
)

#: The same for the token endpoint (RFC 6749 section 3.2).
TOKEN_PARAMS = (
    "grant_type",
    "code",
    "redirect_uri",
    "client_id",
    "client_secret",
    "code_verifier",
    "refresh_token",
    "scope",
)

#: And for the revocation endpoint (RFC 7009 section 2.1).
REVOKE_PARAMS = ("token", "token_type_hint", "client_id", "client_secret")

Params = Mapping[str, list[str]]


def single(params: Params, name: str, required: bool = False) -> Optional[str]:
    """
    The one value of parameter C{name}.  A repeated parameter is an
    C{invalid_request} (RFC 6749 section 3.1), and so is an empty or
    oversized one.
    """
    values = params.get(name, [])
    if len(values) > 1:
        raise errors.invalid_request(f"parameter {name} is repeated")
    if not values or values[0] == "":
        if required:
            raise errors.invalid_request(f"parameter {name} is required")
        return None
    value = values[0]
    if len(value) > MAX_PARAM:
        raise errors.invalid_request(f"parameter {name} is too long")
    return value


def reject_repeated(params: Params, names: Iterable[str]) -> None:
    """
    Refuse a request that repeats one of C{names} (RFC 6749 sections 3.1
    and 3.2: parameters MUST NOT be included more than once).  Parameters
    we do not know are ignored, as RFC 6749 section 3.1 requires.
    """
    if all(len(values) == 1 for values in params.values()):
        # The usual request: nothing repeated at all.
        return
    for name in names:
        if len(params.get(name, [])) > 1:
            raise errors.invalid_request(f"parameter {name} is repeated")
    if len(params.get("resource", [])) > 1:
        raise errors.invalid_target("only one resource may be requested")
