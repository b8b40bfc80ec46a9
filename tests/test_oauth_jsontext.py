"""
Tests for L{smeldr_oauth.oauth.jsontext}: the standard encoder's text, without
its set-up per call, and its answers for values that contain themselves.
"""

from __future__ import annotations

import json
from typing import Any, Optional
from unittest import mock

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from smeldr_oauth.oauth.jsontext import COMPACT, encoder


class Opaque:
    """Something JSON has no type for (a tool may return a datetime)."""

    def __str__(self) -> str:
        return "opaque ✓"


# JSON values, with the other things the standard encoder accepts: tuples,
# non-string keys, floats that JSON has no words for, lone surrogates.
_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text()
    | st.just("\ud800")
)
_keys = st.text() | st.integers() | st.booleans() | st.none() | st.floats(allow_nan=False)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.tuples(inner, inner) | st.dictionaries(_keys, inner, max_size=4)
    ),
    max_leaves=20,
)


def standard(
    value: Any,
    separators: tuple[str, str] = COMPACT,
    ensure_ascii: bool = True,
    default: Optional[Any] = None,
) -> str:
    return json.JSONEncoder(separators=separators, ensure_ascii=ensure_ascii, default=default).encode(value)


class EncoderTests(SynchronousTestCase):
    @given(_values)
    def test_same_text_ascii(self, value: Any) -> None:
        """
        The text is the standard compact encoder's, escaping every
        non-ASCII character.
        """
        self.assertEqual(encoder()(value), standard(value))

    @given(_values)
    def test_same_text_unicode(self, value: Any) -> None:
        """
        With C{ensure_ascii=False}, non-ASCII characters are kept, as the
        standard encoder keeps them.
        """
        self.assertEqual(encoder(ensure_ascii=False)(value), standard(value, ensure_ascii=False))

    @given(_values)
    def test_same_text_spaced_default(self, value: Any) -> None:
        """
        Other separators and a C{default} for what JSON cannot hold: the
        standard encoder's text with the same options (a tool's result).
        """
        value = [value, Opaque(), {"at": Opaque()}]
        options: dict[str, Any] = dict(separators=(", ", ": "), ensure_ascii=False, default=str)
        self.assertEqual(encoder(**options)(value), standard(value, **options))

    def test_no_set_up_per_call(self) -> None:
        """
        A value that does not contain itself is encoded without
        C{JSONEncoder.iterencode} (the C encoder and the dict of
        containers it makes on every call).
        """
        encode = encoder()
        with mock.patch.object(json.JSONEncoder, "iterencode", side_effect=AssertionError("set up per call")):
            self.assertEqual(encode({"a": [1, "é", None]}), '{"a":[1,"\\u00e9",null]}')

    def test_shared_value(self) -> None:
        """
        A value met twice, which is not a cycle, is written twice.
        """
        shared = {"x": [1, 2]}
        value = {"a": shared, "b": [shared, shared]}
        self.assertEqual(encoder()(value), standard(value))

    def test_cycle(self) -> None:
        """
        A value that contains itself is refused with the standard
        encoder's C{ValueError}, and the encoder still works after it.
        """
        encode = encoder()
        cyclic: dict[str, Any] = {"a": 1}
        cyclic["self"] = [cyclic]
        with self.assertRaises(ValueError) as raised:
            encode(cyclic)
        self.assertIn("Circular reference", str(raised.exception))
        self.assertEqual(encode({"a": 1}), '{"a":1}')

    def test_default_returns_itself(self) -> None:
        """
        A C{default} that gives back what it was given is a cycle too, as
        the standard encoder says.
        """
        encode = encoder(default=lambda value: value)
        with self.assertRaises(ValueError) as raised:
            encode([Opaque()])
        self.assertIn("Circular reference", str(raised.exception))

    def test_not_serialisable(self) -> None:
        """
        What JSON cannot hold, without a C{default}, raises the standard
        C{TypeError}, and the next call is not affected.
        """
        encode = encoder()
        with self.assertRaises(TypeError):
            encode({"a": [object()]})
        self.assertEqual(encode([{"a": []}]), '[{"a":[]}]')


class UsersTests(SynchronousTestCase):
    """
    The JSON the server writes on every token request and every
    C{tools/call} goes through this module's encoders, not
    C{JSONEncoder.encode}.
    """

    def setUp(self) -> None:
        patcher = mock.patch.object(
            json.JSONEncoder, "iterencode", side_effect=AssertionError("set up per call")
        )
        patcher.start()
        self.addCleanup(patcher.stop)

    def test_jsonrpc_message(self) -> None:
        from smeldr_oauth.mcp import jsonrpc

        message = jsonrpc.result_response(1, {"content": [{"type": "text", "text": "é"}]})
        self.assertEqual(
            jsonrpc.encode(message),
            '{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"é"}]}}'.encode(),
        )

    def test_token_response(self) -> None:
        from twisted.web.test.requesthelper import DummyRequest

        from smeldr_oauth.web.responses import json_response

        self.assertEqual(
            json_response(DummyRequest([b""]), {"token_type": "Bearer", "expires_in": 60}),
            b'{"token_type":"Bearer","expires_in":60}',
        )

    def test_tool_text(self) -> None:
        from smeldr_oauth.mcp import results

        tool = mock.Mock(structured=False)
        answer = results.tool_result(tool, {"posts": [], "at": Opaque()}, "2025-06-18")
        self.assertEqual(answer["content"], [{"type": "text", "text": '{"posts": [], "at": "opaque ✓"}'}])
