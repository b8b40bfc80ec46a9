# -*- test-case-name: tests.test_oauth_cimd -*-
"""
Validating a fetched metadata document and turning it into a L{Client}.

The rule: a metadata-document client is always a public client
(C{token_endpoint_auth_method} C{none}, with PKCE).  A document is refused
when it:

  - is not a JSON object of UTF-8 text, repeats a member, or uses NaN or
    Infinity;
  - names another URL as its C{client_id};
  - lists no usable redirect URI (the one rule of
    L{smeldr_oauth.oauth.urls.check_redirect_uri}), or more than
    L{MAX_REDIRECT_URIS};
  - carries any of L{REFUSED_MEMBERS} (C{client_secret},
    C{client_secret_expires_at}): shared-secret members, which the draft
    says a document MUST NOT contain, since it is public;
  - declares a C{token_endpoint_auth_method} that needs a shared secret, or
    a C{token_endpoint_auth_methods_supported} made only of such methods
    (other methods, like the C{private_key_jwt} ChatGPT declares beside
    C{none}, are tolerated: the client is still public);
  - has C{grant_types} without C{authorization_code}, or C{response_types}
    without C{code}, or members of the wrong type.
"""

from __future__ import annotations

import json
from typing import Any

from hyperlink import URL, URLParseError

from smeldr_oauth.oauth.cimd.errors import CIMDError
from smeldr_oauth.oauth.model import Client
from smeldr_oauth.oauth.text import clean_client_name
from smeldr_oauth.oauth.urls import MAX_URL_LENGTH, InvalidRedirectURI, check_redirect_uri

MAX_REDIRECT_URIS = 32
MAX_SCOPE = 1000

#: Members a public document must not have: they only make sense for a
#: secret shared with the authorization server.
REFUSED_MEMBERS = ("client_secret", "client_secret_expires_at")

#: Methods built on a secret shared with the authorization server, which a
#: client identified only by a public URL cannot have.
SHARED_SECRET_METHODS = frozenset({"client_secret_post", "client_secret_basic", "client_secret_jwt"})
SUPPORTED_GRANT_TYPES = ("authorization_code", "refresh_token")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Two "client_id" members would let two parsers disagree about the
    # document: refuse rather than pick one.
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError("duplicate key")
        result[key] = value
    return result


def _no_constants(name: str) -> None:
    raise ValueError("NaN and Infinity are not JSON")


def parse_document(client_id: str, body: bytes, *, created_at: float = 0.0, allow_insecure: bool = False) -> Client:
    """
    Validate a fetched metadata document and turn it into a L{Client}.

    @param client_id: the URL the document was fetched from.
    @param body: the response body, already size-capped.
    @param created_at: the fetch time, for L{Client.created_at}.
    @param allow_insecure: development: http redirect URIs anywhere.
    @raise CIMDError: if the document is not acceptable.
    """
    try:
        doc = json.loads(body.decode("utf-8"), object_pairs_hook=_unique_keys, parse_constant=_no_constants)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise CIMDError("client metadata document is not valid JSON") from None
    if not isinstance(doc, dict):
        raise CIMDError("client metadata document must be a JSON object")
    if doc.get("client_id") != client_id:
        raise CIMDError("client metadata document's client_id does not match its URL")
    redirect_uris = _redirect_uris(doc.get("redirect_uris"), allow_insecure)
    _check_auth_methods(doc)
    grant_types = _grant_types(doc.get("grant_types"))
    _check_response_types(doc.get("response_types"))
    return Client(
        client_id=client_id,
        client_name=_client_name(doc.get("client_name")),
        redirect_uris=redirect_uris,
        token_endpoint_auth_method="none",
        grant_types=grant_types,
        scope=_scope(doc.get("scope")),
        kind="cimd",
        created_at=created_at,
        client_uri=_display_url(doc, "client_uri"),
        logo_uri=_display_url(doc, "logo_uri"),
    )


def _is_list_of_str(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _redirect_uris(value: object, allow_insecure: bool) -> tuple[str, ...]:
    if not _is_list_of_str(value) or not value:
        raise CIMDError("redirect_uris must be a non-empty list of strings")
    assert isinstance(value, list)
    if len(value) > MAX_REDIRECT_URIS:
        raise CIMDError("client metadata document lists too many redirect_uris")
    for uri in value:
        try:
            check_redirect_uri(uri, allow_insecure)
        except InvalidRedirectURI as e:
            raise CIMDError(str(e))
    return tuple(dict.fromkeys(value))


def _check_auth_methods(doc: dict[str, Any]) -> None:
    for member in REFUSED_MEMBERS:
        if member in doc:
            raise CIMDError(f"client metadata document must not contain {member}")
    method = doc.get("token_endpoint_auth_method")
    if method is not None:
        if not isinstance(method, str):
            raise CIMDError("token_endpoint_auth_method must be a string")
        if method in SHARED_SECRET_METHODS:
            raise CIMDError(
                f"token_endpoint_auth_method {method} needs a shared secret, "
                "which metadata document clients cannot have"
            )
    supported = doc.get("token_endpoint_auth_methods_supported")
    if supported is not None:
        if not _is_list_of_str(supported):
            raise CIMDError("token_endpoint_auth_methods_supported must be a list of strings")
        assert isinstance(supported, list)
        if supported and all(m in SHARED_SECRET_METHODS for m in supported):
            raise CIMDError("token_endpoint_auth_methods_supported lists only shared-secret methods")


def _grant_types(value: object) -> tuple[str, ...]:
    if value is None:
        return ("authorization_code",)
    if not _is_list_of_str(value):
        raise CIMDError("grant_types must be a list of strings")
    assert isinstance(value, list)
    if "authorization_code" not in value:
        raise CIMDError("grant_types must include authorization_code")
    return tuple(g for g in dict.fromkeys(value) if g in SUPPORTED_GRANT_TYPES)


def _check_response_types(value: object) -> None:
    if value is None:
        return
    if not _is_list_of_str(value) or "code" not in value:  # type: ignore[operator]
        raise CIMDError("response_types must be a list of strings including code")


def _client_name(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise CIMDError("client_name must be a string")
    return clean_client_name(value)


def _scope(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > MAX_SCOPE:
        raise CIMDError("scope must be a space-separated string")
    return " ".join(value.split()) or None


def _display_url(doc: dict[str, Any], key: str) -> str | None:
    """
    C{client_uri} and C{logo_uri} are cosmetic: a wrong type is an error,
    but a string that is not a plain https URL is dropped rather than
    failing the sign-in, so the consent page only ever sees https links.
    """
    value = doc.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise CIMDError(f"{key} must be a string")
    if len(value) > MAX_URL_LENGTH or not all(" " < c < "\x7f" for c in value):
        return None
    try:
        url = URL.from_text(value)
        url.port  # noqa: B018
    except (URLParseError, ValueError):
        return None
    if url.scheme != "https" or not url.host or url.userinfo:
        return None
    if not value.startswith("https://"):
        return None
    return value
