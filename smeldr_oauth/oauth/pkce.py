# -*- test-case-name: tests.test_oauth_pkce -*-
"""
PKCE (RFC 7636), S256 only: OAuth 2.1 forbids C{plain} for new servers.
"""

from __future__ import annotations

import base64
import hashlib
import re

from smeldr_oauth.oauth.secrets import constant_time_equal

_VERIFIER = re.compile(r"^[A-Za-z0-9\-._~]{43,128}$")
_CHALLENGE = re.compile(r"^[A-Za-z0-9\-_]{43}$")


def valid_verifier(verifier: str) -> bool:
    return bool(_VERIFIER.match(verifier))


def valid_challenge(challenge: str) -> bool:
    """
    An S256 challenge is the unpadded base64url of 32 bytes: 43 characters.
    """
    return bool(_CHALLENGE.match(challenge))


def s256(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def verify(verifier: str, challenge: str) -> bool:
    if not valid_verifier(verifier):
        return False
    return constant_time_equal(s256(verifier), challenge)
