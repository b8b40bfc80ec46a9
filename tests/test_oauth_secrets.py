"""
Tests for L{smeldr_oauth.oauth.secrets}.
"""

from __future__ import annotations

import base64
import re

from twisted.trial.unittest import SynchronousTestCase

from smeldr_oauth.oauth import secrets

_URLSAFE = re.compile(r"[A-Za-z0-9_-]{43}")


class NewSecretsTests(SynchronousTestCase):
    def test_shape(self) -> None:
        """
        Each of L{secrets.new_secrets}' secrets is what L{secrets.new_secret}
        makes: 256 bits as URL-safe base64 without padding.
        """
        made = secrets.new_secrets(3) + [secrets.new_secret()]
        for secret in made:
            self.assertIsNotNone(_URLSAFE.fullmatch(secret), secret)
            self.assertEqual(len(base64.urlsafe_b64decode(secret + "=")), secrets.TOKEN_BYTES)

    def test_distinct(self) -> None:
        """
        The secrets of one call come from different bytes, and so do those
        of successive calls.
        """
        made = [secret for _ in range(50) for secret in secrets.new_secrets(2)]
        self.assertEqual(len(set(made)), 100)
