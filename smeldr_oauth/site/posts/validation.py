# -*- test-case-name: tests.test_site_posts -*-
"""
Validation of a post's fields and of pagination cursors: plain functions of
plain values, raising L{ValidationError} with the argument's name.
"""

from __future__ import annotations

import base64
import binascii
import re
import unicodedata

from smeldr_oauth.site.posts.model import (
    MAX_BODY,
    MAX_LIMIT,
    MAX_SLUG,
    MAX_TAG,
    MAX_TAGS,
    MAX_TITLE,
    STATUSES,
    InvalidCursor,
    ValidationError,
)

_SLUG = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*\Z")
_TAG = _SLUG
# Control characters other than tab/newline/carriage return.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# Lone surrogates: JSON lets a client send one ("\\ud800"), but it has no
# UTF-8, so SQLite could not store it (the write failed with a traceback).
_SURROGATE = re.compile("[\ud800-\udfff]")


def validate_slug(value: object, field: str = "slug") -> str:
    if not isinstance(value, str):
        raise ValidationError(field, "must be a string")
    if len(value) > MAX_SLUG:
        raise ValidationError(field, f"must be at most {MAX_SLUG} characters")
    if not _SLUG.match(value):
        raise ValidationError(
            field,
            "must be lowercase letters, digits and single hyphens (e.g. 'my-first-post')",
        )
    return value


def slugify(title: str) -> str:
    """
    A slug made from a title: accents folded to ASCII, runs of anything else
    turned into one hyphen, cut at a hyphen within L{MAX_SLUG}.  A title with
    nothing ASCII-foldable gives C{"post"}.
    """
    folded = (
        unicodedata.normalize("NFKD", title).encode("ascii", "ignore").decode("ascii")
    )
    slug = re.sub(r"[^a-z0-9]+", "-", folded.lower()).strip("-")
    if len(slug) > MAX_SLUG:
        slug = (
            slug[:MAX_SLUG].rsplit("-", 1)[0]
            if "-" in slug[:MAX_SLUG]
            else slug[:MAX_SLUG]
        )
        slug = slug.strip("-")
    return slug or "post"


def one_line(value: object, field: str, maximum: int, tab: bool = True) -> str:
    """
    A non-empty line of text (a title, a name), trimmed: at most C{maximum}
    characters, no line break, no control character (a tab only if C{tab}).
    """
    if not isinstance(value, str):
        raise ValidationError(field, "must be a string")
    value = value.strip()
    if not value:
        raise ValidationError(field, "must not be empty")
    if len(value) > maximum:
        raise ValidationError(field, f"must be at most {maximum} characters")
    if "\n" in value or "\r" in value or (not tab and "\t" in value) or _CONTROL.search(value):
        raise ValidationError(field, "must be one line without control characters")
    if _SURROGATE.search(value):
        raise ValidationError(field, "must not contain lone surrogates")
    return value


def validate_title(value: object) -> str:
    return one_line(value, "title", MAX_TITLE)


def validate_body(value: object) -> str:
    if not isinstance(value, str):
        raise ValidationError("body", "must be a string")
    if len(value) > MAX_BODY:
        raise ValidationError("body", f"must be at most {MAX_BODY} characters")
    if _CONTROL.search(value):
        raise ValidationError("body", "must not contain control characters")
    if _SURROGATE.search(value):
        raise ValidationError("body", "must not contain lone surrogates")
    return value


def validate_tag(value: object, field: str = "tag") -> str:
    if not isinstance(value, str):
        raise ValidationError(field, "must be a string")
    tag = value.strip().lower()
    if len(tag) > MAX_TAG or not _TAG.match(tag):
        raise ValidationError(
            field,
            f"{value[:MAX_TAG]!r} must be lowercase letters, digits and hyphens, at most {MAX_TAG}",
        )
    return tag


def validate_tags(value: object) -> tuple[str, ...]:
    """
    Tags, lowercased, de-duplicated, in the order given.
    """
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise ValidationError("tags", "must be a list of strings")
    tags: list[str] = []
    for item in value:
        tag = validate_tag(item, "tags")
        if tag not in tags:
            tags.append(tag)
    if len(tags) > MAX_TAGS:
        raise ValidationError("tags", f"at most {MAX_TAGS} tags")
    return tuple(tags)


def validate_status(value: object) -> str:
    if value not in STATUSES:
        raise ValidationError("status", "must be 'draft' or 'published'")
    assert isinstance(value, str)
    return value


def validate_limit(value: object, default: int = 20) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError("limit", "must be an integer")
    if not 1 <= value <= MAX_LIMIT:
        raise ValidationError("limit", f"must be between 1 and {MAX_LIMIT}")
    return value


def encode_cursor(post_id: int) -> str:
    return base64.urlsafe_b64encode(f"p1:{post_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: object) -> int:
    if not isinstance(cursor, str) or len(cursor) > 64:
        raise InvalidCursor("cursor", "is not a cursor from a previous page")
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode(
            "ascii"
        )
    except (binascii.Error, ValueError):
        raise InvalidCursor("cursor", "is not a cursor from a previous page")
    prefix, _, number = raw.partition(":")
    if prefix != "p1" or not number.isdigit() or len(number) > 18:
        raise InvalidCursor("cursor", "is not a cursor from a previous page")
    return int(number)
