# -*- test-case-name: tests.test_oauth_server -*-
"""
The one place OAuth errors are defined.

Protocol logic raises these; the HTTP layer turns them into an RFC 6749
section 5.2 JSON body (token, revocation and registration endpoints), an
error redirect carrying C{iss} (authorization endpoint, once the redirect URI
is trusted), or a plain page (authorization endpoint, before it is).
"""

from __future__ import annotations

import re
from typing import Optional

# RFC 6749 section 5.2: error_description is limited to printable ASCII
# without '"' and '\\'.  Descriptions may quote what a client sent (an
# unknown scope), so anything else is replaced rather than echoed.
_NOT_DESCRIPTION = re.compile(r"[^\x20-\x21\x23-\x5b\x5d-\x7e]")
MAX_DESCRIPTION = 300


def clean_description(text: str) -> str:
    """
    Make C{text} a valid C{error_description}: printable ASCII except C{"}
    and C{\\}, at most L{MAX_DESCRIPTION} characters.
    """
    return _NOT_DESCRIPTION.sub("?", text)[:MAX_DESCRIPTION]


class OAuthError(Exception):
    """
    An OAuth error response.

    @ivar error: the RFC 6749 / RFC 7591 / RFC 8707 error code.
    @ivar description: human-readable text; never contains a secret.
    @ivar status: the HTTP status for JSON endpoints.
    """

    status = 400

    def __init__(self, error: str, description: str, status: Optional[int] = None) -> None:
        super().__init__(error, description)
        self.error = error
        self.description = clean_description(description)
        if status is not None:
            self.status = status

    def as_json(self) -> dict[str, str]:
        return {"error": self.error, "error_description": self.description}


def invalid_request(description: str) -> OAuthError:
    return OAuthError("invalid_request", description)


def invalid_client(description: str) -> OAuthError:
    return OAuthError("invalid_client", description, 401)


def invalid_grant(description: str) -> OAuthError:
    return OAuthError("invalid_grant", description)


def invalid_scope(description: str) -> OAuthError:
    return OAuthError("invalid_scope", description)


def invalid_target(description: str) -> OAuthError:
    return OAuthError("invalid_target", description)


def unsupported_grant_type(description: str) -> OAuthError:
    return OAuthError("unsupported_grant_type", description)


def unsupported_response_type(description: str) -> OAuthError:
    return OAuthError("unsupported_response_type", description)


def access_denied(description: str) -> OAuthError:
    return OAuthError("access_denied", description, 403)


def slow_down(description: str) -> OAuthError:
    return OAuthError("slow_down", description, 429)


def invalid_redirect_uri(description: str) -> OAuthError:
    return OAuthError("invalid_redirect_uri", description)


def invalid_client_metadata(description: str) -> OAuthError:
    return OAuthError("invalid_client_metadata", description)


class UntrustedRedirect(Exception):
    """
    The authorization request cannot be redirected back: the client is
    unknown or the redirect URI is not one of its own.  The user gets a
    plain error page, never a redirect (no open redirector).
    """

    def __init__(self, title: str, detail: str, status: int = 400, retry_after: Optional[int] = None) -> None:
        super().__init__(title, detail)
        self.title = title
        self.detail = detail
        self.status = status
        self.retry_after = retry_after


class RateLimited(Exception):
    """
    A per-address rate limit refused the request; the HTTP layer answers
    429 with C{Retry-After}.
    """

    def __init__(self, retry_after: int = 60) -> None:
        super().__init__(retry_after)
        self.retry_after = retry_after


class PasteRefused(Exception):
    """
    The site token pasted into a form was not accepted.
    """


class AuthorizeRedirectError(Exception):
    """
    An authorization request error that may be sent back to the (trusted)
    redirect URI, with C{state} and C{iss}.

    @ivar issuer: the C{iss} to send back (RFC 9207); set by whoever raises
        it, so the HTTP layer can answer with L{location} alone.
    """

    def __init__(
        self, redirect_uri: str, state: Optional[str], error: OAuthError, issuer: Optional[str] = None
    ) -> None:
        super().__init__(redirect_uri, error.error)
        self.redirect_uri = redirect_uri
        self.state = state
        self.error = error
        self.issuer = issuer

    @property
    def location(self) -> str:
        """
        The Location of the error response (RFC 6749 section 4.1.2.1, with
        RFC 9207's C{iss}).
        """
        from smeldr_oauth.oauth.urls import with_query

        if self.issuer is None:
            raise ValueError("an authorization error redirect needs the issuer")
        params = [("error", self.error.error), ("error_description", self.error.description)]
        if self.state is not None:
            params.append(("state", self.state))
        params.append(("iss", self.issuer))
        return with_query(self.redirect_uri, params)


def login_required(description: str) -> OAuthError:
    """
    C{prompt=none} asked for no interaction, but every approval here needs
    the user to paste a site token (OpenID Connect Core section 3.1.2.6).
    """
    return OAuthError("login_required", description)


def server_error(description: str = "the server could not handle the request") -> OAuthError:
    """
    Something failed on our side; the description never says what.
    """
    return OAuthError("server_error", description, 500)


def temporarily_unavailable(description: str, status: int = 503) -> OAuthError:
    """
    The server cannot serve the request now (a registration cap, or a rate
    limit with C{status} 429): RFC 6749's code for "try again later", which
    RFC 7591 clients understand better than the device-flow C{slow_down}.
    """
    return OAuthError("temporarily_unavailable", description, status)
