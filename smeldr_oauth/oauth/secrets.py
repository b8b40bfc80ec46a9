# -*- test-case-name: tests.test_oauth_secrets -*-
"""
Making, hashing and comparing secrets.

Every code and token is 256 bits from L{secrets}, sent as URL-safe base64,
stored as hex SHA-256.  A high-entropy token needs no slow hash: SHA-256 is
enough that a leaked database yields nothing usable, and it keeps look-up an
index probe.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets

TOKEN_BYTES = 32


def new_secret() -> str:
    """
    A fresh 256-bit secret, URL-safe base64 without padding (43 characters).
    """
    return secrets.token_urlsafe(TOKEN_BYTES)


def new_secrets(count: int) -> list[str]:
    """
    C{count} fresh secrets as L{new_secret} makes them, from one read of
    the system's random source (a token response holds two: the
    per-call cost of L{secrets.token_urlsafe}, a system call each, was a
    third of making them).
    """
    raw = os.urandom(TOKEN_BYTES * count)
    encode = base64.urlsafe_b64encode
    return [
        encode(raw[start : start + TOKEN_BYTES]).rstrip(b"=").decode("ascii")
        for start in range(0, TOKEN_BYTES * count, TOKEN_BYTES)
    ]


def new_id() -> str:
    """
    An opaque identifier for rows that are not secrets (grants, clients).
    """
    return secrets.token_hex(16)


def hash_secret(value: str) -> str:
    """
    The hex SHA-256 of C{value}: the only form a secret is stored in.
    """
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()


def constant_time_equal(a: str, b: str) -> bool:
    """
    Compare two strings without leaking, through timing, where they differ.
    """
    return hmac.compare_digest(a.encode("utf-8", "surrogatepass"), b.encode("utf-8", "surrogatepass"))
