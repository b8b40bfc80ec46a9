"""
Tests for L{smeldr_oauth.web.headers}: header values are read as bytes and
never make a decoding error.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from smeldr_oauth.web import errors
from smeldr_oauth.web.headers import header, media_type


def request_with(name: bytes, *values: bytes) -> DummyRequest:
    request = DummyRequest([b""])
    request.requestHeaders.setRawHeaders(name, list(values))
    return request


class HeaderTests(SynchronousTestCase):
    def test_absent(self) -> None:
        self.assertIsNone(header(DummyRequest([b""]), b"authorization"))

    def test_stripped(self) -> None:
        self.assertEqual(header(request_with(b"x-a", b"  v a l  "), b"x-a"), "v a l")

    def test_last_of_repeated(self) -> None:
        self.assertEqual(header(request_with(b"x-a", b"1", b"2"), b"x-a"), "2")

    def test_repeated_refused(self) -> None:
        with self.assertRaises(errors.HTTPError) as caught:
            header(request_with(b"content-type", b"a/b", b"c/d"), b"content-type", unique=True)
        self.assertEqual(caught.exception.status, 400)
        self.assertIn("Content-Type", caught.exception.description)

    def test_high_bytes(self) -> None:
        """
        Bytes 0x80-0xFF are legal in HTTP (obs-text): a 400 where only
        ASCII makes sense, never a decoding error; read as Latin-1 where
        the caller takes anything.
        """
        request = request_with(b"authorization", b"Basic \xff\xfe\x80")
        with self.assertRaises(errors.HTTPError):
            header(request, b"authorization")
        self.assertEqual(header(request, b"authorization", ascii_only=False), "Basic \xff\xfe\x80")

    def test_controls_refused(self) -> None:
        with self.assertRaises(errors.HTTPError):
            header(request_with(b"x-a", b"a\x00b"), b"x-a")

    @given(st.lists(st.binary(max_size=40), min_size=1, max_size=3), st.booleans(), st.booleans())
    def test_any_bytes(self, values: list[bytes], unique: bool, ascii_only: bool) -> None:
        """
        Whatever the bytes, the answer is a string, C{None} or an
        L{errors.HTTPError}.
        """
        try:
            value = header(request_with(b"x-any", *values), b"x-any", unique=unique, ascii_only=ascii_only)
        except errors.HTTPError as e:
            self.assertEqual(e.status, 400)
        else:
            self.assertIsInstance(value, str)


class MediaTypeTests(SynchronousTestCase):
    def test_parameters_and_case(self) -> None:
        request = request_with(b"content-type", b"Application/X-WWW-Form-URLEncoded; charset=UTF-8")
        self.assertEqual(media_type(request), "application/x-www-form-urlencoded")

    def test_absent(self) -> None:
        self.assertEqual(media_type(DummyRequest([b""])), "")

    def test_high_bytes(self) -> None:
        with self.assertRaises(errors.HTTPError):
            media_type(request_with(b"content-type", b"application/json\xff"))

    @given(st.binary(max_size=80))
    def test_any_bytes(self, value: bytes) -> None:
        try:
            self.assertIsInstance(media_type(request_with(b"content-type", value)), str)
        except errors.HTTPError as e:
            self.assertEqual(e.status, 400)


class MediaTypeMemoTests(SynchronousTestCase):
    """
    A C{Content-Type} value is parsed once; the table of parsed values
    stays bounded; a value is checked at every request all the same.
    """

    def setUp(self) -> None:
        from smeldr_oauth.web import headers

        self.headers = headers
        self.parsed: list[str] = []
        parse = headers.parse_options_header
        self.patch(headers, "parse_options_header", lambda value: (self.parsed.append(value), parse(value))[1])
        self.patch(headers, "_MEDIA_TYPES", {})

    def test_parsed_once(self) -> None:
        for _ in range(3):
            request = request_with(b"content-type", b"Application/JSON; charset=utf-8")
            self.assertEqual(media_type(request), "application/json")
        self.assertEqual(self.parsed, ["Application/JSON; charset=utf-8"])

    def test_bounded(self) -> None:
        for i in range(self.headers._MAX_MEDIA_TYPES * 2 + 1):
            self.assertEqual(media_type(request_with(b"content-type", b"text/x-%d" % i)), f"text/x-{i}")
            self.assertLessEqual(len(self.headers._MEDIA_TYPES), self.headers._MAX_MEDIA_TYPES)
        long = b"application/json; p=" + b"x" * self.headers._MAX_MEDIA_TYPE_LENGTH
        self.assertEqual(media_type(request_with(b"content-type", long)), "application/json")
        self.assertNotIn(long.decode(), self.headers._MEDIA_TYPES)

    def test_still_checked(self) -> None:
        self.assertEqual(media_type(request_with(b"content-type", b"application/json")), "application/json")
        with self.assertRaises(errors.HTTPError):
            media_type(request_with(b"content-type", b"application/json", b"application/json"))
        with self.assertRaises(errors.HTTPError):
            media_type(request_with(b"content-type", b"application/json\xff"))
