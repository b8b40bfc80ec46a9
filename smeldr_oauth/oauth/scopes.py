# -*- test-case-name: tests.test_oauth_server -*-
"""
What a request may be granted: its scopes (within the configuration and,
for a registered client, within what it registered) and its audience, the
resource indicator of RFC 8707.  Pure functions over the configuration.
"""

from __future__ import annotations

from typing import Iterable, Optional

from smeldr_oauth.oauth import errors
from smeldr_oauth.oauth.config import OFFLINE_ACCESS, Config
from smeldr_oauth.oauth.model import Client
from smeldr_oauth.oauth.urls import canonical_resource


def parse_scopes(
    config: Config, scope: Optional[str], client: Optional[Client] = None, resource: Optional[str] = None
) -> tuple[str, ...]:
    """
    The scopes asked for, in server order, or the defaults when none are
    named.  Unknown scopes are an C{invalid_scope} error rather than
    silently dropped, so a client learns what it will not get.

    With C{resource} (a canonical URL L{check_resource} accepted), only
    that resource's scopes (and C{offline_access}) may be asked for, and
    the defaults are cut down to them: a token for one upstream of the
    gateway never carries another's scopes.

    A I{registered} C{client} that registered a C{scope} (RFC 7591
    section 2) gets nothing beyond it: asking for more is
    C{invalid_scope}, and the defaults are cut down to it.  A CIMD
    document's C{scope} is not enforced: one document serves a client
    with every server it talks to, so its scope names are not ours.
    """
    allowed = set(config.all_scopes)
    protected = config.protected_resource(resource) if resource is not None else None
    if protected is not None and len(config.resources) > 1:
        allowed &= set(protected.scopes) | {OFFLINE_ACCESS}
    limited = client is not None and client.kind == "registered" and client.scope is not None
    if limited:
        assert client is not None and client.scope is not None
        allowed &= set(client.scope.split())
    if scope is None or not scope.strip():
        defaults = tuple(s for s in config.default_scopes or () if s in allowed)
        if limited and not defaults:
            raise errors.invalid_scope("name a scope: none of the defaults was registered by this client")
        return defaults
    asked = scope.split()
    unknown = [s for s in asked if s not in config.all_scopes]
    if unknown:
        raise errors.invalid_scope("unknown scope: " + " ".join(sorted(set(unknown)))[:200])
    beyond = [s for s in asked if s not in allowed]
    if beyond:
        reason = "scope not registered by this client: " if limited else "scope not offered for this resource: "
        raise errors.invalid_scope(reason + " ".join(sorted(set(beyond)))[:200])
    return tuple(s for s in config.all_scopes if s in asked)


def check_resource(config: Config, values: Iterable[str]) -> str:
    """
    RFC 8707: the resource, canonicalised, must be one of ours; absent
    means the default one (L{Config.resource}).  Only one resource may be
    named.
    """
    resource = config.resource or ""
    values = [v for v in values if v != ""]
    if not values:
        return resource
    if len(values) > 1:
        raise errors.invalid_target("only one resource may be requested")
    canon = canonical_resource(values[0])
    if canon is None:
        raise errors.invalid_target("resource must be an absolute URL")
    if config.protected_resource(canon) is None:
        if len(config.resources) == 1:
            raise errors.invalid_target("this server issues tokens only for " + resource)
        raise errors.invalid_target("this server issues no tokens for that resource")
    return canon
