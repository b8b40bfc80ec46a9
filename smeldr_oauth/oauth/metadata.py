# -*- test-case-name: tests.test_oauth_server -*-
"""
The two metadata documents: the authorization server's (RFC 8414) and the
protected resource's (RFC 9728).  Both depend only on the configuration,
so the HTTP layer serialises them once.
"""

from __future__ import annotations

from typing import Any, Optional

from smeldr_oauth.oauth.config import OFFLINE_ACCESS, Config, ProtectedResource

AUTH_METHODS = ["none", "client_secret_basic", "client_secret_post"]


def authorization_server_metadata(config: Config, cimd: bool) -> dict[str, Any]:
    """
    RFC 8414 metadata.  C{issuer} is byte-identical to the resource
    metadata's C{authorization_servers[0]}.

    @param cimd: whether Client ID Metadata Documents are accepted.
    """
    c = config
    body: dict[str, Any] = {
        "issuer": c.issuer,
        "authorization_endpoint": c.endpoint("/oauth/authorize"),
        "token_endpoint": c.endpoint("/oauth/token"),
        "revocation_endpoint": c.endpoint("/oauth/revoke"),
        "response_types_supported": ["code"],
        "response_modes_supported": ["query"],
        "grant_types_supported": ["authorization_code", "refresh_token"],
        "code_challenge_methods_supported": ["S256"],
        "token_endpoint_auth_methods_supported": AUTH_METHODS,
        "revocation_endpoint_auth_methods_supported": AUTH_METHODS,
        # RFC 7662: for resource servers only (their own credentials).
        "introspection_endpoint": c.endpoint("/oauth/introspect"),
        "introspection_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
        "scopes_supported": list(c.all_scopes),
        "client_id_metadata_document_supported": cimd,
        "authorization_response_iss_parameter_supported": True,
        "service_documentation": c.endpoint("/"),
    }
    if c.dynamic_registration:
        body["registration_endpoint"] = c.endpoint("/oauth/register")
    return body


def protected_resource_metadata(config: Config, resource: Optional[ProtectedResource] = None) -> dict[str, Any]:
    """
    RFC 9728 metadata for one protected resource (default: the default
    one).  C{offline_access} is an authorization-server concern, so it is
    not listed here.
    """
    c = config
    protected = resource or c.protected_resource(c.resource)
    assert protected is not None
    return {
        "resource": protected.url,
        "authorization_servers": [c.issuer],
        "scopes_supported": [s for s in protected.scopes if s != OFFLINE_ACCESS],
        "bearer_methods_supported": ["header"],
        "resource_name": protected.name or c.service_name,
    }
