# -*- test-case-name: tests.test_oauth_server -*-
"""
Ending tokens and grants: the revocation endpoint (RFC 7009), revoking a
grant (the connected-apps page, the admin command), and L{GrantEvents},
through which every revocation made in this process reaches the access
verifier's cache and the resources that hold something open for a grant.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import attr

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from smeldr_oauth.oauth import errors
from smeldr_oauth.oauth.clients import ClientResolver
from smeldr_oauth.oauth.interfaces import IGrantEvents
from smeldr_oauth.oauth.model import AccessInfo
from smeldr_oauth.oauth.params import MAX_PARAM, REVOKE_PARAMS, Params, reject_repeated, single
from smeldr_oauth.oauth.secrets import hash_secret
from smeldr_oauth.oauth.verifier import AccessVerifier

log = Logger()


@implementer(IGrantEvents)
class GrantEvents:
    """
    Tells the verifier, and every observer, that a token or a grant ended;
    and the verifier that a grant's use was just recorded.
    """

    def __init__(self, verifier: AccessVerifier) -> None:
        self.verifier = verifier
        self._observers: list[Callable[[str], None]] = []

    def add_revocation_observer(self, observer: Callable[[str], None]) -> None:
        self._observers.append(observer)

    def token_revoked(self, token_hash: str) -> None:
        self.verifier.token_revoked(token_hash)

    def revocation_mark(self) -> int:
        """
        See L{AccessVerifier.revocation_mark}.
        """
        return self.verifier.revocation_mark()

    def access_issued(self, token_hash: str, info: AccessInfo, mark: int) -> None:
        """
        A token was issued (see L{AccessVerifier.access_issued}).
        """
        self.verifier.access_issued(token_hash, info, mark)

    def grant_used(self, grant_id: str) -> None:
        """
        The store recorded the grant's use (see L{AccessVerifier.grant_used}).
        """
        self.verifier.grant_used(grant_id)

    def grant_revoked(self, grant_id: str) -> None:
        self.verifier.grant_revoked(grant_id)
        for observer in list(self._observers):
            try:
                observer(grant_id)
            except Exception:
                log.failure("revocation observer failed")


@attr.s(auto_attribs=True, eq=False)
class Revocation:
    """
    RFC 7009 revocation, and revoking grants by id.
    """

    store: Any
    _clock: IReactorTime
    clients: ClientResolver
    events: GrantEvents

    async def revoke(self, params: Params, basic: Optional[tuple[str, str]] = None) -> None:
        """
        RFC 7009.  Unknown tokens are not an error; a refresh token ends its
        grant.  Public clients identify themselves by client_id only, and
        are not required to: a token is its own proof of possession.  But
        a client that does name itself (C{client_id}, or by authenticating)
        revokes only its own tokens: one of another client's is left alone,
        and the answer is the same 200 (RFC 7009 section 2.1: the server
        verifies that the token was issued to the requesting client).
        """
        reject_repeated(params, REVOKE_PARAMS)
        values = params.get("token", [])
        if not values or not values[0]:
            raise errors.invalid_request("parameter token is required")
        token = values[0]
        # RFC 7009 section 2.2.1: a token_type_hint we do not know is
        # ignored (unsupported_token_type is for types that cannot be
        # revoked; both of ours can), and so is the hint itself: the
        # token's hash finds it whatever its type.
        requester = single(params, "client_id")
        if basic is not None or single(params, "client_secret") is not None:
            requester = (await self.clients.authenticate(params, basic)).client_id
        if len(token) > MAX_PARAM:
            # Not one of ours: RFC 7009 answers 200 for invalid tokens.
            return
        token_hash = hash_secret(token)
        grant_id = await self.store.revoke_token(token_hash, self._clock.seconds(), client_id=requester)
        self.events.token_revoked(token_hash)
        if grant_id is not None:
            log.info("grant {grant_id} revoked by its client", grant_id=grant_id, smeldr_event="token_revoked")
            self.events.grant_revoked(grant_id)

    async def revoke_grant(self, grant_id: str) -> bool:
        ended = await self.store.revoke_grant(grant_id, self._clock.seconds())
        if ended:
            log.info("grant {grant_id} revoked", grant_id=grant_id, smeldr_event="token_revoked")
            self.events.grant_revoked(grant_id)
        return bool(ended)
