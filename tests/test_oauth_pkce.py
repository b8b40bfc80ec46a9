"""
Tests for L{smeldr_oauth.oauth.pkce}.
"""

from twisted.trial.unittest import SynchronousTestCase

from smeldr_oauth.oauth import pkce


class S256Tests(SynchronousTestCase):
    def test_rfc7636_appendix_b(self) -> None:
        """
        The worked example of RFC 7636 Appendix B.
        """
        verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
        challenge = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        self.assertEqual(pkce.s256(verifier), challenge)
        self.assertTrue(pkce.verify(verifier, challenge))

    def test_wrong_verifier(self) -> None:
        challenge = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        self.assertFalse(pkce.verify("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXx", challenge))

    def test_verifier_shape(self) -> None:
        self.assertFalse(pkce.valid_verifier("short"))
        self.assertFalse(pkce.valid_verifier("a" * 129))
        self.assertFalse(pkce.valid_verifier("a" * 42 + "!"))
        self.assertTrue(pkce.valid_verifier("a" * 43))
        self.assertFalse(pkce.verify("a" * 42 + "!", pkce.s256("a" * 42 + "!")))

    def test_challenge_shape(self) -> None:
        self.assertTrue(pkce.valid_challenge("E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"))
        self.assertFalse(pkce.valid_challenge("E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-c"))
        self.assertFalse(pkce.valid_challenge("E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-c="))
