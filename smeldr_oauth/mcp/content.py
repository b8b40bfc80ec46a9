# -*- test-case-name: tests.test_mcp_results -*-
"""
The content records a tool may return: text, images, audio, embedded
resources and resource links, each knowing its own JSON shape.

They are values (frozen attrs records) so a tool can build them once and
return them many times.  How a record is shown to a client that predates
it (a C{resource_link} for a 2025-03-26 client) is not decided here but in
L{smeldr_oauth.mcp.results}, the one place that shapes results per
protocol version.
"""

from __future__ import annotations

import base64
from typing import Any, ClassVar, Optional, Union

import attr

JSONValue = Any


def b64(data: Union[bytes, str]) -> str:
    """Raw bytes as base64 text; text is taken to be base64 already."""
    if isinstance(data, bytes):
        return base64.b64encode(data).decode("ascii")
    return data


def _common(body: dict[str, JSONValue], annotations: Optional[dict], meta: Optional[dict]) -> dict:
    if annotations:
        body["annotations"] = annotations
    if meta:
        body["_meta"] = meta
    return body


@attr.s(frozen=True, auto_attribs=True)
class TextContent:
    text: str
    annotations: Optional[dict] = None
    meta: Optional[dict] = None

    def as_json(self) -> dict[str, JSONValue]:
        return _common({"type": "text", "text": self.text}, self.annotations, self.meta)


@attr.s(frozen=True, auto_attribs=True)
class _Media:
    """Binary content with a MIME type; C{data} is raw bytes or already-base64 text."""

    data: Union[bytes, str]
    mime_type: str
    annotations: Optional[dict] = None
    meta: Optional[dict] = None
    _kind: ClassVar[str] = ""

    def as_json(self) -> dict[str, JSONValue]:
        return _common(
            {"type": self._kind, "data": b64(self.data), "mimeType": self.mime_type},
            self.annotations,
            self.meta,
        )


@attr.s(frozen=True, auto_attribs=True)
class ImageContent(_Media):
    """An image; C{data} is raw bytes or already-base64 text."""

    _kind: ClassVar[str] = "image"


@attr.s(frozen=True, auto_attribs=True)
class AudioContent(_Media):
    """Audio; C{data} is raw bytes or already-base64 text."""

    _kind: ClassVar[str] = "audio"


@attr.s(frozen=True, auto_attribs=True)
class EmbeddedResource:
    """The contents of a resource, inline: C{text} or C{blob} (bytes)."""

    uri: str
    mime_type: Optional[str] = None
    text: Optional[str] = None
    blob: Optional[bytes] = None
    annotations: Optional[dict] = None
    meta: Optional[dict] = None

    def as_json(self) -> dict[str, JSONValue]:
        resource: dict[str, JSONValue] = {"uri": self.uri}
        if self.mime_type:
            resource["mimeType"] = self.mime_type
        if self.blob is not None:
            resource["blob"] = b64(self.blob)
        else:
            resource["text"] = self.text or ""
        return _common({"type": "resource", "resource": resource}, self.annotations, self.meta)


@attr.s(frozen=True, auto_attribs=True)
class ResourceLink:
    """A pointer to a resource the client may read later."""

    uri: str
    name: str
    title: Optional[str] = None
    description: Optional[str] = None
    mime_type: Optional[str] = None
    size: Optional[int] = None
    annotations: Optional[dict] = None
    meta: Optional[dict] = None

    def as_json(self) -> dict[str, JSONValue]:
        body: dict[str, JSONValue] = {"type": "resource_link", "uri": self.uri, "name": self.name}
        for key, value in (
            ("title", self.title),
            ("description", self.description),
            ("mimeType", self.mime_type),
            ("size", self.size),
        ):
            if value is not None:
                body[key] = value
        return _common(body, self.annotations, self.meta)


Content = Union[TextContent, ImageContent, AudioContent, EmbeddedResource, ResourceLink]
CONTENT_TYPES = (TextContent, ImageContent, AudioContent, EmbeddedResource, ResourceLink)
