# -*- test-case-name: tests.test_oauth_secrets -*-
"""
Making, hashing and comparing secrets.

Every code and token is 256 bits from L{secrets}, sent as URL-safe base64
after a time stamp (L{new_secrets}), stored as the stamp and its SHA-256
(L{hash_secret}).  A high-entropy token needs no slow hash: SHA-256 is
enough that a leaked database yields nothing usable, and it keeps look-up an
index probe.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import os
import time
from collections import deque

TOKEN_BYTES = 32

#: Secrets made per read of the system's random source (L{new_secrets}).
POOL_SIZE = 64

# Secrets made ahead, each handed out once: deque.popleft is atomic, so
# two threads never get the same one.  A forked child starts with none
# (below): it must not hand out what its parent already has or will.
_pool: deque[str] = deque()
os.register_at_fork(after_in_child=_pool.clear)

#: Identifiers (L{new_id}), made and handed out the same way.
_ids: deque[str] = deque()
os.register_at_fork(after_in_child=_ids.clear)

#: Bytes of one identifier (128 bits, 32 hex digits).
ID_BYTES = 16

#: Standard base64 to its URL-safe alphabet, the padding and newline gone.
_URLSAFE = bytes.maketrans(b"+/", b"-_")

#: Characters of a secret's time stamp (L{new_secrets}): 48 bits of
#: milliseconds as lowercase hex.
STAMP_CHARS = 12

#: Characters of a stamped secret: the stamp, then 256 bits as unpadded
#: URL-safe base64.
STAMPED_CHARS = STAMP_CHARS + 43

_HEX_DIGITS = frozenset("0123456789abcdef")


def new_secret() -> str:
    """
    A fresh 256-bit secret, stamped (L{new_secrets}; 55 characters), from
    the pool L{new_secrets} hands out: a consent's code was one
    C{getrandom} system call of its own (with the grant's id, 0.55% of a
    full flow's CPU; C{docs/performance.md}, round ten).
    """
    return new_secrets(1)[0]


def new_secrets(count: int) -> list[str]:
    """
    C{count} fresh secrets as L{new_secret} makes them (a token response
    holds two).

    They are made L{POOL_SIZE} at a time, from one read of the system's
    random source, and each is handed out once: in the server that read,
    a C{getrandom} system call, took 3% of a refresh's CPU when made per
    response (C{docs/performance.md}, round nine), against a fraction of
    a microsecond per secret in a batch.  Each secret is still 256 bits
    from C{os.urandom}, never derived from another; what waits in the
    pool is no more exposed than the tokens the process holds anyway,
    and a forked child empties its copy (C{os.register_at_fork}).

    Each is handed out after a stamp of the time, the milliseconds of
    the wall clock as 12 hex digits, which L{hash_secret} puts first in
    the stored hash: codes and tokens made one after another are stored
    one after another, at the end of their tables' primary-key indexes
    (the pages a group commit's inserts share, and which a WAL checkpoint
    copies once), where the bare hash put each insert into a random leaf
    of an index that grows with every rotation (the store loop at 120,000
    refreshes: 4.4 -> 2.1 WAL frames a refresh, the checkpoint's CPU a
    third; C{docs/performance.md}, "Round twelve: refresh").  As with the
    grants' ids (L{new_ordered_id}), the stamp tells the holder when the
    secret was made, which it knows; it is not secret and adds nothing to
    the 256 random bits after it, which the stored hash covers too.
    """
    pool = _pool
    made: list[str] = []
    while len(made) < count:
        try:
            made.append(pool.popleft())
        except IndexError:
            _refill(pool)
    stamp = "%012x" % (int(time.time() * 1000) & 0xFFFFFFFFFFFF)
    return [stamp + secret for secret in made]


def _refill(pool: deque[str]) -> None:
    raw = os.urandom(TOKEN_BYTES * POOL_SIZE)
    encode, urlsafe = binascii.b2a_base64, _URLSAFE
    pool.extend(
        encode(raw[start : start + TOKEN_BYTES], newline=False).translate(urlsafe, b"=").decode("ascii")
        for start in range(0, TOKEN_BYTES * POOL_SIZE, TOKEN_BYTES)
    )


def new_id() -> str:
    """
    An opaque identifier for rows that are not secrets (grants, clients):
    128 bits from C{os.urandom} as 32 hex digits.  Made L{POOL_SIZE} at a
    time from one read, each handed out once, as L{new_secrets} makes
    secrets (a forked child empties its copy).
    """
    try:
        return _ids.popleft()
    except IndexError:
        raw = os.urandom(ID_BYTES * POOL_SIZE).hex()
        step = 2 * ID_BYTES
        _ids.extend(raw[start : start + step] for start in range(0, len(raw), step))
        return new_id()


def new_ordered_id(now: float) -> str:
    """
    An identifier like L{new_id} (32 hex digits) whose first 12 are the
    milliseconds of C{now} (48 bits, as a UUIDv7 starts) and the other 20
    random (80 bits from L{new_id}'s pool): ids made one after another sort
    one after another.  For grants, whose id is the key of four indexes
    (the grants' own, and their codes', refresh tokens' and timeline
    steps' by grant): with random ids each new grant wrote into a random
    leaf page of each, and the code exchange's commit wrote those pages to
    the WAL and the checkpoint copied them again; ids in time order go to
    the end of each index, the pages a batch of consents shares (a flow's
    statements in a bare loop at 20,000 grants: 17.4 -> 13.4 WAL pages,
    124-126 -> 98-109 us of CPU; C{docs/performance.md}, round ten).

    A grant's id is not a secret (a grant is reached with the tokens and
    the site token, never its id alone), and what the prefix tells is the
    grant's creation time, which the grant's owner sees anyway; the 80
    random bits keep ids made in the same millisecond apart.
    """
    return "%012x" % (int(now * 1000) & 0xFFFFFFFFFFFF) + new_id()[:20]


def hash_secret(value: str) -> str:
    """
    The form a secret is stored in: the hex SHA-256 of C{value}, after its
    time stamp when it is one L{new_secrets} made (55 characters, the
    first 12 hex digits), so that secrets made in turn are stored in turn
    (76 hex digits; a secret of the releases before, 43 characters, and
    any other value, has the 64 of its hash alone, as before).
    """
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()
    if len(value) == STAMPED_CHARS and _HEX_DIGITS.issuperset(value[:STAMP_CHARS]):
        return value[:STAMP_CHARS] + digest
    return digest


def constant_time_equal(a: str, b: str) -> bool:
    """
    Compare two strings without leaking, through timing, where they differ.
    """
    return hmac.compare_digest(a.encode("utf-8", "surrogatepass"), b.encode("utf-8", "surrogatepass"))
