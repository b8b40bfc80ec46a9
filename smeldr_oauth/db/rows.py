# -*- test-case-name: tests.test_db_rows -*-
"""
Rows to records and filters to SQL: the two things every store over
L{smeldr_oauth.db.database} writes around its queries (the OAuth store, the
site's tokens and posts, the flow timeline), written once.

A table's columns are named like its record's fields, so a row maps to a
record field by field; only the columns whose type SQL does not keep
(JSON-encoded tuples, SQLite's integer booleans) are converted by the
caller.  The filter builder keeps the optional conditions of a listing
query (a subject, a tag, a cursor) and their parameters in step.
"""

from __future__ import annotations

from typing import Any, Optional, TypeVar, Union

import attr

T = TypeVar("T")

_names: dict[type, tuple[str, ...]] = {}


def from_row(record: type[T], row: Any, **converted: Any) -> T:
    """
    An attrs C{record} from a database row whose columns bear its fields'
    names (a C{sqlite3.Row}, a psycopg dict row, any mapping).

    @param converted: the fields the row does not hold as such, already
        converted (C{scopes=tuple(json.loads(row["scopes"]))}).
    """
    names = _names.get(record)
    if names is None:
        names = _names[record] = tuple(field.name for field in attr.fields(record))  # type: ignore[arg-type]
    values = {name: row[name] for name in names if name not in converted}
    values.update(converted)
    return record(**values)


def where(*conditions: Union[str, tuple[str, Optional[object]]]) -> tuple[str, list[object]]:
    """
    A C{WHERE} clause and its parameters.

    @param conditions: each either SQL that always applies
        (C{"revoked_at IS NULL"}) or a pair of SQL with one placeholder and
        its value, which applies only when the value is not C{None}
        (C{("subject = ?", subject)}).
    @return: C{(" WHERE a AND b = ?", [value])}, or C{("", [])} when no
        condition applies.
    """
    sql: list[str] = []
    params: list[object] = []
    for condition in conditions:
        if isinstance(condition, str):
            sql.append(condition)
        elif condition[1] is not None:
            sql.append(condition[0])
            params.append(condition[1])
    return (" WHERE " + " AND ".join(sql) if sql else ""), params
