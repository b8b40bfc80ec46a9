"""Tests for L{smeldr_oauth.mcp.jsonrpc}: frame parsing and error building."""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase

from smeldr_oauth.mcp import jsonrpc


class ParseTests(SynchronousTestCase):
    def test_kinds(self) -> None:
        _, [req, note, resp, err] = jsonrpc.parse_frame(
            b'[{"jsonrpc":"2.0","id":"a","method":"m"},{"jsonrpc":"2.0","method":"n","params":null},'
            b'{"jsonrpc":"2.0","id":3,"result":{}},{"jsonrpc":"2.0","id":4,"error":{"code":1,"message":"x"}}]'
        )
        self.assertEqual(req, jsonrpc.Request("a", "m", {}))
        self.assertEqual(note, jsonrpc.Notification("n", {}))
        self.assertEqual(resp, jsonrpc.Response(3, {}, None))
        self.assertEqual(err.error, {"code": 1, "message": "x"})

    def test_invalid_members_keep_their_id(self) -> None:
        _, [bad] = jsonrpc.parse_frame(b'{"jsonrpc":"2.0","id":5,"method":"m","params":"x"}')
        self.assertIsInstance(bad, jsonrpc.Invalid)
        self.assertEqual((bad.id, bad.error.code), (5, jsonrpc.INVALID_PARAMS))

    def test_not_json(self) -> None:
        for body in (b"", b"{", b"\xff", b'{"a": NaN}', b"[" * 100000):
            with self.assertRaises(jsonrpc.JSONRPCError) as caught:
                jsonrpc.parse_frame(body)
            self.assertEqual(caught.exception.code, jsonrpc.PARSE_ERROR)

    def test_long_method_name_truncated_in_error(self) -> None:
        error = jsonrpc.method_not_found("x" * 10000)
        self.assertEqual(len(error.data["method"]), 200)

    def test_encode_lone_surrogate(self) -> None:
        """
        A lone surrogate (a client's C{"\\ud800"}, echoed by a tool) has
        no UTF-8: it is sent escaped, as valid JSON that reads back the
        same, never an exception (which left the request unanswered).
        """
        message = {"jsonrpc": "2.0", "id": 1, "result": {"text": "a\ud800b", "ok": "\u00e9"}}
        data = jsonrpc.encode(message)
        self.assertEqual(json.loads(data.decode("utf-8")), message)
        self.assertNotIn(b"\n", data)
        # Text that has UTF-8 is sent as UTF-8, not escaped.
        self.assertEqual(jsonrpc.encode({"t": "\u00e9"}), '{"t":"\u00e9"}'.encode("utf-8"))

    def test_encode_is_one_line(self) -> None:
        self.assertEqual(jsonrpc.encode({"a": "b\nc"}), b'{"a":"b\\nc"}')
