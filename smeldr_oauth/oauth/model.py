# -*- test-case-name: tests.test_oauth_server -*-
"""
Records shared by the authorization server, its store and the MCP layer.

They are plain values (frozen attrs classes): the protocol logic builds them,
the store persists them, and nothing in here knows about HTTP or SQL.  Every
secret (code, access token, refresh token) appears here only as the hex
SHA-256 of its value: the plaintext exists only in the response that hands it
to the client.
"""

from __future__ import annotations

from typing import Optional

import attr


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class Client:
    """
    A client as the authorization server knows it, whatever its origin: a
    dynamic registration (RFC 7591) or a Client ID Metadata Document.

    @ivar client_secret_hash: SHA-256 of the secret of a confidential
        registered client, or C{None} for a public client.
    @ivar kind: C{"registered"} or C{"cimd"}.
    """

    client_id: str
    client_name: Optional[str]
    redirect_uris: tuple[str, ...]
    token_endpoint_auth_method: str = "none"
    grant_types: tuple[str, ...] = ("authorization_code", "refresh_token")
    scope: Optional[str] = None
    kind: str = "registered"
    client_secret_hash: Optional[str] = None
    created_at: float = 0.0
    client_uri: Optional[str] = None
    logo_uri: Optional[str] = None


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class Grant:
    """
    One approval by one user of one client: the row that codes, access
    tokens and refresh tokens hang from.  Revoking it ends them all.

    @ivar subject: who approved (what C{verify_bearer} returned, or
        C{"site"} when it returned C{True}).
    @ivar site_token_id: the site token the approval was made with, so that
        revoking the site token revokes its grants (C{None} when unknown).
    """

    grant_id: str
    client_id: str
    subject: str
    scopes: tuple[str, ...]
    resource: str
    created_at: float
    site_token_id: Optional[str] = None
    client_name: Optional[str] = None
    last_used_at: Optional[float] = None
    revoked_at: Optional[float] = None


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class AuthorizationCode:
    """
    An authorization code, stored by hash, with everything the token endpoint
    must check against the exchange request.
    """

    code_hash: str
    grant_id: str
    client_id: str
    redirect_uri: str
    code_challenge: str
    scopes: tuple[str, ...]
    resource: str
    expires_at: float
    issue_refresh: bool


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class AccessToken:
    token_hash: str
    grant_id: str
    scopes: tuple[str, ...]
    resource: str
    expires_at: float


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class RefreshToken:
    """
    A refresh token.  C{generation} counts rotations within its grant: the
    live generation is the highest one, and the one before it may be
    replayed during the grace window (see L{smeldr_oauth.oauth.rotation}).
    """

    token_hash: str
    grant_id: str
    scopes: tuple[str, ...]
    generation: int
    created_at: float
    expires_at: float
    used_at: Optional[float] = None


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class AccessInfo:
    """
    What a valid access token tells a resource server: who, through which
    client, for which scopes and which resource, until when.
    """

    subject: str
    client_id: str
    scopes: frozenset[str]
    resource: str
    grant_id: str
    expires_at: float


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class IssuedTokens:
    """
    The plaintext tokens that one successful token request returns.  Only
    the response carries these; the store holds hashes.
    """

    access_token: str
    expires_in: int
    scopes: tuple[str, ...]
    refresh_token: Optional[str] = None

    def as_json(self) -> dict[str, object]:
        return token_response(self.access_token, self.expires_in, self.scopes, self.refresh_token)


def token_response(
    access_token: str, expires_in: int, scopes: tuple[str, ...], refresh_token: Optional[str]
) -> dict[str, object]:
    """
    The token response's body (RFC 6749 section 5.1): L{IssuedTokens.as_json},
    without a frozen record made on the way (the token endpoint answers
    every refresh with one).
    """
    body: dict[str, object] = {
        "access_token": access_token,
        "token_type": "Bearer",
        "expires_in": expires_in,
        "scope": " ".join(scopes),
    }
    if refresh_token is not None:
        body["refresh_token"] = refresh_token
    return body


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class Approval:
    """
    Who approved a consent form: what a C{verify_bearer} callable may return
    instead of C{True} or a subject string, so that the grant remembers the
    site token it was made with (revoking that token then revokes the grant).
    """

    subject: str
    site_token_id: Optional[str] = None
