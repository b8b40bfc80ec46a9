"""
Tests for L{smeldr_oauth.oauth.secrets}.
"""

from __future__ import annotations

import base64
import os
import re
from typing import Callable

from twisted.trial.unittest import SynchronousTestCase

from smeldr_oauth.oauth import secrets

_URLSAFE = re.compile(r"[0-9a-f]{12}[A-Za-z0-9_-]{43}")


def _in_forked_child(make: Callable[[], str]) -> str:
    """
    What C{make} returns in a child forked now (each pool is emptied by
    C{os.register_at_fork} in the child, so this is what a forked worker's
    first call hands out).
    """
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        try:
            os.close(read)
            os.write(write, make().encode("ascii"))
        finally:
            os._exit(0)
    os.close(write)
    try:
        return os.read(read, 100).decode("ascii")
    finally:
        os.close(read)
        os.waitpid(pid, 0)


class NewSecretsTests(SynchronousTestCase):
    def test_shape(self) -> None:
        """
        Each of L{secrets.new_secrets}' secrets is what L{secrets.new_secret}
        makes: a time stamp, then 256 bits as URL-safe base64 without
        padding.
        """
        made = secrets.new_secrets(3) + [secrets.new_secret()]
        for secret in made:
            self.assertIsNotNone(_URLSAFE.fullmatch(secret), secret)
            self.assertEqual(len(secret), secrets.STAMPED_CHARS)
            self.assertEqual(len(base64.urlsafe_b64decode(secret[12:] + "=")), secrets.TOKEN_BYTES)

    def test_distinct(self) -> None:
        """
        The secrets of one call come from different bytes, and so do those
        of successive calls.
        """
        made = [secret for _ in range(50) for secret in secrets.new_secrets(2)]
        self.assertEqual(len(set(made)), 100)

    def test_made_in_batches(self) -> None:
        """
        Secrets are made L{secrets.POOL_SIZE} at a time from one read of
        the system's random source, each the URL-safe base64 of its own 32
        bytes of it, each handed out once, in order.
        """
        reads: list[int] = []
        counter = [0]

        def urandom(size: int) -> bytes:
            reads.append(size)
            made = bytes((counter[0] + i) % 256 for i in range(size))
            counter[0] += 7
            return made

        secrets._pool.clear()
        self.addCleanup(secrets._pool.clear)
        self.patch(os, "urandom", urandom)
        made = [secret for _ in range(secrets.POOL_SIZE // 2) for secret in secrets.new_secrets(2)]
        self.assertEqual(reads, [secrets.TOKEN_BYTES * secrets.POOL_SIZE])
        raw = bytes(i % 256 for i in range(secrets.TOKEN_BYTES * secrets.POOL_SIZE))
        self.assertEqual(
            [secret[12:] for secret in made],
            [
                base64.urlsafe_b64encode(raw[start : start + secrets.TOKEN_BYTES]).rstrip(b"=").decode("ascii")
                for start in range(0, len(raw), secrets.TOKEN_BYTES)
            ],
        )
        # The pool empty: one more read, two left over; three asked for
        # then: one more read, and the two first.
        secrets.new_secrets(secrets.POOL_SIZE - 2)
        self.assertEqual(reads, [secrets.TOKEN_BYTES * secrets.POOL_SIZE] * 2)
        left = list(secrets._pool)
        self.assertEqual(len(left), 2)
        self.assertEqual([secret[12:] for secret in secrets.new_secrets(3)[:2]], left)
        self.assertEqual(reads, [secrets.TOKEN_BYTES * secrets.POOL_SIZE] * 3)

    def test_forked_child_starts_empty(self) -> None:
        """
        A forked child does not hand out the secrets its parent's pool
        holds: it starts with none of them.
        """
        secrets.new_secrets(1)
        self.assertTrue(secrets._pool)
        expected = secrets._pool[0]
        child = _in_forked_child(lambda: secrets.new_secrets(1)[0])
        self.assertEqual(len(child), secrets.STAMPED_CHARS)
        self.assertNotEqual(child[12:], expected)
        self.assertEqual(secrets.new_secrets(1)[0][12:], expected)

    def test_new_secret_from_the_pool(self) -> None:
        """
        L{secrets.new_secret} hands out the pool's next secret: no read of
        the system's random source of its own.
        """
        secrets.new_secrets(1)
        expected = secrets._pool[0]
        reads: list[int] = []
        self.patch(os, "urandom", lambda size: reads.append(size) or b"\0" * size)
        self.assertEqual(secrets.new_secret()[12:], expected)
        self.assertEqual(reads, [])

    def test_stamped(self) -> None:
        """
        The secrets are handed out after the milliseconds of the wall
        clock as 12 hex digits, the same for the secrets of one call.
        """
        self.patch(secrets.time, "time", lambda: 1_700_000_000.1234)
        made = secrets.new_secrets(2) + [secrets.new_secret()]
        self.assertEqual({secret[:12] for secret in made}, {"%012x" % 1_700_000_000_123})
        self.assertEqual(len({secret[12:] for secret in made}), 3)


class HashSecretTests(SynchronousTestCase):
    def test_stamped_first(self) -> None:
        """
        A stamped secret is stored as its stamp and then its SHA-256, so
        that secrets made in turn are stored in turn, whatever their
        random part.
        """
        import hashlib

        now = [0]
        # The middle of each millisecond: a float's rounding never moves it.
        self.patch(secrets.time, "time", lambda: (1_700_000_000_000 + now[0] + 0.5) / 1000)
        made = []
        for _ in range(20):
            made.append(secrets.new_secret())
            now[0] += 1
        hashed = [secrets.hash_secret(secret) for secret in made]
        for secret, stored in zip(made, hashed):
            self.assertEqual(stored, secret[:12] + hashlib.sha256(secret.encode("ascii")).hexdigest())
        self.assertEqual(sorted(hashed), hashed)

    def test_others_hash_alone(self) -> None:
        """
        A secret of the releases before (43 characters), and anything not
        stamped as L{secrets.new_secrets} stamps, is stored as its SHA-256
        alone, as before.
        """
        import hashlib

        stamped = secrets.new_secret()
        for value in (
            stamped[12:],
            "G" + stamped[1:],
            stamped[:11].upper() + "A" + stamped[12:],
            "+" + stamped[1:],
            stamped + "x",
            "",
            "smeldr_" + stamped,
        ):
            self.assertEqual(secrets.hash_secret(value), hashlib.sha256(value.encode("utf-8")).hexdigest(), value)


class NewIdTests(SynchronousTestCase):
    def test_shape_and_distinct(self) -> None:
        """128 bits as 32 lower-case hex digits, never the same twice."""
        made = [secrets.new_id() for _ in range(3 * secrets.POOL_SIZE)]
        for made_id in made:
            self.assertIsNotNone(re.fullmatch(r"[0-9a-f]{32}", made_id), made_id)
        self.assertEqual(len(set(made)), len(made))

    def test_made_in_batches(self) -> None:
        """
        Identifiers are made L{secrets.POOL_SIZE} at a time from one read,
        each the hex of its own 16 bytes of it, each handed out once, in
        order.
        """
        reads: list[int] = []

        def urandom(size: int) -> bytes:
            reads.append(size)
            return bytes((len(reads) + i) % 256 for i in range(size))

        secrets._ids.clear()
        self.addCleanup(secrets._ids.clear)
        self.patch(os, "urandom", urandom)
        made = [secrets.new_id() for _ in range(secrets.POOL_SIZE)]
        self.assertEqual(reads, [secrets.ID_BYTES * secrets.POOL_SIZE])
        raw = bytes((1 + i) % 256 for i in range(secrets.ID_BYTES * secrets.POOL_SIZE))
        self.assertEqual(
            made, [raw[start : start + secrets.ID_BYTES].hex() for start in range(0, len(raw), secrets.ID_BYTES)]
        )
        secrets.new_id()
        self.assertEqual(reads, [secrets.ID_BYTES * secrets.POOL_SIZE] * 2)

    def test_forked_child_starts_empty(self) -> None:
        """A forked child does not hand out the identifiers its parent holds."""
        secrets.new_id()
        self.assertTrue(secrets._ids)
        expected = secrets._ids[0]
        child = _in_forked_child(secrets.new_id)
        self.assertEqual(len(child), 32)
        self.assertNotEqual(child, expected)
        self.assertEqual(secrets.new_id(), expected)


class NewOrderedIdTests(SynchronousTestCase):
    def test_shape(self) -> None:
        """32 lower-case hex digits, as L{secrets.new_id}: the milliseconds, then 80 random bits."""
        made = secrets.new_ordered_id(1_800_000_000.123)
        self.assertIsNotNone(re.fullmatch(r"[0-9a-f]{32}", made), made)
        self.assertEqual(made[:12], "%012x" % 1_800_000_000_123)

    def test_sorted_by_time(self) -> None:
        """
        Ids made later sort later (the point: each new grant's id goes to
        the end of the indexes keyed by it); ids of the same millisecond
        differ.
        """
        times = [1_800_000_000.0 + step / 1000 for step in range(0, 5000, 7)]
        made = [secrets.new_ordered_id(now) for now in times]
        self.assertEqual(sorted(made), made)
        same = [secrets.new_ordered_id(1_800_000_000.0) for _ in range(3 * secrets.POOL_SIZE)]
        self.assertEqual(len(set(same)), len(same))
        self.assertEqual(len({made_id[12:] for made_id in same}), len(same))
