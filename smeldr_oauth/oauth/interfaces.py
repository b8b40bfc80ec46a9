"""
The seam between the authorization server and the resources it protects.

The MCP layer depends only on these two interfaces, never on the OAuth
server's internals: anything that can turn a bearer token into an
L{AccessInfo} (and tell when a grant ends) can protect an MCP endpoint.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

from zope.interface import Interface

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from smeldr_oauth.oauth.model import AccessInfo


class IAccessVerifier(Interface):
    """
    Validates access tokens presented to a protected resource.
    """

    def verify_access_token(token: str) -> "Deferred[Optional[AccessInfo]]":  # type: ignore[misc]
        """
        The L{smeldr_oauth.oauth.model.AccessInfo} of a live token issued
        for this resource, or C{None} if the token is unknown, expired,
        revoked, or was issued for another resource (audience).
        """


class IGrantEvents(Interface):
    """
    Lets a resource hear that a grant ended, so it can close what was
    opened with it (for MCP: the SSE streams of that grant).
    """

    def add_revocation_observer(observer: Callable[[str], None]) -> None:  # type: ignore[misc]
        """
        Call C{observer(grant_id)} whenever a grant is revoked.
        """
