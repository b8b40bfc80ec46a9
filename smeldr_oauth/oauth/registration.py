# -*- test-case-name: tests.test_oauth_server -*-
"""
Dynamic client registration (RFC 7591).
"""

from __future__ import annotations

from typing import Any, Optional

import attr

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from smeldr_oauth.oauth import errors
from smeldr_oauth.oauth.config import Config
from smeldr_oauth.oauth.model import Client
from smeldr_oauth.oauth.ratelimit import IRateLimiter, spend
from smeldr_oauth.oauth.scopes import parse_scopes
from smeldr_oauth.oauth.secrets import hash_secret, new_id, new_secret
from smeldr_oauth.oauth.text import MAX_CLIENT_NAME, clean_client_name, loggable
from smeldr_oauth.oauth.urls import InvalidRedirectURI, check_redirect_uri, parse

log = Logger()

#: The grant types a client may register.
GRANT_TYPES = ("authorization_code", "refresh_token")

#: What a registration without C{grant_types} gets: RFC 7591 section 2's
#: default.  Every client we know (the TypeScript and Python SDKs,
#: mcp-remote, Claude.ai, ChatGPT) sends its grant types; one that sends
#: none gets refresh tokens only by asking for C{offline_access}.
DEFAULT_GRANT_TYPES = ["authorization_code"]

MAX_REDIRECT_URIS = 20


@attr.s(auto_attribs=True, eq=False)
class Registration:
    """
    Registers clients: public (C{token_endpoint_auth_method: none}) unless
    they ask for a shared-secret method, in which case they get a secret,
    shown once.

    @ivar limiter: registrations per client address.
    """

    config: Config
    store: Any
    _clock: IReactorTime
    limiter: IRateLimiter

    async def register(self, metadata: Any, address: Optional[str] = None) -> dict[str, Any]:
        """
        The registration response (RFC 7591 section 3.2.1) for C{metadata}.

        @param address: the client address, counted against the
            registration limit (C{None}: not counted).
        @raise errors.RateLimited: too many registrations from C{address}.
        @raise errors.OAuthError: C{invalid_redirect_uri},
            C{invalid_client_metadata}, or C{temporarily_unavailable} (503)
            when the cap on registered clients is reached.
        """
        if address is not None:
            await spend(self.limiter, address, "register", "registration")
        if not isinstance(metadata, dict):
            raise errors.invalid_client_metadata("the body must be a JSON object")
        uris = metadata.get("redirect_uris")
        if not isinstance(uris, list) or not uris or len(uris) > MAX_REDIRECT_URIS:
            raise errors.invalid_redirect_uri("redirect_uris must be a list of 1 to 20 URIs")
        for uri in uris:
            try:
                check_redirect_uri(uri, self.config.allow_insecure_client_ids)
            except InvalidRedirectURI as e:
                raise errors.invalid_redirect_uri(str(e))
        method = metadata.get("token_endpoint_auth_method", "none")
        if method not in ("none", "client_secret_basic", "client_secret_post"):
            raise errors.invalid_client_metadata(
                "token_endpoint_auth_method must be none, client_secret_basic or client_secret_post"
            )
        grant_types = metadata.get("grant_types", DEFAULT_GRANT_TYPES)
        if (
            not isinstance(grant_types, list)
            or not all(g in GRANT_TYPES for g in grant_types)
            or "authorization_code" not in grant_types
        ):
            raise errors.invalid_client_metadata(
                "grant_types must include authorization_code and may add refresh_token only"
            )
        response_types = metadata.get("response_types", ["code"])
        if response_types != ["code"]:
            raise errors.invalid_client_metadata('response_types must be ["code"]')
        name = metadata.get("client_name")
        if name is not None and (not isinstance(name, str) or len(name) > MAX_CLIENT_NAME):
            raise errors.invalid_client_metadata("client_name must be a string of at most 200 characters")
        if name is not None:
            name = clean_client_name(name)
        scope = metadata.get("scope")
        if scope is not None:
            if not isinstance(scope, str):
                raise errors.invalid_client_metadata("scope must be a string")
            try:
                parse_scopes(self.config, scope)
            except errors.OAuthError as e:
                raise errors.invalid_client_metadata(e.description)
        optional_urls = {}
        for key in ("client_uri", "logo_uri"):
            value = metadata.get(key)
            if value is not None:
                # Plain ASCII, as a metadata document's (cimd.document):
                # a lone surrogate (a JSON escape) cannot be stored, and
                # failed the store's write with a 500.
                plain = isinstance(value, str) and all(" " < c < "\x7f" for c in value)
                url = parse(value) if plain else None
                if url is None or url.scheme != "https":
                    raise errors.invalid_client_metadata(f"{key} must be an https URL of plain ASCII")
                optional_urls[key] = value
        if await self.store.count_clients() >= self.config.max_registered_clients:
            log.warn(
                "refused a registration: the cap of {cap} registered clients is reached",
                cap=self.config.max_registered_clients,
            )
            raise errors.temporarily_unavailable("registration is closed: too many clients")
        now = self._clock.seconds()
        secret = new_secret() if method != "none" else None
        client = Client(
            client_id=new_id(),
            client_name=name,
            redirect_uris=tuple(uris),
            token_endpoint_auth_method=method,
            grant_types=tuple(grant_types),
            scope=scope,
            kind="registered",
            client_secret_hash=None if secret is None else hash_secret(secret),
            created_at=now,
            **optional_urls,
        )
        await self.store.save_client(client)
        log.info(
            "registered client {client_id} ({name}) auth {method}",
            client_id=client.client_id,
            name=loggable(name),
            method=method,
            address=loggable(address) if address else None,
            smeldr_event="client_registered",
        )
        body: dict[str, Any] = {
            "client_id": client.client_id,
            "client_id_issued_at": int(now),
            "redirect_uris": list(uris),
            "token_endpoint_auth_method": method,
            "grant_types": list(grant_types),
            "response_types": ["code"],
        }
        if name is not None:
            body["client_name"] = name
        if scope is not None:
            body["scope"] = scope
        body.update(optional_urls)
        if secret is not None:
            body["client_secret"] = secret
            body["client_secret_expires_at"] = 0
        return body
