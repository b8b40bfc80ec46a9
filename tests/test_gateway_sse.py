"""
Tests for L{smeldr_oauth.gateway.sse}: the incremental event-stream decoder.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from smeldr_oauth.gateway.sse import Event, SSEDecoder, SSETooLarge


def decode(chunks: list[bytes], limit: int = 1 << 20) -> list[Event]:
    decoder = SSEDecoder(limit)
    events: list[Event] = []
    for chunk in chunks:
        events.extend(decoder.feed(chunk))
    return events


class DecoderTests(SynchronousTestCase):
    def test_fields(self) -> None:
        stream = b": comment\nevent: endpoint\ndata: /messages?x=1\n\nid: 7\ndata: {\"a\":\ndata:1}\nretry: 2500\n\n"
        decoder = SSEDecoder()
        self.assertEqual(
            decoder.feed(stream),
            [Event("/messages?x=1", "endpoint", None), Event('{"a":\n1}', "message", "7")],
        )
        self.assertEqual((decoder.last_event_id, decoder.retry), ("7", 2500))

    def test_line_endings(self) -> None:
        for sep in (b"\n", b"\r", b"\r\n"):
            self.assertEqual(decode([b"data: x" + sep + sep]), [Event("x")])

    def test_crlf_split_across_chunks(self) -> None:
        self.assertEqual(decode([b"data: a\r", b"\n\r", b"\ndata: b\r\n\r\n"]), [Event("a"), Event("b")])

    def test_bom_and_no_space(self) -> None:
        self.assertEqual(decode([b"\xef\xbb", b"\xbfdata:x\n\n"]), [Event("x")])

    def test_id_only_event_is_not_dispatched(self) -> None:
        decoder = SSEDecoder()
        self.assertEqual(decoder.feed(b"id: 42\n\n"), [])
        self.assertEqual(decoder.last_event_id, "42")
        self.assertEqual(decoder.feed(b"data:\n\n"), [Event("", "message", "42")])

    def test_limits(self) -> None:
        self.assertRaises(SSETooLarge, decode, [b"data: " + b"x" * 50 + b"\n"], 40)
        self.assertRaises(SSETooLarge, decode, [b"data: " + b"x" * 30 + b"\n", b"data: " + b"y" * 30 + b"\n"], 40)
        self.assertRaises(SSETooLarge, decode, [b"x" * 30, b"y" * 30], 40)

    @settings(deadline=None)  # no timing in tests: a loaded CI box is slow
    @given(
        st.lists(st.tuples(st.sampled_from(["message", "endpoint"]), st.text(alphabet=st.characters(blacklist_characters="\r\n", blacklist_categories=["Cs"]), max_size=30)), max_size=8),
        st.lists(st.integers(min_value=1, max_value=7), min_size=1, max_size=20),
    )
    def test_chunking_does_not_matter(self, events: list, cuts: list) -> None:
        """However the bytes are cut, the same events come out."""
        wire = b"".join(f"event: {kind}\ndata: {data}\n\n".encode() for kind, data in events)
        chunks, position = [], 0
        for cut in cuts * (len(wire) // max(1, sum(cuts)) + 1):
            chunks.append(wire[position : position + cut])
            position += cut
            if position >= len(wire):
                break
        chunks.append(wire[position:])
        self.assertEqual(decode(chunks), [Event(data, kind) for kind, data in events])

    @settings(deadline=None)  # no timing in tests: a loaded CI box is slow
    @given(st.binary(max_size=300))
    def test_any_bytes(self, data: bytes) -> None:
        """Garbage never raises anything but the size error."""
        try:
            decode([data], 200)
        except SSETooLarge:
            pass
