# -*- test-case-name: tests.test_oauth_config -*-
"""
The authorization server's configuration: one frozen record, validated once.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Optional

import attr

from smeldr_oauth.oauth.urls import canonical_resource, is_loopback_host, parse

OFFLINE_ACCESS = "offline_access"

DEFAULT_SCOPES: Mapping[str, str] = {
    "read": "Read your site's content",
    "write": "Create, change and delete your site's content",
}


class ConfigError(ValueError):
    """
    A configuration value is unusable; the message says which and why.
    """


def _resources(values: Iterable["ProtectedResource"]) -> tuple["ProtectedResource", ...]:
    return tuple(values)


def _strings(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(values)


@attr.s(frozen=True, kw_only=True)
class ProtectedResource:
    """
    One resource the server issues tokens for: its RFC 8707 resource
    indicator (the token's audience) and what a token for it may carry.

    A server with one resource (the usual case) needs none of these: the
    L{Config} makes one from C{resource} and every scope.  The OAuth
    gateway makes one per upstream, so a token for C{/mcp/a} is refused at
    C{/mcp/b} and each upstream's consent names only its own scopes.

    @ivar url: the resource's canonical URL (the public MCP URL).
    @ivar scopes: the scopes a token for it may carry (C{offline_access}
        aside), in the order shown; also the defaults when a request
        names none.
    @ivar name: shown in its protected-resource metadata
        (C{resource_name}) and on the consent page; default the service
        name.
    @ivar scope_words: what each scope lets a client do I{here}, on the
        consent page (falling back to L{Config.scopes}).
    """

    url: str = attr.ib()
    scopes: tuple[str, ...] = attr.ib(converter=_strings, default=())
    name: Optional[str] = attr.ib(default=None)
    scope_words: Mapping[str, str] = attr.ib(factory=dict, hash=False)

    @url.validator
    def _canonical(self, attribute: Any, value: str) -> None:
        if canonical_resource(value) != value:
            raise ConfigError(f"a protected resource URL must be canonical, got {value!r}")


def _issuer(value: str) -> str:
    url = parse(value)
    if url is None or url.scheme not in ("http", "https"):
        raise ConfigError(f"issuer must be an absolute http(s) URL, got {value!r}")
    if url.scheme == "http" and not is_loopback_host(url.host):
        raise ConfigError("issuer must use https unless its host is loopback")
    if url.query or url.fragment or url.userinfo:
        raise ConfigError("issuer must have no query, fragment or user info (RFC 8414)")
    return value.rstrip("/")


@attr.s(frozen=True, kw_only=True)
class Config:
    """
    @ivar issuer: the public base URL; the metadata's C{issuer} is exactly
        this (trailing slash removed), byte-identical to what the resource
        metadata names, because the Python SDK compares them byte for byte.
    @ivar resource: the protected resource (the public MCP URL); defaults to
        C{<issuer>/mcp}.
    @ivar verify_bearer: checks what the user pastes into the consent form.
        Returns C{True}/C{False}, a subject string, an
        L{smeldr_oauth.oauth.model.Approval}, or a Deferred/coroutine of one.
    @ivar scopes: scope name -> words shown on the consent page.
    @ivar default_scopes: granted when a request names none (ChatGPT
        reconnects without C{scope}); defaults to every scope but
        C{offline_access}.
    @ivar refresh_grace: seconds during which the previous refresh token may
        be replayed (parallel refreshes) without ending the grant.
    @ivar refresh_for_refresh_grant_clients: also issue refresh tokens to
        clients whose metadata lists the C{refresh_token} grant, even when
        C{offline_access} was not asked for.  On by default: the TypeScript
        SDK and the Python SDK 1.x ask for the resource's scopes only
        (never C{offline_access}) yet register for the refresh grant, and
        without this their users would face the consent page every hour.
        Refresh tokens rotate on every use, which is what OAuth 2.1 asks of
        refresh tokens held by public clients.
    @ivar allow_insecure_client_ids: development only: http and loopback
        client_id URLs and redirect URIs.
    @ivar paste_failures_per_minute: refused site-token pastes (consent
        page and connected-apps page together) per client address (IPv6:
        per /64) per minute.  Site tokens are 256-bit, so this bounds load
        rather than guessing; it is generous because whoever shares the
        address can use it up and lock the owner out for a minute (see
        C{docs/security.md}).
    @ivar registrations_per_minute: dynamic registration attempts per
        client address per minute.
    @ivar cimd_fetches_per_minute: authorization requests per client
        address per minute that make the server fetch a client metadata
        document (answers from the document cache are not counted), so
        nobody can make the server fetch URLs of their choosing at speed.
    @ivar token_requests_per_minute_per_address: token requests per client
        address per minute.  Generous: Claude.ai calls the token endpoint
        for all of its users from a few addresses, and refreshes one token
        several times in parallel.
    @ivar token_requests_per_minute_per_client: token requests per client
        id per minute: one metadata-document client (Claude.ai's, ChatGPT's)
        stands for every user of that product, so this too is generous.
    @ivar rate_limit_keys: how many addresses (or client ids) each limit
        remembers; the least recently seen is forgotten first.  Every limit
        is a token bucket: bursts up to the number, refilled at the number
        per minute.
    @ivar resources: every resource tokens are issued for (RFC 8707), when
        there are several (the OAuth gateway's upstreams); default one,
        C{resource}, with every scope.  C{resource} (the one a request
        that names none gets) defaults to the first.
    @ivar introspections_per_minute: token introspection requests per
        resource server per minute (RFC 7662).
    """

    issuer: str = attr.ib(converter=_issuer)
    verify_bearer: Callable[[str], Any] = attr.ib()
    resource: Optional[str] = attr.ib(default=None)
    scopes: Mapping[str, str] = attr.ib(factory=lambda: dict(DEFAULT_SCOPES))
    default_scopes: Optional[tuple[str, ...]] = attr.ib(default=None)
    access_token_ttl: int = attr.ib(default=3600)
    auth_code_ttl: int = attr.ib(default=300)
    refresh_token_ttl: int = attr.ib(default=30 * 24 * 3600)
    refresh_grace: int = attr.ib(default=60)
    refresh_for_refresh_grant_clients: bool = attr.ib(default=True)
    dynamic_registration: bool = attr.ib(default=True)
    max_registered_clients: int = attr.ib(default=10000)
    allow_insecure_client_ids: bool = attr.ib(default=False)
    access_cache_ttl: float = attr.ib(default=30.0)
    access_cache_size: int = attr.ib(default=10000)
    paste_failures_per_minute: int = attr.ib(default=30)
    registrations_per_minute: int = attr.ib(default=20)
    cimd_fetches_per_minute: int = attr.ib(default=30)
    token_requests_per_minute_per_address: int = attr.ib(default=600)
    token_requests_per_minute_per_client: int = attr.ib(default=600)
    rate_limit_keys: int = attr.ib(default=10000)
    service_name: str = attr.ib(default="smeldr")
    resources: tuple[ProtectedResource, ...] = attr.ib(converter=_resources, default=())
    introspections_per_minute: int = attr.ib(default=12000)
    _by_url: Mapping[str, ProtectedResource] = attr.ib(init=False, factory=dict, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        if self.resource is None:
            first = self.resources[0].url if self.resources else self.issuer + "/mcp"
            object.__setattr__(self, "resource", first)
        canon = canonical_resource(self.resource or "")
        if canon is None:
            raise ConfigError(f"resource must be an absolute http(s) URL, got {self.resource!r}")
        object.__setattr__(self, "resource", canon)
        for name in ("access_token_ttl", "auth_code_ttl", "refresh_token_ttl"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")
        for name in (
            "paste_failures_per_minute",
            "registrations_per_minute",
            "cimd_fetches_per_minute",
            "token_requests_per_minute_per_address",
            "token_requests_per_minute_per_client",
            "rate_limit_keys",
            "introspections_per_minute",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")
        if self.refresh_grace < 0:
            raise ConfigError("refresh_grace must not be negative")
        for scope in self.scopes:
            if not scope or any(c in scope for c in ' "\\') or not scope.isprintable():
                raise ConfigError(f"invalid scope name {scope!r}")
        if self.default_scopes is None:
            object.__setattr__(
                self, "default_scopes", tuple(s for s in self.scopes if s != OFFLINE_ACCESS)
            )
        unknown = set(self.default_scopes or ()) - set(self.all_scopes)
        if unknown:
            raise ConfigError(f"default scopes not in scopes: {sorted(unknown)}")
        if not self.resources:
            assert self.resource is not None
            only = ProtectedResource(url=self.resource, scopes=[s for s in self.scopes if s != OFFLINE_ACCESS])
            object.__setattr__(self, "resources", (only,))
        by_url = {r.url: r for r in self.resources}
        if len(by_url) != len(self.resources):
            raise ConfigError("each protected resource needs its own URL")
        if self.resource not in by_url:
            raise ConfigError(f"resource {self.resource} is not one of the protected resources")
        for protected in self.resources:
            unknown = set(protected.scopes) - set(self.scopes)
            if unknown:
                raise ConfigError(f"scopes of {protected.url} not in scopes: {sorted(unknown)}")
        object.__setattr__(self, "_by_url", by_url)

    def protected_resource(self, url: Optional[str]) -> Optional[ProtectedResource]:
        """The protected resource at C{url} (canonical), or C{None}."""
        return self._by_url.get(url) if url is not None else None

    @property
    def all_scopes(self) -> tuple[str, ...]:
        """
        Every scope the server grants: the configured ones plus
        C{offline_access} (which asks for a refresh token).
        """
        names = [s for s in self.scopes if s != OFFLINE_ACCESS]
        return tuple(names) + (OFFLINE_ACCESS,)

    def endpoint(self, path: str) -> str:
        """
        The public URL of C{path} under the issuer (its path included).
        """
        return self.issuer + path

    @property
    def issuer_origin(self) -> str:
        """
        The issuer's scheme, host and port: where the well-known documents
        live when the issuer has a path (RFC 8414 section 3.1).
        """
        url = parse(self.issuer)
        assert url is not None
        return url.replace(path=(), query=(), fragment="").to_text().rstrip("/")
