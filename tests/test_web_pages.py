"""
Tests for L{smeldr_oauth.web.pages}: the page shell escapes what it is
given, carries its nonce, and refuses to wait.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.template import tags
from twisted.web.test.requesthelper import DummyRequest

from smeldr_oauth.web import pages


class PageTests(SynchronousTestCase):
    def test_escaped(self) -> None:
        html = pages.document('<b>"x"</b>', [tags.p("<script>&"), tags.a("a", href='"><script>')], "n1").decode()
        self.assertNotIn("<script>", html)
        self.assertNotIn("<b>", html)
        self.assertIn("&lt;script&gt;&amp;", html)
        self.assertIn('href="&quot;&gt;&lt;script&gt;"', html)
        self.assertTrue(html.startswith("<!doctype html>\n<html lang=\"en\">"))

    def test_nonce_and_style(self) -> None:
        html = pages.document("t", [], "abc").decode()
        self.assertIn('<style nonce="abc">', html)
        self.assertIn(pages.STYLE, html)

    def test_respond(self) -> None:
        request = DummyRequest([b""])
        body = pages.respond(request, 403, pages.error_page("No", "Nope."), form_targets=("https://c.example",))
        self.assertEqual(request.responseCode, 403)
        [csp] = request.responseHeaders.getRawHeaders(b"content-security-policy")
        nonce = csp.split(b"'nonce-")[1].split(b"'")[0]
        self.assertIn(b'nonce="' + nonce + b'"', body)
        self.assertIn(b"form-action 'self' https://c.example", csp)
        for name, value in ((b"x-frame-options", b"DENY"), (b"cache-control", b"no-store")):
            self.assertEqual(request.responseHeaders.getRawHeaders(name), [value])
        # A new nonce for every answer.
        again = DummyRequest([b""])
        pages.respond(again, 200, pages.error_page("No", "Nope."))
        self.assertNotEqual(again.responseHeaders.getRawHeaders(b"content-security-policy"), [csp])

    def test_no_waiting(self) -> None:
        with self.assertRaises(RuntimeError):
            pages.flatten_now(tags.p(Deferred()))

    def test_hidden_fields(self) -> None:
        """
        One hidden input per pair, in order, a repeated name repeated and
        every value escaped.
        """
        html = pages.flatten_now(tags.div(pages.hidden_fields([("resource", "a"), ("resource", '"b<')]))).decode()
        self.assertEqual(
            html,
            '<div><input type="hidden" name="resource" value="a" />'
            '<input type="hidden" name="resource" value="&quot;b&lt;" /></div>',
        )

    def test_site_token_field(self) -> None:
        html = pages.flatten_now(tags.div(pages.site_token_field("e1"))).decode()
        self.assertIn('<label for="site_token">', html)
        self.assertIn('aria-describedby="e1"', html)
        self.assertNotIn("aria-describedby", pages.flatten_now(tags.div(pages.site_token_field())).decode())
