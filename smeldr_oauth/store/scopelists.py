# -*- test-case-name: tests.test_store_sqlite,tests.test_store_postgres -*-
"""
Scope lists as the SQL store keeps them: JSON arrays in C{TEXT}.

They repeat: a server sees a handful of distinct ones, and each refresh
encodes two and decodes two (a JSON round trip costs about 2 us).  Tuples
and the text are immutable, so remembering them is safe.
"""

from __future__ import annotations

import functools
import json
from typing import Sequence


@functools.lru_cache(maxsize=256)
def _dump_tuple(values: tuple[str, ...]) -> str:
    return json.dumps(list(values))


def dump(values: Sequence[str]) -> str:
    if isinstance(values, tuple):
        return _dump_tuple(values)
    return json.dumps(list(values))


@functools.lru_cache(maxsize=256)
def load(text: str) -> tuple[str, ...]:
    return tuple(json.loads(text))
