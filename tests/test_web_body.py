"""
Tests for L{smeldr_oauth.web.body}: one body reader with a size cap and a
media-type check, and the formats on it.
"""

from __future__ import annotations

from io import BytesIO
from typing import Any, Optional
from urllib.parse import parse_qs

from hypothesis import example, given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from smeldr_oauth.web import errors
from smeldr_oauth.web.body import FORM, JSON, MAX_FIELDS, read_body, read_form, read_json, read_query


def posted(body: bytes, content_type: Optional[bytes] = None, uri: bytes = b"/") -> Any:
    request = DummyRequest([b""])
    request.content = BytesIO(body)
    request.uri = uri
    if content_type is not None:
        request.requestHeaders.setRawHeaders(b"content-type", [content_type])
    return request


class ReadBodyTests(SynchronousTestCase):
    def status_of(self, request: Any, media_type: Any = FORM, limit: int = 10) -> int:
        with self.assertRaises(errors.HTTPError) as caught:
            read_body(request, media_type, limit)
        return caught.exception.status

    def test_reads(self) -> None:
        self.assertEqual(read_body(posted(b"a=1", FORM.encode()), FORM, 10), b"a=1")
        self.assertEqual(read_body(posted(b"xyz"), None, 10), b"xyz")
        self.assertEqual(read_body(posted(b"{}", b"application/json; charset=utf-8"), (FORM, JSON), 10), b"{}")

    def test_limit(self) -> None:
        self.assertEqual(read_body(posted(b"a" * 10, FORM.encode()), FORM, 10), b"a" * 10)
        self.assertEqual(self.status_of(posted(b"a" * 11, FORM.encode())), 413)

    def test_capped_by_the_site(self) -> None:
        request = posted(b"", FORM.encode())
        request.body_too_large = True
        self.assertEqual(self.status_of(request), 413)

    def test_media_type(self) -> None:
        self.assertEqual(self.status_of(posted(b"a=1", b"text/plain")), 415)
        self.assertEqual(self.status_of(posted(b"a=1")), 415)
        self.assertEqual(self.status_of(posted(b"a=1", b"application/x-www-form-urlencoded\xff")), 400)


class FormatTests(SynchronousTestCase):
    def test_form(self) -> None:
        self.assertEqual(read_form(posted(b"a=1&a=2&b=", FORM.encode())), {"a": ["1", "2"], "b": [""]})

    def test_form_not_utf8(self) -> None:
        with self.assertRaises(errors.HTTPError) as caught:
            read_form(posted(b"a=%ff", FORM.encode()))
        self.assertEqual(caught.exception.status, 400)

    def test_form_too_many_fields(self) -> None:
        with self.assertRaises(errors.HTTPError):
            read_form(posted(b"&".join(b"a=1" for _ in range(101)), FORM.encode()))

    @given(
        st.one_of(
            st.binary(max_size=200),
            st.lists(st.sampled_from([b"a", b"b", b"=", b"&", b"+", b"%", b"%2", b"%C3", b"%A9", b"%ff", b"\xc3\xa9", b"%26", b"%3D"]), max_size=30).map(b"".join),
            st.integers(MAX_FIELDS - 2, MAX_FIELDS + 1).map(lambda n: b"&".join(b"a=1" for _ in range(n))),
        )
    )
    @example(b"a+b=c+d&e=%20&&f&g=h=i&%C3%A9=%2B")
    def test_form_as_parse_qs(self, body: bytes) -> None:
        """
        The form parser answers what C{parse_qs} (blank values kept, at
        most C{MAX_FIELDS} fields, strict UTF-8) answers, and refuses what
        it refuses.
        """
        try:
            expected: Any = parse_qs(
                body.decode("utf-8"), keep_blank_values=True, max_num_fields=MAX_FIELDS, errors="strict"
            )
        except (UnicodeDecodeError, ValueError):
            expected = 400
        try:
            got: Any = read_form(posted(body, FORM.encode()))
        except errors.HTTPError as e:
            got = e.status
        self.assertEqual(got, expected)

    def test_decoded_once(self) -> None:
        """
        An encoded text seen again is not decoded again (a client's
        redirect URI and resource in every consent and code exchange); one
        that does not decode is refused each time and never kept; the kept
        texts are bounded.
        """
        from smeldr_oauth.web import body

        calls: list[str] = []
        real = body.unquote

        def counted(text: str, *args: Any, **kw: Any) -> str:
            calls.append(text)
            return real(text, *args, **kw)

        self.patch(body, "unquote", counted)
        self.patch(body, "_DECODED", {})
        form = b"redirect_uri=https%3A%2F%2Fapp.example%2Fcb&scope=read+write&state=x"
        for _ in range(3):
            self.assertEqual(
                read_form(posted(form, FORM.encode())),
                {"redirect_uri": ["https://app.example/cb"], "scope": ["read write"], "state": ["x"]},
            )
        self.assertEqual(calls, ["https://app.example/cb".replace("/", "%2F").replace(":", "%3A"), "read write"])
        for _ in range(2):
            with self.assertRaises(errors.HTTPError):
                read_form(posted(b"a=%ff", FORM.encode()))
        self.assertEqual(len(calls), 4)
        self.assertNotIn("%ff", body._DECODED)
        for n in range(body._MAX_DECODED + 10):
            read_form(posted(b"a=%25" + str(n).encode(), FORM.encode()))
        self.assertLessEqual(len(body._DECODED), body._MAX_DECODED)
        read_form(posted(b"a=" + b"%41" * body._MAX_DECODED_LENGTH, FORM.encode()))
        self.assertNotIn("%41" * body._MAX_DECODED_LENGTH, body._DECODED)

    def test_query(self) -> None:
        self.assertEqual(read_query(posted(b"", uri=b"/x?a=%C3%A9&b")), {"a": ["\u00e9"], "b": [""]})
        self.assertEqual(read_query(posted(b"", uri=b"/x")), {})
        with self.assertRaises(errors.HTTPError):
            read_query(posted(b"", uri=b"/x?a=%ff"))

    def test_json(self) -> None:
        self.assertEqual(read_json(posted(b'{"a": [1]}', b"application/json")), {"a": [1]})
        for bad in (b"{", b"\xff", b"[" * 100000):
            with self.assertRaises(errors.HTTPError):
                read_json(posted(bad, b"application/json"), limit=200000)

    @given(st.binary(max_size=200), st.sampled_from([FORM.encode(), b"application/json", b"text/plain", b"\xff"]))
    def test_any_bytes(self, body: bytes, content_type: bytes) -> None:
        for reader in (read_form, read_json):
            try:
                reader(posted(body, content_type))
            except errors.HTTPError as e:
                self.assertIn(e.status, (400, 413, 415))
