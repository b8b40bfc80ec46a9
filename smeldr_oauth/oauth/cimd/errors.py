"""
The one error of Client ID Metadata Document handling.
"""

from __future__ import annotations


class CIMDError(Exception):
    """
    A client ID metadata document could not be used.

    @ivar reason: short text that is safe to show on an error page: it never
        contains response bodies, tokens or internal addresses.
    @ivar transient: whether the failure says nothing about the document
        (a timeout, a refused connection, a 503, no free fetch slot), so
        that a cached copy may still stand in for it.
    """

    def __init__(self, reason: str, *, transient: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.transient = transient
